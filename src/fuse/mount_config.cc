// Command-line parsing for the mount (see mount_config.h).
#include "fuse/mount_config.h"

#include <string_view>

#include "crypto/secrets.h"
#include "engine/serve.h"
#include "vimgfs/image.h"

namespace vimgfs::mount {
namespace {

// mount(8) options that make no sense to the FUSE kernel module or libfuse; mount.fuse3
// drops most of them itself, a direct `vimgfs IMG MNT -o ...` from fstab-minded users may
// still carry them.
bool IsIgnoredMountOption(std::string_view o) {
  static constexpr std::string_view kIgnored[] = {
      "defaults", "auto",  "noauto", "user",    "nouser", "users",
      "owner",    "group", "nofail", "_netdev", "loop",   "nonempty",
  };
  for (auto i : kIgnored)
    if (o == i) return true;
  return o.starts_with("x-") || o.starts_with("comment=") || o.starts_with("helper=");
}

Status ApplyOption(MountConfig& c, std::string_view o) {
  auto value_of = [&](std::string_view key) -> std::optional<std::string> {
    if (o.starts_with(key) && o.size() > key.size() && o[key.size()] == '=')
      return std::string(o.substr(key.size() + 1));
    return std::nullopt;
  };
  if (o.empty() || IsIgnoredMountOption(o)) return Status::Ok();
  if (o == "ro") {
    c.read_only = true;
    return Status::Ok();
  }
  if (o == "rw") {
    c.read_only = false;
    return Status::Ok();
  }
  if (o == "untrusted") {
    c.untrusted = true;
    return Status::Ok();
  }
  if (o == "nopartitions" || o == "partitions") {
    c.partitions = o == "partitions";
    return Status::Ok();
  }
  if (o == "writeback_cache" || o == "nowriteback_cache") {
    c.writeback_cache = o == "writeback_cache";
    return Status::Ok();
  }
  if (o == "debug") {
    c.debug = true;
    return Status::Ok();
  }
  if (auto v = value_of("format")) {
    c.format = *v;
    return Status::Ok();
  }
  if (auto v = value_of("overlay")) {
    c.overlay = *v;
    return Status::Ok();
  }
  if (auto v = value_of("key_secret")) {
    c.key_secret = *v;
    return Status::Ok();
  }
  if (auto v = value_of("snapshot")) {
    c.snapshot = *v;
    return Status::Ok();
  }
  if (auto v = value_of("detect_zeroes")) {
    if (*v == "on" || *v == "unmap")
      c.detect_zeroes = true;
    else if (*v == "off")
      c.detect_zeroes = false;
    else
      return Status::InvalidArgument("invalid detect_zeroes value '{}' (on or off)", *v);
    return Status::Ok();
  }
  if (auto v = value_of("cache")) {
    ASSIGN_OR_RETURN(c.direct_io, DirectIoForCacheMode(*v));
    return Status::Ok();
  }
  if (auto v = value_of("cache_size")) {
    auto size = ParseSize(*v);
    if (!size.ok()) return Status::InvalidArgument("invalid cache_size '{}'", *v);
    c.cache_bytes = *size;
    return Status::Ok();
  }
  if (o == "fd" || o.starts_with("fd=")) return Status::InvalidArgument("unsupported mount option '{}'", o);
  c.fuse_options.emplace_back(o);  // allow_other, fsname=, dev, suid, noatime, ...
  return Status::Ok();
}

Status ApplyOptionList(MountConfig& c, std::string_view list) {
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string_view::npos) comma = list.size();
    RETURN_IF_ERROR(ApplyOption(c, list.substr(start, comma - start)));
    start = comma + 1;
  }
  return Status::Ok();
}

}  // namespace

Result<MountConfig> ParseMountArgs(int argc, char** argv) {
  MountConfig c;
  std::vector<std::string> positional;
  bool only_positional = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&](std::string_view opt) -> Result<std::string> {
      if (i + 1 >= argc) return Status::InvalidArgument("option '{}' needs an argument", opt);
      return std::string(argv[++i]);
    };
    auto long_value = [&](std::string_view name, std::string* out) -> Result<bool> {
      if (a == name) {
        ASSIGN_OR_RETURN(*out, next(name));
        return true;
      }
      if (a.starts_with(name) && a.size() > name.size() && a[name.size()] == '=') {
        *out = std::string(a.substr(name.size() + 1));
        return true;
      }
      return false;
    };
    if (only_positional || a.empty() || a[0] != '-' || a == "-") {
      positional.emplace_back(a);
      continue;
    }
    if (a == "--") {
      only_positional = true;
      continue;
    }
    if (a == "-h" || a == "--help") {
      c.help = true;
      continue;
    }
    if (a == "-V" || a == "--version") {
      c.version = true;
      continue;
    }
    if (a == "--read-only") {
      c.read_only = true;
      continue;
    }
    if (a == "--untrusted") {
      c.untrusted = true;
      continue;
    }
    if (a == "--no-partitions") {
      c.partitions = false;
      continue;
    }
    if (a == "--foreground") {
      c.foreground = true;
      continue;
    }
    if (a == "--debug") {
      c.debug = true;
      continue;
    }
    if (a == "--single-threaded") {
      c.single_threaded = true;
      continue;
    }
    if (a == "--image-opts") {
      c.image_opts = true;
      continue;
    }
    std::string v;
    ASSIGN_OR_RETURN(bool hit, long_value("--overlay", &c.overlay));
    if (hit) continue;
    ASSIGN_OR_RETURN(hit, long_value("--snapshot", &c.snapshot));
    if (hit) continue;
    ASSIGN_OR_RETURN(hit, long_value("--format", &c.format));
    if (hit) continue;
    ASSIGN_OR_RETURN(hit, long_value("--key-secret", &c.key_secret));
    if (hit) continue;
    ASSIGN_OR_RETURN(hit, long_value("--object", &v));
    if (hit) {
      c.objects.push_back(v);
      // The daemon runs for long: its command line must not show a secret's value.
      crypto::ScrubSecretData(argv[i]);
      continue;
    }
    ASSIGN_OR_RETURN(hit, long_value("--options", &v));
    if (hit) {
      RETURN_IF_ERROR(ApplyOptionList(c, v));
      continue;
    }
    if (a.starts_with("--")) return Status::InvalidArgument("unknown option '{}'", a);
    // Short options; flags may be bundled (-fd), -o/-F take the rest or the next arg.
    for (size_t k = 1; k < a.size(); ++k) {
      char ch = a[k];
      if (ch == 'o' || ch == 'F') {
        std::string arg;
        if (k + 1 < a.size()) {
          arg = std::string(a.substr(k + 1));
        } else {
          ASSIGN_OR_RETURN(arg, next(std::string("-") + ch));
        }
        if (ch == 'o')
          RETURN_IF_ERROR(ApplyOptionList(c, arg));
        else
          c.format = arg;
        break;
      }
      switch (ch) {
        case 'r':
          c.read_only = true;
          break;
        case 'f':
          c.foreground = true;
          break;
        case 'd':
          c.debug = true;
          break;
        case 's':
          c.single_threaded = true;
          break;
        case 'h':
          c.help = true;
          break;
        case 'n':
          break;  // mount(8) "no mtab" passed by some helpers
        default:
          return Status::InvalidArgument("unknown option '-{}'", ch);
      }
    }
  }
  if (c.help || c.version) return c;
  if (positional.size() != 2) {
    if (positional.size() < 2)
      return Status::InvalidArgument("expecting an image file name and a mount point");
    return Status::InvalidArgument("too many arguments: expecting IMAGE MOUNTPOINT");
  }
  c.image = positional[0];
  c.mountpoint = positional[1];
  if (c.debug) c.foreground = true;
  if (!c.snapshot.empty() && !c.overlay.empty())
    return Status::InvalidArgument("--snapshot and --overlay cannot be combined");
  return c;
}

std::string MountUsage(const std::string& prog) {
  return fmt::format(
      "Usage: {0} [options] IMAGE MOUNTPOINT\n"
      "       {0} mount [options] IMAGE MOUNTPOINT\n"
      "\n"
      "Mounts a disk image (qcow2, vmdk, vdi, vpc, vhdx, qed, qcow, parallels, raw; bochs,\n"
      "cloop read-only) as one raw file. A directory MOUNTPOINT shows the file disk.raw and\n"
      "one file per partition of the guest's MBR or GPT (p1, p2, ... by partition number),\n"
      "each exactly its byte range of the disk; a regular-file MOUNTPOINT becomes the raw\n"
      "view itself.\n"
      "The daemon goes to the background once the mount is ready. Unmount with\n"
      "'fusermount3 -u MOUNTPOINT' or 'umount MOUNTPOINT': the image is flushed, marked\n"
      "clean and closed. The image is locked like qemu locks it while mounted.\n"
      "A dmg (Apple disk image, read-only) mounts with -r or --overlay.\n"
      "\n"
      "Options:\n"
      "  -r, --read-only       mount read-only (also: -o ro)\n"
      "  -F, --format FMT      image format (qcow2, vmdk, vdi, vpc, vhdx, qed, qcow, parallels,\n"
      "                        bochs, cloop, dmg, raw); probed if absent (bochs, cloop and\n"
      "                        dmg: read-only, mount with -r)\n"
      "      --overlay FILE    send writes to the qcow2 FILE backed by IMAGE (created if\n"
      "                        absent); IMAGE is opened read-only and never changes\n"
      "      --snapshot NAME   read-only view of the qcow2 internal snapshot NAME\n"
      "      --untrusted       open no backing file, data file or extent the image names\n"
      "      --object secret,id=ID,data=PASS|file=PATH[,format=base64]\n"
      "                        a passphrase for --key-secret (hidden from ps once read)\n"
      "      --key-secret ID   unlock an encrypted image (luks) with secret ID\n"
      "      --image-opts      IMAGE is a key=value list, as qemu-img takes it:\n"
      "                        driver=qcow2,file.filename=F[,key-secret=ID][,backing.*]\n"
      "                        (a json:{{...}} IMAGE is taken with or without it)\n"
      "      --no-partitions   show disk.raw only, no partition files\n"
      "  -f                    stay in the foreground\n"
      "  -d                    FUSE debug output (implies -f)\n"
      "  -s                    single-threaded\n"
      "  -o OPT[,OPT...]       mount options, ours and FUSE's mixed:\n"
      "      ro, rw              read-only / read-write (default when IMAGE is writable)\n"
      "      format=FMT          as -F\n"
      "      overlay=FILE        as --overlay\n"
      "      snapshot=NAME       as --snapshot\n"
      "      untrusted           as --untrusted\n"
      "      key_secret=ID       as --key-secret\n"
      "      nopartitions        as --no-partitions\n"
      "      nowriteback_cache   write buffered writes through to the image at once\n"
      "                          instead of caching them in the kernel until fsync,\n"
      "                          close or the kernel's writeback (default: cached)\n"
      "      detect_zeroes=on|off  write all-zero clusters as zero clusters (default on)\n"
      "      cache=none          read and write the image files around the host's page\n"
      "                          cache (O_DIRECT), as qemu's cache=none: the data is\n"
      "                          cached once, in disk.raw's pages, not twice\n"
      "      cache=writeback     through the host's page cache (the default)\n"
      "      cache_size=SIZE     metadata cache per image (default 32M)\n"
      "      allow_other, default_permissions, fsname=NAME, ... are passed to FUSE;\n"
      "      mount(8) options such as defaults, noauto, nofail, _netdev are ignored\n"
      "  -h, --help            this text\n"
      "\n"
      "Options may come before or after IMAGE MOUNTPOINT, so these work:\n"
      "  {0} disk.qcow2 /mnt/img -o ro\n"
      "  mount -t fuse.vimgfs disk.qcow2 /mnt/img -o ro,format=qcow2\n"
      "  /etc/fstab: /img/a.qcow2 /mnt/img fuse.vimgfs ro,format=qcow2 0 0\n",
      prog);
}

}  // namespace vimgfs::mount

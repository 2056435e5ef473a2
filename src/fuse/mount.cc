// The mount's life cycle (see mount.h).
//
// Order matters:
//  1. open the image (or create/reuse the overlay) and take qemu-compatible locks on every
//     file of the chain; any error is printed and exits 1 while still in the foreground;
//  2. fuse_session_mount: the mount point now exists;
//  3. fuse_daemonize: the parent exits 0 only now, so `vimgfs IMG MNT && cat MNT/disk.raw`
//     works. OFD locks belong to the open file description and survive the fork;
//  4. serve until unmount or SIGINT/SIGTERM/SIGHUP (fuse_set_signal_handlers);
//  5. unmount, Image::Close() (flush + clear the dirty flag), exit 0.
#include "fuse/mount.h"

#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "engine/image_lock.h"
#include "fuse/server.h"
#include "vimgfs/image.h"

namespace vimgfs::mount {
namespace {

namespace fs = std::filesystem;

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

OpenOptions BaseOptions(const MountConfig& c) {
  OpenOptions o;
  o.format = c.format;
  o.untrusted = c.untrusted;
  if (c.cache_bytes) o.cache_bytes = *c.cache_bytes;
  return o;
}

// The name the overlay stores for its backing image: relative to the overlay's folder when
// the image lies inside that folder tree, absolute otherwise.
std::string BackingName(const std::string& image, const std::string& overlay) {
  std::error_code ec;
  fs::path img = fs::weakly_canonical(fs::absolute(image), ec);
  if (ec) return image;
  fs::path dir = fs::weakly_canonical(fs::absolute(overlay).parent_path(), ec);
  if (ec) return img.string();
  fs::path rel = img.lexically_relative(dir);
  if (!rel.empty() && *rel.begin() != "..") return rel.string();
  return img.string();
}

Result<std::unique_ptr<Image>> OpenOverlay(const MountConfig& c) {
  ASSIGN_OR_RETURN(FileStat st, Env::Default()->Stat(c.overlay));
  if (!st.exists) {
    if (c.read_only)
      return Status::NotFound("'{}': overlay does not exist (and -r forbids creating it)", c.overlay);
    OpenOptions io = BaseOptions(c);
    io.read_only = true;
    ASSIGN_OR_RETURN(auto base, Image::Open(c.image, io));
    CreateContext ctx;
    ctx.env = Env::Default();
    ctx.path = c.overlay;
    ctx.size = base->size();
    ctx.backing = BackingRef{BackingName(c.image, c.overlay), base->format()};
    base.reset();
    RETURN_IF_ERROR(Image::Create("qcow2", ctx).WithContext("creating overlay '{}'", c.overlay));
  } else if (!st.regular) {
    return Status::InvalidArgument("'{}': overlay is not a regular file", c.overlay);
  }
  OpenOptions oo = BaseOptions(c);
  oo.format = "qcow2";
  oo.read_only = c.read_only;
  auto overlay = Image::Open(c.overlay, oo);
  if (!overlay.ok()) {
    if (overlay.error().kind() == ErrorKind::kInvalidFormat)
      return Status::InvalidArgument(
          "'{}' exists and is not a qcow2 image backed by '{}'; "
          "refusing to use it as the overlay",
          c.overlay, c.image);
    return overlay.error();
  }
  Image* backing = (*overlay)->backing();
  if (backing == nullptr || !SameFile(backing->path(), c.image)) {
    return Status::InvalidArgument(
        "'{}' exists but its backing file is not '{}'; refusing "
        "to use it as the overlay",
        c.overlay, c.image);
  }
  return std::move(*overlay);
}

Result<std::unique_ptr<Image>> OpenImage(const MountConfig& c) {
  if (!c.overlay.empty()) return OpenOverlay(c);
  OpenOptions o = BaseOptions(c);
  o.snapshot = c.snapshot;
  o.read_only = c.read_only || !c.snapshot.empty();
  if (!o.read_only && ::access(c.image.c_str(), W_OK) != 0 && errno != ENOENT) {
    std::fprintf(stderr, "vimgfs: '%s' is not writable: mounting read-only\n", c.image.c_str());
    o.read_only = true;
  }
  auto opened = Image::Open(c.image, o);
  // The format can't write this image (VMDK streamOptimized, read-only extents) or any
  // image (bochs, cloop, dmg): say so now rather than fail every write with EROFS after the mount.
  const auto cannot_write = [&](const std::string& format) {
    return Status::ReadOnly(
        "'{}' ({}) cannot be written in place: mount it with -r, write to an overlay with "
        "--overlay FILE, or convert it (vimgfs convert -O qcow2)",
        c.image, format);
  };
  if (!opened.ok() && !o.read_only && IsReadOnlyFormat(opened.error())) {
    if (!c.format.empty()) return cannot_write(c.format);
    auto probed = Image::Probe(*Env::Default(), c.image);
    return cannot_write(probed.ok() ? *probed : "read-only format");
  }
  ASSIGN_OR_RETURN(auto img, std::move(opened));
  if (!o.read_only && img->read_only()) return cannot_write(img->format());
  return img;
}

std::string FuseOptionString(const MountConfig& c, const std::string& image, bool read_only) {
  bool has_fsname = false, has_subtype = false;
  std::string out;
  for (const std::string& o : c.fuse_options) {
    has_fsname |= o.starts_with("fsname=");
    has_subtype |= o.starts_with("subtype=");
    if (!out.empty()) out += ',';
    out += o;
  }
  auto add = [&](const std::string& o) {
    if (!out.empty()) out += ',';
    out += o;
  };
  // libfuse splits -o at commas (a backslash escapes one); keep the name readable.
  std::string fsname;
  for (char ch : image) {
    if (ch == ',' || ch == '\\') fsname += '\\';
    fsname += ch;
  }
  if (!has_fsname) add("fsname=" + fsname);
  if (!has_subtype) add("subtype=vimgfs");
  add("default_permissions");
  if (read_only) add("ro");
  return out;
}

struct SessionDeleter {
  void operator()(fuse_session* se) const { fuse_session_destroy(se); }
};

// fuse_session_new rewrites the argument list into heap copies that the caller owns.
struct ArgsFreer {
  fuse_args* args;
  ~ArgsFreer() { fuse_opt_free_args(args); }
};

}  // namespace

int RunMount(const MountConfig& c) {
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "vimgfs: %s\n", msg.c_str());
    return 1;
  };
  struct stat mst {};
  if (::stat(c.mountpoint.c_str(), &mst) != 0)
    return fail(fmt::format("'{}': mount point does not exist", c.mountpoint));
  if (!S_ISDIR(mst.st_mode) && !S_ISREG(mst.st_mode))
    return fail(fmt::format("'{}': mount point must be a directory or a regular file", c.mountpoint));

  auto opened = OpenImage(c);
  if (!opened.ok()) return fail(opened.error().ToString());
  std::unique_ptr<Image> image = std::move(*opened);
  Status st = LockImageChain(*image);
  if (!st.ok()) return fail(st.ToString());

  ServerOptions so;
  so.read_only = image->read_only();
  so.detect_zeroes = c.detect_zeroes;
  so.root_is_file = S_ISREG(mst.st_mode);
  so.partitions = c.partitions;
  so.single_threaded = c.single_threaded;
  so.foreground = c.foreground;
  so.uid = ::getuid();
  so.gid = ::getgid();
  struct stat ist {};
  if (::stat(image->path().c_str(), &ist) == 0) {
    so.file_mode = ist.st_mode & 0666;
    so.time = ist.st_mtim;
  }
  if (so.read_only) so.file_mode &= ~0222u;
  Server server(image.get(), so);

  std::error_code ec;
  std::string abs_image = fs::absolute(c.image, ec).string();
  std::string opts = FuseOptionString(c, ec ? c.image : abs_image, so.read_only);
  std::vector<std::string> arg_strings = {"vimgfs", "-o", opts};
  if (c.debug) arg_strings.push_back("-d");
  std::vector<char*> argv;
  for (auto& a : arg_strings) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  ArgsFreer free_args{&args};

  std::unique_ptr<fuse_session, SessionDeleter> se(
      fuse_session_new(&args, &Server::Ops(), sizeof(fuse_lowlevel_ops), &server));
  if (!se) return fail(fmt::format("cannot start FUSE with options '{}'", opts));
  server.set_session(se.get());
  if (fuse_set_signal_handlers(se.get()) != 0) return fail("cannot install signal handlers");
  if (fuse_session_mount(se.get(), c.mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(se.get());
    return fail(fmt::format("cannot mount on '{}'", c.mountpoint));
  }
  if (!c.foreground) openlog("vimgfs", LOG_PID, LOG_DAEMON);
  // Only now does the parent exit: the mount is in place and the image locked.
  if (fuse_daemonize(c.foreground ? 1 : 0) != 0) {
    fuse_session_unmount(se.get());
    fuse_remove_signal_handlers(se.get());
    return fail("cannot go to the background");
  }

  int ret;
  if (c.single_threaded) {
    ret = fuse_session_loop(se.get());
  } else {
    fuse_loop_config* cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    ret = fuse_session_loop_mt(se.get(), cfg);
    fuse_loop_cfg_destroy(cfg);
  }
  fuse_session_unmount(se.get());
  fuse_remove_signal_handlers(se.get());
  se.reset();

  Status closed = image->Close();
  int code = 0;
  if (ret < 0) {  // >0: the signal that ended the loop, a clean stop
    server.Log(fmt::format("FUSE session failed: {}", std::strerror(-ret)));
    code = 1;
  }
  if (!closed.ok()) {
    server.Log(fmt::format("closing '{}' failed: {}", image->path(), closed.ToString()));
    code = 1;
  }
  return code;
}

}  // namespace vimgfs::mount

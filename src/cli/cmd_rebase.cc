// vimgfs rebase: qemu-img rebase (safe: copies what differs; -u: header only).
#include <getopt.h>

#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs rebase [-f fmt] [-u] [-p] [-q] [-U] -b backing_file [-F backing_fmt] [--untrusted]\n"
    "                     filename\n"
    "\n"
    "Changes the backing file of an image. Safe mode (default) first copies into the image\n"
    "every cluster it does not have whose content differs between the old and the new\n"
    "backing file, so the guest sees the same disk. -u only rewrites the reference.\n"
    "-b \"\" makes the image independent of any backing file.\n"
    "  -U, --force-share  open the image even while another process writes it (no lock)\n";

constexpr uint64_t kStep = 1 << 20;

// Reads [off, off+buf.size()) of img, zeros past its end (or everywhere when img is null).
Status ReadOrZero(Image* img, uint64_t off, std::span<std::byte> buf) {
  uint64_t have = 0;
  if (img && off < img->size()) {
    have = std::min<uint64_t>(buf.size(), img->size() - off);
    RETURN_IF_ERROR(img->Read(off, buf.first(have)));
  }
  std::memset(buf.data() + have, 0, buf.size() - have);
  return Status::Ok();
}

}  // namespace

int RunRebase(int argc, char** argv) {
  std::string fmt, backing, backing_fmt;
  bool have_b = false, unsafe = false, progress = false, quiet = false, untrusted = false;
  enum { kUntrusted = 256, kImageOpts, kObject };
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"untrusted", no_argument, nullptr, kUntrusted},
                                 {"image-opts", no_argument, nullptr, kImageOpts},
                                 {"object", required_argument, nullptr, kObject},
                                 {nullptr, 0, nullptr, 0}};
  bool force_share = false;
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, ":hf:F:b:upt:T:qUc", kLong, nullptr)) != -1) {
    switch (c) {
      case 'h': std::fputs(kUsage, stdout); return 0;
      case 'f': fmt = optarg; break;
      case 'F': backing_fmt = optarg; break;
      case 'b': backing = optarg; have_b = true; break;
      case 'u': unsafe = true; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 'U': force_share = true; break;
      case 't': case 'T': case 'c': case kObject: break;
      case kUntrusted: untrusted = true; break;
      case kImageOpts: PrintError("--image-opts is not supported"); return 1;
      case ':': return UsageError("rebase", fmt::format("option requires an argument -- '{}'", argv[optind - 1]));
      default: return UsageError("rebase", fmt::format("invalid option -- '{}'", argv[optind - 1]));
    }
  }
  if (quiet) progress = false;
  if (optind != argc - 1) return UsageError("rebase", "Expecting one image file name");
  if (!have_b) return UsageError("rebase", "Must specify backing file (-b)");
  std::string filename = argv[optind];
  if (!backing.empty() && backing_fmt.empty()) {
    PrintError(fmt::format("Could not change the backing file to '{}': backing format must be specified",
                           backing));
    return 1;
  }

  ImageOpen o;

  o.force_share = force_share;
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  o.open_backing = !unsafe;
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;

  if (!unsafe) {
    std::unique_ptr<Image> new_base;
    if (!backing.empty()) {
      ImageOpen bo;
      bo.force_share = force_share;
      bo.format = backing_fmt;
      bo.untrusted = untrusted;
      std::string path = PathCombine(filename, backing);
      auto b = OpenImage(path, bo);
      if (!b.ok()) {
        PrintError(fmt::format("Could not open new backing file '{}': {}", path,
                               OpenErrorMessage(path, b.error())));
        return 1;
      }
      new_base = std::move(b).value();
    }
    Image* old_base = img->backing();
    Progress bar(progress && StdoutIsTty());
    std::vector<std::byte> a(kStep), b(kStep);
    const uint64_t size = img->size();
    const uint64_t cluster = img->cluster_map().cluster_size();
    for (uint64_t pos = 0; pos < size; pos += kStep) {
      uint64_t n = std::min(kStep, size - pos);
      auto runs = img->Map(pos, n, true);
      if (!runs.ok()) {
        PrintFileError(filename, runs.error());
        return 1;
      }
      for (const BlockStatus& r : *runs) {
        if (r.depth == 0) continue;  // the image has it: unaffected by its backing file
        std::span<std::byte> sa(a.data(), r.length), sb(b.data(), r.length);
        Status s = ReadOrZero(old_base, r.offset, sa);
        if (!s.ok()) {
          PrintError(fmt::format("error while reading old backing file: {}", s.message()));
          return 1;
        }
        s = ReadOrZero(new_base.get(), r.offset, sb);
        if (!s.ok()) {
          PrintError(fmt::format("error while reading new backing file: {}", s.message()));
          return 1;
        }
        // Copy differing clusters (512-byte runs would split clusters for no gain).
        uint64_t unit = std::min<uint64_t>(cluster, r.length);
        for (uint64_t i = 0; i < r.length;) {
          uint64_t end = std::min(r.length, (r.offset + i) / unit * unit + unit - r.offset);
          if (std::memcmp(sa.data() + i, sb.data() + i, end - i) != 0) {
            s = img->Write(r.offset + i, sa.subspan(i, end - i));
            if (!s.ok()) {
              PrintError(fmt::format("error while writing to COW image: {}", s.message()));
              return 1;
            }
          }
          i = end;
        }
      }
      bar.Update(static_cast<double>(pos + n) / size);
    }
    bar.Done();
  }

  std::optional<BackingRef> ref;
  if (!backing.empty()) ref = BackingRef{backing, backing_fmt};
  Status s = img->cluster_map().SetBacking(ref);
  if (!s.ok()) {
    PrintError(fmt::format("Could not change the backing file to '{}': {}", backing, s.message()));
    return 1;
  }
  s = img->Close();
  if (!s.ok()) {
    PrintFileError(filename, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

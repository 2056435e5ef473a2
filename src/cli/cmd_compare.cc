// vimgfs compare: qemu-img compare (exit 0 identical, 1 different, 2 error).
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs compare [-f fmt] [-F fmt] [-T src_cache] [-s] [-p] [-q] [-U] [--untrusted]\n"
    "                      filename1 filename2\n"
    "\n"
    "Compares the guest-visible content of two images (of any formats).\n"
    "  -f fmt / -F fmt  formats of the first / second image\n"
    "  -s               strict: sizes and allocation must match too\n"
    "  -p               show progress;  -q  quiet\n"
    "  -T src_cache     none or directsync: read around the host's page cache (O_DIRECT)\n"
    "Exit codes: 0 identical, 1 different, 2 error.\n"
    "  -U, --force-share  open the image even while another process writes it (no lock)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

constexpr uint64_t kChunk = 2 << 20;
constexpr uint64_t kSector = 512;
constexpr uint64_t kMapStep = 256ull << 20;

// First byte offset (relative to the buffers) of the 512-byte sector where they differ,
// or -1.
int64_t FirstDifferentSector(const std::byte* a, const std::byte* b, uint64_t n) {
  for (uint64_t i = 0; i < n; i += kSector) {
    uint64_t len = std::min(kSector, n - i);
    if (std::memcmp(a + i, b + i, len) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

int64_t FirstNonzeroSector(const std::byte* a, uint64_t n) {
  for (uint64_t i = 0; i < n; i += kSector) {
    uint64_t len = std::min(kSector, n - i);
    for (uint64_t k = 0; k < len; k++)
      if (a[i + k] != std::byte{0}) return static_cast<int64_t>(i);
  }
  return -1;
}

// Runs of one image over a window, consumed front to back.
class RunCursor {
 public:
  explicit RunCursor(Image& img) : img_(img) {}
  // The run at pos: how far it goes (<= limit) and whether it reads as zeros.
  Result<std::pair<uint64_t, BlockStatus>> At(uint64_t pos, uint64_t limit) {
    while (idx_ < runs_.size() && runs_[idx_].offset + runs_[idx_].length <= pos) idx_++;
    if (idx_ >= runs_.size()) {
      uint64_t n = std::min(kMapStep, limit - pos);
      ASSIGN_OR_RETURN(runs_, img_.Map(pos, n));
      idx_ = 0;
      if (runs_.empty()) return Status::Corrupt("'{}': empty map at {:#x}", img_.path(), pos);
    }
    const BlockStatus& b = runs_[idx_];
    return std::make_pair(std::min(limit, b.offset + b.length), b);
  }

 private:
  Image& img_;
  std::vector<BlockStatus> runs_;
  size_t idx_ = 0;
};

}  // namespace

int RunCompare(int argc, char** argv) {
  std::string fmt1, fmt2, src_cache;
  bool strict = false, progress = false, quiet = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  bool force_share = false;
  OptionParser opts("compare", kUsage, 2);
  opts.Value('f', nullptr, &fmt1)
      .Value('F', nullptr, &fmt2)
      .Value('T', nullptr, &src_cache)
      .Flag('p', nullptr, &progress)
      .Flag('q', nullptr, &quiet)
      .Flag('s', nullptr, &strict)
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;
  if (opts.operands().size() != 2) return UsageError("compare", "Expecting two image file names");
  if (!CheckCacheMode(src_cache, true)) return 2;
  std::string f1 = opts.operands()[0], f2 = opts.operands()[1];
  ImageOpen o;
  o.env = CacheModeEnv(src_cache);
  o.image_opts = image_opts;
  o.force_share = force_share;
  o.untrusted = untrusted;
  o.format = fmt1;
  auto img1 = OpenOrReport(f1, o);
  if (!img1) return 2;
  o.format = fmt2;
  auto img2 = OpenOrReport(f2, o);
  if (!img2) return 2;

  auto say = [quiet](const std::string& s) {
    if (!quiet) std::printf("%s\n", s.c_str());
  };
  uint64_t size1 = img1->size(), size2 = img2->size();
  if (strict && size1 != size2) {
    say("Strict mode: Image size mismatch!");
    return 1;
  }
  uint64_t common = std::min(size1, size2);
  uint64_t total = std::max(size1, size2);
  Progress bar(progress && StdoutIsTty());
  std::vector<std::byte> b1(kChunk), b2(kChunk);
  RunCursor c1(*img1), c2(*img2);

  auto fail = [&](const std::string& path, const Status& s) {
    bar.Done();
    PrintFileError(path, s);
    return 2;
  };

  for (uint64_t pos = 0; pos < common;) {
    auto r1 = c1.At(pos, common);
    if (!r1.ok()) return fail(f1, r1.error());
    auto r2 = c2.At(pos, common);
    if (!r2.ok()) return fail(f2, r2.error());
    const BlockStatus& s1 = r1->second;
    const BlockStatus& s2 = r2->second;
    uint64_t end = std::min({r1->first, r2->first, pos + kChunk});
    if (strict && (s1.present != s2.present || s1.zero != s2.zero)) {
      bar.Done();
      say(fmt::format("Strict mode: Offset {} block status mismatch!", pos));
      return 1;
    }
    uint64_t n = end - pos;
    if (!(s1.zero && s2.zero)) {
      std::span<std::byte> a(b1.data(), n), b(b2.data(), n);
      int64_t idx;
      if (s2.zero) {
        if (Status s = img1->Read(pos, a); !s.ok()) return fail(f1, s);
        idx = FirstNonzeroSector(a.data(), n);
      } else if (s1.zero) {
        if (Status s = img2->Read(pos, b); !s.ok()) return fail(f2, s);
        idx = FirstNonzeroSector(b.data(), n);
      } else {
        if (Status s = img1->Read(pos, a); !s.ok()) return fail(f1, s);
        if (Status s = img2->Read(pos, b); !s.ok()) return fail(f2, s);
        idx = FirstDifferentSector(a.data(), b.data(), n);
      }
      if (idx >= 0) {
        bar.Done();
        say(fmt::format("Content mismatch at offset {}!", pos + static_cast<uint64_t>(idx)));
        return 1;
      }
    }
    pos = end;
    bar.Update(total ? static_cast<double>(pos) / total : 1.0);
  }

  if (size1 != size2) {
    Image& over = size1 > size2 ? *img1 : *img2;
    const std::string& over_name = size1 > size2 ? f1 : f2;
    say("Warning: Image size mismatch!");
    RunCursor co(over);
    for (uint64_t pos = common; pos < total;) {
      auto r = co.At(pos, total);
      if (!r.ok()) return fail(over_name, r.error());
      uint64_t end = std::min(r->first, pos + kChunk);
      if (!r->second.zero) {
        std::span<std::byte> a(b1.data(), end - pos);
        if (Status s = over.Read(pos, a); !s.ok()) return fail(over_name, s);
        int64_t idx = FirstNonzeroSector(a.data(), a.size());
        if (idx >= 0) {
          bar.Done();
          say(fmt::format("Content mismatch at offset {}!", pos + static_cast<uint64_t>(idx)));
          return 1;
        }
      }
      pos = end;
      bar.Update(static_cast<double>(pos) / total);
    }
  }
  bar.Done();
  say("Images are identical.");
  return 0;
}

}  // namespace vimgfs::cli

// vimgfs commit: qemu-img commit (write an overlay's data into its backing file).
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "vimgfs/copy.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] [-r rate] [--untrusted] filename\n"
    "\n"
    "Writes the data of 'filename' (an overlay) into its backing file, or into the image\n"
    "'base' further down the backing chain (-b): everything allocated above base is copied.\n"
    "Then, as qemu-img does, a qcow2 overlay is emptied so that it reads through to its\n"
    "backing file (other formats are left as they are).\n"
    "  -d        do not empty the overlay (implied by -b)\n"
    "  -b base   commit into this image of the backing chain\n"
    "  -p, -q    progress on a terminal; quiet\n"
    "  -r rate   write the base at most this many bytes per second (suffixes k, M, G)\n"
    "  -t cache  none or directsync: read and write around the host's page cache (O_DIRECT)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

// What the layers above the base hold, as the copy pipeline's source: runs listed before
// the base changes under the copy (docs/ARCHITECTURE.md, "The copy pipeline").
class AboveBase final : public CopySource {
 public:
  AboveBase(Image& top, std::vector<BlockStatus> runs) : top_(top), runs_(std::move(runs)) {}
  uint64_t size() const override { return top_.size(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override { return top_.Read(off, buf); }
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool) override {
    std::vector<BlockStatus> out;
    auto it = std::upper_bound(runs_.begin(), runs_.end(), off,
                               [](uint64_t o, const BlockStatus& r) { return o < r.offset + r.length; });
    for (; it != runs_.end() && it->offset < off + len; ++it) {
      BlockStatus r = *it;
      uint64_t from = std::max(r.offset, off), to = std::min(r.offset + r.length, off + len);
      r.offset = from;
      r.length = to - from;
      out.push_back(std::move(r));
    }
    return out;
  }

 private:
  Image& top_;
  std::vector<BlockStatus> runs_;
};

// The canonical absolute path of an existing file, or "" when it cannot be resolved.
std::string RealPath(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

}  // namespace

int RunCommit(int argc, char** argv) {
  std::string fmt, base_name, cache;
  bool progress = false, quiet = false, untrusted = false, keep = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  uint64_t rate_limit = 0;  // -r: bytes per second written to the base
  OptionParser opts("commit", kUsage);
  opts.Value('f', nullptr, &fmt)
      .Value('b', nullptr, &base_name)
      .Flag('d', nullptr, &keep)
      .Flag('p', nullptr, &progress)
      .Flag('q', nullptr, &quiet)
      .Value('t', nullptr, &cache)
      .Add('r', nullptr, true, RateLimitInto(&rate_limit))
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;
  if (opts.operands().size() != 1) return UsageError("commit", "Expecting one image file name");
  if (!CheckCacheMode(cache, false)) return 1;
  std::string filename = opts.operands()[0];

  ImageOpen o;
  o.env = CacheModeEnv(cache);
  o.image_opts = image_opts;
  o.format = fmt;
  o.read_only = true;
  o.untrusted = untrusted;
  o.lock_backing = false;   // the base is opened for writing below
  o.lock_as_writer = true;  // and this image emptied (qemu-img holds it for writing)
  auto top = OpenOrReport(filename, o);
  if (!top) return 1;
  if (!top->backing()) {
    PrintError("Image does not have a backing file");
    return 1;
  }
  // The base: the backing file, or the chain member -b names.
  Image* base = top->backing();
  int base_depth = 1;
  if (!base_name.empty()) {
    // As qemu's bdrv_find_backing_image: a relative -b names a file in the folder of the
    // image whose backing file it is meant to be (not in the working directory), and
    // matches when both resolve to the same file.
    base = nullptr;
    base_depth = 0;
    for (Image* cur = top.get(); cur->backing() && !base; cur = cur->backing()) {
      base_depth++;
      std::string want = RealPath(PathCombine(cur->path(), base_name));
      if (!want.empty() && want == RealPath(cur->backing()->path())) base = cur->backing();
    }
    if (!base) {
      PrintError(fmt::format("Did not find '{}' in the backing chain of '{}'", base_name, filename));
      return 1;
    }
  }
  const std::string base_path = base->path();
  const std::string base_fmt = base->format();

  // Everything allocated above the base, collected before the base changes. Past the end
  // of a short layer between top and base, the top reads zeros whatever the base holds:
  // those zeros count as allocated above the base (qemu's rule for short backing files,
  // iotest 274), so the base gets them too.
  uint64_t short_end = top->size();
  {
    Image* layer = top->backing();
    for (int d = 1; d < base_depth; ++d, layer = layer->backing())
      short_end = std::min(short_end, layer->size());
  }
  std::vector<BlockStatus> runs;
  for (uint64_t pos = 0; pos < top->size(); pos += 1ull << 30) {
    uint64_t n = std::min<uint64_t>(1ull << 30, top->size() - pos);
    auto r = top->Map(pos, n);
    if (!r.ok()) {
      PrintFileError(filename, r.error());
      return 1;
    }
    for (BlockStatus b : *r) {
      if (b.present && b.depth < base_depth) {
        runs.push_back(std::move(b));
        continue;
      }
      uint64_t end = b.offset + b.length;
      if (end <= short_end) continue;
      BlockStatus zeros;
      zeros.offset = std::max(b.offset, short_end);
      zeros.length = end - zeros.offset;
      zeros.present = zeros.zero = true;
      runs.push_back(zeros);
    }
  }

  ImageOpen bo;
  bo.env = CacheModeEnv(cache);
  // A base probed as raw (qcow stores no backing format) is probed again, so its first
  // sector stays protected as in qemu (iotest 301).
  bo.format = base->probed_raw() ? "" : base_fmt;
  bo.read_only = false;
  bo.untrusted = untrusted;
  bo.key_secret = base->key_secret();  // an encrypted base opens with the key it was read with
  auto wbase = OpenOrReport(base_path, bo);
  if (!wbase) return 1;
  if (wbase->size() < top->size()) {
    Status s = wbase->Resize(top->size(), false);
    if (!s.ok()) {
      PrintFileError(base_path, s);
      return 1;
    }
  }

  Progress bar(progress && StdoutIsTty());
  AboveBase above(*top, std::move(runs));
  CopyOptions co;
  co.target_fresh = false;
  co.rate_limit = rate_limit;
  co.min_sparse = 0;  // data as it is; zero runs are unmapped, as qemu-img's commit (a mirror
                      // job with unmap on) leaves them (iotest 313)
  co.progress = [&bar](double percent) { bar.UpdatePercent(percent); };
  if (Status s = CopyToImage(above, *wbase, co); !s.ok()) {
    if (s.err() == EPERM) {
      PrintError("Block job failed: Operation not permitted");  // qemu-img's words
    } else {
      PrintFileError(base_path, s);
    }
    return 1;
  }
  bar.Done();
  Status s = wbase->Close();
  if (!s.ok()) {
    PrintFileError(base_path, s);
    return 1;
  }
  // Emptying an overlay whose data went further down than its own backing file would
  // lose the layers between, hence -b implies -d (as in qemu-img).
  if (!keep && base_name.empty()) {
    top.reset();
    ImageOpen to;
    to.env = CacheModeEnv(cache);
    to.format = fmt;
    to.read_only = false;
    to.untrusted = untrusted;
    to.open_backing = false;
    to.keep_bitmaps = true;
    to.image_opts = image_opts;
    auto wtop = OpenOrReport(filename, to);
    if (!wtop) return 1;
    s = wtop->MakeEmpty();
    if (s.kind() == ErrorKind::kUnsupported) s = Status::Ok();  // qemu leaves these too
    Status c = wtop->Close();
    if (s.ok()) s = c;
    if (!s.ok()) {
      PrintFileError(filename, s);
      return 1;
    }
  }
  if (!quiet) std::printf("Image committed.\n");
  return 0;
}

}  // namespace vimgfs::cli

// vimgfs rebase: qemu-img rebase (safe: copies what differs; -u: header only).
#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "vimgfs/copy.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs rebase [-f fmt] [-t cache] [-T src_cache] [-u] [-p] [-q] [-U] -b backing_file\n"
    "                     [-F backing_fmt] [--untrusted] filename\n"
    "\n"
    "Changes the backing file of an image. Safe mode (default) first copies into the image\n"
    "every cluster it does not have whose content differs between the old and the new\n"
    "backing file, so the guest sees the same disk. -u only rewrites the reference.\n"
    "-b \"\" makes the image independent of any backing file.\n"
    "  -t cache / -T src_cache  none or directsync: the image / the new backing file around\n"
    "                     the host's page cache (O_DIRECT)\n"
    "  -U, --force-share  open the old and new backing files without locking them\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

// What the image reads through its old backing file (zeros past its end, or everywhere
// without one) where it has nothing of its own: the copy pipeline's source for a safe rebase
// (docs/ARCHITECTURE.md, "The copy pipeline"). Where the old backing file has ended, the
// runs are zero runs when the image can store zero clusters, which then read as zeros over
// any backing file (qcow2 v3; v2 gets zero data), as qemu-img writes them (iotest 252).
class ThroughOldBacking final : public CopySource {
 public:
  ThroughOldBacking(Image& img, Image* old_base, bool zero_clusters)
      : img_(img),
        old_base_(old_base),
        zeros_from_(!zero_clusters ? UINT64_MAX
                    : old_base     ? old_base->size()
                                   : 0) {}
  uint64_t size() const override { return img_.size(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    uint64_t have = 0;
    if (old_base_ && off < old_base_->size()) {
      have = std::min<uint64_t>(buf.size(), old_base_->size() - off);
      Status s = old_base_->Read(off, buf.first(have));
      if (!s.ok()) return Status::Error(s.kind(), s.err(), "old backing file: " + s.message());
    }
    std::memset(buf.data() + have, 0, buf.size() - have);
    return Status::Ok();
  }
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool) override {
    ASSIGN_OR_RETURN(auto runs, img_.Map(off, len, true));
    std::vector<BlockStatus> out;
    for (const BlockStatus& r : runs) {
      if (r.depth == 0) continue;  // the image has it: unaffected by its backing file
      const uint64_t end = r.offset + r.length;
      for (uint64_t pos = r.offset; pos < end;) {
        const bool zero = pos >= zeros_from_;
        const uint64_t stop = zero ? end : std::min(end, zeros_from_);
        BlockStatus piece;
        piece.offset = pos;
        piece.length = stop - pos;
        piece.present = true;
        piece.zero = zero;
        piece.data = !zero;
        out.push_back(piece);
        pos = stop;
      }
    }
    return out;
  }

 private:
  Image& img_;
  Image* old_base_;
  uint64_t zeros_from_;
};

}  // namespace

int RunRebase(int argc, char** argv) {
  std::string fmt, backing, backing_fmt, cache, src_cache;
  bool have_b = false, unsafe = false, progress = false, quiet = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  bool force_share = false;
  OptionParser opts("rebase", kUsage);
  opts.Value('f', nullptr, &fmt)
      .Value('F', nullptr, &backing_fmt)
      .Add('b', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             backing = arg;
             have_b = true;
             return std::nullopt;
           })
      .Flag('u', nullptr, &unsafe)
      .Flag('p', nullptr, &progress)
      .Flag('q', nullptr, &quiet)
      .Flag('U', "force-share", &force_share)
      .Value('t', nullptr, &cache)
      .Value('T', nullptr, &src_cache)
      .Accept('c', nullptr, false)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;
  if (opts.operands().size() != 1) return UsageError("rebase", "Expecting one image file name");
  if (!have_b) return UsageError("rebase", "Must specify backing file (-b)");
  if (!CheckCacheMode(cache, false) || !CheckCacheMode(src_cache, true)) return 1;
  std::string filename = opts.operands()[0];
  // -U applies to the backing files only, as in qemu-img: the image rebase writes is locked.
  ImageOpen o;
  o.env = CacheModeEnv(cache);
  o.image_opts = image_opts;
  o.lock_backing = !force_share;
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  o.open_backing = !unsafe;
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;
  // Checked after the open, as qemu-img does (a missing image is reported first).
  if (!backing.empty() && backing_fmt.empty()) {
    PrintError(
        fmt::format("Could not change the backing file to '{}': backing format must be specified", backing));
    return 1;
  }

  if (!unsafe) {
    std::unique_ptr<Image> new_base;
    if (!backing.empty()) {
      ImageOpen bo;
      bo.env = CacheModeEnv(src_cache);
      bo.force_share = force_share;
      bo.format = backing_fmt;
      bo.untrusted = untrusted;
      std::string path = PathCombine(filename, backing);
      auto b = OpenImage(path, bo);
      if (!b.ok()) {
        PrintError(
            fmt::format("Could not open new backing file '{}': {}", path, OpenErrorMessage(path, b.error())));
        return 1;
      }
      new_base = std::move(b).value();
    }
    // Only the clusters whose content differs between the old and the new backing file
    // are copied (a cluster at a time: 512-byte runs would split clusters for no gain).
    ThroughOldBacking source(*img, img->backing(), img->Info().zero_clusters);
    ImageSource reference(new_base.get());
    Progress bar(progress && StdoutIsTty());
    CopyOptions co;
    co.target_fresh = false;
    co.target_has_backing = true;  // zeros are zero clusters, never unmapped
    co.min_sparse = 0;
    co.unless_same_as = &reference;
    co.progress = [&bar](double percent) { bar.UpdatePercent(percent); };
    if (Status s = CopyToImage(source, *img, co); !s.ok()) {
      PrintError(fmt::format("error while copying to the image: {}", s.message()));
      return 1;
    }
    bar.Done();
  }

  std::optional<BackingRef> ref;
  if (!backing.empty()) ref = BackingRef{backing, backing_fmt};
  Status s = img->SetBacking(ref);
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

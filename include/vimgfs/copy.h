// The engine's one copy pipeline: convert, commit and rebase all move guest data with it.
// It reads only what the source's block status says is there, never writes zeros into a
// fresh sparse target, overlaps reading with writing, and compresses clusters on every core
// when asked (docs/ARCHITECTURE.md, "The copy pipeline").
#pragma once

#include <climits>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/format.h"
#include "vimgfs/image.h"
#include "vimgfs/status.h"

namespace vimgfs {

// A disk to copy from: guest bytes and their block status. Only the runs Map returns are
// copied, so a source may leave out what the target already has (commit, rebase).
class CopySource {
 public:
  virtual ~CopySource() = default;
  virtual uint64_t size() const = 0;
  virtual Status Read(uint64_t off, std::span<std::byte> buf) = 0;
  // Runs within [off, off+len), ascending. With top_only, a run that is not in the top
  // image of its source has depth 1 (the target's backing file provides it).
  virtual Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool top_only) = 0;
  // For copy offloading: a descriptor of the host file named `filename` (a run's
  // BlockStatus::filename) when one of the source's images reads it as a plain local
  // file, else -1. Owned by the image.
  virtual int HostFd(const std::string& filename) { return -1; }
};

// One image as a source; nullptr: an empty disk (it reads as zeros past its end, which is
// everywhere).
class ImageSource final : public CopySource {
 public:
  explicit ImageSource(Image* image) : image_(image) {}
  uint64_t size() const override { return image_ ? image_->size() : 0; }
  Status Read(uint64_t off, std::span<std::byte> buf) override;
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool top_only) override;
  int HostFd(const std::string& filename) override;

 private:
  Image* image_;
};

// Images one after the other, seen as one disk (convert's sources).
class ConcatSource final : public CopySource {
 public:
  explicit ConcatSource(std::vector<std::unique_ptr<Image>> images);
  uint64_t size() const override { return size_; }
  Status Read(uint64_t off, std::span<std::byte> buf) override;
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool top_only) override;
  // Names the source that holds `off` (for error messages).
  const std::string& NameAt(uint64_t off) const;
  int HostFd(const std::string& filename) override;

 private:
  std::vector<std::unique_ptr<Image>> images_;
  std::vector<uint64_t> starts_;
  uint64_t size_ = 0;
};

// A source that reads what it can (convert --salvage, qemu's words and steps): a read that
// fails is retried sector by sector, and each sector that still fails reads as zeros; a
// block status that fails is asked again over a quarter of the range, down to one sector,
// which is then read as data. Each sector given up is reported once through `warn`.
class SalvagingSource final : public CopySource {
 public:
  SalvagingSource(CopySource& inner, std::function<void(const std::string&)> warn)
      : inner_(inner), warn_(std::move(warn)) {}
  uint64_t size() const override { return inner_.size(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override;
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool top_only) override;

 private:
  CopySource& inner_;
  std::function<void(const std::string&)> warn_;
};

struct CopyOptions {
  // Store the target's clusters compressed, in `codec` (the target's own: FormatInfo).
  bool compress = false;
  Codec codec = Codec::kDeflateRaw;
  // The source's zero runs are zeroed in the target (or skipped in a fresh one) rather
  // than copied as data. convert: unless -S 0.
  bool zero_runs = true;
  // Data blocks of this many bytes that are all zeros are treated as zero runs (convert
  // -S); 0: data is written as read.
  uint64_t min_sparse = 4096;
  bool target_fresh = true;         // the target reads as zeros: zeros need no writing
  bool target_has_backing = false;  // copy only the sources' top layers; zeros stay zeros
  // Rebase: a piece (one target cluster) is written only where the source's content differs
  // from this one's; nullptr: every piece is written.
  CopySource* unless_same_as = nullptr;
  int threads = 1;
  int requests_in_flight = 8;  // source reads ahead of the writer (1..16)
  // Guest bytes per second the target is written at most (qemu-img -r); 0: no limit.
  uint64_t rate_limit = 0;
  // convert -C: a raw source copied into a raw target by copy_file_range, the kernel's copy
  // (block sharing on a reflink file system), where both are plain host files; otherwise,
  // or where the kernel cannot, the usual copy (as qemu falls back).
  bool copy_offload = false;
  // The progress figure qemu-img shows, in percent: the share of the data copied. Only
  // worked out when set.
  std::function<void(double percent)> progress;
};

// Copies src into target (an open image of at least src.size() bytes).
Status CopyToImage(CopySource& src, Image& target, const CopyOptions& options);
// Copies src into an image being written front to back in compressed units.
Status CopyToStream(CopySource& src, StreamWriter& out, const CopyOptions& options);

}  // namespace vimgfs

// The copy engine of `vimgfs convert`: sources (concatenated) to one target, reading only
// what is allocated, never writing zeros into a fresh sparse target, compressing clusters
// on every core when asked.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cli/cli_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
class StreamOptimizedWriter;
}

namespace vimgfs::cli {

// The sources seen as one disk.
class ConcatSource {
 public:
  explicit ConcatSource(std::vector<std::unique_ptr<Image>> images);
  uint64_t size() const { return size_; }
  // Reads guest bytes across source boundaries.
  Status Read(uint64_t off, std::span<std::byte> buf);
  // Runs covering [off, off+len) with offsets in the concatenated space. With top_only,
  // a run not in the top image of its source has depth 1 (target has the backing).
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool top_only);
  // Names the source that holds `off` (for error messages).
  const std::string& NameAt(uint64_t off) const;

 private:
  std::vector<std::unique_ptr<Image>> images_;
  std::vector<uint64_t> starts_;
  uint64_t size_ = 0;
};

struct ConvertSettings {
  bool compress = false;
  Codec codec = Codec::kDeflateRaw;
  uint64_t min_sparse = 4096;       // -S; 0: write everything, zeros included
  bool target_fresh = true;         // created by us (reads as zeros) or --target-is-zero
  bool target_has_backing = false;  // -B: copy only the sources' top layers
  int threads = 1;
  int requests_in_flight = 8;    // -m: source reads ahead of the writer (1..16)
  Progress* progress = nullptr;  // -p: qemu-img's figure, the share of the data copied
};

// Copies src into target (an open Image of at least src.size() bytes).
Status ConvertToImage(ConcatSource& src, Image& target, const ConvertSettings& s);
// Copies src into a streamOptimized VMDK being written sequentially.
Status ConvertToStream(ConcatSource& src, StreamOptimizedWriter& w, const ConvertSettings& s);

}  // namespace vimgfs::cli

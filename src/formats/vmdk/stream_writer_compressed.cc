// StreamOptimizedWriter::WriteCompressedGrain: the write half of WriteGrain, for grains
// compressed by the caller (convert compresses on every core and writes in order).
#include <cstring>

#include "formats/vmdk/stream_writer.h"
#include "formats/vmdk/vmdk_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs {
using namespace vmdk;

Status StreamOptimizedWriter::WriteCompressedGrain(uint64_t index, std::span<const std::byte> z) {
  if (finished_) return Status::InvalidArgument("'{}': the stream is finished", file_->path());
  uint64_t grains = DivRoundUp(size_, grain_size_);
  if (index >= grains) return Status::OutOfRange("'{}': grain {} is outside the disk", file_->path(), index);
  if (z.empty() || z.size() > grain_size_ + grain_size_ / 16 + 1024 || z.size() > UINT32_MAX)
    return Status::InvalidArgument("'{}': compressed grain {} has an impossible size", file_->path(), index);
  uint64_t total = AlignUp(kGrainMarkerBytes + z.size(), kSector);
  if ((next_ + total) / kSector > UINT32_MAX)
    return Status::NoSpace("'{}': the stream is full (grain sectors are 32-bit)", file_->path());
  std::vector<std::byte> out(total, std::byte{0});
  StoreLE64(out.data(), index * (grain_size_ / kSector));
  StoreLE32(out.data() + 8, static_cast<uint32_t>(z.size()));
  std::memcpy(out.data() + kGrainMarkerBytes, z.data(), z.size());
  RETURN_IF_ERROR(file_->PWrite(next_, out, IoTag::kData));
  uint64_t gi = index / gtes_;
  auto& gt = pending_[gi];
  if (gt.empty()) {
    gt.resize(gtes_);
    std::vector<std::byte> b(gt_bytes_);
    RETURN_IF_ERROR(file_->PRead(uint64_t{gd_[gi]} * kSector, b));
    for (uint32_t i = 0; i < gtes_; i++) gt[i] = LoadLE32(b.data() + 4 * i);
  }
  gt[index % gtes_] = static_cast<uint32_t>(next_ / kSector);
  next_ += total;
  if (pending_.size() > 16) return FlushTables();
  return Status::Ok();
}

}  // namespace vimgfs

// Compressed cluster writes (convert -c). Streams are packed back to back into host
// clusters, as qemu's qcow2_alloc_bytes does: every host cluster holds one reference per
// compressed cluster stored (partly) in it.
//
// Ordering: refcounts are raised first (L2 cache depends on the refcount cache), the
// stream is written, and the L2 entry is linked only after a flush of the data.
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"

namespace vimgfs::qcow2 {

Status Qcow2Map::WriteCompressed(uint64_t guest_off, std::span<const std::byte> stream) {
  RETURN_IF_ERROR(CheckWritable());
  if (header_.crypt_method)
    return Status::Unsupported("'{}': compressed clusters cannot be used with encryption", path_);
  if (header_.has_data_file())
    return Status::Unsupported("'{}': compressed clusters cannot be used with an external data file", path_);
  if (!IsAligned(guest_off, cluster_size_) || guest_off >= size_)
    return Status::InvalidArgument("'{}': compressed write at {:#x} is not a whole cluster", path_,
                                   guest_off);
  const uint64_t len = stream.size();
  if (len == 0 || len >= cluster_size_)
    return Status::InvalidArgument("'{}': compressed stream of {} bytes does not fit a cluster", path_, len);

  // Host bytes for the stream: the rest of the current packing clusters, extended by new
  // clusters when they come right after, else a fresh cluster.
  uint64_t start = comp_next_;
  uint64_t fresh_from = UINT64_MAX;  // clusters from here on were allocated by this call
  if (comp_next_ == 0 || comp_next_ + len > comp_end_) {
    uint64_t need = comp_next_ == 0 ? DivRoundUp(len, cluster_size_)
                                    : DivRoundUp(comp_next_ + len - comp_end_, cluster_size_);
    ASSIGN_OR_RETURN(uint64_t off, AllocClusters(need));
    if (comp_next_ != 0 && off == comp_end_) {
      fresh_from = comp_end_;
      comp_end_ += need << cluster_bits_;
    } else {
      // need clusters always hold the stream (len < cluster size).
      start = off;
      fresh_from = off;
      comp_end_ = off + (need << cluster_bits_);
    }
  }
  for (uint64_t c = start >> cluster_bits_; c <= (start + len - 1) >> cluster_bits_; c++) {
    if ((c << cluster_bits_) >= fresh_from) continue;  // allocated with refcount 1 for us
    RETURN_IF_ERROR(AddRefcount(c, 1));
  }
  RETURN_IF_ERROR(l2_cache_->SetDependency(ref_cache_.get()));
  comp_next_ = start + len;

  RETURN_IF_ERROR(data_->PWrite(start, stream, IoTag::kData)
                      .WithContext("'{}': writing a compressed cluster at {:#x}", path_, start));
  l2_cache_->DependsOnFlush();
  const uint64_t cluster = ClusterIndex(guest_off);
  ASSIGN_OR_RETURN(TableRef l2, GetL2(L1Index(cluster), true));
  uint64_t bm;
  uint64_t old = LoadL2(l2, L2Index(cluster), &bm);
  StoreL2(l2, L2Index(cluster), MakeCompressedEntry(start, len, cluster_bits_), 0);
  if (old & ~(kFlagCopied | kFlagZero)) RETURN_IF_ERROR(FreeL2Entry(old));
  return Status::Ok();
}

}  // namespace vimgfs::qcow2

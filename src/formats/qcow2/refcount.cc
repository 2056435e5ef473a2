// qcow2 refcounts: entries of 1..64 bits in refcount blocks (through the TableCache), the
// refcount table in memory, allocation with a moving free-cluster hint, new refcount
// blocks and refcount table growth.
#include <algorithm>
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

// Host offsets must fit the 56-bit offset field of table entries.
constexpr uint64_t kMaxHostOffset = 1ull << 56;

}  // namespace

uint64_t ReadRefcountEntry(const std::byte* block, uint64_t i, uint32_t bits) {
  switch (bits) {
    case 8:
      return static_cast<uint8_t>(block[i]);
    case 16:
      return LoadBE16(block + i * 2);
    case 32:
      return LoadBE32(block + i * 4);
    case 64:
      return LoadBE64(block + i * 8);
    default: {  // 1, 2, 4: bit 0 is the least significant bit of the byte
      uint64_t bit = i * bits;
      uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
      return (byte >> (bit % 8)) & ((1u << bits) - 1);
    }
  }
}

void WriteRefcountEntry(std::byte* block, uint64_t i, uint32_t bits, uint64_t v) {
  switch (bits) {
    case 8:
      block[i] = static_cast<std::byte>(v);
      return;
    case 16:
      StoreBE16(block + i * 2, static_cast<uint16_t>(v));
      return;
    case 32:
      StoreBE32(block + i * 4, static_cast<uint32_t>(v));
      return;
    case 64:
      StoreBE64(block + i * 8, v);
      return;
    default: {
      uint64_t bit = i * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      uint8_t byte = static_cast<uint8_t>(block[bit / 8]);
      byte = static_cast<uint8_t>((byte & ~mask) | ((v << (bit % 8)) & mask));
      block[bit / 8] = static_cast<std::byte>(byte);
    }
  }
}

Result<uint64_t> Qcow2Map::GetRefcount(uint64_t cluster) {
  uint64_t b = cluster / refblock_entries_;
  if (b >= reftable_.size()) return uint64_t{0};
  uint64_t off = reftable_[b] & kOffsetMask;
  if (off == 0) return uint64_t{0};
  RETURN_IF_ERROR(ValidateTableOffset(off, "refcount block"));
  ASSIGN_OR_RETURN(TableRef t, ref_cache_->Get(off));
  return ReadRefcountEntry(t.data(), cluster % refblock_entries_, refcount_bits_);
}

Status Qcow2Map::SetRefcount(uint64_t cluster, uint64_t value) {
  if (value > refcount_max_)
    return Status::InvalidArgument("'{}': refcount of cluster {} would exceed the {}-bit maximum", path_,
                                   cluster, refcount_bits_);
  uint64_t b = cluster / refblock_entries_;
  RETURN_IF_ERROR(EnsureRefBlock(b));
  uint64_t off = reftable_[b] & kOffsetMask;
  ASSIGN_OR_RETURN(TableRef t, ref_cache_->Get(off));
  WriteRefcountEntry(t.data(), cluster % refblock_entries_, refcount_bits_, value);
  t.MarkDirty();
  if (value == 0 && cluster < free_hint_) free_hint_ = cluster;
  if (value != 0) host_end_ = std::max(host_end_, (cluster + 1) << cluster_bits_);
  return Status::Ok();
}

Status Qcow2Map::AddRefcount(uint64_t cluster, int64_t delta) {
  ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(cluster));
  if (delta < 0 && rc < static_cast<uint64_t>(-delta))
    return Status::Corrupt("'{}': refcount of cluster {} would drop below zero", path_, cluster);
  if (delta > 0 && refcount_max_ - rc < static_cast<uint64_t>(delta))
    return Status::InvalidArgument("'{}': refcount of cluster {} would exceed the {}-bit maximum", path_,
                                   cluster, refcount_bits_);
  return SetRefcount(cluster, rc + delta);
}

Result<uint64_t> Qcow2Map::FindFree(uint64_t n) {
  // Cluster 0 is the header: a hostile refcount of 0 there must not make it allocatable
  // (a refcount block placed at offset 0 would read as "no block" and recurse forever).
  uint64_t c = std::max<uint64_t>(free_hint_, 1);
  uint64_t run_start = c, run = 0;
  bool first_free_seen = false;
  const uint64_t limit = kMaxHostOffset >> cluster_bits_;
  while (run < n) {
    if (c >= limit) return Status::NoSpace("'{}': the image has no room for more clusters", path_);
    uint64_t b = c / refblock_entries_;
    bool reserved = c >= reserved_start_ && c < reserved_end_;
    if (!reserved && (b >= reftable_.size() || (reftable_[b] & kOffsetMask) == 0)) {
      // A whole block of free clusters.
      uint64_t block_end = (b + 1) * refblock_entries_;
      if (reserved_start_ > c && reserved_start_ < block_end) block_end = reserved_start_;
      if (run == 0) run_start = c;
      if (!first_free_seen) {
        free_hint_ = c;
        first_free_seen = true;
      }
      run += block_end - c;
      c = block_end;
      continue;
    }
    uint64_t rc = 1;
    if (!reserved) {
      ASSIGN_OR_RETURN(rc, GetRefcount(c));
    }
    if (rc == 0) {
      if (!first_free_seen) {
        free_hint_ = c;
        first_free_seen = true;
      }
      if (run == 0) run_start = c;
      run++;
    } else {
      run = 0;
    }
    c++;
  }
  return run_start;
}

Status Qcow2Map::WriteRefTableEntries(uint64_t first, uint64_t count) {
  if (growing_reftable_) return Status::Ok();  // the whole new table is written at the end
  std::vector<std::byte> raw(count * 8);
  for (uint64_t i = 0; i < count; i++) StoreBE64(raw.data() + i * 8, reftable_[first + i]);
  return file_->PWrite(header_.refcount_table_offset + first * 8, raw, IoTag::kRefTable);
}

Status Qcow2Map::EnsureRefBlock(uint64_t b) {
  if (b >= reftable_.size()) {
    if (growing_reftable_)
      return Status::Corrupt("'{}': refcount table growth needs more room than planned", path_);
    RETURN_IF_ERROR(GrowRefTable(b + 1));
  }
  while ((reftable_[b] & kOffsetMask) == 0) {
    ASSIGN_OR_RETURN(uint64_t c, FindFree(1));
    uint64_t bc = c / refblock_entries_;
    if (bc >= reftable_.size()) {
      if (growing_reftable_)
        return Status::Corrupt("'{}': refcount table growth needs more room than planned", path_);
      RETURN_IF_ERROR(GrowRefTable(bc + 1));
      continue;
    }
    if (bc != b && (reftable_[bc] & kOffsetMask) == 0) {
      RETURN_IF_ERROR(EnsureRefBlock(bc));  // places itself at c
      continue;
    }
    uint64_t off = c << cluster_bits_;
    {
      ASSIGN_OR_RETURN(TableRef t, ref_cache_->GetEmpty(off));
      t.MarkDirty();
    }
    reftable_[b] = off;
    // The block's own cluster: counted in itself, or in an existing block.
    RETURN_IF_ERROR(SetRefcount(c, 1));
    // The block reaches the disk before the table points at it.
    RETURN_IF_ERROR(ref_cache_->Flush());
    RETURN_IF_ERROR(WriteRefTableEntries(b, 1));
  }
  return Status::Ok();
}

Status Qcow2Map::GrowRefTable(uint64_t min_entries) {
  const uint64_t per_cluster = cluster_size_ / 8;
  uint64_t old_entries = reftable_.size();
  uint64_t old_off = header_.refcount_table_offset;
  uint64_t old_clusters = header_.refcount_table_clusters;
  uint64_t want = std::max<uint64_t>(min_entries, old_entries + old_entries / 2);
  for (int attempt = 0; attempt < 8; attempt++) {
    uint64_t entries = AlignUp(want + 4, per_cluster);
    uint64_t clusters = entries / per_cluster;
    if (entries * 8 > limits::kMaxRefTableBytes)
      return Status::NoSpace("'{}': refcount table would exceed {} bytes", path_, limits::kMaxRefTableBytes);
    ASSIGN_OR_RETURN(uint64_t start, FindFree(clusters));
    // The table must cover itself and the blocks it will need right after it.
    uint64_t need = (start + clusters) / refblock_entries_ + 4;
    if (need > entries) {
      want = need;
      continue;
    }
    reftable_.resize(entries, 0);
    growing_reftable_ = true;
    reserved_start_ = start;
    reserved_end_ = start + clusters;
    Status s;
    for (uint64_t c = start; c < start + clusters && s.ok(); c++) s = EnsureRefBlock(c / refblock_entries_);
    reserved_start_ = reserved_end_ = 0;
    for (uint64_t c = start; c < start + clusters && s.ok(); c++) s = SetRefcount(c, 1);
    growing_reftable_ = false;
    if (s.ok()) s = ref_cache_->Flush();
    if (s.ok()) {
      std::vector<std::byte> raw(entries * 8);
      for (uint64_t i = 0; i < entries; i++) StoreBE64(raw.data() + i * 8, reftable_[i]);
      s = file_->PWrite(start << cluster_bits_, raw, IoTag::kRefTable);
    }
    if (s.ok()) s = file_->Sync(true);
    if (!s.ok()) {
      reftable_.resize(old_entries);
      return s.WithContext("'{}': growing the refcount table", path_);
    }
    header_.refcount_table_offset = start << cluster_bits_;
    header_.refcount_table_clusters = static_cast<uint32_t>(clusters);
    RETURN_IF_ERROR(WriteHeader());
    RETURN_IF_ERROR(file_->Sync(true));
    // The old table is no longer referenced.
    for (uint64_t c = 0; c < old_clusters; c++)
      RETURN_IF_ERROR(AddRefcount((old_off >> cluster_bits_) + c, -1));
    return Status::Ok();
  }
  return Status::NoSpace("'{}': could not place a larger refcount table", path_);
}

Result<uint64_t> Qcow2Map::AllocClusters(uint64_t n) {
  for (;;) {
    ASSIGN_OR_RETURN(uint64_t start, FindFree(n));
    uint64_t first_block = start / refblock_entries_;
    uint64_t last_block = (start + n - 1) / refblock_entries_;
    bool ready = last_block < reftable_.size();
    for (uint64_t b = first_block; ready && b <= last_block; b++) ready = (reftable_[b] & kOffsetMask) != 0;
    if (!ready) {
      // The run is chosen first and its new refcount blocks go after it, as qemu places
      // them (the run stays where a fresh image's data would be). A refcount table growth
      // on the way drops the reservation: the search below then finds the run moved.
      const bool reserve = reserved_end_ == 0;
      const uint64_t hint = free_hint_;  // searches skipping the run move it past the run
      if (reserve) {
        reserved_start_ = start;
        reserved_end_ = start + n;
      }
      Status s;
      for (uint64_t b = first_block; b <= last_block && s.ok(); b++) s = EnsureRefBlock(b);
      if (reserve) reserved_start_ = reserved_end_ = 0;
      free_hint_ = std::min(free_hint_, hint);
      RETURN_IF_ERROR(s);
      continue;
    }
    // A hostile refcount of 0 for live metadata must not hand that metadata out again.
    uint64_t a = start << cluster_bits_, b = (start + n) << cluster_bits_;
    auto overlaps = [&](uint64_t off, uint64_t len) { return len && off < b && a < off + len; };
    if (overlaps(header_.l1_table_offset, uint64_t{header_.l1_size} * 8) ||
        overlaps(header_.refcount_table_offset, reftable_.size() * 8) || overlaps(l1_offset_, l1_.size() * 8))
      return Status::Corrupt(
          "'{}': refcounts say the metadata at {:#x} is free; repair the image with "
          "'check -r all'",
          path_, a);
    for (uint64_t c = start; c < start + n; c++) RETURN_IF_ERROR(SetRefcount(c, 1));
    if (free_hint_ == start) free_hint_ = start + n;
    return start << cluster_bits_;
  }
}

Status Qcow2Map::FreeRange(uint64_t off, uint64_t len) {
  if (len == 0) return Status::Ok();
  uint64_t first = off >> cluster_bits_;
  uint64_t last = (off + len - 1) >> cluster_bits_;
  RETURN_IF_ERROR(ref_cache_->SetDependency(l2_cache_.get()));
  for (uint64_t c = first; c <= last; c++) RETURN_IF_ERROR(AddRefcount(c, -1));
  return Status::Ok();
}

Status Qcow2Map::FreeL2Entry(uint64_t e) {
  if (IsCompressed(e)) {
    uint64_t off = CompressedHostOffset(e, cluster_bits_);
    uint64_t len = CompressedLength(e, cluster_bits_);
    return FreeRange(off, len);
  }
  if (header_.has_data_file()) return Status::Ok();  // data file clusters are not refcounted
  uint64_t host = L2EntryOffset(e);
  if (host == 0) return Status::Ok();
  return FreeRange(host, cluster_size_);
}

}  // namespace vimgfs::qcow2

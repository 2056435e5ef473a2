// qcow2 write path: host space for guest clusters (PrepareWrite), linking it into L2
// (CommitWrite), zero flags, discard, flush ordering and close.
//
// Ordering (docs/ARCHITECTURE.md, "Crash ordering"):
//   allocation: refcount raised in the cache, l2 cache depends on the refcount cache;
//   commit:     l2 cache depends on a host flush (the engine wrote the data before);
//   free:       refcount cache depends on the l2 cache (the entry is gone first);
//   L1 and header are written after both caches are flushed.
#include <algorithm>
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"

namespace vimgfs::qcow2 {
namespace {

enum PlanKind : uint64_t { kPlanNew = 1, kPlanReuse = 2, kPlanDataFile = 3 };
// Largest run allocated by one plan (the engine may stage it for copy-on-write).
constexpr uint64_t kMaxPlanBytes = 8ull << 20;

}  // namespace

Status Qcow2Map::CheckWritable() {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (locked()) return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
  if (!read_only_) return Status::Ok();
  if (corrupt_)
    return Status::ReadOnly(
        "'{}': image is marked corrupt and can only be opened read-only; repair it "
        "with 'check -r all'",
        path_);
  if (snapshot_view_) return Status::ReadOnly("'{}': a snapshot view is read-only", path_);
  return Status::ReadOnly("'{}' is opened read-only", path_);
}

// With lazy refcounts the image is marked dirty before its first metadata change (as
// qemu does), so a crash makes the next read-write open recount; Close clears the mark.
Status Qcow2Map::MarkDirty() {
  if (!(header_.compatible_features & kCompatLazyRefcounts) || !v3_ ||
      (header_.incompatible_features & kIncompatDirty))
    return Status::Ok();
  RETURN_IF_ERROR(file_->Sync(true));
  header_.incompatible_features |= kIncompatDirty;
  RETURN_IF_ERROR(WriteHeader());
  RETURN_IF_ERROR(file_->Sync(true));
  clear_dirty_on_close_ = true;
  return Status::Ok();
}

Result<WritePlan> Qcow2Map::PrepareWrite(uint64_t pos, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  RETURN_IF_ERROR(MarkDirty());
  const uint64_t cluster = ClusterIndex(pos);
  const uint64_t cstart = cluster << cluster_bits_;
  const uint64_t end = std::min(pos + std::max<uint64_t>(len, 1), AlignUp(size_, cluster_size_));
  const uint64_t l1i = L1Index(cluster);
  uint64_t last = ClusterIndex(end - 1);
  last = std::min(last, (l1i + 1) * l2_entries_ - 1);
  last = std::min(last, cluster + std::max<uint64_t>(1, kMaxPlanBytes >> cluster_bits_) - 1);

  ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, false));
  auto entry_of = [&](uint64_t c, uint64_t* bm) -> uint64_t {
    *bm = 0;
    return l2 ? LoadL2(l2, L2Index(c), bm) : 0;
  };

  WritePlan plan;
  plan.file = data_;
  if (header_.has_data_file()) {
    // Guest offset = offset in the data file; nothing to allocate.
    uint64_t n = last - cluster + 1;
    plan.guest_offset = cstart;
    plan.length = n << cluster_bits_;
    plan.host_offset = cstart;
    plan.cookie[0] = kPlanDataFile;
    plan.cookie[1] = cluster;
    plan.cookie[2] = n;
    return plan;
  }

  uint64_t bm;
  uint64_t e = entry_of(cluster, &bm);
  uint64_t host = L2EntryOffset(e);
  if (!IsCompressed(e) && host != 0) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(host >> cluster_bits_));
    if (rc == 1 && IsAligned(host, cluster_size_)) {
      // Ours alone: write in place (zero-flagged preallocation, subclusters, lost COPIED flag).
      uint64_t first_byte = 0, last_byte = cluster_size_;
      if (extended_l2_) {
        uint64_t sc_first = (pos - cstart) / subcluster_size_;
        uint64_t sc_end = std::min<uint64_t>(kSubclusters, DivRoundUp(end - cstart, subcluster_size_));
        first_byte = sc_first * subcluster_size_;
        last_byte = sc_end * subcluster_size_;
      }
      plan.guest_offset = cstart + first_byte;
      plan.length = last_byte - first_byte;
      plan.host_offset = host + first_byte;
      plan.cookie[0] = kPlanReuse;
      plan.cookie[1] = cluster;
      return plan;
    }
  }
  // New clusters for a run that has no host cluster of its own.
  uint64_t n = 1;
  while (cluster + n <= last) {
    uint64_t b2;
    uint64_t e2 = entry_of(cluster + n, &b2);
    if (!IsCompressed(e2) && L2EntryOffset(e2) != 0) break;
    n++;
  }
  l2.Release();
  // The L2 table first, then the data: qemu's order, so images we write lay out as its do
  // (the data of a run stays contiguous across the table's allocation; iotest 122).
  RETURN_IF_ERROR(GetL2(l1i, true).status());
  ASSIGN_OR_RETURN(uint64_t new_host, AllocClusters(n));
  RETURN_IF_ERROR(l2_cache_->SetDependency(ref_cache_.get()));
  plan.guest_offset = cstart;
  plan.length = n << cluster_bits_;
  plan.host_offset = new_host;
  plan.cookie[0] = kPlanNew;
  plan.cookie[1] = cluster;
  plan.cookie[2] = n;
  plan.cookie[3] = new_host;
  return plan;
}

Status Qcow2Map::CommitWrite(const WritePlan& plan) {
  RETURN_IF_ERROR(CheckWritable());
  const uint64_t cluster = plan.cookie[1];
  ASSIGN_OR_RETURN(TableRef l2, GetL2(L1Index(cluster), true));
  // The data must be durable before a table points at it.
  l2_cache_->DependsOnFlush();
  switch (plan.cookie[0]) {
    case kPlanReuse: {
      uint64_t bm;
      uint64_t e = LoadL2(l2, L2Index(cluster), &bm);
      uint64_t host = L2EntryOffset(e);
      if (host == 0 || IsCompressed(e))
        return Status::Corrupt("'{}': cluster at guest offset {:#x} changed during a write", path_,
                               cluster << cluster_bits_);
      if (extended_l2_) {
        uint64_t cstart = cluster << cluster_bits_;
        int first = static_cast<int>((plan.guest_offset - cstart) / subcluster_size_);
        int last = static_cast<int>((plan.guest_offset + plan.length - cstart) / subcluster_size_);
        uint32_t mask = SubMask(first, last);
        bm = MakeSubBitmap(SubAllocBits(bm) | mask, SubZeroBits(bm) & ~mask);
      }
      StoreL2(l2, L2Index(cluster), host | kFlagCopied, bm);
      return Status::Ok();
    }
    case kPlanDataFile: {
      for (uint64_t i = 0; i < plan.cookie[2]; i++) {
        uint64_t c = cluster + i;
        uint64_t bm;
        (void)LoadL2(l2, L2Index(c), &bm);
        StoreL2(l2, L2Index(c), (c << cluster_bits_) | kFlagCopied, MakeSubBitmap(0xffffffffu, 0));
      }
      return Status::Ok();
    }
    case kPlanNew: {
      for (uint64_t i = 0; i < plan.cookie[2]; i++) {
        uint64_t c = cluster + i;
        uint64_t bm;
        uint64_t old = LoadL2(l2, L2Index(c), &bm);
        StoreL2(l2, L2Index(c), (plan.cookie[3] + (i << cluster_bits_)) | kFlagCopied,
                MakeSubBitmap(0xffffffffu, 0));
        if (old & ~kFlagCopied) RETURN_IF_ERROR(FreeL2Entry(old));
      }
      return Status::Ok();
    }
  }
  return Status::Corrupt("'{}': unknown write plan", path_);
}

void Qcow2Map::AbortWrite(const WritePlan& plan) {
  if (plan.cookie[0] != kPlanNew) return;
  (void)FreeRange(plan.cookie[3], plan.cookie[2] << cluster_bits_);  // a leak if this fails
}

Status Qcow2Map::ZeroRange(uint64_t off, uint64_t len, bool unmap) {
  RETURN_IF_ERROR(CheckWritable());
  RETURN_IF_ERROR(MarkDirty());
  if (header_.autoclear_features & kAutoclearDataFileRaw)
    return Status::Unsupported("zeroes must be written to the raw data file");
  if (!v3_ && !header_.backing_file.empty())
    return Status::Unsupported("qcow2 version 2 has no zero clusters");
  const uint64_t first = ClusterIndex(off);
  const uint64_t end_cluster = DivRoundUp(off + len, cluster_size_);
  for (uint64_t c = first; c < end_cluster;) {
    uint64_t l1i = L1Index(c);
    uint64_t table_end = std::min(end_cluster, (l1i + 1) * l2_entries_);
    ASSIGN_OR_RETURN(uint64_t l2_off, L2Offset(l1i));
    // Version 3 gets zero flags even where nothing is allocated and no backing file is
    // there now (as qemu's zeroize): a later rebase must not make them show one.
    if (l2_off == 0 && !v3_) {
      c = table_end;  // v2 without a backing file (refused above with one): zeros already
      continue;
    }
    ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, true));
    for (; c < table_end; c++) {
      uint64_t bm;
      uint64_t e = LoadL2(l2, L2Index(c), &bm);
      uint64_t host = IsCompressed(e) ? 0 : L2EntryOffset(e);
      bool keep = !unmap && host != 0 && IsCopied(e) && v3_;
      uint64_t ne;
      uint64_t nbm = 0;
      if (!v3_) {
        ne = 0;
      } else if (extended_l2_) {
        ne = keep || header_.has_data_file() ? (e & (kOffsetMask | kFlagCopied)) : 0;
        nbm = MakeSubBitmap(0, 0xffffffffu);
      } else {
        ne = keep ? (host | kFlagCopied | kFlagZero) : kFlagZero;
      }
      if (ne == e && nbm == bm) continue;
      StoreL2(l2, L2Index(c), ne, nbm);
      if (!keep && (e & ~(kFlagCopied | kFlagZero)) != 0) RETURN_IF_ERROR(FreeL2Entry(e));
    }
  }
  return Status::Ok();
}

Status Qcow2Map::Discard(uint64_t off, uint64_t len) { return DiscardClusters(off, len, false); }

Status Qcow2Map::MakeEmpty() {
  if (header_.autoclear_features & kAutoclearDataFileRaw)
    return Status::Unsupported("'{}': the raw data file must keep its data", path_);
  return DiscardClusters(0, size_, true);
}

Status Qcow2Map::DiscardClusters(uint64_t off, uint64_t len, bool full) {
  RETURN_IF_ERROR(CheckWritable());
  RETURN_IF_ERROR(MarkDirty());
  if (header_.autoclear_features & kAutoclearDataFileRaw) return Status::Ok();
  const uint64_t first = ClusterIndex(off);
  const uint64_t end_cluster = DivRoundUp(off + len, cluster_size_);
  const bool has_backing = !header_.backing_file.empty();
  for (uint64_t c = first; c < end_cluster;) {
    uint64_t l1i = L1Index(c);
    uint64_t table_end = std::min(end_cluster, (l1i + 1) * l2_entries_);
    ASSIGN_OR_RETURN(uint64_t l2_off, L2Offset(l1i));
    if (l2_off == 0) {
      c = table_end;
      continue;
    }
    ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, true));
    for (; c < table_end; c++) {
      uint64_t bm;
      uint64_t e = LoadL2(l2, L2Index(c), &bm);
      bool allocated = IsCompressed(e) || L2EntryOffset(e) != 0 || SubAllocBits(bm) != 0;
      uint64_t ne = 0, nbm = 0;
      if (!full && v3_ && (has_backing || allocated)) {
        if (extended_l2_) {
          nbm = MakeSubBitmap(0, 0xffffffffu);
        } else {
          ne = kFlagZero;
        }
      }
      if (ne == e && nbm == bm) continue;
      StoreL2(l2, L2Index(c), ne, nbm);
      if ((e & ~(kFlagCopied | kFlagZero)) != 0) RETURN_IF_ERROR(FreeL2Entry(e));
    }
  }
  return Status::Ok();
}

Status Qcow2Map::WriteHeader() {
  ASSIGN_OR_RETURN(std::vector<std::byte> raw, SerializeHeader(header_));
  // The whole cluster, as qemu writes it: a shorter header leaves no stale extension behind.
  raw.resize(cluster_size_);
  RETURN_IF_ERROR(file_->PWrite(0, raw, IoTag::kHeader).WithContext("'{}': writing the header", path_));
  header_dirty_ = false;
  return Status::Ok();
}

Status Qcow2Map::WriteL1() {
  std::vector<std::byte> raw(l1_.size() * 8);
  for (size_t i = 0; i < l1_.size(); i++) StoreBE64(raw.data() + i * 8, l1_[i]);
  if (!raw.empty())
    RETURN_IF_ERROR(
        file_->PWrite(l1_offset_, raw, IoTag::kL1).WithContext("'{}': writing the L1 table", path_));
  l1_dirty_ = false;
  return Status::Ok();
}

Status Qcow2Map::WriteBackTables() {
  // The caches sync only when they wrote something, so a flush after in-place writes
  // costs no fsync here: SyncFiles' one fsync is the whole flush.
  RETURN_IF_ERROR(l2_cache_->Flush());
  RETURN_IF_ERROR(ref_cache_->Flush());
  RETURN_IF_ERROR(l2_cache_->Flush());  // frees may have made refcounts wait for L2
  if (l1_dirty_) {
    RETURN_IF_ERROR(WriteL1());
    // A header that points at a moved L1 must not land before it.
    if (header_dirty_) RETURN_IF_ERROR(file_->Sync(true));
  }
  if (header_dirty_) RETURN_IF_ERROR(WriteHeader());
  return Status::Ok();
}

Status Qcow2Map::FlushAll() {
  RETURN_IF_ERROR(WriteBackTables());
  return file_->Sync(true);
}

Status Qcow2Map::WriteBack() {
  if (read_only_ || closed_ || !l2_cache_ || !ref_cache_) return Status::Ok();  // open failed early
  // Data in an external data file is durable before L2 entries point at it (the L2
  // cache's own ordering covers only this file).
  if (data_file_ && l2_cache_->dirty()) RETURN_IF_ERROR(data_file_->Sync(true));
  return WriteBackTables();
}

Status Qcow2Map::SyncFiles() {
  if (read_only_ || closed_ || !l2_cache_ || !ref_cache_) return Status::Ok();
  if (data_file_) RETURN_IF_ERROR(data_file_->Sync(true));
  return file_->Sync(true);
}

Status Qcow2Map::Close() {
  if (closed_) return Status::Ok();
  Status s = read_only_ ? Status::Ok() : StoreBitmaps();
  if (s.ok()) s = Flush();
  if (s.ok() && clear_dirty_on_close_) {
    header_.incompatible_features &= ~kIncompatDirty;
    s = WriteHeader();
    if (s.ok()) s = file_->Sync(true);
    clear_dirty_on_close_ = false;
  }
  closed_ = true;
  return s;
}

}  // namespace vimgfs::qcow2

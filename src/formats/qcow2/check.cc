// qcow2 consistency: counting every reference from the header down (check, repair, and
// the refcount rebuild of dirty lazy-refcount images).
#include <algorithm>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

// A reference-count array of one uint32 per host cluster; refuse absurd files.
constexpr uint64_t kMaxCheckedClusters = 256ull << 20;

struct Counter {
  std::vector<uint32_t>* refs;
  CheckReport* report;
  uint32_t bits;
  void Add(uint64_t off, uint64_t len, const char* what) {
    if (len == 0) return;
    uint64_t first = off >> bits, last = (off + len - 1) >> bits;
    for (uint64_t c = first; c <= last; c++) {
      if (c >= refs->size()) {
        report->corruptions++;
        report->messages.push_back(
            fmt::format("ERROR {} at offset {:#x} is past the end of the image file", what, off));
        return;
      }
      if ((*refs)[c] != UINT32_MAX) (*refs)[c]++;
    }
  }
};

}  // namespace

Status Qcow2Map::CountReferences(std::vector<uint32_t>* refs, CheckReport* report) {
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  uint64_t n = std::max(AlignUp(file_size, cluster_size_), host_end_) >> cluster_bits_;
  if (n > kMaxCheckedClusters)
    return Status::Unsupported("'{}': image file has too many clusters ({}) to check", path_, n);
  refs->assign(n, 0);
  Counter cnt{refs, report, cluster_bits_};
  cnt.Add(0, cluster_size_, "header");
  cnt.Add(header_.refcount_table_offset, reftable_.size() * 8, "refcount table");
  for (uint64_t b = 0; b < reftable_.size(); b++) {
    uint64_t off = reftable_[b] & kOffsetMask;
    if (!off) continue;
    if (!IsAligned(off, cluster_size_)) {
      report->corruptions++;
      report->messages.push_back(fmt::format("ERROR refcount block {} is not cluster aligned; refcount "
                                             "table entry corrupted", b));
      continue;
    }
    cnt.Add(off, cluster_size_, "refcount block");
  }

  // One L1 table and everything under it. Fragmentation info is for the active table.
  uint64_t next_contiguous = 0;
  auto walk_l1 = [&](uint64_t l1_off, const std::vector<uint64_t>& l1, bool active) -> Status {
    cnt.Add(l1_off, l1.size() * 8, "L1 table");
    for (uint64_t i = 0; i < l1.size(); i++) {
      uint64_t l2_off = L1EntryOffset(l1[i]);
      if (!l2_off) continue;
      if (!IsAligned(l2_off, cluster_size_)) {
        report->corruptions++;
        report->messages.push_back(fmt::format("ERROR l2_offset={:#x}: Table is not cluster aligned; L1 "
                                               "entry corrupted", l2_off));
        continue;
      }
      cnt.Add(l2_off, cluster_size_, "L2 table");
      if ((l2_off >> cluster_bits_) >= refs->size()) continue;
      ASSIGN_OR_RETURN(TableRef t, l2_cache_->Get(l2_off));
      for (uint64_t j = 0; j < l2_entries_; j++) {
        uint64_t bm;
        uint64_t e = LoadL2(t, j, &bm);
        if (IsCompressed(e)) {
          cnt.Add(CompressedHostOffset(e, cluster_bits_), CompressedLength(e, cluster_bits_),
                  "compressed cluster");
          if (active) {
            report->allocated_clusters++;
            report->compressed_clusters++;
            report->fragmented_clusters++;  // re-reads shared sectors: fragmented by nature
          }
          continue;
        }
        uint64_t host = L2EntryOffset(e);
        if (host == 0 && !(header_.has_data_file() && IsCopied(e))) continue;
        if (!IsAligned(host, cluster_size_)) {
          report->corruptions++;
          report->messages.push_back(fmt::format("ERROR offset={:#x}: Cluster is not properly aligned; L2 "
                                                 "entry corrupted", host));
          continue;
        }
        if (active) {
          report->allocated_clusters++;
          if (next_contiguous && host != next_contiguous) report->fragmented_clusters++;
          next_contiguous = host + cluster_size_;
        }
        if (!header_.has_data_file()) cnt.Add(host, cluster_size_, "data cluster");
      }
    }
    return Status::Ok();
  };

  std::vector<uint64_t> active_l1;
  if (snapshot_view_) {
    std::vector<std::byte> raw(uint64_t{header_.l1_size} * 8);
    RETURN_IF_ERROR(file_->PRead(header_.l1_table_offset, raw));
    active_l1.resize(header_.l1_size);
    for (size_t i = 0; i < active_l1.size(); i++) active_l1[i] = LoadBE64(raw.data() + i * 8);
  }
  RETURN_IF_ERROR(walk_l1(header_.l1_table_offset, snapshot_view_ ? active_l1 : l1_, true));

  uint64_t snap_bytes = 0;
  for (const Snapshot& s : snapshots_) {
    snap_bytes += AlignUp(40 + s.extra.size() + s.id.size() + s.name.size(), 8);
    std::vector<uint64_t> l1(s.l1_size);
    std::vector<std::byte> raw(l1.size() * 8);
    RETURN_IF_ERROR(file_->PRead(s.l1_table_offset, raw));
    for (size_t i = 0; i < l1.size(); i++) l1[i] = LoadBE64(raw.data() + i * 8);
    RETURN_IF_ERROR(walk_l1(s.l1_table_offset, l1, false));
  }
  if (snap_bytes) cnt.Add(header_.snapshots_offset, snap_bytes, "snapshot table");

  if (header_.bitmaps_ext && header_.bitmaps_ext->size() >= 24) {
    const std::byte* p = header_.bitmaps_ext->data();
    uint64_t dir_size = LoadBE64(p + 8), dir_off = LoadBE64(p + 16);
    if (dir_size <= limits::kMaxHeaderExtensionBytes * 16 && dir_off + dir_size <= file_size) {
      cnt.Add(dir_off, dir_size, "bitmap directory");
      std::vector<std::byte> dir(dir_size);
      RETURN_IF_ERROR(file_->PRead(dir_off, dir));
      for (uint64_t pos = 0; pos + 24 <= dir_size;) {
        uint64_t table_off = LoadBE64(dir.data() + pos);
        uint64_t table_size = LoadBE32(dir.data() + pos + 8);
        uint64_t name_size = LoadBE16(dir.data() + pos + 18);
        uint64_t extra_size = LoadBE32(dir.data() + pos + 20);
        if (table_size * 8 <= limits::kMaxL1Bytes && table_off + table_size * 8 <= file_size) {
          cnt.Add(table_off, table_size * 8, "bitmap table");
          std::vector<std::byte> table(table_size * 8);
          RETURN_IF_ERROR(file_->PRead(table_off, table));
          for (uint64_t i = 0; i < table_size; i++) {
            uint64_t off = LoadBE64(table.data() + i * 8) & kOffsetMask;
            if (off) cnt.Add(off, cluster_size_, "bitmap data");
          }
        }
        pos += AlignUp(24 + name_size + extra_size, 8);
      }
    }
  }
  return Status::Ok();
}

Status Qcow2Map::RebuildRefcounts() {
  std::vector<uint32_t> refs;
  CheckReport scratch;
  RETURN_IF_ERROR(CountReferences(&refs, &scratch));
  // Nothing below the end of the counted area may be allocated while counts are stale.
  const uint64_t n = refs.size();
  uint64_t saved_hint = free_hint_;
  free_hint_ = std::max(free_hint_, n);
  for (uint64_t c = 0; c < n; c++) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(c));
    if (rc != refs[c]) RETURN_IF_ERROR(SetRefcount(c, std::min<uint64_t>(refs[c], refcount_max_)));
  }
  // Stale counts past the file end are only leaks; they are left for check -r.
  (void)saved_hint;
  free_hint_ = 0;
  return Status::Ok();
}

Result<CheckReport> Qcow2Map::Check(RepairMode mode) {
  CheckReport r;
  if (mode != RepairMode::kNone) RETURN_IF_ERROR(CheckWritable());
  std::vector<uint32_t> refs;
  RETURN_IF_ERROR(CountReferences(&refs, &r));
  r.total_clusters = DivRoundUp(size_, cluster_size_);

  auto compare = [&](uint64_t c, uint64_t stored, uint64_t ref) -> Status {
    if (stored == ref) return Status::Ok();
    bool fix = mode == RepairMode::kAll || (mode == RepairMode::kLeaks && stored > ref);
    r.messages.push_back(fmt::format("{} cluster {} refcount={} reference={}",
                                     fix ? "Repairing" : stored < ref ? "ERROR" : "Leaked", c, stored, ref));
    if (fix) {
      RETURN_IF_ERROR(SetRefcount(c, std::min<uint64_t>(ref, refcount_max_)));
      (stored < ref ? r.corruptions_fixed : r.leaks_fixed)++;
    } else {
      (stored < ref ? r.corruptions : r.leaks)++;
    }
    return Status::Ok();
  };
  const uint64_t n = refs.size();
  if (mode != RepairMode::kNone) free_hint_ = std::max(free_hint_, n);
  for (uint64_t c = 0; c < n; c++) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(c));
    RETURN_IF_ERROR(compare(c, rc, refs[c]));
  }
  // Like qemu, counts past the end of the file are not looked at.
  if (mode != RepairMode::kNone) free_hint_ = 0;

  // COPIED flags of the active tables must match refcount == 1.
  if (!snapshot_view_) {
    for (uint64_t i = 0; i < l1_.size(); i++) {
      uint64_t l2_off = L1EntryOffset(l1_[i]);
      if (!l2_off || !IsAligned(l2_off, cluster_size_) || (l2_off >> cluster_bits_) >= n) continue;
      ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(l2_off >> cluster_bits_));
      if ((rc == 1) != IsCopied(l1_[i])) {
        r.messages.push_back(fmt::format("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
                                         mode == RepairMode::kAll ? "Repairing" : "ERROR", i, l1_[i], rc));
        if (mode == RepairMode::kAll) {
          l1_[i] = rc == 1 ? (l1_[i] | kFlagCopied) : (l1_[i] & ~kFlagCopied);
          l1_dirty_ = true;
          r.corruptions_fixed++;
        } else {
          r.corruptions++;
        }
      }
      if (header_.has_data_file()) continue;
      ASSIGN_OR_RETURN(TableRef t, l2_cache_->Get(l2_off));
      for (uint64_t j = 0; j < l2_entries_; j++) {
        uint64_t bm;
        uint64_t e = LoadL2(t, j, &bm);
        uint64_t host = L2EntryOffset(e);
        if (IsCompressed(e) || host == 0 || !IsAligned(host, cluster_size_) || (host >> cluster_bits_) >= n)
          continue;
        ASSIGN_OR_RETURN(uint64_t drc, GetRefcount(host >> cluster_bits_));
        if ((drc == 1) != IsCopied(e)) {
          r.messages.push_back(fmt::format("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                                           mode == RepairMode::kAll ? "Repairing" : "ERROR", e, drc));
          if (mode == RepairMode::kAll) {
            StoreL2(t, j, drc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied), bm);
            r.corruptions_fixed++;
          } else {
            r.corruptions++;
          }
        }
      }
    }
  }
  if (mode != RepairMode::kNone) RETURN_IF_ERROR(FlushAll());

  uint64_t highest = 0;
  for (uint64_t c = 0; c < n; c++)
    if (refs[c]) highest = c + 1;
  r.image_end_offset = highest << cluster_bits_;
  return r;
}

}  // namespace vimgfs::qcow2

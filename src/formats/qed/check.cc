// `check` for QED, as qemu-img 7.2 checks it: every L2 table and data cluster offset in
// the file, cluster-aligned and past the header; no cluster named twice; clusters nothing
// names are leaks. Repair (-r leaks and -r all alike, as in qemu) clears the offsets that
// are invalid; a cluster named twice and leaks stay. A repaired image with nothing left
// but leaks loses its QED_F_NEED_CHECK mark. qemu prints no message per problem.
#include <vector>

#include "formats/qed/qed_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qed {

Result<CheckReport> QedMap::Check(RepairMode mode) {
  const bool fix = mode != RepairMode::kNone;
  if (fix) RETURN_IF_ERROR(CheckWritable());
  // What the cache holds is what is checked; flushed first so a repair rewrites tables
  // that are on disk.
  if (!read_only_) RETURN_IF_ERROR(Flush());
  const uint64_t cs = header_.cluster_size;
  CheckReport r;
  r.total_clusters = DivRoundUp(header_.image_size, cs);
  const uint64_t nclusters = CheckClusterNumber(file_size_);
  if (nclusters / 8 > limits::kMaxMapBytes)
    return Status::Unsupported("'{}': checking a file of {} clusters needs more memory than vimgfs allows",
                               path_, nclusters);
  std::vector<bool> used(nclusters);
  // Marks n clusters from off used; false when one was already (each such one counts).
  auto mark_used = [&](uint64_t off, uint64_t n) {
    uint64_t first = CheckClusterNumber(off);
    int64_t twice = 0;
    for (uint64_t i = first; i < first + n && i < nclusters; ++i) {
      if (used[i]) ++twice;
      used[i] = true;
    }
    r.corruptions += twice;
    return twice == 0;
  };

  mark_used(header_.l1_table_offset, header_.table_size);
  bool l1_fixed = false;
  bool io_error = false;
  for (uint64_t i = 0; i < header_.table_entries(); ++i) {
    const uint64_t off = L1Entry(i);
    if (off == kUnallocated) continue;
    if (!ValidTableOffset(off)) {
      if (fix) {
        SetL1Entry(i, kUnallocated);
        ++r.corruptions_fixed;
        l1_fixed = true;
      } else {
        ++r.corruptions;
      }
      continue;
    }
    if (!mark_used(off, header_.table_size)) continue;  // a table named twice is not read
    auto table = l2_cache_->Get(off);
    if (!table.ok()) {
      ++r.check_errors;
      io_error = true;
      continue;
    }
    TableRef& l2 = *table;
    uint64_t last = 0;
    bool l2_fixed = false;
    for (uint64_t j = 0; j < header_.table_entries(); ++j) {
      std::byte* slot = l2.data() + j * 8;
      const uint64_t e = LoadLE64(slot);
      if (e == kUnallocated || e == kZeroCluster) continue;
      ++r.allocated_clusters;
      if (last != 0 && last + cs != e) ++r.fragmented_clusters;
      last = e;
      if (!ValidClusterOffset(e)) {
        if (fix) {
          StoreLE64(slot, kUnallocated);
          ++r.corruptions_fixed;
          l2_fixed = true;
        } else {
          ++r.corruptions;
        }
        continue;
      }
      mark_used(e, 1);
    }
    if (l2_fixed) l2.MarkDirty();
  }
  if (l1_fixed || fix) {
    Status s = WriteBack();
    if (!s.ok()) {
      ++r.check_errors;
      io_error = true;
    }
  }
  if (io_error) return r;  // leaks are counted only over a complete scan
  for (uint64_t i = header_.header_size; i < nclusters; ++i) r.leaks += !used[i];
  if (fix && r.corruptions == 0 && r.check_errors == 0 && (header_.features & kFeatureNeedCheck)) {
    // The repairs reach the disk before the mark is cleared.
    RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
    header_.features &= ~kFeatureNeedCheck;
    RETURN_IF_ERROR(WriteHeaderFields());
    RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  }
  return r;
}

}  // namespace vimgfs::qed

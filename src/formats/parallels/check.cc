// `check` for Parallels: what qemu-img 7.2 reports and repairs.
//   - an image left in use by its last writer: one corruption; -r all clears the mark
//     (every read-write open, -r leaks too, clears it when it closes, as qemu's does);
//   - a cluster that starts past the end of the file: a corruption; -r all unmaps it;
//   - file space past the end of the last cluster (the image end offset, which is the
//     first cluster's size when none is allocated): leaked clusters; -r cuts the file.
#include <algorithm>

#include "formats/format_util.h"
#include "formats/parallels/parallels_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs::parallels {

Result<CheckReport> ParallelsMap::Check(RepairMode mode) {
  if (mode != RepairMode::kNone && (read_only_ || closed_))
    return Status::ReadOnly("'{}': cannot repair: image is not open for writing", path_);
  const bool fix_errors = mode == RepairMode::kAll;
  const bool fix_leaks = mode != RepairMode::kNone;
  const char* errors_word = fix_errors ? "Repairing" : "ERROR";
  const char* leaks_word = fix_leaks ? "Repairing" : "ERROR";
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  const uint64_t size = AlignUp(file_size, kSectorSize);  // qemu measures files in whole sectors
  CheckReport report;
  if (unclean_) {
    report.messages.push_back(fmt::format("{} image was not closed correctly", errors_word));
    ++report.corruptions;
    if (fix_errors) {
      ++report.corruptions_fixed;
      unclean_ = false;  // the close writes the header with the mark cleared
    }
  }
  const uint64_t cs = h_.cluster_size;
  report.total_clusters = h_.bat_entries;
  uint64_t high = 0, prev = 0;
  uint64_t last_named = 0;  // end of the last non-zero BAT entry in the file
  for (uint32_t i = 0; i < h_.bat_entries; ++i) {
    const uint64_t host = HostOffset(entry(i));
    if (host == 0) {
      prev = 0;
      continue;
    }
    if (host > size) {
      report.messages.push_back(fmt::format("{} cluster {} is outside image", errors_word, i));
      ++report.corruptions;
      if (fix_errors) {
        SetEntry(i, 0);
        ++report.corruptions_fixed;
        prev = 0;
        continue;
      }
    }
    last_named = kHeaderSize + (uint64_t{i} + 1) * 4;
    ++report.allocated_clusters;
    high = std::max(high, host);
    if (prev != 0 && prev + cs != host) ++report.fragmented_clusters;
    prev = host;
  }
  if (!dirty_sectors_.empty() && fix_errors) {
    // The cleared entries, with any others still due (their data synced first).
    RETURN_IF_ERROR(WriteBack());
    RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
    Scan(file_size);
  }
  report.image_end_offset = high + cs;
  if (size > report.image_end_offset) {
    const uint64_t leaked = size - report.image_end_offset;
    report.messages.push_back(fmt::format("{} space leaked at the end of the image {}", leaks_word, leaked));
    const int64_t count = static_cast<int64_t>(DivRoundUp(leaked, cs));
    report.leaks += count;
    if (fix_leaks) {
      // qemu cuts at the image end offset, even inside an empty BAT (its close grows the
      // file back to the data area, and so does ours). A BAT entry that still names a
      // cluster is never cut off.
      const uint64_t cut = std::max(report.image_end_offset, AlignUp(last_named, kSectorSize));
      if (cut < file_size) RETURN_IF_ERROR(file_->Truncate(cut).WithContext("'{}': truncating", path_));
      report.leaks_fixed += count;
    }
  }
  return report;
}

}  // namespace vimgfs::parallels

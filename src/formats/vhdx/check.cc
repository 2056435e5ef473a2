// `check` for VHDX: what qemu-img 7.2 reports. Every present payload block must lie inside
// the file (a block past the end means a truncated image); qemu reports no leaks, no image
// end offset and no cluster counts for VHDX, and repairs nothing but the log (replayed at
// a read-write open).
#include <algorithm>

#include "formats/vhdx/vhdx_internal.h"

namespace vimgfs::vhdx {

Result<CheckReport> VhdxMap::Check(RepairMode mode) {
  CheckReport report;
  // qemu counts a log replayed at the (read-write) open as one corruption fixed.
  if (log_replayed_ && mode != RepairMode::kNone) report.corruptions_fixed = 1;
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  std::vector<std::pair<uint64_t, uint64_t>> used;  // (offset, entry index)
  for (uint64_t i = 0; i < bat_.size(); ++i) {
    if (i % (p_.chunk_ratio + 1) == p_.chunk_ratio) continue;
    // qemu checks fully present blocks only, the last one for the part inside the disk
    // (it counts that part with the BAT index, sector bitmap entries included).
    if (EntryState(bat_[i]) != kFullyPresent) continue;
    const uint64_t off = EntryOffset(bat_[i]);
    const uint64_t block_length =
        i * uint64_t{p_.block_size} >= p_.virtual_size
            ? p_.block_size
            : std::min<uint64_t>(p_.block_size, p_.virtual_size - i * uint64_t{p_.block_size});
    if (off >= file_size) {
      report.messages.push_back(
          fmt::format("VHDX BAT entry {} start offset {} points after end of file ({}). Image has probably "
                      "been truncated.",
                      i, off, file_size));
      ++report.corruptions;
    } else if (off + block_length > file_size) {
      report.messages.push_back(
          fmt::format("VHDX BAT entry {} end offset {} points after end of file ({}). Image has probably "
                      "been truncated.",
                      i, off + block_length - 1, file_size));
      ++report.corruptions;
    }
    used.emplace_back(off, i);
  }
  std::sort(used.begin(), used.end());
  for (size_t k = 1; k < used.size(); ++k) {
    if (used[k].first < used[k - 1].first + p_.block_size) {  // (vimgfs: qemu does not look)
      report.messages.push_back(fmt::format("VHDX BAT entry {} data block overlaps that of entry {}",
                                            used[k].second, used[k - 1].second));
      ++report.corruptions;
    }
  }
  return report;
}

}  // namespace vimgfs::vhdx

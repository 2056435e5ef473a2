// `check` for VDI: what qemu-img 7.2 reports. Every allocated block map entry must name
// a data block below blocks_in_image that no other entry names, and the number of
// allocated entries must equal the header's blocks_allocated. qemu reports no leaks,
// no image end offset and no cluster counts for VDI, and repairs nothing.
#include <vector>

#include "formats/vdi/vdi_internal.h"
#include "util/endian.h"

namespace vimgfs::vdi {

Result<CheckReport> CheckBlockMap(const Header& h, BlockMapPages& bmap, uint32_t count) {
  CheckReport report;
  // A hostile map may hold hundreds of millions of bad entries: each counts, but only so
  // many are listed.
  constexpr size_t kMaxListed = 10000;
  auto error = [&](std::string line) {
    if (report.messages.size() < kMaxListed) report.messages.push_back(std::move(line));
    ++report.corruptions;
  };
  // taken[i]: some entry names data block i (qemu's message names the index twice).
  std::vector<bool> taken(h.blocks_in_image);
  uint32_t allocated = 0;
  // Entries past the end of the file read as zeros (all naming data block 0): counted at
  // once rather than read one by one.
  ASSIGN_OR_RETURN(const uint64_t in_file, bmap.EntriesInFile());
  const uint64_t scanned = std::min<uint64_t>(h.blocks_in_image, in_file);
  for (uint64_t block = 0; block < scanned; ++block) {
    ASSIGN_OR_RETURN(const uint32_t e, bmap.Get(block));
    if (!IsAllocated(e)) continue;
    if (e < h.blocks_in_image) {
      ++allocated;
      if (!taken[e]) {
        taken[e] = true;
      } else {
        error(fmt::format("ERROR: block index {} also used by {}", e, e));
      }
    } else {
      error(fmt::format("ERROR: block index {} too large, is {}", block, e));
    }
  }
  for (uint64_t zeros = h.blocks_in_image - scanned; zeros > 0; --zeros) {
    ++allocated;
    if (!taken[0]) {
      taken[0] = true;
    } else {
      error("ERROR: block index 0 also used by 0");
      if (report.messages.size() >= kMaxListed) {  // the rest only counts
        allocated += static_cast<uint32_t>(zeros - 1);
        report.corruptions += static_cast<int64_t>(zeros - 1);
        break;
      }
    }
  }
  if (allocated != count) {
    report.messages.push_back(
        fmt::format("ERROR: allocated blocks mismatch, is {}, should be {}", allocated, count));
    ++report.corruptions;
  }
  return report;
}

}  // namespace vimgfs::vdi

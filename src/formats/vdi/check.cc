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
  // taken[i]: some entry names data block i (qemu's message names the index twice).
  std::vector<bool> taken(h.blocks_in_image);
  uint32_t allocated = 0;
  for (uint64_t block = 0; block < h.blocks_in_image; ++block) {
    ASSIGN_OR_RETURN(const uint32_t e, bmap.Get(block));
    if (!IsAllocated(e)) continue;
    if (e < h.blocks_in_image) {
      ++allocated;
      if (!taken[e]) {
        taken[e] = true;
      } else {
        report.messages.push_back(fmt::format("ERROR: block index {} also used by {}", e, e));
        ++report.corruptions;
      }
    } else {
      report.messages.push_back(fmt::format("ERROR: block index {} too large, is {}", block, e));
      ++report.corruptions;
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

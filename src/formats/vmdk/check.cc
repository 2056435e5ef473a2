// qemu-img check for vmdk: qemu walks the disk grain by grain and stops at the first grain
// whose offset is at or past the end of its extent file ("points after EOF") or whose
// grain table cannot be read. It reports no leaks, no image end offset and nothing else;
// a finding fails the check (qemu-img: "Check failed: Invalid argument", exit 1).
#include "formats/vmdk/vmdk_internal.h"

namespace vimgfs::vmdk {

Result<CheckReport> CheckExtents(const std::vector<std::unique_ptr<Extent>>& extents) {
  CheckReport report;
  for (const auto& e : extents) {
    ASSIGN_OR_RETURN(std::string finding, e->CheckGrains(e->start));
    if (!finding.empty()) {
      // qemu counts it, prints the line and fails the check with EINVAL.
      return Status::Error(ErrorKind::kCorrupt, EINVAL, finding + "\nInvalid argument");
    }
  }
  return report;
}

}  // namespace vimgfs::vmdk

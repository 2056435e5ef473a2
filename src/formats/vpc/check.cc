// `check` for VHD. qemu-img does not check VHD; vimgfs reports what would make another
// reader (or the next write) go wrong: a missing or different footer at the end of a
// dynamic disk, a dynamic header whose checksum is wrong, BAT entries that overlap the
// metadata, each other or the end of the file, a fixed disk shorter than its size.
// Nothing is repaired.
#include "formats/vpc/vpc_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs::vpc {

Result<CheckReport> VpcMap::Check(RepairMode mode) {
  if (mode != RepairMode::kNone) return Status::Unsupported("This image format does not support checks");
  CheckReport report;
  auto corrupt = [&](std::string message) {
    report.messages.push_back("ERROR " + message);
    ++report.corruptions;
  };
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  if (fixed()) {
    if (virtual_size() + kFooterSize > file_size)
      corrupt(fmt::format("the disk size {} reaches into the footer (file of {} bytes)", virtual_size(),
                          file_size));
    return report;
  }
  if (!dyn_.checksum_ok) corrupt("the dynamic header checksum is wrong");
  if (!inconsistency_.empty()) corrupt(inconsistency_);
  std::array<std::byte, kFooterSize> end{};
  if (file_size >= kFooterSize) RETURN_IF_ERROR(file_->PRead(file_size - kFooterSize, end));
  if (!HasFooterCookie(end)) {
    corrupt("the file does not end in a VHD footer");
  } else if (end != footer_.raw) {
    corrupt("the footer at the end of the file differs from its copy at the start");
  }
  uint64_t allocated = 0;
  for (uint64_t b = 0; b < dyn_.max_table_entries; ++b) allocated += entry(b) != kBatUnused;
  report.allocated_clusters = allocated;
  report.total_clusters = DivRoundUp(virtual_size(), dyn_.block_size);
  report.image_end_offset = file_size;
  return report;
}

}  // namespace vimgfs::vpc

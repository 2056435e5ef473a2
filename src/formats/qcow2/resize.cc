// qcow2 resize, backing file rewrite and internal snapshots.
#include "formats/qcow2/qcow2_internal.h"

namespace vimgfs::qcow2 {

Status Qcow2Map::Resize(uint64_t, bool) { return Status::Unsupported("not yet"); }
Status Qcow2Map::SetBacking(const std::optional<BackingRef>&) { return Status::Unsupported("not yet"); }
Status Qcow2Map::SnapshotCreate(const std::string&) { return Status::Unsupported("not yet"); }
Status Qcow2Map::SnapshotApply(const std::string&) { return Status::Unsupported("not yet"); }
Status Qcow2Map::SnapshotDelete(const std::string&) { return Status::Unsupported("not yet"); }

}  // namespace vimgfs::qcow2

// `create -f parallels` (the layout qemu-img 7.2 writes: "WithouFreSpacExt", the data
// area starting on a cluster boundary) and the driver object.
#include <cstring>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/parallels/parallels_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::parallels {

Status CreateParallels(const CreateContext& ctx) {
  uint64_t size = ctx.size;
  uint64_t cluster_size = kDefaultClusterSize;
  for (const auto& [key, value] : ctx.options) {
    if (key == "cluster_size") {
      ASSIGN_OR_RETURN(cluster_size, ParseSize(value));
    } else if (key == "size") {
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "preallocation" && value == "off") {
      // The file protocol's; qemu's parallels files are sized by the format anyway.
    } else {
      return Status::InvalidArgument("'{}': Invalid parameter '{}'", ctx.path, key);
    }
  }
  if (ctx.backing)
    return Status::Unsupported("'{}': Backing file not supported for file format 'parallels'", ctx.path);
  // qemu rounds both up to a sector silently (not to a power of two), then checks.
  if (size > limits::kMaxVirtualSize || cluster_size > (uint64_t{1} << 62))
    return Status::InvalidArgument("'{}': Image size is too large for this cluster size", ctx.path);
  size = AlignUp(size, kSectorSize);
  cluster_size = AlignUp(cluster_size, kSectorSize);
  if (cluster_size >= static_cast<uint64_t>(INT64_MAX) / (uint64_t{1} << 32))
    return Status::InvalidArgument("'{}': Cluster size is too large", ctx.path);
  if (size >= (uint64_t{1} << 32) * cluster_size)
    return Status::InvalidArgument("'{}': Image size is too large for this cluster size", ctx.path);
  const uint64_t bat_entries = DivRoundUp(size, cluster_size);  // < 2^32, checked above
  const uint64_t data_start = DivRoundUp(kHeaderSize + bat_entries * 4, cluster_size) * cluster_size;

  std::array<std::byte, kSectorSize> head{};
  std::byte* h = head.data();
  std::memcpy(h + off::kMagic, kMagicClusters, 16);
  StoreLE32(h + off::kVersion, kVersion);
  StoreLE32(h + off::kHeads, kHeads);
  StoreLE32(h + off::kCylinders, static_cast<uint32_t>(size / kSectorSize / kHeads / kSectorsPerCylinder));
  StoreLE32(h + off::kTracks, static_cast<uint32_t>(cluster_size / kSectorSize));
  StoreLE32(h + off::kBatEntries, static_cast<uint32_t>(bat_entries));
  StoreLE64(h + off::kNbSectors, size / kSectorSize);
  StoreLE32(h + off::kDataOff, static_cast<uint32_t>(data_start / kSectorSize));

  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  RETURN_IF_ERROR(file->PWrite(0, head, IoTag::kHeader).WithContext("'{}': writing", ctx.path));
  // The empty BAT up to the data area: zeros, allocated as qemu's zero write leaves them
  // (so `info` shows the same disk size); a hole where the host cannot allocate.
  if (data_start > kSectorSize) {
    Status st = file->Allocate(kSectorSize, data_start - kSectorSize);
    if (!st.ok()) RETURN_IF_ERROR(file->Truncate(data_start).WithContext("'{}': sizing", ctx.path));
  }
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class ParallelsFormat final : public FormatDriver {
 public:
  const char* name() const override { return "parallels"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", CreateOptionSpec::Type::kSize, "Virtual disk size"},
                {"cluster_size", CreateOptionSpec::Type::kSize, "Parallels image cluster size", "1048576"},
            },
        // qemu hands preallocation to the file protocol, and the format then writes the
        // file's size itself: the option has no effect.
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .reports_dirty_flag = false,  // qemu's parallels driver has no bdrv_get_info
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeParallels(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return OpenParallels(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override { return CreateParallels(ctx); }
};

}  // namespace
}  // namespace vimgfs::parallels

namespace vimgfs {
const FormatDriver* ParallelsDriver() {
  static const parallels::ParallelsFormat driver;
  return &driver;
}
}  // namespace vimgfs

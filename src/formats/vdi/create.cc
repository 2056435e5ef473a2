// `create -f vdi` (the layout qemu-img 7.2 writes) and the driver object.
#include <algorithm>
#include <cstring>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/vdi/vdi_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::vdi {
Status CreateVdi(const CreateContext& ctx) {
  bool is_static = false;
  uint64_t size = ctx.size;
  for (const auto& [key, value] : ctx.options) {
    if (key == "static") {
      ASSIGN_OR_RETURN(is_static, ParseBoolOption(key, value));
    } else if (key == "size") {
      // The command line normally folds this into ctx.size; accept it either way.
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "preallocation" && value == "off") {
      // qemu passes this to the file layer; "off" is what it does anyway.
    } else {
      return Status::InvalidArgument("'{}': Invalid parameter '{}'", ctx.path, key);
    }
  }
  if (ctx.backing) {
    return Status::Unsupported("'{}': Backing file not supported for file format 'vdi'", ctx.path);
  }
  if (size > kMaxDiskSize) {
    return Status::Unsupported("'{}': Unsupported VDI image size (size is 0x{:x}, max supported is 0x{:x})",
                               ctx.path, size, kMaxDiskSize);
  }
  size = AlignUp(size, kSectorSize);  // qemu silently rounds up to a sector
  const uint64_t block_size = kDefaultBlockSize;
  const uint64_t blocks = DivRoundUp(size, block_size);
  const uint64_t bmap_size = AlignUp(blocks * 4, kSectorSize);
  if (blocks * 4 > limits::kMaxMapBytes) {
    return Status::Unsupported(
        "'{}': a VDI image of {} bytes needs a block map of {} bytes, over vimgfs's limit of {}", ctx.path,
        size, blocks * 4, limits::kMaxMapBytes);
  }
  const uint64_t offset_bmap = kSectorSize;
  const uint64_t offset_data = offset_bmap + bmap_size;

  std::vector<std::byte> head(offset_data);
  std::memcpy(head.data(), kQemuText, sizeof(kQemuText) - 1);
  std::byte* h = head.data();
  StoreLE32(h + off::kSignature, kSignature);
  StoreLE32(h + off::kVersion, kVersion11);
  StoreLE32(h + off::kHeaderSize, kHeader1PlusSize);
  StoreLE32(h + off::kImageType, is_static ? kTypeStatic : kTypeDynamic);
  StoreLE32(h + off::kImageFlags, 0);
  StoreLE32(h + off::kOffsetBmap, static_cast<uint32_t>(offset_bmap));
  StoreLE32(h + off::kOffsetData, static_cast<uint32_t>(offset_data));
  StoreLE32(h + off::kSectorSizeField, kSectorSize);
  StoreLE64(h + off::kDiskSize, size);
  StoreLE32(h + off::kBlockSize, static_cast<uint32_t>(block_size));
  StoreLE32(h + off::kBlockExtra, 0);
  StoreLE32(h + off::kBlocksInImage, static_cast<uint32_t>(blocks));
  StoreLE32(h + off::kBlocksAllocated, is_static ? static_cast<uint32_t>(blocks) : 0);
  const auto uuid_image = RandomUuid(/*guid_order=*/true);
  const auto uuid_snap = RandomUuid(/*guid_order=*/true);
  std::memcpy(h + off::kUuidImage, uuid_image.data(), 16);
  std::memcpy(h + off::kUuidLastSnap, uuid_snap.data(), 16);
  for (uint64_t b = 0; b < blocks; ++b) {
    StoreLE32(h + offset_bmap + b * 4, is_static ? static_cast<uint32_t>(b) : kBlockFree);
  }

  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  RETURN_IF_ERROR(file->PWrite(0, head, IoTag::kHeader).WithContext("'{}': writing", ctx.path));
  if (is_static) {
    // Static: every block allocated in place (the file is sized, not written, as qemu).
    RETURN_IF_ERROR(file->Truncate(offset_data + blocks * block_size)
                        .WithContext("'{}': Failed to statically allocate file", ctx.path));
  }
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class VdiFormat final : public FormatDriver {
 public:
  const char* name() const override { return "vdi"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", CreateOptionSpec::Type::kSize, "Virtual disk size"},
                {"static", CreateOptionSpec::Type::kBool, "VDI static (pre-allocated) image", "off"},
            },
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeVdi(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override { return OpenVdi(std::move(ctx)); }
  Status Create(const CreateContext& ctx) const override { return CreateVdi(ctx); }
};

}  // namespace
}  // namespace vimgfs::vdi

namespace vimgfs {
const FormatDriver* VdiDriver() {
  static const vdi::VdiFormat driver;
  return &driver;
}
}  // namespace vimgfs

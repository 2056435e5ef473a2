// `create -f vpc` (the layout qemu-img 7.2 writes) and the driver object.
#include <cerrno>
#include <cstring>
#include <ctime>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/vpc/vpc_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::vpc {
namespace {

std::array<std::byte, kFooterSize> MakeFooter(uint32_t disk_type, uint64_t size, const Geometry& g,
                                              bool force_size) {
  std::array<std::byte, kFooterSize> f{};
  std::byte* p = f.data();
  std::memcpy(p + foot::kCookie, "conectix", 8);
  StoreBE32(p + foot::kFeatures, 2);  // "reserved", always set
  StoreBE32(p + foot::kVersion, 0x00010000);
  StoreBE64(p + foot::kDataOffset, disk_type == kTypeFixed ? ~0ull : kFooterSize);
  StoreBE32(p + foot::kTimestamp, static_cast<uint32_t>(std::time(nullptr) - kTimestampBase));
  // "qem2" tells readers that current_size, not the geometry, is the size.
  std::memcpy(p + foot::kCreatorApp, force_size ? "qem2" : "qemu", 4);
  StoreBE32(p + foot::kCreatorVersion, 0x00050003);  // Virtual PC 2007, as qemu writes
  std::memcpy(p + foot::kCreatorOs, "Wi2k", 4);
  StoreBE64(p + foot::kOriginalSize, size);
  StoreBE64(p + foot::kCurrentSize, size);
  StoreBE16(p + foot::kCylinders, g.cylinders);
  p[foot::kHeads] = std::byte{g.heads};
  p[foot::kSectorsPerTrack] = std::byte{g.sectors_per_track};
  StoreBE32(p + foot::kDiskType, disk_type);
  const auto uuid = RandomUuid(/*guid_order=*/false);
  std::memcpy(p + foot::kUniqueId, uuid.data(), uuid.size());
  StoreBE32(p + foot::kChecksum, Checksum(f, foot::kChecksum));
  return f;
}

}  // namespace

Status CreateVpc(const CreateContext& ctx) {
  bool force_size = false;
  uint32_t disk_type = kTypeDynamic;
  uint64_t size = ctx.size;
  for (const auto& [key, value] : ctx.options) {
    if (key == "force_size") {
      ASSIGN_OR_RETURN(force_size, ParseBoolOption(key, value));
    } else if (key == "subformat") {
      if (value == "dynamic")
        disk_type = kTypeDynamic;
      else if (value == "fixed")
        disk_type = kTypeFixed;
      else
        return Status::InvalidArgument("Parameter 'subformat' does not accept value '{}'", value);
    } else if (key == "size") {
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "preallocation") {
      // qemu hands it to the file it creates empty: it changes nothing.
    } else {
      return Status::InvalidArgument("'{}': Invalid parameter '{}'", ctx.path, key);
    }
  }
  if (ctx.backing) return Status::Unsupported("Backing file not supported for file format 'vpc'");
  Geometry g;
  auto created = CreatedSize(size, force_size, &g);
  if (!created.ok()) return Status::Error(ErrorKind::kUnsupported, EFBIG, created.error().message());
  size = created.value();
  const auto footer = MakeFooter(disk_type, size, g, force_size);

  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  if (disk_type == kTypeFixed) {
    RETURN_IF_ERROR(file->Truncate(size + kFooterSize));
    RETURN_IF_ERROR(
        file->PWrite(size, footer, IoTag::kHeader).WithContext("'{}': Unable to write VHD header", ctx.path));
    return file->Sync(false).WithContext("'{}': syncing", ctx.path);
  }
  // Footer copy, dynamic header, BAT (all unused), footer.
  const uint64_t entries = DivRoundUp(size / kSectorSize, kDefaultBlockSize / kSectorSize);
  const uint64_t table_offset = kFooterSize + kDynHeaderSize;
  const uint64_t bat_bytes = AlignUp(entries * 4, kSectorSize);
  if (entries * 4 > limits::kMaxMapBytes)
    return Status::Error(ErrorKind::kUnsupported, EFBIG, "VHD block allocation table too large");
  std::vector<std::byte> head(table_offset + bat_bytes + kFooterSize, std::byte{0});
  std::memcpy(head.data(), footer.data(), kFooterSize);
  std::byte* h = head.data() + kFooterSize;
  std::memcpy(h + dyn::kCookie, "cxsparse", 8);
  // The specification says 0xFFFFFFFF; Microsoft's tools want all 64 bits set.
  StoreBE64(h + dyn::kDataOffset, ~0ull);
  StoreBE64(h + dyn::kTableOffset, table_offset);
  StoreBE32(h + dyn::kVersion, 0x00010000);
  StoreBE32(h + dyn::kMaxTableEntries, static_cast<uint32_t>(entries));
  StoreBE32(h + dyn::kBlockSize, static_cast<uint32_t>(kDefaultBlockSize));
  StoreBE32(h + dyn::kChecksum, Checksum(std::span(h, kDynHeaderSize), dyn::kChecksum));
  std::memset(head.data() + table_offset, 0xff, bat_bytes);
  std::memcpy(head.data() + table_offset + bat_bytes, footer.data(), kFooterSize);
  RETURN_IF_ERROR(file->PWrite(0, head, IoTag::kHeader)
                      .WithContext("'{}': Unable to create or write VHD header", ctx.path));
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class VpcFormat final : public FormatDriver {
 public:
  const char* name() const override { return "vpc"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", CreateOptionSpec::Type::kSize, "Virtual disk size"},
                {"subformat", CreateOptionSpec::Type::kString,
                 "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "},
                {"force_size", CreateOptionSpec::Type::kBool,
                 "Force disk size calculation to use the actual size specified, rather than using the "
                 "nearest "
                 "CHS-based calculation"},
            },
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string&) const override { return ProbeVpc(head); }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override { return OpenVpc(std::move(ctx)); }
  Status Create(const CreateContext& ctx) const override { return CreateVpc(ctx); }
};

}  // namespace
}  // namespace vimgfs::vpc

namespace vimgfs {
const FormatDriver* VpcDriver() {
  static const vpc::VpcFormat driver;
  return &driver;
}
}  // namespace vimgfs

// `create -f vhdx` (the layout qemu-img 7.2 writes) and the driver object.
#include <cstring>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/vhdx/vhdx_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::vhdx {
namespace {

void PutMetaEntry(std::byte* table, int i, const Guid& g, uint32_t off, uint32_t len, uint32_t flags) {
  std::byte* e = table + 32 + i * 32;
  std::memcpy(e, g.data(), 16);
  StoreLE32(e + 16, off);
  StoreLE32(e + 20, len);
  StoreLE32(e + 24, flags);
}

}  // namespace

Status CreateVhdx(const CreateContext& ctx) {
  uint64_t size = ctx.size;
  uint64_t log_size = 1 * MiB;
  uint64_t block_size = 0;
  bool fixed = false;
  bool zero_state = true;
  for (const auto& [key, value] : ctx.options) {
    if (key == "size") {
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "log_size") {
      ASSIGN_OR_RETURN(log_size, ParseSize(value));
    } else if (key == "block_size") {
      ASSIGN_OR_RETURN(block_size, ParseSize(value));
    } else if (key == "subformat") {
      if (value == "fixed") {
        fixed = true;
      } else if (value != "dynamic") {
        return Status::InvalidArgument("'{}': VHDX subformat '{}' is not 'dynamic' or 'fixed'", ctx.path,
                                       value);
      }
    } else if (key == "block_state_zero") {
      ASSIGN_OR_RETURN(zero_state, ParseBoolOption(key, value));
    } else if (key == "preallocation" && value == "off") {
    } else {
      return Status::InvalidArgument("'{}': Invalid parameter '{}'", ctx.path, key);
    }
  }
  if (ctx.backing) {
    return Status::Unsupported("'{}': Backing file not supported for file format 'vhdx'", ctx.path);
  }
  if (size > kMaxVirtualSize) {
    return Status::InvalidArgument("'{}': Image size too large; max of 64TB", ctx.path);
  }
  if (log_size < MiB || log_size % MiB != 0 || log_size > kMaxLogLength) {
    return Status::InvalidArgument("'{}': Log size must be a multiple of 1 MB", ctx.path);
  }
  if (block_size == 0) {
    // qemu's choice by disk size.
    if (size > (32ull << 40))
      block_size = 64 * MiB;
    else if (size > (100ull << 30))
      block_size = 32 * MiB;
    else if (size > (1ull << 30))
      block_size = 16 * MiB;
    else
      block_size = 8 * MiB;
  }
  if (block_size % MiB != 0 || !IsPowerOfTwo(block_size) || block_size > kMaxBlockSize) {
    return Status::InvalidArgument(
        "'{}': Block size must be a multiple of 1 MB and a power of two, at most 256 MB", ctx.path);
  }
  Params p;
  p.block_size = static_cast<uint32_t>(block_size);
  p.logical_sector = 512;
  p.physical_sector = 512;
  p.disk_size = p.virtual_size = AlignUp(size, 512);
  p.bat_length = ~uint64_t{0};  // no room check yet: the BAT region is sized from it
  RETURN_IF_ERROR(ComputeGeometry(&p, ctx.path));
  p.bat_length = AlignUp(std::max<uint64_t>(p.bat_entries * 8, 1), MiB);
  const uint64_t log_offset = 1 * MiB;
  p.bat_offset = log_offset + log_size;
  p.metadata_offset = p.bat_offset + p.bat_length;
  p.metadata_length = 1 * MiB;
  // qemu's layout: payload starts 5 MiB past the BAT (the metadata's 1 MiB and room to
  // spare), 1 MiB aligned whatever the block size; a dynamic file ends there.
  const uint64_t data_start = p.bat_offset + p.bat_length + 5 * MiB;

  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  auto write = [&](uint64_t off, std::span<const std::byte> b, IoTag tag) {
    return file->PWrite(off, b, tag).WithContext("'{}': writing", ctx.path);
  };

  // File identifier.
  std::vector<std::byte> ident(64 * KiB);
  std::memcpy(ident.data(), "vhdxfile", 8);
  const char creator[] = "vimgfs";
  for (size_t i = 0; i + 1 < sizeof(creator); ++i) ident[8 + 2 * i] = std::byte(creator[i]);
  RETURN_IF_ERROR(write(0, ident, IoTag::kHeader));

  // Region table (both copies).
  std::vector<std::byte> rt(kRegionTableSize);
  std::memcpy(rt.data(), "regi", 4);
  StoreLE32(&rt[8], 2);
  std::memcpy(&rt[16], kBatGuid.data(), 16);
  StoreLE64(&rt[32], p.bat_offset);
  StoreLE32(&rt[40], static_cast<uint32_t>(p.bat_length));
  StoreLE32(&rt[44], 0);  // not flagged required, as qemu writes them
  std::memcpy(&rt[48], kMetadataGuid.data(), 16);
  StoreLE64(&rt[64], p.metadata_offset);
  StoreLE32(&rt[72], static_cast<uint32_t>(p.metadata_length));
  StoreLE32(&rt[76], 0);
  StoreChecksum(rt, 4);
  RETURN_IF_ERROR(write(kRegion1Offset, rt, IoTag::kHeader));
  RETURN_IF_ERROR(write(kRegion2Offset, rt, IoTag::kHeader));

  // Metadata.
  std::vector<std::byte> md(kMetadataTableSize + 64 * KiB);
  std::memcpy(md.data(), "metadata", 8);
  StoreLE16(&md[10], 5);
  const uint32_t base = static_cast<uint32_t>(kMetadataTableSize);
  PutMetaEntry(md.data(), 0, kFileParamsGuid, base, 8, 4);
  PutMetaEntry(md.data(), 1, kVirtualDiskSizeGuid, base + 8, 8, 6);
  PutMetaEntry(md.data(), 2, kPage83Guid, base + 16, 16, 6);
  PutMetaEntry(md.data(), 3, kLogicalSectorGuid, base + 32, 4, 6);
  PutMetaEntry(md.data(), 4, kPhysicalSectorGuid, base + 36, 4, 6);
  StoreLE32(&md[base], p.block_size);
  StoreLE32(&md[base + 4], fixed ? 1 : 0);  // LeaveBlocksAllocated for fixed, as qemu
  StoreLE64(&md[base + 8], p.disk_size);
  const Guid page83 = NewGuid();
  std::memcpy(&md[base + 16], page83.data(), 16);
  StoreLE32(&md[base + 32], p.logical_sector);
  StoreLE32(&md[base + 36], p.physical_sector);
  RETURN_IF_ERROR(write(p.metadata_offset, md, IoTag::kHeader));

  // BAT, in pieces; all-zero pieces (NOT_PRESENT) stay holes, as qemu leaves them, so a
  // 64 TiB disk of 1 MiB blocks does not write a 512 MiB table of zeros.
  constexpr uint64_t kPiece = 1 * MiB;
  const uint64_t bat_bytes = AlignUp(std::max<uint64_t>(p.bat_entries * 8, 1), 4 * KiB);
  std::vector<std::byte> piece;
  for (uint64_t at = 0; at < bat_bytes; at += kPiece) {
    piece.assign(std::min(kPiece, bat_bytes - at), std::byte{0});
    bool any = false;
    for (uint64_t i = at / 8; i < std::min(p.bat_entries, (at + piece.size()) / 8); ++i) {
      if (i % (p.chunk_ratio + 1) == p.chunk_ratio) continue;  // sector bitmap: not present
      const uint64_t b = i - i / (p.chunk_ratio + 1);
      uint64_t e = zero_state ? kZero : kNotPresent;
      if (fixed && !zero_state) e = AlignUp(data_start + b * block_size, MiB) | kFullyPresent;
      StoreLE64(&piece[i * 8 - at], e);
      any |= e != 0;
    }
    if (any) RETURN_IF_ERROR(write(p.bat_offset + at, piece, IoTag::kBlockMap));
  }

  // Headers last: the image is valid only once they are there.
  Header h;
  h.file_write_guid = NewGuid();
  h.data_write_guid = NewGuid();
  h.log_offset = log_offset;
  h.log_length = static_cast<uint32_t>(log_size);
  h.sequence = 1;
  RETURN_IF_ERROR(write(kHeader1Offset, EncodeHeader(h), IoTag::kHeader));
  h.sequence = 2;
  RETURN_IF_ERROR(write(kHeader2Offset, EncodeHeader(h), IoTag::kHeader));
  const uint64_t end = fixed ? data_start + p.virtual_size : data_start;
  RETURN_IF_ERROR(file->Truncate(end).WithContext("'{}': sizing the file", ctx.path));
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class VhdxFormat final : public FormatDriver {
 public:
  const char* name() const override { return "vhdx"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", CreateOptionSpec::Type::kSize, "Virtual disk size; max of 64TB."},
                {"log_size", CreateOptionSpec::Type::kSize, "Log size; min 1MB.", "1048576"},
                {"block_size", CreateOptionSpec::Type::kSize,
                 "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.", "0"},
                {"subformat", CreateOptionSpec::Type::kString,
                 "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."},
                {"block_state_zero", CreateOptionSpec::Type::kBool,
                 "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to "
                 "'off' when using 'qemu-img convert' with subformat=dynamic."},
            },
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .block_status = false,  // qemu 7.2's vhdx driver has no block status
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeVhdx(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return OpenVhdx(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override { return CreateVhdx(ctx); }
};

}  // namespace
}  // namespace vimgfs::vhdx

namespace vimgfs {
const FormatDriver* VhdxDriver() {
  static const vhdx::VhdxFormat driver;
  return &driver;
}
}  // namespace vimgfs

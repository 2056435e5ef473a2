// VDI header: probe, decode with validation of every field, encode, UUIDs.
#include <cstring>

#include "formats/vdi/vdi_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vdi {
namespace {

// VDIHEADER0 (version 0.x) field offsets: the header follows the pre-header directly and
// the block map follows the header; no sector alignment.
namespace off0 {
inline constexpr size_t kImageType = 0x48;
inline constexpr size_t kImageFlags = 0x4c;
inline constexpr size_t kDiskSize = 0x160;
inline constexpr size_t kBlockSize = 0x168;
inline constexpr size_t kBlocksInImage = 0x16c;
inline constexpr size_t kBlocksAllocated = 0x170;
inline constexpr size_t kUuidLink = 0x194;
}  // namespace off0

bool IsNullUuid(const std::byte* p) {
  for (int i = 0; i < 16; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

// Checks shared by both layouts once the geometry fields are decoded.
Status ValidateGeometry(Header* h, const std::string& path) {
  if (h->disk_size > limits::kMaxVirtualSize || h->disk_size > kMaxDiskSize) {
    return Status::Unsupported("'{}': Unsupported VDI image size (size is 0x{:x}, max supported is 0x{:x})",
                               path, h->disk_size, kMaxDiskSize);
  }
  if (h->block_size != kDefaultBlockSize) {
    return Status::Unsupported("'{}': unsupported VDI image (block size {} is not {})", path, h->block_size,
                               kDefaultBlockSize);
  }
  // 'VBoxManage convertfromraw' writes odd disk sizes; qemu rounds them up to a sector.
  h->virtual_size = AlignUp(h->disk_size, kSectorSize);
  const uint64_t room = uint64_t{h->blocks_in_image} * h->block_size;
  if (h->virtual_size > room) {
    return Status::Unsupported("'{}': unsupported VDI image (disk size {}, image bitmap has room for {})",
                               path, h->virtual_size, room);
  }
  if (h->blocks_in_image > kMaxBlocks) {
    return Status::Unsupported("'{}': unsupported VDI image (too many blocks {}, max is {})", path,
                               h->blocks_in_image, kMaxBlocks);
  }
  return Status::Ok();
}

Result<Header> ParseVersion0(std::span<const std::byte, kSectorSize> s, uint64_t file_size,
                             const std::string& path) {
  Header h;
  h.version = LoadLE32(&s[off::kVersion]);
  h.header_size = kHeader0Size;
  if (file_size < kPreHeaderSize + kHeader0Size) {
    return Status::InvalidFormat("'{}': truncated VDI header ({} bytes, version 0 needs {})", path, file_size,
                                 kPreHeaderSize + kHeader0Size);
  }
  h.image_type = LoadLE32(&s[off0::kImageType]);
  h.image_flags = LoadLE32(&s[off0::kImageFlags]);
  h.disk_size = LoadLE64(&s[off0::kDiskSize]);
  h.block_size = LoadLE32(&s[off0::kBlockSize]);
  h.blocks_in_image = LoadLE32(&s[off0::kBlocksInImage]);
  h.blocks_allocated = LoadLE32(&s[off0::kBlocksAllocated]);
  h.offset_bmap = kPreHeaderSize + kHeader0Size;
  if (!IsNullUuid(&s[off0::kUuidLink])) {
    return Status::Unsupported("'{}': unsupported VDI image (non-NULL link UUID)", path);
  }
  RETURN_IF_ERROR(ValidateGeometry(&h, path));
  h.offset_data = h.offset_bmap + h.bmap_bytes();
  if (h.offset_data > file_size) {
    return Status::InvalidFormat(
        "'{}': VDI block map (offset 0x{:x}, {} bytes) extends past the end of the file "
        "({} bytes)",
        path, h.offset_bmap, h.bmap_bytes(), file_size);
  }
  std::memcpy(h.raw.data(), s.data(), kSectorSize);
  return h;
}

}  // namespace

int ProbeVdi(std::span<const std::byte> head) {
  // qemu pads its probe buffer with zeros, so a short file with the signature is VDI.
  if (head.size() < off::kSignature + 4) return 0;
  return LoadLE32(&head[off::kSignature]) == kSignature ? 100 : 0;
}

Result<Header> ParseHeader(std::span<const std::byte, kSectorSize> s, uint64_t file_size,
                           const std::string& path, bool no_writes) {
  if (file_size < off::kVersion + 4) {
    return Status::InvalidFormat("'{}': file of {} bytes is too small for a VDI header", path, file_size);
  }
  const uint32_t signature = LoadLE32(&s[off::kSignature]);
  if (signature != kSignature) {
    return Status::InvalidFormat("'{}': Image not in VDI format (bad signature {:08x})", path, signature);
  }
  Header h;
  h.version = LoadLE32(&s[off::kVersion]);
  const uint32_t major = h.version >> 16;
  if (major == 0) return ParseVersion0(s, file_size, path);
  if (major != 1) {
    return Status::Unsupported("'{}': unsupported VDI image (version {}.{})", path, major,
                               h.version & 0xffff);
  }
  if (file_size < kPreHeaderSize + kHeader1Size) {
    return Status::InvalidFormat("'{}': truncated VDI header ({} bytes, the header needs {})", path,
                                 file_size, kPreHeaderSize + kHeader1Size);
  }
  h.header_size = LoadLE32(&s[off::kHeaderSize]);
  h.image_type = LoadLE32(&s[off::kImageType]);
  h.image_flags = LoadLE32(&s[off::kImageFlags]);
  h.offset_bmap = LoadLE32(&s[off::kOffsetBmap]);
  h.offset_data = LoadLE32(&s[off::kOffsetData]);
  const uint32_t sector_size = LoadLE32(&s[off::kSectorSizeField]);
  h.disk_size = LoadLE64(&s[off::kDiskSize]);
  h.block_size = LoadLE32(&s[off::kBlockSize]);
  const uint32_t block_extra = LoadLE32(&s[off::kBlockExtra]);
  h.blocks_in_image = LoadLE32(&s[off::kBlocksInImage]);
  h.blocks_allocated = LoadLE32(&s[off::kBlocksAllocated]);

  if (h.header_size < kHeader1Size) {
    return Status::Unsupported("'{}': unsupported VDI image (header size {} is less than {})", path,
                               h.header_size, kHeader1Size);
  }
  if (h.image_type < kTypeDynamic || h.image_type > kTypeDiff) {
    return Status::Unsupported("'{}': unsupported VDI image (image type {})", path, h.image_type);
  }
  if (h.offset_bmap % kSectorSize != 0) {
    return Status::Unsupported("'{}': unsupported VDI image (unaligned block map offset 0x{:x})", path,
                               h.offset_bmap);
  }
  if (h.offset_data % kSectorSize != 0) {
    return Status::Unsupported("'{}': unsupported VDI image (unaligned data offset 0x{:x})", path,
                               h.offset_data);
  }
  if (sector_size != kSectorSize) {
    return Status::Unsupported("'{}': unsupported VDI image (sector size {} is not {})", path, sector_size,
                               kSectorSize);
  }
  if (block_extra != 0) {
    return Status::Unsupported("'{}': unsupported VDI image (block_extra {} is not 0)", path, block_extra);
  }
  RETURN_IF_ERROR(ValidateGeometry(&h, path));
  if (!IsNullUuid(&s[off::kUuidLink])) {
    return Status::Unsupported("'{}': unsupported VDI image (non-NULL link UUID)", path);
  }
  if (!IsNullUuid(&s[off::kUuidParent])) {
    return Status::Unsupported("'{}': unsupported VDI image (non-NULL parent UUID)", path);
  }
  const uint64_t header_end = kPreHeaderSize + uint64_t{h.header_size};
  if (h.offset_bmap < header_end) {
    return Status::InvalidFormat(
        "'{}': VDI block map offset 0x{:x} is inside the header (which ends at 0x{:x})", path, h.offset_bmap,
        header_end);
  }
  const uint64_t bmap_end = h.offset_bmap + h.bmap_bytes();  // < 2^33: no overflow
  // qemu opens such an image; vimgfs refuses to write through it, since a write would land
  // on the block map, but reads and checks it as qemu does.
  if ((h.offset_data < bmap_end || h.offset_data < header_end) && !no_writes) {
    return Status::InvalidFormat("'{}': VDI data offset 0x{:x} is inside the block map (0x{:x}..0x{:x})",
                                 path, h.offset_data, h.offset_bmap, bmap_end);
  }
  std::memcpy(h.raw.data(), s.data(), kSectorSize);
  return h;
}

void EncodeHeader(Header* h) {
  StoreLE64(&h->raw[off::kDiskSize], h->disk_size);
  StoreLE32(&h->raw[off::kBlocksInImage], h->blocks_in_image);
  StoreLE32(&h->raw[off::kBlocksAllocated], h->blocks_allocated);
}

}  // namespace vimgfs::vdi

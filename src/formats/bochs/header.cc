// Bochs header and catalog: probe, decode and validate as qemu 7.2's block/bochs.c does.
#include <array>
#include <cstring>

#include "formats/bochs/bochs_internal.h"
#include "util/endian.h"

namespace vimgfs::bochs {
namespace {

// strcmp(field, s) == 0 for a field of the header: s and its NUL terminator at `at`.
bool FieldIs(std::span<const std::byte, kHeaderSize> h, size_t at, std::string_view s) {
  return std::memcmp(&h[at], s.data(), s.size()) == 0 && h[at + s.size()] == std::byte{0};
}

bool IsBochs(std::span<const std::byte, kHeaderSize> h) {
  const uint32_t version = LoadLE32(&h[hdr::kVersion]);
  return FieldIs(h, hdr::kMagic, "Bochs Virtual HD Image") && FieldIs(h, hdr::kType, "Redolog") &&
         FieldIs(h, hdr::kSubtype, "Growing") && (version == kVersion2 || version == kVersion1);
}

}  // namespace

bool IsBochsHeader(std::span<const std::byte> head) {
  std::array<std::byte, kHeaderSize> h{};  // zero-padded, as qemu's probe buffer
  std::memcpy(h.data(), head.data(), std::min(head.size(), kHeaderSize));
  return IsBochs(h);
}

int ProbeBochs(std::span<const std::byte> head) { return IsBochsHeader(head) ? 100 : 0; }

Result<Header> ReadHeader(File& file, const std::string& path, std::vector<uint32_t>* catalog) {
  // A header cut short by the end of the file reads as zeros past it, as in qemu.
  std::array<std::byte, kHeaderSize> raw{};
  RETURN_IF_ERROR(file.PRead(0, raw).WithContext("'{}': reading the Bochs header", path));
  if (!IsBochs(raw)) return Status::InvalidFormat("'{}': Image not in Bochs format", path);

  Header h;
  h.version = LoadLE32(&raw[hdr::kVersion]);
  h.header_size = LoadLE32(&raw[hdr::kHeaderSize]);
  h.catalog_entries = LoadLE32(&raw[hdr::kCatalog]);
  h.bitmap_bytes = LoadLE32(&raw[hdr::kBitmap]);
  h.extent_bytes = LoadLE32(&raw[hdr::kExtent]);
  const uint64_t disk = LoadLE64(&raw[h.version == kVersion1 ? hdr::kDiskV1 : hdr::kDiskV2]);
  const uint64_t total_sectors = disk / kSectorSize;
  h.virtual_size = total_sectors * kSectorSize;

  if (h.catalog_entries > kMaxCatalogEntries)
    return Status::InvalidFormat("'{}': Catalog size is too large", path);
  // A catalog past the end of the file reads as zeros (every extent then names block 0).
  std::vector<std::byte> raw_catalog(uint64_t{h.catalog_entries} * 4);
  RETURN_IF_ERROR(
      file.PRead(h.header_size, raw_catalog).WithContext("'{}': reading the Bochs catalog", path));
  catalog->resize(h.catalog_entries);
  for (uint32_t i = 0; i < h.catalog_entries; ++i) (*catalog)[i] = LoadLE32(&raw_catalog[i * 4]);

  // qemu's uint32 arithmetic: the data offset wraps at 4 GiB, and a zero bitmap size wraps
  // to 8M sectors of bitmap.
  h.data_offset = h.header_size + h.catalog_entries * 4;
  h.bitmap_blocks = 1 + (h.bitmap_bytes - 1) / 512;
  h.extent_blocks = 1 + (h.extent_bytes - 1) / 512;

  if (h.extent_bytes < kMinExtentSize)
    return Status::InvalidFormat("'{}': Extent size must be at least 512", path);
  if ((h.extent_bytes & (h.extent_bytes - 1)) != 0)
    return Status::InvalidFormat("'{}': Extent size {} is not a power of two", path, h.extent_bytes);
  if (h.extent_bytes > kMaxExtentSize)
    return Status::InvalidFormat("'{}': Extent size {} is too large", path, h.extent_bytes);
  const uint64_t sectors_per_extent = h.extent_bytes / kSectorSize;
  if (h.catalog_entries < (total_sectors + sectors_per_extent - 1) / sectors_per_extent)
    return Status::InvalidFormat("'{}': Catalog size is too small for this disk size", path);
  return h;
}

}  // namespace vimgfs::bochs

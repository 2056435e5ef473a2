// The QED header: decode with validation in the order qemu 7.2 validates (so the same
// hostile image gives the same message), encode, probe.
#include <algorithm>
#include <cstring>

#include "formats/qed/qed_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qed {

bool IsValidClusterSize(uint64_t cluster_size) {
  return cluster_size >= kMinClusterSize && cluster_size <= kMaxClusterSize && IsPowerOfTwo(cluster_size);
}

bool IsValidTableSize(uint64_t table_size) {
  return table_size >= 1 && table_size <= kMaxTableSize && IsPowerOfTwo(table_size);
}

uint64_t MaxImageSize(uint64_t cluster_size, uint64_t table_size) {
  // Unsigned arithmetic wraps exactly as qemu's does, so the largest geometries (whose true
  // maximum passes 2^64) get qemu's answer too.
  const uint64_t entries = table_size * cluster_size / 8;
  return entries * cluster_size * entries;
}

bool IsValidImageSize(uint64_t image_size, uint64_t cluster_size, uint64_t table_size) {
  return image_size % 512 == 0 && image_size <= MaxImageSize(cluster_size, table_size) &&
         image_size <= limits::kMaxVirtualSize;
}

std::array<std::byte, kHeaderBytes> SerializeHeader(const Header& h) {
  std::array<std::byte, kHeaderBytes> raw{};
  std::byte* p = raw.data();
  StoreLE32(p + hdr::kMagic, kMagic);
  StoreLE32(p + hdr::kClusterSize, h.cluster_size);
  StoreLE32(p + hdr::kTableSize, h.table_size);
  StoreLE32(p + hdr::kHeaderSize, h.header_size);
  StoreLE64(p + hdr::kFeatures, h.features);
  StoreLE64(p + hdr::kCompatFeatures, h.compat_features);
  StoreLE64(p + hdr::kAutoclearFeatures, h.autoclear_features);
  StoreLE64(p + hdr::kL1TableOffset, h.l1_table_offset);
  StoreLE64(p + hdr::kImageSize, h.image_size);
  StoreLE32(p + hdr::kBackingNameOffset, h.backing_name_offset);
  StoreLE32(p + hdr::kBackingNameSize, h.backing_name_size);
  return raw;
}

int ProbeQed(std::span<const std::byte> head) {
  return head.size() >= kHeaderBytes && LoadLE32(head.data()) == kMagic ? 100 : 0;
}

Result<Header> ParseHeader(File& file, const std::string& path, uint64_t file_size) {
  // A file shorter than the header reads as zeros past its end, as in qemu.
  std::array<std::byte, kHeaderBytes> raw{};
  RETURN_IF_ERROR(file.PRead(0, std::span(raw).first(std::min<uint64_t>(kHeaderBytes, file_size)))
                      .WithContext("'{}': Failed to read QED header", path));
  const std::byte* p = raw.data();
  if (LoadLE32(p + hdr::kMagic) != kMagic)
    return Status::InvalidFormat("'{}': Image not in QED format", path);
  Header h;
  h.cluster_size = LoadLE32(p + hdr::kClusterSize);
  h.table_size = LoadLE32(p + hdr::kTableSize);
  h.header_size = LoadLE32(p + hdr::kHeaderSize);
  h.features = LoadLE64(p + hdr::kFeatures);
  h.compat_features = LoadLE64(p + hdr::kCompatFeatures);
  h.autoclear_features = LoadLE64(p + hdr::kAutoclearFeatures);
  h.l1_table_offset = LoadLE64(p + hdr::kL1TableOffset);
  h.image_size = LoadLE64(p + hdr::kImageSize);
  h.backing_name_offset = LoadLE32(p + hdr::kBackingNameOffset);
  h.backing_name_size = LoadLE32(p + hdr::kBackingNameSize);

  if (h.features & ~kKnownFeatures)
    return Status::Unsupported("'{}': Unsupported QED features: {:x}", path, h.features & ~kKnownFeatures);
  if (!IsValidClusterSize(h.cluster_size))
    return Status::InvalidFormat("'{}': QED cluster size is invalid", path);
  if (!IsValidTableSize(h.table_size)) return Status::InvalidFormat("'{}': QED table size is invalid", path);
  if (!IsValidImageSize(h.image_size, h.cluster_size, h.table_size))
    return Status::InvalidFormat("'{}': QED image size is invalid", path);
  // qemu's table offset test, against the file's length rounded down to a cluster.
  const uint64_t end = AlignDown(file_size, h.cluster_size);
  const uint64_t header_end = uint64_t{h.header_size} * h.cluster_size;
  const uint64_t l1_last = h.l1_table_offset + uint64_t{h.table_size - 1} * h.cluster_size;
  auto valid_cluster = [&](uint64_t off) {
    return IsAligned(off, h.cluster_size) && off >= header_end && off < end;
  };
  // qemu's overflow test counts an equal end as overflow too, so it refuses every image
  // with one-cluster tables (table_size=1), though it creates them; so does vimgfs.
  if (l1_last <= h.l1_table_offset) return Status::InvalidFormat("'{}': QED table offset is invalid", path);
  if (!valid_cluster(h.l1_table_offset) || !valid_cluster(l1_last))
    return Status::InvalidFormat("'{}': QED table offset is invalid", path);
  if (h.header_size > UINT32_MAX / h.cluster_size)
    return Status::InvalidFormat("'{}': QED header size is too large", path);
  if (h.table_bytes() > kMaxTableBytes)
    return Status::Unsupported("'{}': QED tables of {} bytes are larger than vimgfs reads ({} bytes)", path,
                               h.table_bytes(), kMaxTableBytes);
  if (h.has_backing()) {
    if (uint64_t{h.backing_name_offset} + h.backing_name_size > header_end)
      return Status::InvalidFormat("'{}': QED backing filename offset is invalid", path);
    if (h.backing_name_size > kMaxBackingNameBytes)
      return Status::InvalidFormat("'{}': Failed to read backing filename (it is {} bytes long)", path,
                                   h.backing_name_size);
    std::string name(h.backing_name_size, '\0');
    const uint64_t present = h.backing_name_offset < file_size
                                 ? std::min<uint64_t>(h.backing_name_size, file_size - h.backing_name_offset)
                                 : 0;
    RETURN_IF_ERROR(file.PRead(h.backing_name_offset, std::as_writable_bytes(std::span(name)).first(present))
                        .WithContext("'{}': Failed to read backing filename", path));
    // qemu keeps the name as a C string: it ends at the first NUL.
    name.resize(std::strlen(name.c_str()));
    h.backing_name = std::move(name);
  }
  return h;
}

}  // namespace vimgfs::qed

// VHD footer and dynamic header: decode with validation of every field, checksums, the
// CHS geometry, parent locators, probe.
#include <algorithm>
#include <cstring>

#include "formats/vpc/vpc_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "util/utf16.h"

namespace vimgfs::vpc {
namespace {

// The VHD specification's geometry for a disk of `total_sectors`, with qemu's extension
// of up to 255 heads beyond 127 GB. The product may round the sectors down.
Geometry GeometryFor(uint64_t total_sectors) {
  total_sectors = std::min(total_sectors, kMaxGeometry);
  Geometry g;
  uint64_t cyls_times_heads;
  if (total_sectors >= 65535ull * 16 * 63) {
    g.sectors_per_track = 255;
    g.heads = 16;
    cyls_times_heads = total_sectors / 255;
  } else {
    g.sectors_per_track = 17;
    cyls_times_heads = total_sectors / 17;
    uint64_t heads = std::max<uint64_t>(DivRoundUp(cyls_times_heads, 1024), 4);
    if (cyls_times_heads >= heads * 1024 || heads > 16) {
      g.sectors_per_track = 31;
      heads = 16;
      cyls_times_heads = total_sectors / 31;
    }
    if (cyls_times_heads >= heads * 1024) {
      g.sectors_per_track = 63;
      heads = 16;
      cyls_times_heads = total_sectors / 63;
    }
    g.heads = static_cast<uint8_t>(heads);
  }
  g.cylinders = static_cast<uint16_t>(cyls_times_heads / g.heads);
  return g;
}

// Creator applications whose images mean current_size, not the geometry (qemu's table).
bool SizeFromCurrentSize(const std::string& app) {
  return app == "win " || app == "qem2" || app == "d2v " || app == "CTXS" || app == std::string("tap\0", 4);
}

constexpr uint32_t FourCc(const char (&s)[5]) {
  return uint32_t(uint8_t(s[0])) << 24 | uint32_t(uint8_t(s[1])) << 16 | uint32_t(uint8_t(s[2])) << 8 |
         uint32_t(uint8_t(s[3]));
}
constexpr uint32_t kPlatformW2ru = FourCc("W2ru");  // Windows relative path, UTF-16LE
constexpr uint32_t kPlatformW2ku = FourCc("W2ku");  // Windows absolute path, UTF-16LE
constexpr uint32_t kPlatformMacX = FourCc("MacX");  // file:// URL, UTF-8
// A locator's data is a path: a few KiB at most.
constexpr uint32_t kMaxLocatorBytes = 64 * 1024;

std::string SlashSeparated(std::string s) {
  std::replace(s.begin(), s.end(), '\\', '/');
  return s;
}

}  // namespace

uint32_t Checksum(std::span<const std::byte> bytes, size_t checksum_offset) {
  uint32_t sum = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i >= checksum_offset && i < checksum_offset + 4) continue;
    sum += static_cast<uint8_t>(bytes[i]);
  }
  return ~sum;
}

Result<uint64_t> CreatedSize(uint64_t size, bool force_size, Geometry* geometry) {
  size = AlignUp(size, kSectorSize);
  Geometry g;
  uint64_t sectors;
  if (force_size) {
    g = {static_cast<uint16_t>(kChsMaxC), static_cast<uint8_t>(kChsMaxH), static_cast<uint8_t>(kChsMaxS)};
  } else {
    // The smallest geometry holding the size: grow the request until one does, so that
    // convert never truncates (qemu's calculate_rounded_image_size).
    const uint64_t want = std::min(kMaxGeometry, size / kSectorSize);
    for (uint64_t i = 0; want > g.sectors(); ++i) g = GeometryFor(want + i);
  }
  if (g.sectors() == kMaxGeometry) {
    sectors = size / kSectorSize;
    if (sectors > kMaxSectors) return Status::InvalidArgument("Disk size is too large, max size is 2040 GiB");
  } else {
    sectors = g.sectors();
  }
  if (geometry) *geometry = g;
  return sectors * kSectorSize;
}

bool HasFooterCookie(std::span<const std::byte> raw) {
  return raw.size() >= 8 && std::memcmp(raw.data(), "conectix", 8) == 0;
}

int ProbeVpc(std::span<const std::byte> head) { return HasFooterCookie(head) ? 100 : 0; }

Result<Footer> ParseFooter(std::span<const std::byte, kFooterSize> raw, const std::string& path) {
  Footer f;
  std::memcpy(f.raw.data(), raw.data(), kFooterSize);
  if (!HasFooterCookie(raw)) return Status::InvalidFormat("'{}': invalid VPC image (no VHD footer)", path);
  const uint32_t stored = LoadBE32(&raw[foot::kChecksum]);
  if (Checksum(raw, foot::kChecksum) != stored)
    return Status::InvalidFormat("'{}': Incorrect header checksum (VHD footer)", path);
  f.disk_type = LoadBE32(&raw[foot::kDiskType]);
  f.data_offset = LoadBE64(&raw[foot::kDataOffset]);
  f.current_size = LoadBE64(&raw[foot::kCurrentSize]);
  f.geometry.cylinders = LoadBE16(&raw[foot::kCylinders]);
  f.geometry.heads = static_cast<uint8_t>(raw[foot::kHeads]);
  f.geometry.sectors_per_track = static_cast<uint8_t>(raw[foot::kSectorsPerTrack]);
  f.creator_app.assign(reinterpret_cast<const char*>(&raw[foot::kCreatorApp]), 4);

  // Virtual PC and qemu's default: the geometry is the size; the others, and the maximal
  // geometry (which cannot say the size), use current_size.
  uint64_t sectors = f.geometry.sectors();
  f.size_from_geometry = !SizeFromCurrentSize(f.creator_app) && sectors != kMaxGeometry;
  if (!f.size_from_geometry) sectors = f.current_size / kSectorSize;
  if (sectors > kMaxSectors)
    return Status::InvalidFormat("'{}': VHD disk size of {} sectors is larger than the 2040 GiB maximum",
                                 path, sectors);
  f.virtual_size = sectors * kSectorSize;
  return f;
}

Result<DynHeader> ParseDynHeader(std::span<const std::byte, kDynHeaderSize> raw, uint64_t virtual_size,
                                 uint64_t file_size, File& file, const std::string& path) {
  DynHeader h;
  std::memcpy(h.raw.data(), raw.data(), kDynHeaderSize);
  if (std::memcmp(raw.data(), "cxsparse", 8) != 0)
    return Status::InvalidFormat("'{}': Invalid header magic (VHD dynamic header)", path);
  h.checksum_ok = Checksum(raw, dyn::kChecksum) == LoadBE32(&raw[dyn::kChecksum]);
  h.table_offset = LoadBE64(&raw[dyn::kTableOffset]);
  h.max_table_entries = LoadBE32(&raw[dyn::kMaxTableEntries]);
  h.block_size = LoadBE32(&raw[dyn::kBlockSize]);
  if (!IsPowerOfTwo(h.block_size) || h.block_size < kSectorSize)
    return Status::InvalidFormat("'{}': Invalid block size {}", path, h.block_size);
  h.bitmap_size = static_cast<uint32_t>(AlignUp(h.block_size / (8 * kSectorSize), kSectorSize));
  if (virtual_size / h.block_size > 0xffffffffull)
    return Status::InvalidFormat("'{}': Too many blocks", path);
  if (uint64_t{h.max_table_entries} * h.block_size < virtual_size)
    return Status::InvalidFormat("'{}': Page table too small ({} entries of {} bytes for a disk of {} bytes)",
                                 path, h.max_table_entries, h.block_size, virtual_size);
  const uint64_t bat_bytes = uint64_t{h.max_table_entries} * 4;
  if (h.max_table_entries > 0x7fffffffu / 4 || bat_bytes > limits::kMaxMapBytes)
    return Status::InvalidFormat("'{}': Max Table Entries too large ({})", path, h.max_table_entries);
  if (!IsAligned(h.table_offset, kSectorSize) || h.table_offset > file_size ||
      bat_bytes > file_size - h.table_offset)
    return Status::InvalidFormat(
        "'{}': VHD block allocation table (offset 0x{:x}, {} bytes) is outside the file ({} bytes)", path,
        h.table_offset, bat_bytes, file_size);

  h.parent_name = Utf16ToUtf8(std::span(&raw[dyn::kParentName], dyn::kParentNameBytes), true).value_or("");
  for (int i = 0; i < dyn::kLocatorCount; ++i) {
    const std::byte* e = &raw[dyn::kParentLocators + i * dyn::kLocatorEntrySize];
    ParentLocator loc;
    loc.platform = LoadBE32(e);
    if (loc.platform == 0) continue;
    const uint32_t length = LoadBE32(e + 8);
    const uint64_t offset = LoadBE64(e + 16);
    if (length == 0) continue;
    if (length > kMaxLocatorBytes || offset > file_size || length > file_size - offset)
      return Status::InvalidFormat(
          "'{}': VHD parent locator {} (offset 0x{:x}, {} bytes) is outside the file", path, i, offset,
          length);
    if (loc.platform != kPlatformW2ru && loc.platform != kPlatformW2ku && loc.platform != kPlatformMacX) {
      h.locators.push_back(loc);  // kept for check; not a path we can use
      continue;
    }
    std::vector<std::byte> data(length);
    RETURN_IF_ERROR(file.PRead(offset, data).WithContext("'{}': reading VHD parent locator {}", path, i));
    if (loc.platform == kPlatformMacX) {
      std::string url(reinterpret_cast<const char*>(data.data()), data.size());
      url = url.substr(0, url.find('\0'));
      if (url.rfind("file://", 0) == 0) url = url.substr(7);
      loc.path = url;
    } else {
      loc.path = SlashSeparated(Utf16ToUtf8(data, false).value_or(""));
    }
    h.locators.push_back(loc);
  }
  return h;
}

std::optional<std::string> ParentName(const DynHeader& h) {
  auto find = [&](uint32_t platform) -> std::string {
    for (const ParentLocator& l : h.locators)
      if (l.platform == platform && !l.path.empty()) return l.path;
    return "";
  };
  if (std::string rel = find(kPlatformW2ru); !rel.empty()) {
    while (rel.rfind("./", 0) == 0) rel = rel.substr(2);
    return rel;
  }
  if (std::string mac = find(kPlatformMacX); !mac.empty()) return mac;
  std::string abs = find(kPlatformW2ku);
  if (abs.empty()) abs = SlashSeparated(h.parent_name);
  if (abs.empty()) return std::nullopt;
  // A Windows absolute path ("C:/vms/base.vhd") means nothing here: the parent is looked
  // for beside the child, by its file name.
  return abs.substr(abs.rfind('/') == std::string::npos ? 0 : abs.rfind('/') + 1);
}

}  // namespace vimgfs::vpc

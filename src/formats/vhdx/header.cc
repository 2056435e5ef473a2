// VHDX: CRC-32C, GUIDs, probe, headers, region table, metadata and parent locator.
#include <cstring>

#include "formats/format_util.h"
#include "formats/vhdx/vhdx_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "util/utf16.h"

namespace vimgfs::vhdx {
namespace {

constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return 0;
}

bool Matches(std::span<const std::byte> buf, size_t at, std::string_view sig) {
  return buf.size() >= at + sig.size() && std::memcmp(buf.data() + at, sig.data(), sig.size()) == 0;
}

Guid GuidAt(std::span<const std::byte> buf, size_t at) {
  Guid g;
  std::memcpy(g.data(), buf.data() + at, 16);
  return g;
}

// Header field offsets.
namespace hoff {
constexpr size_t kChecksum = 4, kSequence = 8, kFileWrite = 16, kDataWrite = 32, kLogGuid = 48,
                 kLogVersion = 64, kVersion = 66, kLogLength = 68, kLogOffset = 72;
}

}  // namespace

uint32_t Crc32c(std::span<const std::byte> data, uint32_t crc) {
  crc = ~crc;
  for (std::byte b : data) crc = kCrcTable[(crc ^ static_cast<uint8_t>(b)) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t ChecksumWithHole(std::span<const std::byte> buf, size_t at) {
  const std::byte zeros[4] = {};
  uint32_t crc = Crc32c(buf.subspan(0, at));
  crc = Crc32c(zeros, crc);
  return Crc32c(buf.subspan(at + 4), crc);
}

void StoreChecksum(std::span<std::byte> buf, size_t at) {
  StoreLE32(&buf[at], 0);
  StoreLE32(&buf[at], Crc32c(buf));
}

Guid ParseGuid(const char* text) {
  // Data1 (4 bytes), Data2, Data3 little-endian; Data4 (8 bytes) as written.
  uint8_t raw[16];
  int n = 0;
  for (const char* p = text; *p && n < 16; ++p) {
    if (*p == '-') continue;
    raw[n++] = static_cast<uint8_t>(HexDigit(p[0]) << 4 | HexDigit(p[1]));
    ++p;
  }
  static constexpr int kOrder[16] = {3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15};
  Guid g;
  for (int i = 0; i < 16; ++i) g[i] = std::byte{raw[kOrder[i]]};
  return g;
}

bool IsNullGuid(const Guid& g) {
  for (std::byte b : g) {
    if (b != std::byte{0}) return false;
  }
  return true;
}

Guid NewGuid() { return RandomUuid(/*guid_order=*/true); }

const Guid kBatGuid = ParseGuid("2DC27766-F623-4200-9D64-115E9BFD4A08");
const Guid kMetadataGuid = ParseGuid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const Guid kFileParamsGuid = ParseGuid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const Guid kVirtualDiskSizeGuid = ParseGuid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const Guid kPage83Guid = ParseGuid("BECA12AB-B2E6-4523-93EF-C309E000C746");
const Guid kLogicalSectorGuid = ParseGuid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const Guid kPhysicalSectorGuid = ParseGuid("CDA348C7-445D-4471-9CC9-E9885251C556");
const Guid kParentLocatorGuid = ParseGuid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
const Guid kVhdxParentTypeGuid = ParseGuid("B04AEFB7-D19E-4A81-B789-25B8E9445913");

int ProbeVhdx(std::span<const std::byte> head) { return Matches(head, 0, "vhdxfile") ? 100 : 0; }

Status Reader::Read(uint64_t off, std::span<std::byte> buf) const {
  RETURN_IF_ERROR(file_->PRead(off, buf));
  if (!overlay_ || overlay_->empty()) return Status::Ok();
  auto it = overlay_->upper_bound(off);
  if (it != overlay_->begin()) --it;
  for (; it != overlay_->end() && it->first < off + buf.size(); ++it) {
    const uint64_t s = it->first, e = s + it->second.size();
    if (e <= off) continue;
    const uint64_t lo = std::max(s, off), hi = std::min<uint64_t>(e, off + buf.size());
    std::memcpy(buf.data() + (lo - off), it->second.data() + (lo - s), hi - lo);
  }
  return Status::Ok();
}

std::array<std::byte, kHeaderSize> EncodeHeader(const Header& h) {
  std::array<std::byte, kHeaderSize> b{};
  std::memcpy(b.data(), "head", 4);
  StoreLE64(&b[hoff::kSequence], h.sequence);
  std::memcpy(&b[hoff::kFileWrite], h.file_write_guid.data(), 16);
  std::memcpy(&b[hoff::kDataWrite], h.data_write_guid.data(), 16);
  std::memcpy(&b[hoff::kLogGuid], h.log_guid.data(), 16);
  StoreLE16(&b[hoff::kLogVersion], h.log_version);
  StoreLE16(&b[hoff::kVersion], h.version);
  StoreLE32(&b[hoff::kLogLength], h.log_length);
  StoreLE64(&b[hoff::kLogOffset], h.log_offset);
  StoreChecksum(b, hoff::kChecksum);
  return b;
}

Result<Headers> ReadHeaders(File* file, uint64_t file_size, const std::string& path) {
  if (file_size < 1 * MiB) {
    return Status::InvalidFormat("'{}': file of {} bytes is too small for a VHDX image", path, file_size);
  }
  std::array<std::byte, 8> ident{};
  RETURN_IF_ERROR(file->PRead(0, ident).WithContext("'{}': reading the VHDX file identifier", path));
  if (!Matches(ident, 0, "vhdxfile")) {
    return Status::InvalidFormat("'{}': not a VHDX image (no 'vhdxfile' signature)", path);
  }
  std::optional<Headers> best;
  std::string why[2];
  for (int slot = 0; slot < 2; ++slot) {
    std::array<std::byte, kHeaderSize> b{};
    const uint64_t at = slot == 0 ? kHeader1Offset : kHeader2Offset;
    RETURN_IF_ERROR(file->PRead(at, b).WithContext("'{}': reading VHDX header {}", path, slot + 1));
    if (!Matches(b, 0, "head")) {
      why[slot] = "no 'head' signature";
      continue;
    }
    if (LoadLE32(&b[hoff::kChecksum]) != ChecksumWithHole(b, hoff::kChecksum)) {
      why[slot] = "bad checksum";
      continue;
    }
    Header h;
    h.sequence = LoadLE64(&b[hoff::kSequence]);
    h.file_write_guid = GuidAt(b, hoff::kFileWrite);
    h.data_write_guid = GuidAt(b, hoff::kDataWrite);
    h.log_guid = GuidAt(b, hoff::kLogGuid);
    h.log_version = LoadLE16(&b[hoff::kLogVersion]);
    h.version = LoadLE16(&b[hoff::kVersion]);
    h.log_length = LoadLE32(&b[hoff::kLogLength]);
    h.log_offset = LoadLE64(&b[hoff::kLogOffset]);
    if (!best || h.sequence > best->current.sequence) best = Headers{h, slot};
  }
  if (!best) {
    return Status::InvalidFormat("'{}': no valid VHDX header (header 1: {}; header 2: {})", path, why[0],
                                 why[1]);
  }
  const Header& h = best->current;
  if (h.version != 1) {
    return Status::Unsupported("'{}': unsupported VHDX version {}", path, h.version);
  }
  if (h.log_version != 0) {
    return Status::Unsupported("'{}': unsupported VHDX log version {}", path, h.log_version);
  }
  if (h.log_length % MiB != 0 || h.log_offset % MiB != 0 || h.log_offset < MiB ||
      h.log_length > kMaxLogLength) {
    return Status::InvalidFormat(
        "'{}': invalid VHDX log location (offset 0x{:x}, length {}: must be 1 MiB multiples, "
        "at or past 1 MiB, at most {} bytes)",
        path, h.log_offset, h.log_length, kMaxLogLength);
  }
  if (!IsNullGuid(h.log_guid) &&
      (h.log_length == 0 || h.log_offset > file_size || h.log_length > file_size - h.log_offset)) {
    return Status::InvalidFormat("'{}': VHDX log (offset 0x{:x}, {} bytes) is outside the file ({} bytes)",
                                 path, h.log_offset, h.log_length, file_size);
  }
  return *best;
}

namespace {

Status ParseParentLocator(std::span<const std::byte> item, Params* p, const std::string& path) {
  if (item.size() < 20) {
    return Status::InvalidFormat("'{}': VHDX parent locator of {} bytes is too short", path, item.size());
  }
  if (GuidAt(item, 0) != kVhdxParentTypeGuid) {
    return Status::Unsupported("'{}': unsupported VHDX parent locator type", path);
  }
  const uint16_t count = LoadLE16(&item[18]);
  if (20 + uint64_t{count} * 12 > item.size()) {
    return Status::InvalidFormat("'{}': VHDX parent locator has {} entries, more than fit in {} bytes", path,
                                 count, item.size());
  }
  for (uint16_t i = 0; i < count; ++i) {
    const std::byte* e = item.data() + 20 + i * 12;
    const uint64_t ko = LoadLE32(e), vo = LoadLE32(e + 4), kl = LoadLE16(e + 8), vl = LoadLE16(e + 10);
    if (ko + kl > item.size() || vo + vl > item.size() || kl == 0 || vl == 0 || kl % 2 || vl % 2) {
      return Status::InvalidFormat("'{}': VHDX parent locator entry {} is outside the locator", path, i);
    }
    auto key = Utf16ToUtf8(item.subspan(ko, kl), false);
    auto value = Utf16ToUtf8(item.subspan(vo, vl), false);
    if (!key || !value) {
      return Status::InvalidFormat("'{}': VHDX parent locator entry {} is not valid UTF-16", path, i);
    }
    if (p->parent.contains(*key)) {
      return Status::InvalidFormat("'{}': VHDX parent locator key '{}' appears twice", path, *key);
    }
    p->parent[*key] = *value;
  }
  if (!p->parent.contains("parent_linkage")) {
    return Status::InvalidFormat("'{}': VHDX parent locator has no parent_linkage", path);
  }
  return Status::Ok();
}

}  // namespace

Status ComputeGeometry(Params* p, const std::string& path) {
  p->chunk_ratio = (uint64_t{1} << 23) * p->logical_sector / p->block_size;
  p->data_blocks = DivRoundUp(p->virtual_size, p->block_size);
  p->bitmap_blocks = DivRoundUp(p->data_blocks, p->chunk_ratio);
  if (p->has_parent) {
    p->bat_entries = p->bitmap_blocks * (p->chunk_ratio + 1);
  } else {
    p->bat_entries = p->data_blocks == 0 ? 0 : p->data_blocks + (p->data_blocks - 1) / p->chunk_ratio;
  }
  if (p->bat_entries * 8 > kMaxBatBytes) {  // cannot happen with validated sizes; a guard
    return Status::Unsupported("'{}': VHDX BAT of {} entries exceeds the limit of {} bytes", path,
                               p->bat_entries, kMaxBatBytes);
  }
  if (p->bat_entries * 8 > p->bat_length) {
    return Status::InvalidFormat("'{}': VHDX BAT region ({} bytes) is too small for {} entries", path,
                                 p->bat_length, p->bat_entries);
  }
  return Status::Ok();
}

Result<Params> ReadRegionsAndMetadata(const Reader& r, uint64_t file_size, const std::string& path) {
  Params p;
  std::vector<std::byte> rt(kRegionTableSize);
  bool found = false;
  std::string why;
  for (uint64_t at : {kRegion1Offset, kRegion2Offset}) {
    RETURN_IF_ERROR(r.Read(at, rt).WithContext("'{}': reading the VHDX region table", path));
    if (!Matches(rt, 0, "regi")) {
      why = "no 'regi' signature";
      continue;
    }
    if (LoadLE32(&rt[4]) != ChecksumWithHole(rt, 4)) {
      why = "bad checksum";
      continue;
    }
    found = true;
    break;
  }
  if (!found) return Status::InvalidFormat("'{}': no valid VHDX region table ({})", path, why);
  const uint32_t count = LoadLE32(&rt[8]);
  if (count > kMaxRegionEntries) {
    return Status::InvalidFormat("'{}': VHDX region table has {} entries (max {})", path, count,
                                 kMaxRegionEntries);
  }
  bool have_bat = false, have_meta = false;
  for (uint32_t i = 0; i < count; ++i) {
    const size_t e = 16 + size_t{i} * 32;
    const Guid g = GuidAt(rt, e);
    const uint64_t off = LoadLE64(&rt[e + 16]);
    const uint64_t len = LoadLE32(&rt[e + 24]);
    const bool required = (LoadLE32(&rt[e + 28]) & 1) != 0;
    const bool bat = g == kBatGuid, meta = g == kMetadataGuid;
    if (!bat && !meta) {
      if (required) return Status::Unsupported("'{}': VHDX region {} is required but unknown", path, i);
      continue;
    }
    if ((bat && have_bat) || (meta && have_meta)) {
      return Status::InvalidFormat("'{}': VHDX region table lists the {} region twice", path,
                                   bat ? "BAT" : "metadata");
    }
    if (off % MiB != 0 || len % MiB != 0 || off < MiB || len == 0 || off > file_size ||
        len > file_size - off) {
      return Status::InvalidFormat(
          "'{}': VHDX {} region (offset 0x{:x}, {} bytes) is misaligned or outside the file ({} bytes)", path,
          bat ? "BAT" : "metadata", off, len, file_size);
    }
    if (bat) {
      p.bat_offset = off, p.bat_length = len, have_bat = true;
    } else {
      p.metadata_offset = off, p.metadata_length = len, have_meta = true;
    }
  }
  if (!have_bat || !have_meta) {
    return Status::InvalidFormat("'{}': VHDX region table has no {} region", path,
                                 have_bat ? "metadata" : "BAT");
  }
  if (p.bat_offset < p.metadata_offset + p.metadata_length &&
      p.metadata_offset < p.bat_offset + p.bat_length) {
    return Status::InvalidFormat("'{}': VHDX BAT and metadata regions overlap", path);
  }

  // Metadata table.
  if (p.metadata_length < kMetadataTableSize) {
    return Status::InvalidFormat("'{}': VHDX metadata region is too small", path);
  }
  std::vector<std::byte> mt(kMetadataTableSize);
  RETURN_IF_ERROR(r.Read(p.metadata_offset, mt).WithContext("'{}': reading the VHDX metadata table", path));
  if (!Matches(mt, 0, "metadata")) {
    return Status::InvalidFormat("'{}': VHDX metadata table has no 'metadata' signature", path);
  }
  const uint16_t mcount = LoadLE16(&mt[10]);
  if (mcount > kMaxMetadataEntries) {
    return Status::InvalidFormat("'{}': VHDX metadata table has {} entries (max {})", path, mcount,
                                 kMaxMetadataEntries);
  }
  bool have_params = false, have_size = false, have_lss = false, have_pss = false;
  for (uint16_t i = 0; i < mcount; ++i) {
    const size_t e = 32 + size_t{i} * 32;
    const Guid g = GuidAt(mt, e);
    const uint64_t off = LoadLE32(&mt[e + 16]);
    const uint64_t len = LoadLE32(&mt[e + 20]);
    const uint32_t flags = LoadLE32(&mt[e + 24]);
    const bool required = (flags & 4) != 0;
    if (len == 0) continue;
    if (off < kMetadataTableSize || off + len > p.metadata_length) {
      return Status::InvalidFormat(
          "'{}': VHDX metadata item {} (offset 0x{:x}, {} bytes) is outside the metadata region", path, i,
          off, len);
    }
    auto read_item = [&](uint64_t want_min, uint64_t cap) -> Result<std::vector<std::byte>> {
      if (len < want_min || len > cap) {
        return Status::InvalidFormat("'{}': VHDX metadata item {} has length {}", path, i, len);
      }
      std::vector<std::byte> b(len);
      RETURN_IF_ERROR(r.Read(p.metadata_offset + off, b).WithContext("'{}': reading VHDX metadata", path));
      return b;
    };
    if (g == kFileParamsGuid) {
      ASSIGN_OR_RETURN(auto b, read_item(8, 8));
      p.block_size = LoadLE32(&b[0]);
      const uint32_t f = LoadLE32(&b[4]);
      p.leave_allocated = f & 1;
      p.has_parent = f & 2;
      have_params = true;
    } else if (g == kVirtualDiskSizeGuid) {
      ASSIGN_OR_RETURN(auto b, read_item(8, 8));
      p.disk_size = LoadLE64(&b[0]);
      have_size = true;
    } else if (g == kPage83Guid) {
      ASSIGN_OR_RETURN(auto b, read_item(16, 16));
      std::memcpy(p.page83.data(), b.data(), 16);
    } else if (g == kLogicalSectorGuid) {
      ASSIGN_OR_RETURN(auto b, read_item(4, 4));
      p.logical_sector = LoadLE32(&b[0]);
      have_lss = true;
    } else if (g == kPhysicalSectorGuid) {
      ASSIGN_OR_RETURN(auto b, read_item(4, 4));
      p.physical_sector = LoadLE32(&b[0]);
      have_pss = true;
    } else if (g == kParentLocatorGuid) {
      ASSIGN_OR_RETURN(auto b, read_item(20, kMaxParentLocatorBytes));
      RETURN_IF_ERROR(ParseParentLocator(b, &p, path));
    } else if (required) {
      return Status::Unsupported("'{}': VHDX metadata item {} is required but unknown", path, i);
    }
  }
  if (!have_params || !have_size || !have_lss || !have_pss) {
    return Status::InvalidFormat("'{}': VHDX metadata lacks the {}", path,
                                 !have_params ? "file parameters"
                                 : !have_size ? "virtual disk size"
                                 : !have_lss  ? "logical sector size"
                                              : "physical sector size");
  }
  if (!IsPowerOfTwo(p.block_size) || p.block_size < kMinBlockSize || p.block_size > kMaxBlockSize) {
    return Status::InvalidFormat("'{}': invalid VHDX block size {} (a power of two from 1 MiB to 256 MiB)",
                                 path, p.block_size);
  }
  if (p.logical_sector != 512 && p.logical_sector != 4096) {
    return Status::InvalidFormat("'{}': invalid VHDX logical sector size {}", path, p.logical_sector);
  }
  if (p.physical_sector != 512 && p.physical_sector != 4096) {
    return Status::InvalidFormat("'{}': invalid VHDX physical sector size {}", path, p.physical_sector);
  }
  if (p.disk_size > kMaxVirtualSize || p.disk_size > limits::kMaxVirtualSize) {
    return Status::Unsupported("'{}': VHDX virtual disk size {} exceeds the maximum of {}", path, p.disk_size,
                               kMaxVirtualSize);
  }
  if (p.has_parent && p.parent.empty()) {
    return Status::InvalidFormat("'{}': VHDX differencing image has no parent locator", path);
  }
  p.virtual_size = AlignUp(p.disk_size, 512);
  RETURN_IF_ERROR(ComputeGeometry(&p, path));
  return p;
}

}  // namespace vimgfs::vhdx

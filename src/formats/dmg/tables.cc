// The koly trailer, the XML property list and the resource fork, and the mish block
// tables they hold, read and validated into a sorted chunk list (dmg_internal.h).
#include <algorithm>
#include <array>
#include <cstring>
#include <string_view>

#include "formats/dmg/dmg_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::dmg {
namespace {

// qemu searches this many bytes for "koly": the last 511 bytes of the second-to-last
// sector of the (sector-rounded) file and the first 4 of the last.
constexpr uint64_t kKolySearchBytes = 515;
constexpr uint64_t kKolySearchBack = 511 + 512;

bool KnownReadableType(uint32_t type) {
  return type == kChunkZero || type == kChunkRaw || type == kChunkIgnore || type == kChunkZlib ||
         type == kChunkBzip2;
}

bool ReadsAsZeros(uint32_t type) { return type == kChunkZero || type == kChunkIgnore; }

// The sextet of a base64 character; -1 for anything else.
int Base64Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool IsXmlSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Standard base64 with the whitespace a property list wraps it in; '=' padding only at the
// end. nullopt for anything else (qemu's decoder skips stray characters; vimgfs refuses).
std::optional<std::vector<std::byte>> DecodeBase64(std::string_view text) {
  std::vector<std::byte> out;
  out.reserve(text.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t padding = 0;
  for (char c : text) {
    if (IsXmlSpace(c)) continue;
    if (c == '=') {
      padding++;
      continue;
    }
    int v = Base64Value(c);
    if (v < 0 || padding > 0) return std::nullopt;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<std::byte>((acc >> bits) & 0xff));
    }
  }
  // Leftover bits must be the zero fill of a final partial group, with at most 2 pads.
  if (padding > 2 || bits >= 6 || (acc & ((1u << bits) - 1)) != 0) return std::nullopt;
  return out;
}

class TableReader {
 public:
  TableReader(File& file, const std::string& path) : file_(file), path_(path) {}

  Result<Tables> Read() {
    ASSIGN_OR_RETURN(uint64_t trailer, FindTrailer());
    std::array<std::byte, kTrailerSize> k{};
    RETURN_IF_ERROR(file_.PRead(trailer, k).WithContext("'{}': reading the UDIF trailer", path_));
    data_fork_offset_ = LoadBE64(&k[koly::kDataForkOffset]);
    const uint64_t rsrc_offset = LoadBE64(&k[koly::kRsrcForkOffset]);
    const uint64_t rsrc_length = LoadBE64(&k[koly::kRsrcForkLength]);
    const uint64_t plist_offset = LoadBE64(&k[koly::kPlistOffset]);
    const uint64_t plist_length = LoadBE64(&k[koly::kPlistLength]);
    tables_.sector_count = LoadBE64(&k[koly::kSectorCount]);
    // Everything the trailer points to lies before it (qemu checks both forks even when
    // only one is used).
    if (data_fork_offset_ > trailer)
      return Status::InvalidFormat("'{}': data fork offset {} lies past the UDIF trailer at {}", path_,
                                   data_fork_offset_, trailer);
    if (rsrc_offset >= trailer || rsrc_length > trailer - rsrc_offset)
      return Status::InvalidFormat(
          "'{}': resource fork ({} bytes at {}) does not end before the UDIF trailer at {}", path_,
          rsrc_length, rsrc_offset, trailer);
    if (plist_offset >= trailer || plist_length > trailer - plist_offset)
      return Status::InvalidFormat(
          "'{}': property list ({} bytes at {}) does not end before the UDIF trailer at {}", path_,
          plist_length, plist_offset, trailer);
    if (tables_.sector_count > limits::kMaxVirtualSize / kSectorSize)
      return Status::InvalidFormat("'{}': disk of {} sectors is too large", path_, tables_.sector_count);
    if (rsrc_length != 0) {
      RETURN_IF_ERROR(ReadResourceFork(rsrc_offset, rsrc_length));
    } else if (plist_length != 0) {
      RETURN_IF_ERROR(ReadPropertyList(plist_offset, plist_length));
    } else {
      return Status::InvalidFormat("'{}': the UDIF trailer points to no block tables", path_);
    }
    RETURN_IF_ERROR(CheckOrder());
    return std::move(tables_);
  }

 private:
  // The trailer's offset: the first "koly" where qemu looks for it.
  Result<uint64_t> FindTrailer() {
    ASSIGN_OR_RETURN(uint64_t size, file_.Size());
    // qemu sees the file's length rounded up to a sector; bytes past the end read as zeros.
    const uint64_t length = AlignUp(size, kSectorSize);
    if (length < kSectorSize)
      return Status::InvalidFormat("'{}': dmg file must be at least 512 bytes long", path_);
    const uint64_t start = length > kKolySearchBack ? length - kKolySearchBack : 0;
    std::vector<std::byte> window(std::min(length, kKolySearchBytes));
    RETURN_IF_ERROR(file_.PRead(start, window).WithContext("'{}': reading the UDIF trailer", path_));
    for (size_t i = 0; i + 4 <= window.size(); i++) {
      if (std::memcmp(&window[i], "koly", 4) == 0) return start + i;
    }
    return Status::InvalidFormat("'{}': Could not locate UDIF trailer in dmg file", path_);
  }

  // The older layout: a resource fork whose data area is a run of resources, each a
  // 32-bit length and that many bytes (the resource map after it is not needed).
  Status ReadResourceFork(uint64_t offset, uint64_t length) {
    std::array<std::byte, 12> head{};
    RETURN_IF_ERROR(file_.PRead(offset, head).WithContext("'{}': reading the resource fork", path_));
    const uint64_t data_offset = LoadBE32(&head[0]);
    const uint64_t data_length = LoadBE32(&head[8]);
    if (data_offset > length || data_length == 0 || data_length > length - data_offset)
      return Status::InvalidFormat(
          "'{}': resource data ({} bytes at {}) lies outside the resource fork ({} bytes)", path_,
          data_length, data_offset, length);
    if (data_length > limits::kMaxDmgTableBytes)
      return Status::InvalidFormat("'{}': resource data of {} bytes is larger than max ({})", path_,
                                   data_length, limits::kMaxDmgTableBytes);
    // Read whole at once: a run of tiny resources must not cost a read each. qemu lets the
    // last resource's length field count towards the data, so 4 bytes may lie past it.
    std::vector<std::byte> data(data_length + 4);
    RETURN_IF_ERROR(
        file_.PRead(offset + data_offset, data).WithContext("'{}': reading the resource fork", path_));
    uint64_t pos = 0;
    while (pos < data_length) {
      const uint64_t n = LoadBE32(&data[pos]);
      if (n == 0 || n > data_length - pos)
        return Status::InvalidFormat("'{}': resource of {} bytes at {} overruns the resource data ({} bytes)",
                                     path_, n, pos, data_length);
      pos += 4;
      // n <= data_length - pos + 4: the table may take in the 4 bytes past the data.
      RETURN_IF_ERROR(ReadMish(std::span(data).subspan(pos, n)));
      pos += n;
    }
    return Status::Ok();
  }

  // The property list is not parsed as XML: every <data> element is decoded and the mish
  // tables among them kept, as qemu does.
  Status ReadPropertyList(uint64_t offset, uint64_t length) {
    if (length > limits::kMaxDmgPlistBytes)
      return Status::InvalidFormat("'{}': property list of {} bytes is larger than max ({})", path_, length,
                                   limits::kMaxDmgPlistBytes);
    std::string text(length, '\0');
    RETURN_IF_ERROR(file_.PRead(offset, std::as_writable_bytes(std::span(text)))
                        .WithContext("'{}': reading the property list", path_));
    // qemu reads it as a C string: a NUL byte ends it.
    text.resize(std::strlen(text.c_str()));
    constexpr std::string_view kOpen = "<data>", kClose = "</data>";
    size_t element = 0;
    for (size_t pos = text.find(kOpen); pos != std::string::npos; pos = text.find(kOpen, pos)) {
      pos += kOpen.size();
      size_t end = text.find(kClose, pos);
      if (end == std::string::npos)
        return Status::InvalidFormat("'{}': property list: <data> element {} has no </data>", path_, element);
      auto bytes = DecodeBase64(std::string_view(text).substr(pos, end - pos));
      if (!bytes)
        return Status::InvalidFormat("'{}': property list: <data> element {} is not valid base64", path_,
                                     element);
      RETURN_IF_ERROR(ReadMish(*bytes));
      pos = end + kClose.size();
      element++;
    }
    return Status::Ok();
  }

  // One block table; anything that is not one is skipped (as qemu skips it).
  Status ReadMish(std::span<const std::byte> t) {
    if (t.size() < mish::kMinTableSize || std::memcmp(t.data(), "mish", 4) != 0) return Status::Ok();
    const uint64_t first_sector = LoadBE64(&t[mish::kFirstSector]);
    auto in_offset = CheckedAdd(data_fork_offset_, LoadBE64(&t[mish::kDataOffset]));
    if (!in_offset) return Status::InvalidFormat("'{}': block table data offset overflows", path_);
    const size_t entries = (t.size() - mish::kHeaderSize) / mish::kEntrySize;
    for (size_t i = 0; i < entries; i++) {
      const std::byte* e = &t[mish::kHeaderSize + i * mish::kEntrySize];
      Chunk c;
      c.type = LoadBE32(e);
      if (c.type == kChunkComment || c.type == kChunkLast) continue;
      if (tables_.readable.size() + tables_.unreadable.size() >= limits::kMaxDmgChunks)
        return Status::InvalidFormat("'{}': more than {} chunks", path_, limits::kMaxDmgChunks);
      auto sector = CheckedAdd(LoadBE64(e + mish::kEntrySector), first_sector);
      c.sector_count = LoadBE64(e + mish::kEntrySectorCount);
      if (!KnownReadableType(c.type)) {
        // qemu leaves these out of its table; kept aside only to name them in errors.
        if (sector && CheckedAdd(*sector, c.sector_count)) {
          c.first_sector = *sector;
          tables_.unreadable.push_back(c);
        }
        continue;
      }
      // qemu's numbering: the known chunks so far.
      const size_t index = tables_.readable.size();
      if (!sector) return Status::InvalidFormat("'{}': sector number of chunk {} overflows", path_, index);
      c.first_sector = *sector;
      if (!ReadsAsZeros(c.type) && c.sector_count > limits::kMaxDmgChunkBytes / kSectorSize)
        return Status::InvalidFormat("'{}': sector count {} for chunk {} is larger than max ({})", path_,
                                     c.sector_count, index, limits::kMaxDmgChunkBytes / kSectorSize);
      auto offset = CheckedAdd(LoadBE64(e + mish::kEntryOffset), *in_offset);
      if (!offset) return Status::InvalidFormat("'{}': data offset of chunk {} overflows", path_, index);
      c.host_offset = *offset;
      c.host_length = LoadBE64(e + mish::kEntryLength);
      if (c.host_length > limits::kMaxDmgChunkBytes)
        return Status::InvalidFormat("'{}': length {} for chunk {} is larger than max ({})", path_,
                                     c.host_length, index, limits::kMaxDmgChunkBytes);
      if (!CheckedAdd(c.first_sector, c.sector_count) || !CheckedAdd(c.host_offset, c.host_length))
        return Status::InvalidFormat("'{}': chunk {} overflows", path_, index);
      if (c.type == kChunkRaw && c.host_length < c.sector_count * kSectorSize)
        return Status::InvalidFormat("'{}': raw chunk {} stores {} bytes for {} sectors", path_, index,
                                     c.host_length, c.sector_count);
      if (c.sector_count == 0) continue;  // covers nothing
      tables_.readable.push_back(c);
    }
    return Status::Ok();
  }

  // qemu finds a sector's chunk by binary search: the tables must come in sector order.
  Status CheckOrder() const {
    const auto& r = tables_.readable;
    for (size_t i = 0; i < r.size(); i++) {
      if (i > 0 && r[i].first_sector < r[i - 1].end_sector())
        return Status::InvalidFormat(
            "'{}': chunk at sectors {}..{} overlaps or precedes the chunk before it ({}..{})", path_,
            r[i].first_sector, r[i].end_sector(), r[i - 1].first_sector, r[i - 1].end_sector());
      if (r[i].end_sector() > tables_.sector_count)
        return Status::InvalidFormat(
            "'{}': chunk at sectors {}..{} reaches past the end of the disk ({} sectors)", path_,
            r[i].first_sector, r[i].end_sector(), tables_.sector_count);
    }
    return Status::Ok();
  }

  File& file_;
  const std::string& path_;
  uint64_t data_fork_offset_ = 0;
  Tables tables_;
};

}  // namespace

std::string DescribeChunkType(uint32_t type) {
  switch (type) {
    case kChunkLzfse:
      return "lzfse-compressed";
    case kChunkAdc:
      return "ADC-compressed";
    default:
      return fmt::format("of unknown type {:x}", type);
  }
}

Result<Tables> ReadTables(File& file, const std::string& path) { return TableReader(file, path).Read(); }

}  // namespace vimgfs::dmg

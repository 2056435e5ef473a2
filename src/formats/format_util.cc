#include "formats/format_util.h"

#include <algorithm>
#include <cstring>
#include <random>

namespace vimgfs {

Result<bool> ParseBoolOption(const std::string& key, const std::string& v) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") return true;
  if (v == "off" || v == "no" || v == "false" || v == "n") return false;
  return Status::InvalidArgument("Parameter '{}' expects 'on' or 'off'", key);
}

std::array<std::byte, 16> RandomUuid(bool guid_order) {
  static thread_local std::mt19937_64 rng{std::random_device{}() ^ (uint64_t{std::random_device{}()} << 32)};
  std::array<std::byte, 16> u;
  const uint64_t a = rng(), b = rng();
  std::memcpy(u.data(), &a, 8);
  std::memcpy(u.data() + 8, &b, 8);
  // The version nibble is the high one of time_hi_and_version's high byte: byte 7 when
  // that field is stored little-endian, byte 6 in RFC order. The variant byte (8) is as is.
  const size_t version_byte = guid_order ? 7 : 6;
  u[version_byte] = (u[version_byte] & std::byte{0x0f}) | std::byte{0x40};
  u[8] = (u[8] & std::byte{0x3f}) | std::byte{0x80};
  return u;
}

Status LookupPlainExtents(File& file, uint64_t host_base, uint64_t off, uint64_t len, bool writable,
                          std::vector<Mapping>* out) {
  const uint64_t end = off + len;
  while (off < end) {
    ASSIGN_OR_RETURN(HostExtent ext, file.ProbeExtent(host_base + off));
    Mapping m;
    m.length = ext.length == 0 ? end - off : std::min(ext.length, end - off);
    m.kind = ext.data || ext.context_flags ? Mapping::Kind::kData : Mapping::Kind::kZero;
    m.file = &file;
    m.host_offset = host_base + off;
    m.writable = writable;
    out->push_back(m);
    off += m.length;
  }
  return Status::Ok();
}

Status WriteZeros(File& file, uint64_t off, uint64_t len, IoTag tag) {
  static const std::vector<std::byte> kZeros(1 << 20);
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(kZeros.size(), len - done);
    RETURN_IF_ERROR(file.PWrite(off + done, std::span(kZeros.data(), n), tag));
    done += n;
  }
  return Status::Ok();
}

Status WriteDirtySectors(File& file, uint64_t base, std::span<const std::byte> table,
                         std::set<uint64_t>* dirty, IoTag tag) {
  constexpr uint64_t kSector = 512;
  auto it = dirty->begin();
  while (it != dirty->end()) {
    const uint64_t start = *it;
    uint64_t end = start + 1;
    auto next = std::next(it);
    while (next != dirty->end() && *next == end) {
      ++end;
      ++next;
    }
    const uint64_t lo = start * kSector, hi = std::min<uint64_t>(end * kSector, table.size());
    RETURN_IF_ERROR(file.PWrite(base + lo, table.subspan(lo, hi - lo), tag));
    it = dirty->erase(it, next);
  }
  return Status::Ok();
}

}  // namespace vimgfs

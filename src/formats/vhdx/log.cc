// VHDX log: finding the active sequence and replaying it; building log entries.
//
// An entry: a 64-byte header ("loge", CRC-32C over the whole entry, entry length, tail,
// sequence number, descriptor count, log GUID, flushed and last file offsets), then the
// descriptors (32 bytes each: "zero" or "desc"), padded to 4 KiB, then one 4 KiB data
// sector per data descriptor ("data", sequence high, 4084 bytes, sequence low; the
// descriptor holds the sector's first 8 and last 4 bytes).
#include <cstring>

#include "formats/vhdx/vhdx_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs::vhdx {
namespace {

struct Entry {
  uint64_t pos = 0;  // in the log
  uint64_t length = 0;
  uint64_t tail = 0;
  uint64_t sequence = 0;
  uint64_t flushed = 0, last = 0;
  std::vector<std::byte> bytes;  // the whole entry
};

// Reads and fully validates the entry at pos (wrapping around the log's end).
std::optional<Entry> TryEntry(File* file, const Header& h, uint64_t pos) {
  const uint64_t len = h.log_length;
  std::array<std::byte, 64> hd{};
  if (!file->PRead(h.log_offset + pos, hd).ok()) return std::nullopt;
  if (std::memcmp(hd.data(), "loge", 4) != 0) return std::nullopt;
  Entry e;
  e.pos = pos;
  e.length = LoadLE32(&hd[8]);
  e.tail = LoadLE32(&hd[12]);
  e.sequence = LoadLE64(&hd[16]);
  const uint64_t descs = LoadLE32(&hd[24]);
  e.flushed = LoadLE64(&hd[48]);
  e.last = LoadLE64(&hd[56]);
  if (e.length == 0 || e.length % kLogSector || e.length > len || e.tail % kLogSector || e.tail >= len ||
      e.sequence == 0) {
    return std::nullopt;
  }
  if (std::memcmp(&hd[32], h.log_guid.data(), 16) != 0) return std::nullopt;
  const uint64_t head_sectors = DivRoundUp(64 + descs * 32, kLogSector);
  if (head_sectors * kLogSector > e.length) return std::nullopt;
  e.bytes.resize(e.length);
  for (uint64_t done = 0; done < e.length;) {
    const uint64_t at = (pos + done) % len;
    const uint64_t n = std::min(e.length - done, len - at);
    if (!file->PRead(h.log_offset + at, std::span(e.bytes.data() + done, n)).ok()) return std::nullopt;
    done += n;
  }
  if (LoadLE32(&e.bytes[4]) != ChecksumWithHole(e.bytes, 4)) return std::nullopt;
  uint64_t data_descs = 0;
  for (uint64_t i = 0; i < descs; ++i) {
    const std::byte* d = &e.bytes[64 + i * 32];
    if (LoadLE64(d + 24) != e.sequence) return std::nullopt;
    if (std::memcmp(d, "desc", 4) == 0) {
      ++data_descs;
    } else if (std::memcmp(d, "zero", 4) != 0) {
      return std::nullopt;
    }
  }
  if ((head_sectors + data_descs) * kLogSector != e.length) return std::nullopt;
  return e;
}

}  // namespace

uint64_t LogEntrySize(size_t sectors) {
  return (DivRoundUp(64 + sectors * 32, kLogSector) + sectors) * kLogSector;
}

Status ReadLog(File* file, uint64_t file_size, const Header& h, const std::string& path,
               std::map<uint64_t, std::vector<std::byte>>* overlay, uint64_t* last_file_offset,
               uint64_t* last_sequence, bool* active) {
  *last_file_offset = 0;
  *last_sequence = 0;
  *active = false;
  if (IsNullGuid(h.log_guid)) return Status::Ok();
  // Every valid entry, by position.
  std::map<uint64_t, Entry> valid;
  for (uint64_t pos = 0; pos < h.log_length; pos += kLogSector) {
    if (auto e = TryEntry(file, h, pos)) valid.emplace(pos, std::move(*e));
  }
  // The longest run of entries that follow each other with sequence numbers rising by one,
  // ending in the highest sequence number: its head's tail starts the active sequence.
  const Entry* head = nullptr;
  for (const auto& [pos, e] : valid) {
    if (!head || e.sequence > head->sequence) head = &e;
  }
  if (!head) return Status::Ok();  // nothing valid: nothing to replay
  *last_sequence = head->sequence;
  // Walk back from the tail to the head.
  std::vector<const Entry*> seq;
  uint64_t pos = head->tail;
  for (size_t guard = 0; guard <= valid.size(); ++guard) {
    auto it = valid.find(pos);
    if (it == valid.end()) break;
    if (!seq.empty() && it->second.sequence != seq.back()->sequence + 1) break;
    seq.push_back(&it->second);
    if (&it->second == head) break;
    pos = (pos + it->second.length) % h.log_length;
  }
  if (seq.empty() || seq.back() != head) {
    // The head's tail does not lead to it: no active sequence (the log is empty).
    *last_sequence = head->sequence;
    return Status::Ok();
  }
  if (head->flushed > file_size) {
    return Status::Corrupt("'{}': VHDX log says the file had {} bytes, but it has {}", path, head->flushed,
                           file_size);
  }
  *active = true;
  for (const Entry* e : seq) {
    const uint64_t descs = LoadLE32(&e->bytes[24]);
    uint64_t data_at = DivRoundUp(64 + descs * 32, kLogSector) * kLogSector;
    for (uint64_t i = 0; i < descs; ++i) {
      const std::byte* d = &e->bytes[64 + i * 32];
      const uint64_t off = LoadLE64(d + 16);
      if (off % kLogSector || off < MiB) {
        return Status::Corrupt("'{}': VHDX log entry {} writes at invalid offset 0x{:x}", path, e->sequence,
                               off);
      }
      if (std::memcmp(d, "zero", 4) == 0) {
        const uint64_t zl = LoadLE64(d + 8);
        if (zl % kLogSector || zl > (64ull << 20)) {
          return Status::Corrupt("'{}': VHDX log zero descriptor of {} bytes", path, zl);
        }
        for (uint64_t z = 0; z < zl; z += kLogSector) {
          (*overlay)[off + z] = std::vector<std::byte>(kLogSector);
        }
        continue;
      }
      const std::byte* s = &e->bytes[data_at];
      data_at += kLogSector;
      if (std::memcmp(s, "data", 4) != 0 || LoadLE32(s + 4) != (e->sequence >> 32) ||
          LoadLE32(s + 4092) != (e->sequence & 0xffffffffu)) {
        return Status::Corrupt("'{}': VHDX log entry {} has a bad data sector", path, e->sequence);
      }
      std::vector<std::byte> sector(kLogSector);
      std::memcpy(sector.data(), d + 8, 8);  // leading bytes
      std::memcpy(sector.data() + 8, s + 8, 4084);
      std::memcpy(sector.data() + 4092, d + 4, 4);  // trailing bytes
      (*overlay)[off] = std::move(sector);
    }
    *last_file_offset = std::max(*last_file_offset, e->last);
  }
  return Status::Ok();
}

std::vector<std::byte> BuildLogEntry(const Guid& log_guid, uint64_t sequence, uint64_t tail,
                                     const std::map<uint64_t, const std::byte*>& sectors,
                                     uint64_t file_size) {
  const uint64_t n = sectors.size();
  const uint64_t head_bytes = DivRoundUp(64 + n * 32, kLogSector) * kLogSector;
  std::vector<std::byte> b(LogEntrySize(n));
  std::memcpy(b.data(), "loge", 4);
  StoreLE32(&b[8], static_cast<uint32_t>(b.size()));
  StoreLE32(&b[12], static_cast<uint32_t>(tail));
  StoreLE64(&b[16], sequence);
  StoreLE32(&b[24], static_cast<uint32_t>(n));
  std::memcpy(&b[32], log_guid.data(), 16);
  StoreLE64(&b[48], file_size);
  StoreLE64(&b[56], file_size);
  uint64_t i = 0;
  for (const auto& [off, src] : sectors) {
    std::byte* d = &b[64 + i * 32];
    std::memcpy(d, "desc", 4);
    std::memcpy(d + 4, src + 4092, 4);
    std::memcpy(d + 8, src, 8);
    StoreLE64(d + 16, off);
    StoreLE64(d + 24, sequence);
    std::byte* s = &b[head_bytes + i * kLogSector];
    std::memcpy(s, "data", 4);
    StoreLE32(s + 4, static_cast<uint32_t>(sequence >> 32));
    std::memcpy(s + 8, src + 8, 4084);
    StoreLE32(s + 4092, static_cast<uint32_t>(sequence));
    ++i;
  }
  StoreChecksum(b, 4);
  return b;
}

}  // namespace vimgfs::vhdx

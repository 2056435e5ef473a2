// libFuzzer target for the guest partition table parser (src/guest/partition_table.cc).
// The input is a disk, read four ways: exactly as given; the same with the CRCs of any GPT
// headers and arrays set right (a mutation almost always breaks them, which would keep the
// entry parsing out of reach); as the head of a 64 MiB disk whose missing bytes read as
// zeros (seeds are table heads cut from larger disks); and split in two halves placed at
// the head and the tail of a disk whose size the last bytes choose, so backup GPT headers
// and EBRs far from sector 0 are reachable. Any result must keep the header's promises; a
// read outside the disk aborts.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "guest/partition_table.h"
#include "util/endian.h"

namespace {

using vimgfs::guest::PartitionTable;

// A disk of `size` bytes holding `head` at 0 and `tail` at its end; zeros elsewhere.
void ParseDisk(std::span<const uint8_t> head, std::span<const uint8_t> tail, uint64_t size) {
  const uint64_t tail_at = size - tail.size();
  vimgfs::guest::DiskReader read = [&](uint64_t off, std::span<std::byte> out) -> vimgfs::Status {
    if (off > size || out.size() > size - off) abort();  // the parser promised not to
    std::memset(out.data(), 0, out.size());
    const uint64_t end = off + out.size();
    if (off < head.size())
      std::memcpy(out.data(), head.data() + off, std::min<uint64_t>(end, head.size()) - off);
    if (end > tail_at) {
      const uint64_t from = std::max(off, tail_at);
      std::memcpy(out.data() + (from - off), tail.data() + (from - tail_at), end - from);
    }
    return vimgfs::Status::Ok();
  };
  auto t = vimgfs::guest::ReadPartitionTable(read, size);
  if (!t.ok()) abort();  // only a failed read is an error, and none fails here

  if (t->partitions.size() > vimgfs::guest::kMaxPartitions) abort();
  if (t->kind == PartitionTable::Kind::kNone && !t->partitions.empty()) abort();
  if (t->sector_size != 512 && t->sector_size != 4096) abort();
  unsigned last = 0;
  for (const vimgfs::guest::Partition& p : t->partitions) {
    if (p.number <= last) abort();  // ascending and unique
    last = p.number;
    if (p.length == 0 || p.offset >= size || p.length > size - p.offset) abort();
    if (t->kind == PartitionTable::Kind::kGpt && (p.number > vimgfs::guest::kMaxPartitions || p.extended))
      abort();
    if (p.extended && p.number > 4) abort();
  }
  for (const vimgfs::guest::ByteRange& r : t->metadata)
    if (r.offset > size || r.length > size - r.offset) abort();
  if (size > 0 && (!t->Touches(0, 1) || !t->Touches(size - 1, 1))) abort();
}

uint32_t Crc(const uint8_t* p, size_t n) { return static_cast<uint32_t>(crc32(0, p, static_cast<uInt>(n))); }

// Rewrites the CRCs of the GPT headers at LBA 1 and the last LBA (both sector sizes) whose
// fields are in range, array first since the header's CRC covers the array's.
void FixGptCrcs(std::vector<uint8_t>& d) {
  for (uint64_t ss : {512, 4096}) {
    if (d.size() / ss < 3) continue;
    for (uint64_t lba : {uint64_t{1}, d.size() / ss - 1}) {
      uint8_t* h = d.data() + lba * ss;
      if (std::memcmp(h, "EFI PART", 8) != 0) continue;
      const uint32_t header_size = vimgfs::LoadLE32(h + 12);
      const uint64_t array_lba = vimgfs::LoadLE64(h + 72);
      const uint64_t bytes = uint64_t{vimgfs::LoadLE32(h + 80)} * vimgfs::LoadLE32(h + 84);
      if (header_size < 92 || header_size > ss) continue;
      if (bytes <= (1 << 20) && array_lba < d.size() / ss && bytes <= d.size() - array_lba * ss)
        vimgfs::StoreLE32(h + 88, Crc(d.data() + array_lba * ss, bytes));
      vimgfs::StoreLE32(h + 16, 0);
      vimgfs::StoreLE32(h + 16, Crc(h, header_size));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> in(data, size);
  ParseDisk(in, {}, size);
  std::vector<uint8_t> fixed(data, data + size);
  FixGptCrcs(fixed);
  ParseDisk(fixed, {}, size);
  ParseDisk(in, {}, std::max<uint64_t>(size, 64 << 20));
  if (size >= 8) {
    // Disk size from the last 8 bytes: up to 2^40 bytes, at least the whole input. Not
    // rounded to sectors, so odd sizes are tried too.
    uint64_t want = 0;
    std::memcpy(&want, data + size - 8, 8);
    const std::span<const uint8_t> body = in.first(size - 8);
    const size_t half = body.size() / 2;
    const uint64_t disk = std::max<uint64_t>(want % (uint64_t{1} << 40), body.size());
    ParseDisk(body.first(half), body.subspan(half), disk);
  }
  return 0;
}

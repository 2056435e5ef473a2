// MBR and GPT parsing (see partition_table.h). Layouts: the MBR's four 16-byte entries at
// byte 446 and the 0x55AA signature at 510, EBR chains for logical partitions; GPT's
// header at LBA 1 (backup at the last LBA) and its entry array, both CRC32-protected
// (UEFI specification, chapter 5). What Linux accepts is what we accept: MBR entries past
// the end of the disk are cut short there, GPT entries past it are left out.
#include "guest/partition_table.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <set>

#include "util/endian.h"
#include "util/utf16.h"

namespace vimgfs::guest {
namespace {

constexpr uint32_t kMbrSector = 512;
constexpr size_t kMbrEntries = 446;
constexpr uint8_t kTypeGptProtective = 0xEE;
constexpr uint64_t kMaxGptArrayBytes = 1 << 20;  // 16 KiB is usual; 8192 entries of 128

bool IsExtendedType(uint8_t type) { return type == 0x05 || type == 0x0F || type == 0x85; }

struct MbrEntry {
  uint8_t status;
  uint8_t type;
  uint32_t lba;
  uint32_t sectors;
};

MbrEntry EntryAt(const std::array<std::byte, kMbrSector>& sector, size_t i) {
  const std::byte* p = sector.data() + kMbrEntries + 16 * i;
  return {static_cast<uint8_t>(p[0]), static_cast<uint8_t>(p[4]), LoadLE32(p + 8), LoadLE32(p + 12)};
}

bool HasBootSignature(const std::array<std::byte, kMbrSector>& sector) {
  return sector[510] == std::byte{0x55} && sector[511] == std::byte{0xAA};
}

uint32_t Crc32(const std::byte* p, size_t n) {
  return static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(p), static_cast<uInt>(n)));
}

class Parser {
 public:
  Parser(const DiskReader& read, uint64_t disk_size) : read_(read), size_(disk_size) {}

  Result<PartitionTable> Run() {
    table_.metadata = EdgeRanges(size_);
    if (size_ < kMbrSector) return Done("the disk is smaller than one sector");
    std::array<std::byte, kMbrSector> mbr{};
    RETURN_IF_ERROR(read_(0, mbr));
    if (!HasBootSignature(mbr)) return Done("no boot signature in sector 0");
    bool protective = false;
    for (size_t i = 0; i < 4; ++i) {
      MbrEntry e = EntryAt(mbr, i);
      // A FAT or NTFS boot sector also ends in 0x55AA; its bytes here are code, not
      // entries with a boot flag of 0x00 or 0x80.
      if (e.status != 0x00 && e.status != 0x80) return Done("sector 0 is a boot sector, not an MBR");
      if (e.type == kTypeGptProtective) protective = true;
    }
    if (protective) {
      std::string why;  // of the 512-byte-sector attempt, the usual layout
      for (uint32_t ss : {512u, 4096u}) {
        std::string why_here;
        ASSIGN_OR_RETURN(bool found, ReadGpt(ss, &why_here));
        if (found) return std::move(table_);
        if (why.empty()) why = why_here;
      }
      return Done(fmt::format("a protective MBR without a valid GPT ({})", why));
    }
    table_.kind = PartitionTable::Kind::kMbr;
    for (unsigned i = 0; i < 4; ++i) {
      MbrEntry e = EntryAt(mbr, i);
      if (e.type == 0 || e.sectors == 0) continue;
      auto primary = Take(i + 1, 0, e, "primary");
      if (!primary) continue;
      if (IsExtendedType(e.type)) {
        primary->extended = true;
        Add(*primary);
        RETURN_IF_ERROR(ReadLogicals(e.lba));
      } else {
        Add(*primary);
      }
    }
    std::sort(table_.partitions.begin(), table_.partitions.end(),
              [](const Partition& a, const Partition& b) { return a.number < b.number; });
    return std::move(table_);
  }

 private:
  Result<PartitionTable> Done(std::string why) {
    table_.kind = PartitionTable::Kind::kNone;
    table_.partitions.clear();
    table_.notes.push_back(std::move(why));
    return std::move(table_);
  }

  void Add(Partition p) {
    if (table_.partitions.size() >= kMaxPartitions) {
      if (!full_noted_)
        table_.notes.push_back(fmt::format("more than {} partitions: the rest ignored", kMaxPartitions));
      full_noted_ = true;
      return;
    }
    table_.partitions.push_back(std::move(p));
  }

  // An MBR or EBR entry whose start is base_lba + e.lba, checked against the disk.
  std::optional<Partition> Take(unsigned number, uint64_t base_lba, const MbrEntry& e, const char* what) {
    uint64_t start = (base_lba + e.lba) * kMbrSector;
    if (e.lba == 0 || start >= size_) {
      table_.notes.push_back(fmt::format("{} partition {} starts outside the disk: ignored", what, number));
      return std::nullopt;
    }
    Partition p;
    p.number = number;
    p.offset = start;
    p.length = uint64_t{e.sectors} * kMbrSector;
    p.mbr_type = e.type;
    if (p.length > size_ - start) {
      table_.notes.push_back(fmt::format("partition {} runs past the end of the disk: cut short", number));
      p.length = size_ - start;
    }
    return p;
  }

  // The EBR chain of the extended partition starting at ext_lba. Each EBR holds the
  // logical partition (relative to the EBR) and the link to the next EBR (relative to
  // the extended partition). Bounded and loop-free: a hostile chain ends with a note.
  Status ReadLogicals(uint32_t ext_lba) {
    std::set<uint64_t> seen;
    uint64_t ebr_lba = ext_lba;
    while (true) {
      uint64_t at = ebr_lba * kMbrSector;
      if (at > size_ - kMbrSector || !seen.insert(ebr_lba).second || seen.size() > kMaxPartitions) {
        table_.notes.push_back(fmt::format("the extended partition's chain breaks at sector {}", ebr_lba));
        return Status::Ok();
      }
      std::array<std::byte, kMbrSector> ebr{};
      RETURN_IF_ERROR(read_(at, ebr));
      table_.metadata.push_back({at, kMbrSector});
      if (!HasBootSignature(ebr)) {
        if (ebr_lba != ext_lba)  // an empty extended partition has no valid EBR at all
          table_.notes.push_back(fmt::format("no boot signature in the EBR at sector {}", ebr_lba));
        return Status::Ok();
      }
      std::optional<uint64_t> next;
      for (size_t i = 0; i < 4; ++i) {
        MbrEntry e = EntryAt(ebr, i);
        if (e.type == 0 || e.sectors == 0) continue;
        if (IsExtendedType(e.type)) {
          if (!next) next = uint64_t{ext_lba} + e.lba;
          continue;
        }
        if (auto logical = Take(next_logical_, ebr_lba, e, "logical")) Add(*logical);
        ++next_logical_;
      }
      if (!next) return Status::Ok();
      ebr_lba = *next;
    }
  }

  struct GptHeader {
    uint64_t my_lba, alternate_lba, first_usable, last_usable, array_lba;
    uint32_t entries, entry_size, array_crc;
  };

  // The header at lba, or why it is not one.
  Result<std::optional<GptHeader>> ReadGptHeader(uint32_t ss, uint64_t lba, std::string* why) {
    std::vector<std::byte> sector(ss);
    RETURN_IF_ERROR(read_(lba * ss, sector));
    if (std::memcmp(sector.data(), "EFI PART", 8) != 0) {
      *why = "no GPT signature";
      return std::optional<GptHeader>();
    }
    uint32_t header_size = LoadLE32(&sector[12]);
    if (header_size < 92 || header_size > ss) {
      *why = fmt::format("header size {} out of range", header_size);
      return std::optional<GptHeader>();
    }
    uint32_t stored_crc = LoadLE32(&sector[16]);
    std::memset(&sector[16], 0, 4);
    if (Crc32(sector.data(), header_size) != stored_crc) {
      *why = "header CRC mismatch";
      return std::optional<GptHeader>();
    }
    GptHeader h{LoadLE64(&sector[24]), LoadLE64(&sector[32]), LoadLE64(&sector[40]), LoadLE64(&sector[48]),
                LoadLE64(&sector[72]), LoadLE32(&sector[80]), LoadLE32(&sector[84]), LoadLE32(&sector[88])};
    const uint64_t last_lba = size_ / ss - 1;
    if (h.my_lba != lba) {
      *why = fmt::format("header says it is at LBA {}", h.my_lba);
    } else if (h.first_usable > h.last_usable || h.last_usable > last_lba) {
      *why = "usable range outside the disk";
    } else if (h.entry_size < 128 || h.entry_size % 128 != 0 || h.entries == 0 ||
               uint64_t{h.entries} * h.entry_size > kMaxGptArrayBytes) {
      *why = fmt::format("entry array of {} x {} bytes out of range", h.entries, h.entry_size);
    } else if (uint64_t{h.entries} * h.entry_size > size_ || h.array_lba > last_lba ||
               h.array_lba * ss > size_ - uint64_t{h.entries} * h.entry_size) {
      *why = "entry array outside the disk";
    } else {
      return std::optional<GptHeader>(h);
    }
    return std::optional<GptHeader>();
  }

  // The GPT with sector size ss: the primary header, else the backup at the last LBA. When
  // neither is valid, *why says what was wrong with the last one tried.
  Result<bool> ReadGpt(uint32_t ss, std::string* why_out) {
    std::string& why = *why_out;
    if (size_ / ss < 3) {
      why = "the disk is too small for a GPT";
      return false;
    }
    const uint64_t last_lba = size_ / ss - 1;
    for (uint64_t lba : {uint64_t{1}, last_lba}) {
      ASSIGN_OR_RETURN(std::optional<GptHeader> h, ReadGptHeader(ss, lba, &why));
      if (!h) continue;
      const uint64_t array_bytes = uint64_t{h->entries} * h->entry_size;
      std::vector<std::byte> array(array_bytes);
      RETURN_IF_ERROR(read_(h->array_lba * ss, array));
      if (Crc32(array.data(), array.size()) != h->array_crc) {
        why = "entry array CRC mismatch";
        continue;
      }
      if (lba != 1) table_.notes.push_back("the primary GPT is damaged: the backup is used");
      table_.kind = PartitionTable::Kind::kGpt;
      table_.sector_size = ss;
      table_.metadata.push_back({lba * ss, ss});
      table_.metadata.push_back({h->array_lba * ss, array_bytes});
      TakeGptEntries(*h, array, ss);
      return true;
    }
    return false;
  }

  void TakeGptEntries(const GptHeader& h, const std::vector<std::byte>& array, uint32_t ss) {
    const uint64_t last_lba = size_ / ss - 1;
    for (uint32_t i = 0; i < h.entries; ++i) {
      const std::byte* e = array.data() + uint64_t{i} * h.entry_size;
      if (std::all_of(e, e + 16, [](std::byte b) { return b == std::byte{0}; })) continue;  // unused
      unsigned number = i + 1;
      uint64_t first = LoadLE64(e + 32), last = LoadLE64(e + 40);
      if (number > kMaxPartitions) {
        table_.notes.push_back(
            fmt::format("GPT entry {} beyond partition {}: ignored", number, kMaxPartitions));
        break;
      }
      if (first == 0 || first > last || last > last_lba) {
        table_.notes.push_back(fmt::format("GPT partition {} lies outside the disk: ignored", number));
        continue;
      }
      Partition p;
      p.number = number;
      p.offset = first * ss;
      p.length = (last - first + 1) * ss;
      p.label = Utf16ToUtf8(std::span<const std::byte>(e + 56, 72), false).value_or("");
      Add(std::move(p));
    }
  }

  const DiskReader& read_;
  uint64_t size_;
  PartitionTable table_;
  bool full_noted_ = false;
  // Shared by all extended partitions, as in Linux: a second chain goes on from the first.
  unsigned next_logical_ = 5;
};

}  // namespace

std::vector<ByteRange> EdgeRanges(uint64_t disk_size) {
  std::vector<ByteRange> edges = {{0, std::min(disk_size, kWatchedEdge)}};
  if (disk_size > kWatchedEdge) edges.push_back({disk_size - kWatchedEdge, kWatchedEdge});
  return edges;
}

bool PartitionTable::Touches(uint64_t offset, uint64_t length) const {
  for (const ByteRange& r : metadata)
    if (offset < r.offset + r.length && r.offset < offset + length) return true;
  return false;
}

Result<PartitionTable> ReadPartitionTable(const DiskReader& read, uint64_t disk_size) {
  return Parser(read, disk_size).Run();
}

}  // namespace vimgfs::guest

// dmg (Apple UDIF disk images), read-only, as qemu 7.2's dmg driver reads them.
//
// Layout (all fields big-endian):
//   data fork    the chunks' bytes: raw sectors, or zlib / bzip2 / lzfse streams
//   block tables one "mish" table per partition: a 204-byte header (its first sector
//                at 8, its offset in the data fork at 0x18) and 40-byte chunk entries
//                (type, comment, first sector, sector count, offset, length), both
//                relative to the header's values
//   koly trailer 512 bytes near the end of the file: where the data fork, the resource
//                fork and the XML property list lie, and the disk's sector count (0x1ec)
// The block tables are found in the resource fork when it has a length (the older layout:
// a classic resource fork whose data area holds length-prefixed resources), else in the
// XML property list, as base64 inside <data> elements.
//
// What qemu does, and so vimgfs (every field checked besides, as docs/ARCHITECTURE.md,
// "Untrusted images", asks):
//   - The trailer is the first "koly" in the 515 bytes that end 508 bytes before the file
//     size rounded up to a sector (so an odd-sized file still finds it).
//   - Every <data> element of the property list is decoded; blocks that are not "mish"
//     tables (or are shorter than a header and one entry) are skipped. The chunk count
//     comes from the table's size, not its count field.
//   - Comment and terminator entries are skipped; so are chunks of types qemu cannot
//     read (lzfse, ADC, unknown), which leaves their sectors unreadable: a read there
//     fails naming the chunk type. Zero and "ignore" chunks read as zeros.
//   - A compressed chunk inflates to at most 64 MiB, and no chunk stores more than
//     64 MiB (qemu's limits). The disk is the trailer's sector count; sectors no chunk
//     covers cannot be read (qemu: I/O error).
// vimgfs refuses besides: offsets that overflow, chunks out of order or overlapping (qemu's
// binary search would miss them), chunks reaching past the disk, raw chunks storing fewer
// bytes than their sectors (qemu serves stale buffer bytes), base64 with characters other
// than whitespace (qemu skips them), resource data over limits::kMaxDmgTableBytes, more
// chunks than limits::kMaxDmgChunks. bzip2 chunks are read as qemu reads them with its
// dmg-bz2 module (Debian's qemu-img lacks the module and fails them). Compressed chunks
// are the engine's units (Mapping::Kind::kCompressed): inflated whole and cached.
//
// Files:
//   tables.cc  the trailer, the property list and resource fork, the mish tables
//   dmg.cc     DmgMap: the ClusterMap (lookup only), opening, probe, the driver object
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs::dmg {

inline constexpr uint64_t kSectorSize = 512;
inline constexpr uint64_t kTrailerSize = 512;

// Chunk types (the entry's first field).
inline constexpr uint32_t kChunkZero = 0;              // UDZE
inline constexpr uint32_t kChunkRaw = 1;               // UDRW
inline constexpr uint32_t kChunkIgnore = 2;            // UDIG: reads as zeros
inline constexpr uint32_t kChunkAdc = 0x80000004;      // UDCO: qemu cannot read it
inline constexpr uint32_t kChunkZlib = 0x80000005;     // UDZO
inline constexpr uint32_t kChunkBzip2 = 0x80000006;    // UDBZ
inline constexpr uint32_t kChunkLzfse = 0x80000007;    // ULFO: qemu needs a module Debian lacks
inline constexpr uint32_t kChunkComment = 0x7ffffffe;  // UDCM
inline constexpr uint32_t kChunkLast = 0xffffffff;     // UDLE

// Byte offsets in the koly trailer.
namespace koly {
inline constexpr size_t kDataForkOffset = 0x18;
inline constexpr size_t kRsrcForkOffset = 0x28;
inline constexpr size_t kRsrcForkLength = 0x30;
inline constexpr size_t kPlistOffset = 0xd8;
inline constexpr size_t kPlistLength = 0xe0;
inline constexpr size_t kSectorCount = 0x1ec;
}  // namespace koly

// Byte offsets in a mish table.
namespace mish {
inline constexpr size_t kFirstSector = 0x08;
inline constexpr size_t kDataOffset = 0x18;
inline constexpr size_t kHeaderSize = 204;  // the chunk entries follow
inline constexpr size_t kEntrySize = 40;
inline constexpr size_t kEntrySector = 0x08;
inline constexpr size_t kEntrySectorCount = 0x10;
inline constexpr size_t kEntryOffset = 0x18;
inline constexpr size_t kEntryLength = 0x20;
// qemu reads a table only from this size on (a header and one entry).
inline constexpr size_t kMinTableSize = 244;
}  // namespace mish

// A run of sectors and where it is stored.
struct Chunk {
  uint32_t type = 0;
  uint64_t first_sector = 0;
  uint64_t sector_count = 0;
  uint64_t host_offset = 0;  // in the file
  uint64_t host_length = 0;  // bytes stored there
  uint64_t end_sector() const { return first_sector + sector_count; }
};

struct Tables {
  uint64_t sector_count = 0;      // the disk, from the trailer
  std::vector<Chunk> readable;    // sorted, disjoint, inside the disk
  std::vector<Chunk> unreadable;  // lzfse, ADC, unknown types: qemu leaves them out
};

// A chunk type as an error names it ("lzfse-compressed", "of unknown type 1234").
std::string DescribeChunkType(uint32_t type);

// Finds the trailer of `file` and reads every block table it points to. Errors name path.
Result<Tables> ReadTables(File& file, const std::string& path);

// The open image.
class DmgMap final : public ClusterMap {
 public:
  DmgMap(std::string path, std::unique_ptr<File> file, Tables tables);

  uint64_t virtual_size() const override { return tables_.sector_count * kSectorSize; }
  uint64_t cluster_size() const override { return kSectorSize; }
  bool read_only() const override { return true; }
  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return Status::Ok(); }
  Status Close() override { return Status::Ok(); }
  FormatInfo Info() override;

 private:
  // The error for a sector no readable chunk covers.
  Status Unreadable(uint64_t sector) const;

  std::string path_;
  std::unique_ptr<File> file_;
  Tables tables_;
};

Result<std::unique_ptr<ClusterMap>> OpenDmg(OpenContext ctx);

}  // namespace vimgfs::dmg

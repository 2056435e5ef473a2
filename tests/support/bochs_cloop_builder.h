// Builders of Bochs growing images and cloop images byte by byte, for tests: qemu-img
// cannot create either format. Each builder also keeps the disk content the image should
// read as, recorded from what was put in (not derived from the layout), so that both
// qemu-img and vimgfs are judged against it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace vimgfs::test {

// A Bochs "growing" redolog image. Set the geometry, write sectors, then Write(path).
// The header fields may be overridden after the fact for hostile variants.
class BochsBuilder {
 public:
  // disk_size: the header's disk size (need not be a sector multiple); catalog_entries 0:
  // just enough for the disk.
  BochsBuilder(uint64_t disk_size, uint32_t extent_size, uint32_t bitmap_bytes, uint32_t catalog_entries = 0,
               uint32_t version = 0x00020000);

  // Writes one 512-byte sector of the disk: allocates its extent's block (the next free
  // index, or `block` when the extent has none yet and `block` is given), sets its bitmap
  // bit and stores the data.
  void WriteSector(uint64_t sector, const std::vector<uint8_t>& data, std::optional<uint32_t> block = {});
  // Allocates the extent's block without marking any sector written.
  void AllocateExtent(uint64_t extent, std::optional<uint32_t> block = {});
  // Clears a written sector's bitmap bit, leaving its data in the block (reads as zeros).
  void ClearBit(uint64_t sector);

  // The disk as it should read: written sectors, zeros elsewhere (disk_size rounded down to
  // a sector, as qemu).
  std::vector<uint8_t> Expected() const;
  // Writes the image file (sparse where blocks are far apart).
  void Write(const std::string& path) const;

  // Header fields as written (override for hostile variants).
  std::string magic = "Bochs Virtual HD Image", type = "Redolog", subtype = "Growing";
  uint32_t version;
  uint32_t header_size = 512;  // where the catalog starts
  uint32_t catalog_entries;
  uint32_t bitmap_bytes;
  uint32_t extent_size;
  uint64_t disk_size;
  std::vector<uint32_t> catalog;  // 0xFFFFFFFF: unallocated
  bool write_catalog = true;      // false: leave it out (past the end of the file)
  // Where the data area starts, as bximage lays it out: header_size + 4 * catalog_entries
  // (override to put blocks elsewhere, e.g. where qemu's 32-bit sum wraps).
  std::optional<uint64_t> data_offset;
  // Extra bytes written at absolute file offsets after everything else.
  std::map<uint64_t, std::vector<uint8_t>> patches;

 private:
  uint64_t BlockBytes() const;
  uint64_t BitmapSectors() const;
  std::map<uint32_t, std::vector<uint8_t>> blocks_;   // block index -> bitmap sectors + extent
  std::map<uint64_t, std::vector<uint8_t>> written_;  // sector -> data, what should read back
  uint32_t next_block_ = 0;
};

// A cloop V2.0 image: blocks of block_size bytes, each a zlib stream.
class CloopBuilder {
 public:
  explicit CloopBuilder(uint32_t block_size) : block_size(block_size) {}

  // Appends a block compressed at `level` (zlib's 0..9; 0 stores, larger than the block).
  void AddBlock(const std::vector<uint8_t>& data, int level = 6);
  // Appends a block stored as the given bytes (a hostile stream); `reads_as` is what it
  // should read as, or nothing when a read must fail.
  void AddRawBlock(const std::vector<uint8_t>& stream, std::optional<std::vector<uint8_t>> reads_as);

  // The offsets table as laid out (n + 1 entries, the blocks after room for `room`
  // entries when that is more); override entries for hostile variants.
  std::vector<uint64_t> Offsets(size_t room = 0) const;
  // The disk as it should read (blocks whose read must fail read as zeros here).
  std::vector<uint8_t> Expected() const;
  void Write(const std::string& path) const;

  uint32_t block_size;
  std::optional<uint32_t> block_count;           // the header's n; default: blocks added
  std::optional<std::vector<uint64_t>> offsets;  // the table written; default: Offsets()
                                                 // (blocks go after it, as Offsets(size))
  std::optional<uint64_t> truncate_at;           // cut the file there
  std::string script =
      "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n";

 private:
  std::vector<std::vector<uint8_t>> streams_;
  std::vector<std::vector<uint8_t>> expected_;
};

// zlib's compress2 of `data` (a zlib stream, RFC 1950).
std::vector<uint8_t> ZlibCompress(const std::vector<uint8_t>& data, int level);

}  // namespace vimgfs::test

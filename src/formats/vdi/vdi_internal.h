// VDI (VirtualBox Disk Image): the layout and the pieces of the driver.
//
// A VDI file is: a 72-byte pre-header (text, signature, version), the header proper,
// the block map (one little-endian uint32 per block of the virtual disk), and the data
// area, where allocated blocks follow each other in allocation order. A block map entry
// is the index of a block in the data area (host = offset_data + index * block_size), or
//   0xFFFFFFFF  free: never allocated (reads as zeros here, since VDI has no backing)
//   0xFFFFFFFE  zero: discarded, reads as zeros
// Both are Mapping::kZero: qemu reports them as present zeros.
// Blocks are only ever appended at index blocks_allocated; the header's blocks_allocated
// counts the entries that point into the data area.
//
// Files:
//   header.cc     parsing and validating the header, encoding it back, probe
//   block_map.cc  VdiMap: the ClusterMap (lookup, allocation, zeroing, flush)
//   create.cc     `create -f vdi`, the driver object
//   check.cc      `check` (what qemu-img check reports for VDI)
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs::vdi {

inline constexpr uint32_t kSignature = 0xbeda107f;
inline constexpr uint32_t kVersion0 = 0x00000000;  // oldest layout: VDIHEADER0 (read-only)
inline constexpr uint32_t kVersion11 = 0x00010001;
inline constexpr uint32_t kTypeDynamic = 1;
inline constexpr uint32_t kTypeStatic = 2;
inline constexpr uint32_t kTypeUndo = 3;
inline constexpr uint32_t kTypeDiff = 4;
inline constexpr uint32_t kBlockFree = 0xFFFFFFFFu;
inline constexpr uint32_t kBlockZero = 0xFFFFFFFEu;
inline constexpr bool IsAllocated(uint32_t entry) { return entry < kBlockZero; }

inline constexpr uint64_t kSectorSize = 512;
inline constexpr uint64_t kPreHeaderSize = 72;     // text[64], signature, version
inline constexpr uint32_t kHeader1Size = 384;      // VDIHEADER1 (0x180)
inline constexpr uint32_t kHeader1PlusSize = 400;  // VDIHEADER1PLUS (0x190), what qemu 7.2 writes
inline constexpr uint32_t kHeader0Size = 348;      // VDIHEADER0
inline constexpr uint64_t kDefaultBlockSize = 1ull << 20;
// qemu's limits (VDI_BLOCKS_IN_IMAGE_MAX, VDI_DISK_SIZE_MAX): a block map just under
// 2 GiB, a disk just under 512 TiB. Blocks are 1 MiB, the only size VirtualBox and qemu
// write or qemu reads.
inline constexpr uint32_t kMaxBlocks = (0x80000000u - 512) / 4;
inline constexpr uint64_t kMaxDiskSize = uint64_t{kMaxBlocks} * kDefaultBlockSize;
inline constexpr const char kQemuText[] = "<<< QEMU VM Virtual Disk Image >>>\n";

// Byte offsets of the version 1.1 header fields in the first sector.
namespace off {
inline constexpr size_t kSignature = 0x40;
inline constexpr size_t kVersion = 0x44;
inline constexpr size_t kHeaderSize = 0x48;
inline constexpr size_t kImageType = 0x4c;
inline constexpr size_t kImageFlags = 0x50;
inline constexpr size_t kComment = 0x54;
inline constexpr size_t kOffsetBmap = 0x154;
inline constexpr size_t kOffsetData = 0x158;
inline constexpr size_t kSectorSizeField = 0x168;
inline constexpr size_t kDiskSize = 0x170;
inline constexpr size_t kBlockSize = 0x178;
inline constexpr size_t kBlockExtra = 0x17c;
inline constexpr size_t kBlocksInImage = 0x180;
inline constexpr size_t kBlocksAllocated = 0x184;
inline constexpr size_t kUuidImage = 0x188;
inline constexpr size_t kUuidLastSnap = 0x198;
inline constexpr size_t kUuidLink = 0x1a8;
inline constexpr size_t kUuidParent = 0x1b8;
}  // namespace off

// The header, decoded and validated.
struct Header {
  uint32_t version = 0;
  uint32_t header_size = 0;
  uint32_t image_type = 0;
  uint32_t image_flags = 0;
  uint64_t offset_bmap = 0;
  uint64_t offset_data = 0;
  uint64_t disk_size = 0;     // as stored (may be odd)
  uint64_t virtual_size = 0;  // disk_size rounded up to 512, as qemu does
  uint32_t block_size = 0;
  uint32_t blocks_in_image = 0;
  uint32_t blocks_allocated = 0;
  // The first sector as read, rewritten with updated fields (version 1.x only).
  std::array<std::byte, kSectorSize> raw{};

  bool writable_layout() const { return (version >> 16) == 1; }
  uint64_t bmap_bytes() const { return uint64_t{blocks_in_image} * 4; }
};

// Decodes and validates the header in `sector` (the first 512 bytes of the file, zero
// padded) of a file of file_size bytes. Errors name `path` and the cause. The block map
// may reach past the end of the file (it reads as zeros there, as qemu reads it). With
// `no_writes` (a check, a read-only open) the data area may overlap the block map, as
// qemu allows; a write there would land on the map, so a writable open is refused.
Result<Header> ParseHeader(std::span<const std::byte, kSectorSize> sector, uint64_t file_size,
                           const std::string& path, bool no_writes = false);
// Writes the mutable fields of h (blocks_allocated, disk_size, blocks_in_image) into
// h.raw, which then is the sector to write at offset 0.
void EncodeHeader(Header* h);
int ProbeVdi(std::span<const std::byte> head);

// The block map, read from the file a page at a time as entries are used: the header sizes
// it (up to 2 GiB), memory follows what is touched (clean pages are dropped past
// kMaxPages). Where the map reaches past the end of the file it reads as zeros, as qemu
// reads it. Changed sectors stay in memory until WriteDirty.
class BlockMapPages {
 public:
  static constexpr uint64_t kPageBytes = 64 << 10;
  static constexpr size_t kMaxPages = 1024;  // 64 MiB of clean pages

  // `bytes`: the map's size from `offset` in `file` (sector padded where it is written).
  BlockMapPages(File* file, uint64_t offset, uint64_t bytes, std::string path);
  Result<uint32_t> Get(uint64_t index);
  Status Set(uint64_t index, uint32_t value);
  // The map grows to `bytes` (a resize); the caller sets every new entry.
  void Grow(uint64_t bytes);
  bool dirty() const { return !dirty_sectors_.empty(); }
  // The end of the last dirty sector, in map bytes (0: none).
  uint64_t dirty_end() const;
  // The first n bytes of the map into out (for one write with the header).
  Status CopyPrefix(uint64_t n, std::byte* out);
  void ForgetDirty() { dirty_sectors_.clear(); }
  // Entries the file holds (those past its end read as zeros).
  Result<uint64_t> EntriesInFile() const;
  // Writes the dirty sectors (a run inside one page per write) and forgets them.
  Status WriteDirty(IoTag tag);

 private:
  Result<std::byte*> Page(uint64_t page);
  void DropCleanPages();

  File* file_;
  uint64_t offset_;
  uint64_t bytes_;
  std::string path_;
  std::map<uint64_t, std::vector<std::byte>> pages_;  // page index -> kPageBytes bytes
  std::set<uint64_t> dirty_sectors_;                  // sector index from offset_
};

// The ClusterMap of an open VDI image. Reads its block map through BlockMapPages;
// changed sectors of it are written at Flush in a crash-safe order:
//   sync (data durable) -> header count and block map sectors, in one write where the
//   map follows the header -> sync -> file grown or truncated to the counted blocks.
// So an entry never reaches the disk before its data, the count always matches the
// entries in use, and a block index is never reused while a durable entry may still
// point at it.
class VdiMap final : public ClusterMap {
 public:
  VdiMap(std::string path, std::unique_ptr<File> file, Header header, bool read_only);

  uint64_t virtual_size() const override { return h_.virtual_size; }
  uint64_t cluster_size() const override { return h_.block_size; }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  void AbortWrite(const WritePlan& plan) override;
  Status ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) override;
  Status Discard(uint64_t guest_off, uint64_t len) override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  FormatInfo Info() override;
  Result<CheckReport> Check(RepairMode mode) override;
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) override;

  // Scans the map once at a writable open: entries past blocks_allocated or shared by two blocks
  // make the image unsafe to allocate in (inconsistency_ says why).
  Status ScanForInconsistency();

  // For tests and check.
  const Header& header() const { return h_; }
  bool inconsistent() const { return !inconsistency_.empty(); }

 private:
  uint64_t HostOffset(uint32_t entry) const { return h_.offset_data + uint64_t{entry} * h_.block_size; }
  Status CheckWritable(const char* what) const;
  // Clears guest blocks [first_block, end_block): top data blocks are given back (entry
  // set to new_entry), the others zeroed in place (hole punched; re-reserved unless unmap).
  Status ClearBlocks(uint64_t first_block, uint64_t end_block, uint32_t new_entry, bool unmap);
  Status ZeroHostBlock(uint64_t block, uint32_t entry, bool keep_allocated);
  // Writes dirty metadata in the order described above (data synced first). durable: sync
  // after it too; without, a sync is still due (SyncFiles), unless blocks were given back.
  Status WriteMetadata(bool durable = true);
  Status WriteHeader(uint32_t blocks_allocated);
  // Writes the dirty map sectors and, given a count, the header carrying it.
  Status WriteHeaderAndMap(std::optional<uint32_t> header_count, bool header_first);

  std::string path_;
  std::unique_ptr<File> file_;
  Header h_;
  BlockMapPages bmap_;
  bool read_only_;
  bool closed_ = false;
  std::string inconsistency_;  // non-empty: allocation refused

  // Allocation state. count_ is blocks_allocated in memory, including blocks reserved by
  // PrepareWrite whose data is in flight. Indices [free_top_, count_) were freed (their
  // entries cleared) but the header still counts them until the next flush.
  uint32_t count_ = 0;
  uint32_t free_top_ = 0;
  uint32_t disk_count_ = 0;         // blocks_allocated as last written
  std::vector<uint32_t> reusable_;  // reserved then aborted (never referenced)
  std::set<uint32_t> in_flight_;    // reserved, data being written, not yet linked
};

Result<std::unique_ptr<ClusterMap>> OpenVdi(OpenContext ctx);
Status CreateVdi(const CreateContext& ctx);
// qemu's vdi_co_check over the block map.
Result<CheckReport> CheckBlockMap(const Header& h, BlockMapPages& bmap, uint32_t count);

}  // namespace vimgfs::vdi

// VHD ("vpc", Virtual PC / Hyper-V / Azure): the layout and the pieces of the driver.
//
// Every VHD ends with a 512-byte footer ("conectix", big-endian fields, a one's-complement
// byte-sum checksum). Three kinds:
//   fixed         the file is the disk, followed by the footer; nothing else.
//   dynamic       a copy of the footer at offset 0, a 1024-byte dynamic header ("cxsparse")
//                 at footer.data_offset, the block allocation table (BAT: one big-endian
//                 uint32 per block, the sector number of the block in the file, or
//                 0xFFFFFFFF for a block never written), then the blocks in allocation
//                 order and the footer again at the end of the file. A block is a sector
//                 bitmap (one bit per sector, rounded up to whole sectors) then the data.
//   differencing  a dynamic disk with a parent: sectors whose bitmap bit is clear, and
//                 blocks not in the BAT, read from the parent, which the dynamic header
//                 names in its parent locators.
//
// The virtual size is computed as qemu 7.2 computes it: from the CHS geometry, except for
// images written by Hyper-V, disk2vhd, XenServer, XenConverter and qemu's force_size
// ("win ", "d2v ", "tap\0", "CTXS", "qem2") and for the maximal geometry, where the footer's
// current_size is the size. Reads of a dynamic disk ignore the sector bitmap (qemu does too:
// its writers set whole bitmaps); only a differencing disk consults it.
//
// Allocation (dynamic and differencing), crash-safe in this order:
//   1. the footer is written at the new end of the file and synced (so the file always
//      ends in a footer), then the block's bitmap (all sectors present) over the old one;
//   2. the engine writes the block's data;
//   3. at flush: data synced, then the changed BAT sectors written (and synced).
// A crash before 3 leaves a block that no entry names: space lost, nothing corrupt.
//
// Files:
//   header.cc     footer and dynamic header: parse with validation, checksums, geometry,
//                 parent locators, probe
//   block_map.cc  VpcMap: the ClusterMap (lookup, allocation, flush)
//   create.cc     `create -f vpc`, the driver object
//   check.cc      `check`: footer copies, BAT entries, overlaps
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

namespace vimgfs::vpc {

inline constexpr uint64_t kSectorSize = 512;
inline constexpr uint64_t kFooterSize = 512;
inline constexpr uint64_t kDynHeaderSize = 1024;
inline constexpr uint32_t kTypeFixed = 2;
inline constexpr uint32_t kTypeDynamic = 3;
inline constexpr uint32_t kTypeDifferencing = 4;
inline constexpr uint32_t kBatUnused = 0xFFFFFFFFu;
inline constexpr uint64_t kDefaultBlockSize = 2ull << 20;
// qemu's VHD_MAX_SECTORS: 2040 GiB.
inline constexpr uint64_t kMaxSectors = 0xff000000ull;
inline constexpr uint64_t kChsMaxC = 65535, kChsMaxH = 16, kChsMaxS = 255;
inline constexpr uint64_t kMaxGeometry = kChsMaxC * kChsMaxH * kChsMaxS;
// Seconds from the Unix epoch to 2000-01-01, the VHD epoch.
inline constexpr uint32_t kTimestampBase = 946684800;
// Largest block we allocate into: a block is one copy-on-write unit (Hyper-V and qemu write
// 2 MiB, Virtual PC 512 KiB). Larger blocks are read, not written.
inline constexpr uint64_t kMaxWritableBlockSize = 64ull << 20;

// Byte offsets in the footer.
namespace foot {
inline constexpr size_t kCookie = 0;
inline constexpr size_t kFeatures = 8;
inline constexpr size_t kVersion = 12;
inline constexpr size_t kDataOffset = 16;
inline constexpr size_t kTimestamp = 24;
inline constexpr size_t kCreatorApp = 28;
inline constexpr size_t kCreatorVersion = 32;
inline constexpr size_t kCreatorOs = 36;
inline constexpr size_t kOriginalSize = 40;
inline constexpr size_t kCurrentSize = 48;
inline constexpr size_t kCylinders = 56;
inline constexpr size_t kHeads = 58;
inline constexpr size_t kSectorsPerTrack = 59;
inline constexpr size_t kDiskType = 60;
inline constexpr size_t kChecksum = 64;
inline constexpr size_t kUniqueId = 68;
}  // namespace foot

// Byte offsets in the dynamic header.
namespace dyn {
inline constexpr size_t kCookie = 0;
inline constexpr size_t kDataOffset = 8;
inline constexpr size_t kTableOffset = 16;
inline constexpr size_t kVersion = 24;
inline constexpr size_t kMaxTableEntries = 28;
inline constexpr size_t kBlockSize = 32;
inline constexpr size_t kChecksum = 36;
inline constexpr size_t kParentUniqueId = 40;
inline constexpr size_t kParentTimestamp = 56;
inline constexpr size_t kParentName = 64;  // UTF-16 big-endian, 512 bytes
inline constexpr size_t kParentNameBytes = 512;
inline constexpr size_t kParentLocators = 576;  // 8 entries of 24 bytes
inline constexpr size_t kLocatorEntrySize = 24;
inline constexpr int kLocatorCount = 8;
}  // namespace dyn

// The one's complement of the byte sum of `bytes`, whose checksum field at
// `checksum_offset` counts as zero.
uint32_t Checksum(std::span<const std::byte> bytes, size_t checksum_offset);

struct Geometry {
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors_per_track = 0;
  uint64_t sectors() const { return uint64_t{cylinders} * heads * sectors_per_track; }
};
// The size qemu gives an image created with `size` bytes (rounded up to a sector, then,
// without force_size, up to the next CHS geometry), with the geometry stored for it.
// Errors: too large for VHD.
Result<uint64_t> CreatedSize(uint64_t size, bool force_size, Geometry* geometry);

struct Footer {
  std::array<std::byte, kFooterSize> raw{};  // as read (checksum valid)
  uint32_t disk_type = 0;
  uint64_t data_offset = 0;
  uint64_t current_size = 0;
  Geometry geometry;
  std::string creator_app;    // 4 characters
  uint64_t virtual_size = 0;  // as qemu computes it (see above)
  bool size_from_geometry = false;
};

// Decodes and validates a footer; `where` says which copy for the error. Errors name path.
Result<Footer> ParseFooter(std::span<const std::byte, kFooterSize> raw, const std::string& path);
bool HasFooterCookie(std::span<const std::byte> raw);

struct ParentLocator {
  uint32_t platform = 0;  // 'W2ru', 'W2ku', 'MacX', ...
  std::string path;       // decoded to UTF-8 with '/' separators; empty if undecodable
};

struct DynHeader {
  std::array<std::byte, kDynHeaderSize> raw{};
  uint64_t table_offset = 0;
  uint32_t max_table_entries = 0;
  uint32_t block_size = 0;
  uint32_t bitmap_size = 0;  // bytes before each block's data, whole sectors
  bool checksum_ok = true;   // qemu does not verify it; check reports it
  std::string parent_name;   // UTF-8, from the UTF-16BE name field
  std::vector<ParentLocator> locators;
};

// Decodes and validates the dynamic header for a disk of virtual_size bytes in a file of
// file_size bytes (parent locators are read from `file`). Errors name path.
Result<DynHeader> ParseDynHeader(std::span<const std::byte, kDynHeaderSize> raw, uint64_t virtual_size,
                                 uint64_t file_size, File& file, const std::string& path);
// The parent's name as the engine opens it (relative to the image's folder): the relative
// Windows locator, else the Mac OS X URL, else the last component of the absolute Windows
// locator, else the header's parent name.
std::optional<std::string> ParentName(const DynHeader& h);

int ProbeVpc(std::span<const std::byte> head);

// The ClusterMap of an open VHD. The BAT is held in memory (bounded by
// limits::kMaxMapBytes); differencing disks cache sector bitmaps on demand.
class VpcMap final : public ClusterMap {
 public:
  // Fixed disk.
  VpcMap(std::string path, std::unique_ptr<File> file, Footer footer, bool read_only);
  // Dynamic or differencing disk; `bat` as on disk (big-endian), sector padded.
  VpcMap(std::string path, std::unique_ptr<File> file, Footer footer, DynHeader header,
         std::vector<std::byte> bat, uint64_t file_size, bool read_only);

  uint64_t virtual_size() const override { return footer_.virtual_size; }
  uint64_t cluster_size() const override;
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
  std::optional<BackingRef> backing() const override;
  FormatInfo Info() override;
  Result<CheckReport> Check(RepairMode mode) override;

  bool fixed() const { return footer_.disk_type == kTypeFixed; }
  bool differencing() const { return footer_.disk_type == kTypeDifferencing; }
  uint32_t entry(uint64_t block) const;

 private:
  uint64_t BlockStart(uint32_t entry) const { return uint64_t{entry} * kSectorSize; }
  uint64_t DataStart(uint32_t entry) const { return BlockStart(entry) + dyn_.bitmap_size; }
  uint64_t BlockBytes() const { return uint64_t{dyn_.bitmap_size} + dyn_.block_size; }
  void SetEntry(uint64_t block, uint32_t value);
  // Entries that overlap the metadata, each other or lie past the end make the image
  // unsafe to write into (inconsistency_ says why); found once at open.
  void ScanForInconsistency(uint64_t file_size);
  Status CheckWritable(const char* what) const;
  // The sector bitmap of an allocated block (differencing disks), cached.
  Result<const std::vector<uint8_t>*> Bitmap(uint64_t block, uint32_t entry);
  Status LookupFixed(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out);

  std::string path_;
  std::unique_ptr<File> file_;
  Footer footer_;
  DynHeader dyn_;
  std::vector<std::byte> bat_;  // on-disk BAT (big-endian), sector padded
  bool read_only_;
  bool closed_ = false;
  std::string inconsistency_;
  uint64_t cache_bytes_ = 32ull << 20;

  // Allocation: the next block starts at next_block_ (where the end footer lies on disk
  // once the reserved blocks are written). Reserved blocks whose data write failed are
  // reused before the file grows.
  uint64_t next_block_ = 0;
  std::vector<uint64_t> reusable_;                    // block start offsets
  std::set<uint64_t> dirty_sectors_;                  // BAT sectors to write at the next flush
  std::map<uint64_t, std::vector<uint8_t>> bitmaps_;  // block -> sector bitmap
  std::set<uint64_t> dirty_bitmaps_;                  // completed bitmaps to write at the next flush
};

Result<std::unique_ptr<ClusterMap>> OpenVpc(OpenContext ctx);
Status CreateVpc(const CreateContext& ctx);

}  // namespace vimgfs::vpc

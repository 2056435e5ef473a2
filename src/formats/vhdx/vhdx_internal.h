// VHDX (Hyper-V virtual hard disk v2, MS-VHDX; qemu's "vhdx"): the layout and the pieces
// of the driver.
//
// A VHDX file is made of 1 MiB-aligned objects:
//   0        file identifier: "vhdxfile", creator (UTF-16LE, 512 bytes)
//   64 KiB   header 1 } 4 KiB each: "head", CRC-32C, sequence number, FileWriteGuid,
//   128 KiB  header 2 } DataWriteGuid, LogGuid, log version/offset/length. The valid one
//                       with the higher sequence number is current.
//   192 KiB  region table 1 } 64 KiB each: "regi", CRC-32C, entries (GUID, offset, length,
//   256 KiB  region table 2 } required). Two regions matter: the BAT and the metadata.
//   log      (header's LogOffset/LogLength) a circular buffer of log entries
//   metadata a 64 KiB table ("metadata", items: GUID, offset, length, flags) then the items:
//            file parameters (block size, leave-allocated, has-parent), virtual disk size,
//            page 83 id, logical/physical sector size, parent locator (differencing).
//   BAT      little-endian uint64 entries: state in bits 0..2, file offset in MiB in bits
//            20..63. Payload block entries are interleaved with sector bitmap entries: after
//            every chunk_ratio payload entries comes one sector bitmap entry, where
//            chunk_ratio = 2^23 * logical_sector_size / block_size. A sector bitmap block
//            (1 MiB) has one bit per logical sector of its chunk (LSB first): set = the
//            sector is in this file (PARTIALLY_PRESENT blocks of differencing images).
//   payload  blocks of block_size bytes, anywhere past the fixed objects, 1 MiB aligned.
//
// Payload block states: NOT_PRESENT(0), UNDEFINED(1), ZERO(2), UNMAPPED(3) read as zeros
// (or, in a differencing image, NOT_PRESENT/UNDEFINED/UNMAPPED read from the parent:
// Mapping::kUnallocated); FULLY_PRESENT(6) is data; PARTIALLY_PRESENT(7) per sector.
//
// The log: a header whose LogGuid is non-zero may have log entries not yet applied. At
// open the active sequence is found and replayed: a read-write open writes it to the file,
// syncs and clears LogGuid; a read-only open keeps the replayed sectors in memory (an
// overlay read under every metadata read) and never writes. A log entry that rewrites
// payload data cannot be overlaid on kData mappings: a read-only open refuses it.
//
// Writing (vimgfs): a block is allocated at the file end (1 MiB aligned) and written whole
// by the engine; its BAT entry is set in memory. At WriteBack the data is synced first,
// then the changed BAT sectors (4 KiB) go through the log: one log entry holding them is
// written and synced, then the sectors are written to the BAT and synced. So a crash leaves
// either the old BAT or a log whose replay produces the new one, never an entry naming data
// that is not durable. The first write of a read-write open gives the header new
// FileWriteGuid/DataWriteGuid (and a LogGuid) through the two-header update (the inactive
// copy first, synced, then the other). A clean Close clears the LogGuid.
//
// Files:
//   header.cc     CRC-32C, GUIDs, probe, headers, region table, metadata, parent locator
//   log.cc        finding and replaying the active log sequence; writing log entries
//   block_map.cc  VhdxMap: the ClusterMap (lookup, allocation, flush), opening
//   create.cc     `create -f vhdx`, the driver object
//   check.cc      `check` (what qemu-img check reports for VHDX)
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

namespace vimgfs::vhdx {

using Guid = std::array<std::byte, 16>;

inline constexpr uint64_t KiB = 1024;
inline constexpr uint64_t MiB = 1024 * 1024;
inline constexpr uint64_t kHeader1Offset = 64 * KiB;
inline constexpr uint64_t kHeader2Offset = 128 * KiB;
inline constexpr uint64_t kHeaderSize = 4 * KiB;
inline constexpr uint64_t kRegion1Offset = 192 * KiB;
inline constexpr uint64_t kRegion2Offset = 256 * KiB;
inline constexpr uint64_t kRegionTableSize = 64 * KiB;
inline constexpr uint32_t kMaxRegionEntries = 2047;
inline constexpr uint64_t kMetadataTableSize = 64 * KiB;
inline constexpr uint32_t kMaxMetadataEntries = 2047;
inline constexpr uint64_t kMinBlockSize = 1 * MiB;
inline constexpr uint64_t kMaxBlockSize = 256 * MiB;
inline constexpr uint64_t kMaxVirtualSize = 64ull << 40;  // 64 TiB (spec and qemu)
inline constexpr uint64_t kSectorBitmapBlockSize = 1 * MiB;
inline constexpr uint64_t kLogSector = 4 * KiB;
inline constexpr uint64_t kMaxLogLength = 256 * MiB;  // what we scan at open
inline constexpr uint64_t kMaxParentLocatorBytes = 64 * KiB;
// The largest BAT a valid image has: 64 TiB of 1 MiB blocks, plus one sector bitmap entry
// per 4096 of them (a differencing image with 512-byte sectors): 512 MiB + 128 KiB. qemu
// holds the whole BAT in memory too; the generic map cap (256 MiB) would refuse the
// 64 TiB images qemu makes with small blocks.
inline constexpr uint64_t kMaxBatBytes = ((kMaxVirtualSize / kMinBlockSize) * 4097 / 4096) * 8;

// BAT entry states.
inline constexpr uint64_t kStateMask = 7;
inline constexpr uint64_t kNotPresent = 0;
inline constexpr uint64_t kUndefined = 1;
inline constexpr uint64_t kZero = 2;
inline constexpr uint64_t kUnmapped = 3;
inline constexpr uint64_t kFullyPresent = 6;
inline constexpr uint64_t kPartiallyPresent = 7;
inline constexpr uint64_t kSbPresent = 6;  // sector bitmap block present
inline constexpr uint64_t EntryOffset(uint64_t e) { return (e >> 20) << 20; }
inline constexpr uint64_t EntryState(uint64_t e) { return e & kStateMask; }

// Well-known GUIDs, in their on-disk byte order.
Guid ParseGuid(const char* text);  // "2DC27766-F623-4200-9D64-115E9BFD4A08"
bool IsNullGuid(const Guid& g);
Guid NewGuid();
extern const Guid kBatGuid, kMetadataGuid, kFileParamsGuid, kVirtualDiskSizeGuid, kPage83Guid,
    kLogicalSectorGuid, kPhysicalSectorGuid, kParentLocatorGuid, kVhdxParentTypeGuid;

uint32_t Crc32c(std::span<const std::byte> data, uint32_t crc = 0);
// CRC-32C of buf with the 4 bytes at checksum_at taken as zeros.
uint32_t ChecksumWithHole(std::span<const std::byte> buf, size_t checksum_at);
void StoreChecksum(std::span<std::byte> buf, size_t checksum_at);

// Reads the file as it is after the in-memory log replay (read-only opens).
class Reader {
 public:
  Reader(File* file, const std::map<uint64_t, std::vector<std::byte>>* overlay)
      : file_(file), overlay_(overlay) {}
  Status Read(uint64_t off, std::span<std::byte> buf) const;

 private:
  File* file_;
  const std::map<uint64_t, std::vector<std::byte>>* overlay_;  // 4 KiB sectors by offset
};

struct Header {
  uint64_t sequence = 0;
  Guid file_write_guid{}, data_write_guid{}, log_guid{};
  uint16_t log_version = 0;
  uint16_t version = 1;
  uint32_t log_length = 0;
  uint64_t log_offset = 0;
};
std::array<std::byte, kHeaderSize> EncodeHeader(const Header& h);

// The two headers: the current one (higher valid sequence) and which slot it is in.
struct Headers {
  Header current;
  int slot = 0;  // 0: at 64 KiB, 1: at 128 KiB
};
Result<Headers> ReadHeaders(File* file, uint64_t file_size, const std::string& path);

struct Params {
  uint32_t block_size = 0;
  bool leave_allocated = false;
  bool has_parent = false;
  uint64_t disk_size = 0;  // as stored
  uint64_t virtual_size = 0;
  uint32_t logical_sector = 512;
  uint32_t physical_sector = 512;
  Guid page83{};
  uint64_t bat_offset = 0, bat_length = 0;
  uint64_t metadata_offset = 0, metadata_length = 0;
  uint64_t chunk_ratio = 0;
  uint64_t data_blocks = 0;
  uint64_t bitmap_blocks = 0;
  uint64_t bat_entries = 0;
  std::map<std::string, std::string> parent;  // parent locator key -> value
  // BAT index of payload block b / of the sector bitmap of chunk c.
  uint64_t PayloadIndex(uint64_t b) const { return b + b / chunk_ratio; }
  uint64_t BitmapIndex(uint64_t c) const { return c * (chunk_ratio + 1) + chunk_ratio; }
};
// Region table (either valid copy) and metadata, validated against file_size.
Result<Params> ReadRegionsAndMetadata(const Reader& r, uint64_t file_size, const std::string& path);
// Computes chunk_ratio, block and entry counts; validates against the BAT region.
Status ComputeGeometry(Params* p, const std::string& path);

// The log. Replays the active sequence of h's log into `overlay` (4 KiB sectors by file
// offset, later entries replacing earlier ones). *last_file_offset: the largest
// LastFileOffset of the replayed entries (the file is at least that long after replay).
// *active: the log holds an active sequence (qemu: a log that needs replaying).
Status ReadLog(File* file, uint64_t file_size, const Header& h, const std::string& path,
               std::map<uint64_t, std::vector<std::byte>>* overlay, uint64_t* last_file_offset,
               uint64_t* last_sequence, bool* active);
// Builds one log entry (header, descriptors, data sectors) that writes `sectors`
// (4 KiB each, by file offset). Its tail is itself.
std::vector<std::byte> BuildLogEntry(const Guid& log_guid, uint64_t sequence, uint64_t tail,
                                     const std::map<uint64_t, const std::byte*>& sectors, uint64_t file_size);
uint64_t LogEntrySize(size_t sectors);

class VhdxMap final : public ClusterMap {
 public:
  VhdxMap(std::string path, std::unique_ptr<File> file, Headers headers, Params params,
          std::vector<uint64_t> bat, bool read_only);

  uint64_t virtual_size() const override { return p_.virtual_size; }
  uint64_t cluster_size() const override { return p_.block_size; }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  void AbortWrite(const WritePlan& plan) override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  std::optional<BackingRef> backing() const override;
  FormatInfo Info() override;
  Result<CheckReport> Check(RepairMode mode) override;

  const Params& params() const { return p_; }
  uint64_t bat_entry(uint64_t i) const { return bat_[i]; }
  uint64_t file_size_at_open() const { return file_size_at_open_; }
  void set_file_size_at_open(uint64_t s) { file_size_at_open_ = s; }
  void set_log_cursor(uint64_t seq) { log_sequence_ = seq; }
  void set_log_replayed(bool r) { log_replayed_ = r; }

 private:
  Status CheckWritable() const;
  Status FirstWrite();
  Status UpdateHeaders();  // writes h_.current to both slots (inactive first), synced
  Status LoadBitmap(uint64_t chunk, const std::vector<std::byte>** out);
  Status WriteBat();

  std::string path_;
  std::unique_ptr<File> file_;
  Headers h_;
  Params p_;
  std::vector<uint64_t> bat_;
  bool read_only_;
  bool closed_ = false;
  bool wrote_ = false;       // FirstWrite done
  uint64_t next_alloc_ = 0;  // next block's host offset
  uint64_t file_size_at_open_ = 0;
  uint64_t log_sequence_ = 0;
  uint64_t log_pos_ = 0;                  // where the next log entry goes, relative to the log
  bool log_replayed_ = false;             // a read-write open replayed a log (check counts it fixed)
  std::set<uint64_t> dirty_bat_sectors_;  // 4 KiB sectors of the BAT region
  std::map<uint64_t, std::vector<std::byte>> bitmaps_;  // chunk -> sector bitmap
};

Result<std::unique_ptr<ClusterMap>> OpenVhdx(OpenContext ctx);
Status CreateVhdx(const CreateContext& ctx);
int ProbeVhdx(std::span<const std::byte> head);

}  // namespace vimgfs::vhdx

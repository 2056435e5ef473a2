// Parallels (Virtuozzo / ploop) expandable images: the layout and the pieces of the driver.
//
// A file is a 64-byte header, the BAT right after it (one little-endian uint32 per
// cluster of the disk), then the data area. All numbers are little-endian.
//   "WithoutFreeSpace"  BAT entries are sector numbers; only the low 32 bits of the
//                       sector count are the disk size.
//   "WithouFreSpacExt"  BAT entries are cluster numbers (what qemu creates).
// An entry of 0 is a cluster never written: it reads as zeros (qemu's driver has no
// backing file in the image; qemu-img map reports such clusters as not present).
// The header's in_use field is set while a writer has the image open and cleared when it
// closes; qemu refuses to open an image left in use for writing (only `check` may), and
// `check` reports it as an error that `-r all` clears. vimgfs does the same.
// The format extension (ext_off: dirty bitmaps) is not read: the disk data does not
// depend on it. Clusters are allocated past it, so a write never overwrites it.
//
// Allocation, crash-safe in this order (docs/ARCHITECTURE.md, "Crash ordering"):
//   1. a new cluster is taken at the end of the data area (never one an entry names);
//   2. the engine writes its data;
//   3. at flush: data synced, then the changed BAT sectors written.
// A crash before 3 leaves space past the last cluster that no entry names, which qemu-img
// check reports as leaked (and in_use still set, as qemu leaves it after a crash).
//
// Files:
//   header.cc    header: probe, decode with validation
//   bat_map.cc   ParallelsMap: the ClusterMap (open, lookup, allocation, flush, close)
//   check.cc     `check` and its repairs, as qemu-img does them
//   create.cc    `create -f parallels`, the driver object
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs::parallels {

inline constexpr uint64_t kSectorSize = 512;
inline constexpr uint64_t kHeaderSize = 64;
inline constexpr char kMagicSectors[] = "WithoutFreeSpace";  // 16 bytes, no terminator on disk
inline constexpr char kMagicClusters[] = "WithouFreSpacExt";
inline constexpr uint32_t kVersion = 2;
inline constexpr uint32_t kInUse = 0x746F6E59;
// qemu opens clusters of up to INT32_MAX / 513 sectors (about 2 GiB).
inline constexpr uint32_t kMaxTracks = 0x7fffffff / 513;
// Clusters above this are read but not written: one cluster is one copy-on-write buffer.
inline constexpr uint64_t kMaxWritableClusterSize = 64ull << 20;
inline constexpr uint64_t kDefaultClusterSize = 1ull << 20;
// The geometry qemu writes; nothing reads it back.
inline constexpr uint32_t kHeads = 16;
inline constexpr uint32_t kSectorsPerCylinder = 32;

// Byte offsets of the header fields.
namespace off {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 16;
inline constexpr size_t kHeads = 20;
inline constexpr size_t kCylinders = 24;
inline constexpr size_t kTracks = 28;  // cluster size in sectors
inline constexpr size_t kBatEntries = 32;
inline constexpr size_t kNbSectors = 36;
inline constexpr size_t kInUse = 44;
inline constexpr size_t kDataOff = 48;  // sectors
inline constexpr size_t kFlags = 52;
inline constexpr size_t kExtOff = 56;  // sectors
}  // namespace off

struct Header {
  bool cluster_entries = false;  // "WithouFreSpacExt": entries count clusters, not sectors
  uint32_t tracks = 0;
  uint64_t cluster_size = 0;  // tracks * 512; not always a power of two in old images
  uint32_t bat_entries = 0;
  uint64_t virtual_size = 0;
  uint32_t in_use = 0;
  uint64_t data_start = 0;  // bytes: data_off, or the BAT end rounded up to a sector
  uint64_t ext_off = 0;     // bytes; 0: no format extension

  uint64_t entry_unit() const { return cluster_entries ? cluster_size : kSectorSize; }
  uint64_t bat_end() const { return kHeaderSize + uint64_t{bat_entries} * 4; }
};

// Decodes and validates the first 64 bytes. Errors name path and the cause.
Result<Header> ParseHeader(std::span<const std::byte, kHeaderSize> raw, const std::string& path);
int ProbeParallels(std::span<const std::byte> head);

class ParallelsMap final : public ClusterMap {
 public:
  // meta: the file's first bytes, header and BAT, padded to whole sectors.
  ParallelsMap(std::string path, std::unique_ptr<File> file, Header header, std::vector<std::byte> meta,
               uint64_t file_size, bool read_only);

  uint64_t virtual_size() const override { return h_.virtual_size; }
  // The engine's unit: the cluster, or for old images whose cluster is not a power of two
  // the largest power of two dividing it (such images are read-only here).
  uint64_t cluster_size() const override { return h_.cluster_size & (~h_.cluster_size + 1); }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  void AbortWrite(const WritePlan& plan) override;
  Status ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  FormatInfo Info() override;
  Result<CheckReport> Check(RepairMode mode) override;
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) override {
    return Status::Unsupported("Image format driver does not support resize");  // qemu 7.2's driver
  }

  // Marks the image in use on disk (a read-write open).
  Status MarkInUse();
  uint32_t entry(uint64_t cluster) const;
  bool inconsistent() const { return !inconsistency_.empty(); }

 private:
  uint64_t HostOffset(uint32_t entry) const { return uint64_t{entry} * h_.entry_unit(); }
  void SetEntry(uint64_t cluster, uint32_t value);
  // Finds what makes the image unsafe to write into (inconsistency_ says why) and where
  // the next cluster goes. Run at open and after a repair.
  void Scan(uint64_t file_size);
  Status CheckWritable(const char* what) const;
  // Where qemu's close cuts the file: the end of the last cluster, or the data area start.
  uint64_t DataEnd() const;
  Status WriteHeaderSector();

  std::string path_;
  std::unique_ptr<File> file_;
  Header h_;
  std::vector<std::byte> meta_;  // header + BAT as on disk (in_use as last written)
  bool read_only_;
  bool closed_ = false;
  bool unclean_ = false;       // in_use was set when opened: the last writer did not close it
  std::string inconsistency_;  // a BAT that a write could corrupt further: run check
  std::string unwritable_;     // a geometry vimgfs does not write (the image is fine)

  uint64_t next_alloc_ = 0;           // host offset of the next new cluster
  std::vector<uint64_t> reusable_;    // reserved, data write failed, never named by the BAT
  std::set<uint64_t> dirty_sectors_;  // sectors of meta_ to write at the next flush
};

Result<std::unique_ptr<ClusterMap>> OpenParallels(OpenContext ctx);
Status CreateParallels(const CreateContext& ctx);

}  // namespace vimgfs::parallels

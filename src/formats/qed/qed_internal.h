// QED (QEMU Enhanced Disk): the layout and the pieces of the driver.
//
// Spec: qemu docs/interop/qed_spec.txt. Everything is little-endian.
//   cluster 0..header_size-1  the header (64 bytes), then the backing file name
//   L1 table                  table_size clusters of 64-bit offsets of L2 tables (0: none)
//   L2 tables                 table_size clusters of 64-bit data cluster offsets
//                             (0: unallocated, reads the backing file; 1: reads as zeros)
//   data clusters             allocated at the end of the file, in write order
// There are no reference counts: every cluster is named once, and a cluster past the
// header that no table names is a leak (what check reports).
//
// Allocation, crash-safe (docs/ARCHITECTURE.md, "Crash ordering"): a new cluster is the
// next one past the end of the file; the engine writes its data; CommitWrite links it in
// an L2 table held in the TableCache, which syncs the data before it writes the table;
// the L1 entries a new L2 table needs are written after the table cache has flushed.
// Like qemu, an image without a backing file is marked QED_F_NEED_CHECK before its
// first allocating write, and the mark is cleared on a clean close; a marked image is
// checked and repaired by the next read-write open.
//
// Files:
//   header.cc   the header: parse with validation (qemu's order and messages), probe
//   qed_map.cc  QedMap: open, lookup, allocation, zero clusters, flush, resize, backing
//   check.cc    `check` and `check -r`: what qemu-img reports, repairing what qemu repairs
//   create.cc   `create -f qed`, the driver object
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "engine/table_cache.h"
#include "util/checked.h"
#include "vimgfs/format.h"

namespace vimgfs::qed {

inline constexpr uint32_t kMagic = 0x00444551;  // "QED\0" read little-endian
inline constexpr uint64_t kHeaderBytes = 64;
inline constexpr uint64_t kFeatureBackingFile = 0x01;
inline constexpr uint64_t kFeatureNeedCheck = 0x02;
inline constexpr uint64_t kFeatureBackingNoProbe = 0x04;
inline constexpr uint64_t kKnownFeatures = 0x07;
inline constexpr uint32_t kMinClusterSize = 4096;
inline constexpr uint32_t kMaxClusterSize = 64u << 20;
inline constexpr uint32_t kDefaultClusterSize = 65536;
inline constexpr uint32_t kMaxTableSize = 16;  // in clusters
inline constexpr uint32_t kDefaultTableSize = 4;
// L2 entries with a special meaning.
inline constexpr uint64_t kUnallocated = 0;
inline constexpr uint64_t kZeroCluster = 1;
// A table (L1 in memory, each cached L2) is read whole. qemu allows 64 MiB clusters times
// 16, a 1 GiB table; tables past this cap are refused instead of allocated.
inline constexpr uint64_t kMaxTableBytes = 64ull << 20;
// qemu reads the backing name into a PATH_MAX buffer: 4095 bytes at most.
inline constexpr uint64_t kMaxBackingNameBytes = 4095;

// Byte offsets in the header.
namespace hdr {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kClusterSize = 4;
inline constexpr size_t kTableSize = 8;
inline constexpr size_t kHeaderSize = 12;
inline constexpr size_t kFeatures = 16;
inline constexpr size_t kCompatFeatures = 24;
inline constexpr size_t kAutoclearFeatures = 32;
inline constexpr size_t kL1TableOffset = 40;
inline constexpr size_t kImageSize = 48;
inline constexpr size_t kBackingNameOffset = 56;
inline constexpr size_t kBackingNameSize = 60;
}  // namespace hdr

struct Header {
  uint32_t cluster_size = kDefaultClusterSize;
  uint32_t table_size = kDefaultTableSize;
  uint32_t header_size = 1;  // in clusters
  uint64_t features = 0;
  uint64_t compat_features = 0;
  uint64_t autoclear_features = 0;
  uint64_t l1_table_offset = 0;
  uint64_t image_size = 0;
  uint32_t backing_name_offset = 0;
  uint32_t backing_name_size = 0;
  std::string backing_name;  // read when kFeatureBackingFile is set

  uint64_t table_bytes() const { return uint64_t{cluster_size} * table_size; }
  uint64_t table_entries() const { return table_bytes() / 8; }
  bool has_backing() const { return features & kFeatureBackingFile; }
};

bool IsValidClusterSize(uint64_t cluster_size);
bool IsValidTableSize(uint64_t table_size);
// qemu's largest image for a geometry (entries^2 * cluster size, wrapping as qemu's does).
uint64_t MaxImageSize(uint64_t cluster_size, uint64_t table_size);
bool IsValidImageSize(uint64_t image_size, uint64_t cluster_size, uint64_t table_size);

// The 64 header bytes as stored.
std::array<std::byte, kHeaderBytes> SerializeHeader(const Header& h);
// Parses and validates the header of a file of file_size bytes as qemu opens it. Errors
// name path.
Result<Header> ParseHeader(File& file, const std::string& path, uint64_t file_size);

int ProbeQed(std::span<const std::byte> head);

class QedMap final : public ClusterMap {
 public:
  static Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx);
  ~QedMap() override;

  uint64_t virtual_size() const override { return header_.image_size; }
  uint64_t cluster_size() const override { return header_.cluster_size; }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  void AbortWrite(const WritePlan& plan) override;
  Status ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  std::optional<BackingRef> backing() const override;
  FormatInfo Info() override;
  Result<CheckReport> Check(RepairMode mode) override;
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) override;
  Status SetBacking(const std::optional<BackingRef>& ref) override;

 private:
  QedMap() = default;
  uint64_t L1Index(uint64_t guest) const { return guest / (header_.table_entries() * header_.cluster_size); }
  uint64_t L2Index(uint64_t guest) const { return guest / header_.cluster_size % header_.table_entries(); }
  uint64_t L1Entry(uint64_t i) const;
  void SetL1Entry(uint64_t i, uint64_t value);
  // qemu's validity tests, against the file's size as allocation has grown it.
  bool ValidClusterOffset(uint64_t off) const;
  bool ValidTableOffset(uint64_t off) const;
  // The L2 table of l1 index i, or an empty ref when there is none. With `create`, a
  // missing one is allocated at the end of the file (linked in L1 at the next WriteBack).
  Result<TableRef> L2Table(uint64_t l1_index, bool create);
  Status CheckWritable() const;
  // Sets QED_F_NEED_CHECK before the first allocating change, as qemu does (only without
  // a backing file: with one, qemu relies on its flush before each L2 update).
  Status MarkNeedCheck();
  Status WriteHeaderFields();
  // qemu's cluster numbering in its check, kept so leak counts match qemu-img's: it
  // divides by cluster_size - 1, which equals the true index only below cluster_size - 1
  // clusters (files of 4 GiB in 64 KiB clusters, of 16 MiB in 4 KiB ones); past that qemu
  // skips numbers and counts them as leaks, and so does this.
  uint64_t CheckClusterNumber(uint64_t bytes) const {
    return AlignDown(bytes + header_.cluster_size - 1, header_.cluster_size) / (header_.cluster_size - 1);
  }

  std::string path_;
  std::unique_ptr<File> file_;
  Header header_;
  bool read_only_ = true;
  bool closed_ = false;
  std::vector<std::byte> l1_;    // as stored (little-endian)
  std::set<uint64_t> dirty_l1_;  // L1 sectors to write after the L2 tables
  std::unique_ptr<TableCache> l2_cache_;
  uint64_t file_size_ =
      0;  // qemu's file_size: the file's length rounded down to a cluster, grown by allocation
};

Status CreateQed(const CreateContext& ctx);

}  // namespace vimgfs::qed

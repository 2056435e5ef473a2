// VMDK: the table of contents of the driver.
//
// A VMDK disk is a descriptor (text) naming one or more extents laid end to end in guest
// order. The descriptor is either a file of its own ("# Disk DescriptorFile") or embedded
// in a hosted sparse extent ("KDMV" header, descriptor at descriptorOffset). Extents are
// FLAT/VMFS (plain bytes at an offset of a file), ZERO (no file), SPARSE ("KDMV" hosted
// sparse, grain directory -> grain tables -> grains; streamOptimized when compressed) or
// VMFSSPARSE ("COWD", the ESX sparse format, same two-level map).
//
//   descriptor.cc     descriptor text: parse, format (create), probe
//   sparse_extent.cc  KDMV / COWD headers, grain directory and tables, allocation
//   flat_extent.cc    FLAT, VMFS and ZERO extents
//   stream.cc         streamOptimized: footer, markers, StreamOptimizedWriter
//   vmdk.cc           the driver and the ClusterMap spanning all extents
//   create.cc         create -f vmdk (all five subformats)
//   check.cc          qemu-img check for vmdk
//
// Specification: libyal/libvmdk "VMWare Virtual Disk Format (VMDK)"; behaviour: qemu 7.2.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/table_cache.h"
#include "vimgfs/format.h"

namespace vimgfs::vmdk {

inline constexpr uint64_t kSector = 512;
inline constexpr uint32_t kMagicKdmv = 0x564d444b;  // "KDMV" read little-endian
inline constexpr uint32_t kMagicCowd = 0x44574f43;  // "COWD" read little-endian

// Hosted sparse header flags.
inline constexpr uint32_t kFlagNewlineTest = 1u << 0;
inline constexpr uint32_t kFlagRedundantGt = 1u << 1;
inline constexpr uint32_t kFlagZeroedGrain = 1u << 2;
inline constexpr uint32_t kFlagCompressed = 1u << 16;
inline constexpr uint32_t kFlagMarkers = 1u << 17;
inline constexpr uint16_t kCompressDeflate = 1;
inline constexpr uint64_t kGdAtEnd = UINT64_MAX;  // gdOffset of a stream with a footer
inline constexpr uint32_t kGteZeroed = 1;         // GT entry of a zeroed grain

// Stream markers (streamOptimized): {u64 value, u32 size, u32 type}; size != 0 is a grain.
inline constexpr uint32_t kMarkerEos = 0;
inline constexpr uint32_t kMarkerGt = 1;
inline constexpr uint32_t kMarkerGd = 2;
inline constexpr uint32_t kMarkerFooter = 3;
inline constexpr uint64_t kGrainMarkerBytes = 12;

// Limits (qemu's, where it has one).
inline constexpr uint64_t kMaxGdEntries = 32ull << 20;  // qemu: "L1 size too big"
inline constexpr uint32_t kMaxGtesPerGt = 512;          // qemu: "L2 table size too big"
inline constexpr uint32_t kCowdGtesPerGt = 4096;
inline constexpr uint64_t kMaxGrainBytes = 2ull << 20;  // engine COW/decompress unit
inline constexpr size_t kMaxExtents = 4096;
inline constexpr int kMaxDescriptorDepth = 4;  // capacity-0 sparse -> descriptor

// ---- Hosted sparse extent header (512 bytes, little-endian) ----
struct SparseHeader {
  uint32_t magic = kMagicKdmv;
  uint32_t version = 1;
  uint32_t flags = 0;
  uint64_t capacity = 0;     // sectors
  uint64_t grain_size = 0;   // sectors
  uint64_t desc_offset = 0;  // sectors
  uint64_t desc_size = 0;    // sectors
  uint32_t num_gtes_per_gt = 512;
  uint64_t rgd_offset = 0;  // sectors
  uint64_t gd_offset = 0;   // sectors
  uint64_t overhead = 0;    // sectors (first grain)
  uint8_t unclean_shutdown = 0;
  uint16_t compress_algorithm = 0;
};
SparseHeader DecodeSparseHeader(const std::byte* p);
void EncodeSparseHeader(const SparseHeader& h, std::byte* p);  // 512 bytes

// ---- Descriptor ----
enum class Access { kRW, kRdOnly, kNoAccess };

struct ExtentLine {
  Access access = Access::kRW;
  uint64_t sectors = 0;
  std::string type;     // "SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", ...
  std::string file;     // empty for ZERO
  uint64_t offset = 0;  // FLAT: start sector inside the file
};

struct Descriptor {
  uint32_t version = 1;
  uint32_t cid = 0xffffffff;
  uint32_t parent_cid = 0xffffffff;
  std::string create_type;
  std::optional<std::string> parent_hint;  // parentFileNameHint
  std::vector<ExtentLine> extents;
  std::vector<std::pair<std::string, std::string>> ddb;  // ddb.* keys, in order
};

// Parses descriptor text (up to the first NUL). `path` names the file in messages.
// Unknown keys are kept out; malformed extent lines are errors.
Result<Descriptor> ParseDescriptor(std::string_view text, const std::string& path);
// Whether `head` looks like a text descriptor: its first line that is not a comment or
// blank is "version=N" (qemu's probe).
bool LooksLikeDescriptor(std::string_view head);

struct DescriptorText {
  uint32_t cid = 0;
  uint32_t parent_cid = 0xffffffff;
  std::string create_type;
  std::optional<std::string> parent_hint;
  std::vector<ExtentLine> extents;
  std::string hw_version = "4";
  uint64_t size = 0;  // bytes, for the geometry
  std::string adapter_type = "ide";
  std::string tools_version = "2147483647";
};
// The descriptor qemu-img create writes.
std::string FormatDescriptor(const DescriptorText& d);

// ---- Extents ----
class Extent {
 public:
  virtual ~Extent() = default;

  uint64_t start = 0;   // guest byte where this extent begins
  uint64_t length = 0;  // guest bytes
  std::string type;     // as in the descriptor ("" for a monolithic sparse file)
  bool read_only = true;

  // Extent-relative guest offsets. Appends mappings covering exactly [off, off+len).
  // Compressed mappings carry extent-relative unit_guest_offset (the map shifts them).
  virtual Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) = 0;
  virtual Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) {
    return Status::ReadOnly("this extent cannot be written");
  }
  virtual Status CommitWrite(const WritePlan& plan) { return Status::ReadOnly("extent"); }
  virtual Status ZeroRange(uint64_t off, uint64_t len) { return Status::Unsupported("zero"); }
  // Dirty grain tables and directories written back in order (see ClusterMap::WriteBack).
  virtual Status WriteBack() { return Status::Ok(); }
  // Syncs the extent's file when it is writable.
  virtual Status SyncFile() { return Status::Ok(); }
  virtual File* file() { return nullptr; }
  virtual uint64_t grain_bytes() const { return 0; }  // 0: flat
  virtual bool compressed() const { return false; }
  // `qemu-img check`: "" when fine, else the ERROR line (and *check_error for read errors).
  virtual Result<std::string> CheckGrains(uint64_t guest_start) { return std::string(); }
  VmdkExtentDetails Info() const;
};

struct SparseOpenResult {
  std::unique_ptr<Extent> extent;
  SparseHeader header;  // KDMV only
  bool is_cowd = false;
  std::string embedded_desc;  // descriptor text in the extent ("" if none)
};

// Opens a KDMV or COWD sparse extent. The extent takes `file` when `owned` is set; else
// it borrows it (the monolithic case: the ClusterMap owns the main file).
Result<SparseOpenResult> OpenSparseExtent(File* file, std::unique_ptr<File> owned, bool read_only,
                                          uint64_t cache_bytes);

std::unique_ptr<Extent> NewFlatExtent(File* file, std::unique_ptr<File> owned, uint64_t file_offset,
                                      uint64_t length, bool read_only, std::string type);
std::unique_ptr<Extent> NewZeroExtent(uint64_t length);
// A reference refused under --untrusted, kept for `info` (which opens no chain): reads fail.
std::unique_ptr<Extent> NewUnopenedExtent(std::string name, std::string type, uint64_t length);

// streamOptimized with gdOffset == GD_AT_END: the header copy in the footer.
Result<SparseHeader> ReadFooterHeader(File& file);

// Reads the descriptor embedded in a sparse extent (capped at limits::kMaxDescriptorBytes).
Result<std::string> ReadEmbeddedDescriptor(File& file, const SparseHeader& h);

// ---- create / check ----
// qemu-img check for vmdk: every allocated grain must start inside its file.
Result<CheckReport> CheckExtents(const std::vector<std::unique_ptr<Extent>>& extents);
Status CreateVmdk(const CreateContext& ctx);

// Writes the header, embedded descriptor (if any), redundant and primary grain
// directories and tables of an empty hosted sparse extent, as qemu-img create does.
struct SparseLayout {
  SparseHeader header;
  uint64_t gd_entries = 0;
  uint64_t gt_bytes = 0;
};
SparseLayout PlanSparseExtent(uint64_t capacity_bytes, bool zeroed_grain, bool compressed);
Status WriteEmptySparseExtent(File& file, const SparseLayout& layout, std::string_view descriptor);

}  // namespace vimgfs::vmdk

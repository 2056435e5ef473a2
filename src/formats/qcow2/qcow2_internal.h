// qcow2 internals: the header model, table-entry bit helpers and the ClusterMap.
//
// Files of this driver, by concern:
//   header.cc       parse / validate / serialize the header and its extensions
//   cluster_map.cc  open, L1/L2 lookup (standard and extended L2), snapshot table, info
//   refcount.cc     refcount get/set (1..64 bit), allocation, refcount table growth,
//                   the full rebuild used for dirty lazy-refcount images
//   write.cc        PrepareWrite / CommitWrite, zeroing, discard, flush, close
//   resize.cc       Resize, SetBacking, snapshots create/apply/delete
//   create.cc       Create, -o options, the FormatDriver
//
// Spec: qemu docs/interop/qcow2.rst. Everything is big-endian.
#pragma once

#include "crypto/crypt_file.h"
#include "crypto/luks.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/table_cache.h"
#include "util/checked.h"
#include "vimgfs/format.h"

namespace vimgfs::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3HeaderLength = 104;
inline constexpr uint32_t kV3HeaderLengthWithCompression = 112;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

// Feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;

// Persistent bitmaps: directory entry flags and qemu's limits (qcow2.h, qcow2-bitmap.c).
inline constexpr uint32_t kBitmapInUse = 1u << 0;
inline constexpr uint32_t kBitmapAuto = 1u << 1;
inline constexpr uint32_t kBitmapReservedFlags = 0xfffffffcu;
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 1024 * kMaxBitmaps;
inline constexpr uint32_t kMaxBitmapTableSize = 0x8000000;
inline constexpr uint64_t kMaxBitmapPhysBytes = 0x20000000;
inline constexpr uint16_t kMaxBitmapNameBytes = 1023;
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;

inline constexpr uint8_t kCompressionZlib = 0;
inline constexpr uint8_t kCompressionZstd = 1;

// ---- table entries ----

inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9..55
inline constexpr uint64_t kFlagCopied = 1ull << 63;             // refcount exactly one
inline constexpr uint64_t kFlagCompressed = 1ull << 62;
inline constexpr uint64_t kFlagZero = 1ull << 0;  // v3 standard descriptor
// Reserved bits of a standard L2 entry (1..8, 56..61) and of an L1 entry (0..8, 56..62).
inline constexpr uint64_t kL2StandardReserved = 0x3f000000000001feull;
inline constexpr uint64_t kL1Reserved = 0x7f000000000001ffull;
// Bits 0..8 of a refcount table entry are reserved.
inline constexpr uint64_t kRefTableReserved = 0x1ffull;

inline uint64_t L1EntryOffset(uint64_t e) { return e & kOffsetMask; }
inline uint64_t L2EntryOffset(uint64_t e) { return e & kOffsetMask; }
inline bool IsCompressed(uint64_t e) { return (e & kFlagCompressed) != 0; }
inline bool IsCopied(uint64_t e) { return (e & kFlagCopied) != 0; }
inline bool HasZeroFlag(uint64_t e) { return !IsCompressed(e) && (e & kFlagZero) != 0; }

// Compressed cluster descriptor: x = 62 - (cluster_bits - 8) bits of host offset, then
// the count of additional 512-byte sectors.
inline uint32_t CompressedOffsetBits(uint32_t cluster_bits) { return 62 - (cluster_bits - 8); }
inline uint64_t CompressedHostOffset(uint64_t e, uint32_t cluster_bits) {
  return e & ((1ull << CompressedOffsetBits(cluster_bits)) - 1);
}
inline uint64_t CompressedSectors(uint64_t e, uint32_t cluster_bits) {
  uint32_t x = CompressedOffsetBits(cluster_bits);
  return ((e & ~(kFlagCompressed | kFlagCopied)) >> x) + 1;  // including the first sector
}
// Bytes of compressed data stored from the host offset on (to the end of the last sector).
inline uint64_t CompressedLength(uint64_t e, uint32_t cluster_bits) {
  uint64_t off = CompressedHostOffset(e, cluster_bits);
  return CompressedSectors(e, cluster_bits) * 512 - (off & 511);
}
inline uint64_t MakeCompressedEntry(uint64_t host_off, uint64_t len, uint32_t cluster_bits) {
  uint64_t sectors = ((host_off + len - 1) / 512) - (host_off / 512);  // additional sectors
  return kFlagCompressed | (sectors << CompressedOffsetBits(cluster_bits)) | host_off;
}

// Extended L2 subcluster bitmap: bits 0..31 allocated, 32..63 reads as zeros.
inline constexpr int kSubclusters = 32;
inline uint32_t SubAllocBits(uint64_t bitmap) { return static_cast<uint32_t>(bitmap); }
inline uint32_t SubZeroBits(uint64_t bitmap) { return static_cast<uint32_t>(bitmap >> 32); }
inline uint64_t MakeSubBitmap(uint32_t alloc, uint32_t zero) {
  return static_cast<uint64_t>(alloc) | (static_cast<uint64_t>(zero) << 32);
}
// Bits first..last-1 set (0 <= first <= last <= 32).
inline uint32_t SubMask(int first, int last) {
  uint64_t m = ((1ull << last) - 1) & ~((1ull << first) - 1);
  return static_cast<uint32_t>(m);
}

// One entry of a refcount block of `bits` (1..64) bits per entry.
uint64_t ReadRefcountEntry(const std::byte* block, uint64_t i, uint32_t bits);
void WriteRefcountEntry(std::byte* block, uint64_t i, uint32_t bits, uint64_t v);

// ---- header ----

struct UnknownExtension {
  uint32_t type = 0;
  std::vector<std::byte> data;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderLengthWithCompression;
  uint8_t compression_type = kCompressionZlib;
  std::vector<std::byte> extra_header_fields;  // bytes 105..header_length (preserved)

  // Extensions and the backing name.
  std::string backing_file;
  std::optional<std::string> backing_format;
  std::optional<std::string> data_file;
  bool has_feature_table = false;
  std::optional<std::vector<std::byte>> bitmaps_ext;  // preserved as is
  // The LUKS header's clusters (crypt_method 2): offset and length in the image file.
  uint64_t crypto_header_offset = 0;
  uint64_t crypto_header_length = 0;
  std::vector<UnknownExtension> unknown_extensions;  // preserved on rewrite

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
  bool has_data_file() const { return incompatible_features & kIncompatDataFile; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
};

// Parses and validates the header in the first cluster. `file_size` bounds every offset,
// except with `for_check` (OpenOptions::for_check), where tables may reach past it.
Result<Header> ParseHeader(File& file, const std::string& path, uint64_t file_size, bool for_check = false);
// Serializes header + extensions (+ feature table) + backing name into one cluster-sized
// buffer. Fails when it does not fit in cluster 0.
Result<std::vector<std::byte>> SerializeHeader(const Header& h);

// ---- snapshots ----

struct Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;
  uint64_t disk_size = 0;
  bool has_disk_size = false;
  uint64_t icount = UINT64_MAX;
  std::vector<std::byte> extra;  // extra data as stored (preserved)
  // Extra data on disk past the 1024 bytes kept (check -r all drops it when it rewrites
  // the table); the entry still spans it until then.
  uint64_t dropped_extra = 0;
};

// How a snapshot table is read. kOpen: as an image is opened (tables validated, qemu's
// limits refuse the open with its words and hint); kCheck: entries past the end of the
// file read as zeros and their L1 tables are left to the check; kRepair: kCheck, and
// what qemu's limits refuse is dropped instead, as check -r all drops it.
enum class SnapshotRead { kOpen, kCheck, kRepair };
// What kRepair dropped: the messages qemu prints, snapshots discarded, entries cut short.
struct SnapshotTableRepair {
  std::vector<std::string> messages;
  uint64_t discarded = 0;
  uint64_t extra_dropped = 0;
};
// qemu's limits on the table (QCOW_MAX_SNAPSHOTS, its 64 MiB, 1 KiB of extra data each).
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
// qemu-img measure (measure.cc).
Result<MeasureResult> Measure(const MeasureRequest& req);

Result<std::vector<Snapshot>> ParseSnapshotTable(File& file, const std::string& path, const Header& h,
                                                 SnapshotRead how, SnapshotTableRepair* repair = nullptr);
// Bytes the table spans on disk as read (the last entry unpadded, as qemu writes it).
uint64_t SnapshotTableExtent(const std::vector<Snapshot>& snaps);
std::vector<std::byte> SerializeSnapshotTable(const std::vector<Snapshot>& snaps);

// ---- the map ----

class Qcow2Map final : public ClusterMap {
 public:
  static Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx);
  ~Qcow2Map() override;

  uint64_t virtual_size() const override { return size_; }
  uint64_t cluster_size() const override { return cluster_size_; }
  uint64_t subcluster_size() const override { return extended_l2_ ? subcluster_size_ : cluster_size_; }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  bool LookupCached(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  void AbortWrite(const WritePlan& plan) override;
  Status ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) override;
  Status Discard(uint64_t guest_off, uint64_t len) override;
  Status MakeEmpty() override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  std::optional<BackingRef> backing() const override;
  FormatInfo Info() override;
  // qemu's qcow2_has_zero_init: preallocated (a first L2 table) and encrypted reads noise.
  bool ZeroInit() override { return !(header_.crypt_method != 0 && !l1_.empty() && l1_[0] != 0); }
  std::vector<File*> host_files() override;
  Result<CheckReport> Check(RepairMode mode) override;
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) override;
  Status SetBacking(const std::optional<BackingRef>& ref) override;
  Status Amend(const AmendRequest& req, AmendStage stage) override;
  Result<bool> MapShowsHostHoles() override;
  Status SnapshotCreate(const std::string& name) override;
  Status SnapshotApply(const std::string& name) override;
  Status SnapshotDelete(const std::string& name) override;
  // compressed_write.cc (convert -c): packs streams back to back like qemu's alloc_bytes.
  Status WriteCompressed(uint64_t guest_off, std::span<const std::byte> stream) override;

  // ---- internals shared by the .cc files ----
  Qcow2Map() = default;
  // Frees the clusters of a range. Not full: they read as zeros afterwards (zero flag
  // where a backing file or an allocation needs it). Full: they become unallocated and
  // read from the backing file.
  Status DiscardClusters(uint64_t off, uint64_t len, bool full);

  // Resize's parts (resize.cc).
  Status ZeroGrown(uint64_t old_size, uint64_t new_size, bool homes);
  Status MapRawDataFile(uint64_t old_size, uint64_t new_size);
  Status TrimAfterShrink(const std::vector<uint64_t>& freed);

  // L1/L2 geometry.
  uint64_t l2_entries() const { return l2_entries_; }
  uint32_t l2_entry_bytes() const { return extended_l2_ ? 16 : 8; }
  uint64_t ClusterIndex(uint64_t guest) const { return guest >> cluster_bits_; }
  uint64_t L1Index(uint64_t cluster) const { return cluster / l2_entries_; }
  uint64_t L2Index(uint64_t cluster) const { return cluster % l2_entries_; }
  // Clusters needed to describe `size` bytes, and L1 entries for it.
  uint64_t L1EntriesFor(uint64_t size) const {
    return DivRoundUp(DivRoundUp(size, cluster_size_), l2_entries_);
  }

  // Reads a validated L2 table offset for l1 index (0: none).
  Result<uint64_t> L2Offset(uint64_t l1_index);
  Status ValidateTableOffset(uint64_t off, const char* what);
  // The L2 table for l1_index, allocating (or copying a shared one) when `allocate`.
  Result<TableRef> GetL2(uint64_t l1_index, bool allocate);
  uint64_t LoadL2(const TableRef& t, uint64_t idx, uint64_t* bitmap) const;
  // Lookup's body; cached_only: tables are only peeked, and *missed says one was not cached.
  Status LookupIn(bool cached_only, bool* missed, uint64_t guest_off, uint64_t len,
                  std::vector<Mapping>* out);
  void StoreL2(const TableRef& t, uint64_t idx, uint64_t entry, uint64_t bitmap) const;

  // Refcounts (refcount.cc).
  Result<uint64_t> GetRefcount(uint64_t cluster);
  Status SetRefcount(uint64_t cluster, uint64_t value);
  Status AddRefcount(uint64_t cluster, int64_t delta);
  // Allocates n contiguous clusters with refcount 1; returns the host offset.
  Result<uint64_t> AllocClusters(uint64_t n);
  // Drops one reference of each cluster touched by [off, off+len).
  Status FreeRange(uint64_t off, uint64_t len);
  // Drops the reference an L2 entry holds (data, zero-alloc or compressed).
  Status FreeL2Entry(uint64_t entry);
  Status EnsureRefBlock(uint64_t block_index);
  Status GrowRefTable(uint64_t min_entries);
  Result<uint64_t> FindFree(uint64_t n);
  uint64_t refblock_entries() const { return refblock_entries_; }
  // A snapshot's L1 table, checked when it is used, not at open (as qemu: a damaged
  // snapshot entry leaves the active image usable): qemu's words and errnos.
  Result<std::vector<uint64_t>> ReadSnapshotL1(const Snapshot& s);

  // Check (check.cc), step by step as qemu-img check goes.
  // Counts references of every cluster reachable from the header into `refs` and reports
  // what is wrong with the tables on the way. -r all repairs what it can in place. Sets
  // *rebuild when the refcount blocks themselves cannot be trusted.
  Status CountReferences(std::vector<uint32_t>* refs, CheckReport* report, RepairMode mode, bool* rebuild);
  // Stored refcounts against `refs`: leaks and corruptions, fixed as `mode` allows.
  Status CompareRefcounts(const std::vector<uint32_t>& refs, RepairMode mode, CheckReport* r, bool* rebuild);
  // Writes a whole new refcount table and blocks from `refs` (every reference counted,
  // the old structure's included), placed first-fit in clusters nothing uses as qemu
  // places them, and switches the header to them. `refs` gains the new clusters.
  Status RebuildRefcountStructure(std::vector<uint32_t>* refs);
  // The refcount blocks of `refs` that hold a count in clusters [first, end), allocating
  // blocks (and table entries) as needed; true when the table had to grow.
  Result<bool> WriteRebuiltRefblocks(std::vector<uint32_t>* refs, uint64_t first, uint64_t end,
                                     std::vector<uint64_t>* table);
  // Grows the file (now file_size bytes) so a refcount block at block_offset lies inside
  // it (check -r all); the cause as strerror words when it cannot, else empty.
  std::string GrowFileToCover(uint64_t block_offset, uint64_t file_size);
  // OFLAG_COPIED of the active L1 and L2 entries against the refcounts.
  Status CheckCopiedFlags(RepairMode mode, CheckReport* r);
  // `entries` big-endian words at off; zeros past the end of the file.
  Result<std::vector<uint64_t>> ReadTableForCheck(uint64_t off, uint64_t entries);

  // Amend's steps (amend.cc); Progress gets the fraction of a step done.
  using Progress = std::function<void(double)>;
  Status Upgrade(const Progress& progress);
  Status Downgrade(const Progress& progress);
  Status ExpandZeroClusters(const Progress& progress);
  Result<bool> HasCompressedClusters();
  Status ChangeRefcountBits(uint32_t bits);
  Status AmendKeyslots(const AmendRequest& req);
  // Calls fn for each L2 table of the active L1 and of every snapshot's, once per L1
  // entry naming it, with the guest offset the entry covers; progress after each entry.
  Status ForEachL2Table(const std::function<Status(uint64_t l2_off, uint64_t guest)>& fn,
                        const Progress& progress = nullptr);

  // Persistent dirty bitmaps of a read-write open (bitmaps.cc).
  struct LoadedBitmap {
    std::string name;
    uint8_t granularity_bits = 16;
    uint32_t flags = 0;  // as found at open (an inconsistent one keeps its in-use mark)
    std::vector<std::byte> extra;
    uint64_t table_offset = 0;  // as found at open
    uint32_t table_size = 0;
    bool consistent = true;  // not in use at open: its bits are loaded
    DirtyBits bits;          // bit k: granule k dirty; set from any thread
    uint64_t bits_for(uint64_t disk_size) const;
  };
  // The stored bitmaps, their bits read (consistent ones); nothing marked.
  Result<std::vector<LoadedBitmap>> LoadStoredBitmaps();
  Status LoadBitmapsForWriting();
  void NoteGuestWrite(uint64_t off, uint64_t len) override;
  bool BitmapsSupported() override { return v3_; }
  Result<std::vector<DirtyBitmap>> ReadBitmaps() override;
  Status CanStoreBitmap(const std::string& name, uint32_t granularity_bits,
                        const std::vector<DirtyBitmap>& existing) override;
  Status ReplaceBitmaps(std::vector<DirtyBitmap> bitmaps) override;
  void MarkBitmapsAllDirty();
  // A resize needs every bitmap loaded (qemu's words otherwise); then they follow it.
  Status CheckBitmapsResizable() const;
  void ResizeBitmaps(uint64_t new_size);
  Status StoreBitmaps();

  // Header / L1 write-out.
  Status WriteHeader();
  Status WriteL1();
  Status WriteRefTableEntries(uint64_t first, uint64_t count);
  // Dirty tables, L1 and header written back in dependency order (durable after a sync).
  Status WriteBackTables();
  // WriteBackTables, then a sync of the image file: all metadata durable.
  Status FlushAll();
  Status CheckWritable();
  std::vector<Qcow2Bitmap> BitmapList();
  // The persistent bitmap directory as qemu loads it at open: its extension, every entry
  // within qemu's constraints (qemu refuses to open the image otherwise).
  Status ValidateBitmapDirectory();
  Status MarkDirty();

  // State.
  std::string path_;
  Env* env_ = nullptr;
  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;  // external data file, if any
  File* data_ = nullptr;             // where guest clusters live (file_ or data_file_, or
                                     // crypt_ over one of them)
  // Encryption: the data clusters' cipher over the file they live in. encrypt.format=luks
  // (crypt_method 2): the LUKS header, IVs by host offset (qemu's crypt_physical_offset);
  // aes (1): IVs by guest offset. crypt_ is null when the image was opened for its
  // metadata only (info), and then no guest data is read.
  std::optional<crypto::LuksHeader> luks_;
  std::unique_ptr<crypto::CryptFile> crypt_;
  std::string key_secret_;  // the secret that opened a LUKS image: a new key slot's master key
  Status OpenEncryption(const OpenOptions& options);
  // Encrypted, opened without the key (info): no guest data may be read.
  bool locked() const { return header_.crypt_method != 0 && !crypt_; }
  Header header_;
  std::vector<Snapshot> snapshots_;
  // Opened for check: why the snapshot table could not be read within qemu's limits.
  Status snapshot_table_error_;
  uint64_t size_ = 0;
  uint32_t cluster_bits_ = 16;
  uint64_t cluster_size_ = 65536;
  uint64_t l2_entries_ = 8192;
  bool extended_l2_ = false;
  uint64_t subcluster_size_ = 0;
  bool read_only_ = true;
  bool corrupt_ = false;
  bool snapshot_view_ = false;
  bool closed_ = false;
  bool v3_ = true;

  std::vector<uint64_t> l1_;
  uint64_t l1_offset_ = 0;
  bool l1_dirty_ = false;
  bool header_dirty_ = false;

  std::vector<uint64_t> reftable_;
  uint64_t refblock_entries_ = 0;
  uint32_t refcount_bits_ = 16;
  uint64_t refcount_max_ = 0xffff;
  uint64_t free_hint_ = 0;       // no free cluster below this one
  uint64_t host_end_ = 0;        // clusters at or past this offset are unused
  uint64_t reserved_start_ = 0;  // clusters FindFree must skip (refcount table growth)
  uint64_t reserved_end_ = 0;
  bool growing_reftable_ = false;

  std::unique_ptr<TableCache> l2_cache_;
  std::unique_ptr<TableCache> ref_cache_;
  bool clear_dirty_on_close_ = false;
  std::vector<LoadedBitmap> bitmaps_;
  bool bitmaps_loaded_ = false;  // loaded and marked in use (or set anew): stored back at close
  // Stored tables no bitmap of bitmaps_ names any more (removed, or replaced by bits held
  // in memory), and the directory loaded at open: freed once the new ones are stored.
  std::vector<std::pair<uint64_t, uint32_t>> stale_bitmap_tables_;
  uint64_t bitmap_dir_offset_ = 0;
  uint64_t bitmap_dir_size_ = 0;
  // MapShowsHostHoles, decided once per open as qemu decides it.
  bool preallocated_checked_ = false;
  bool preallocated_ = false;
  // Packing state of WriteCompressed: next free byte and end of the clusters it owns.
  uint64_t comp_next_ = 0;
  uint64_t comp_end_ = 0;
};

// Makes `snaps` the snapshot table through the crash-safe metadata switch of resize.cc
// (new structures beside the old, one header write to switch).
Status WriteSnapshotTable(Qcow2Map& m, std::vector<Snapshot> snaps);

}  // namespace vimgfs::qcow2

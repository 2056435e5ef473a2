// qcow (version 1, qemu's original copy-on-write format): the layout and the pieces of
// the driver.
//
// A qcow file is: a 48-byte big-endian header, the backing file name (optional), the L1
// table, then L2 tables and data clusters in allocation order. Two-level lookup: guest
// cluster c has L1 index c >> l2_bits and L2 index c & (2^l2_bits - 1). An L1 entry is the
// host offset of an L2 table (2^l2_bits entries of 8 bytes) or 0. An L2 entry is
//   0                      unallocated: read the backing file, or zeros without one
//   bit 63 clear           the host offset of the cluster's data (512-aligned)
//   bit 63 set             a compressed cluster: the host offset in the low 63 - cluster_bits
//                          bits, the stream's byte length in the cluster_bits bits above
//                          (raw deflate of one whole cluster)
// There are no refcounts: space is only ever appended at the end of the file, and
// nothing is freed (qemu's qcow driver does the same), so no check is possible either.
//
// Files:
//   header.cc       probe, parse and validate the header, encode it for create
//   cluster_map.cc  QcowMap: lookup, allocation, compressed writes, flush, make-empty
//   create.cc       `create -f qcow` and the driver object
#pragma once

#include "crypto/crypt_file.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "engine/table_cache.h"
#include "vimgfs/format.h"

namespace vimgfs::qcow {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb", shared with qcow2
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kHeaderSize = 48;
inline constexpr uint32_t kCryptNone = 0;
inline constexpr uint32_t kCryptAes = 1;
inline constexpr uint64_t kCompressedFlag = 1ull << 63;
inline constexpr uint64_t kSectorSize = 512;
// The ranges qemu accepts: clusters and L2 tables of 512 B .. 64 KiB.
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 16;
inline constexpr uint32_t kMinL2Bits = 9 - 3;
inline constexpr uint32_t kMaxL2Bits = 16 - 3;
// What qemu-img create writes: 4 KiB clusters and 4 KiB L2 tables, or with a backing
// file 512-byte clusters (qemu's qcow copies no unwritten sectors into a new cluster)
// and 32 KiB L2 tables.
inline constexpr uint32_t kCreateClusterBits = 12;
inline constexpr uint32_t kCreateL2Bits = 9;
inline constexpr uint32_t kCreateBackingClusterBits = 9;
inline constexpr uint32_t kCreateBackingL2Bits = 12;

namespace off {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 4;
inline constexpr size_t kBackingOffset = 8;
inline constexpr size_t kBackingSize = 16;
inline constexpr size_t kMtime = 20;
inline constexpr size_t kSize = 24;
inline constexpr size_t kClusterBits = 32;
inline constexpr size_t kL2Bits = 33;
inline constexpr size_t kCryptMethod = 36;
inline constexpr size_t kL1Offset = 40;
}  // namespace off

// The header, decoded and validated.
struct Header {
  uint64_t backing_offset = 0;
  uint32_t backing_size = 0;
  uint64_t size = 0;          // as stored
  uint64_t virtual_size = 0;  // size rounded down to a sector, as qemu takes it
  uint32_t cluster_bits = 0;
  uint32_t l2_bits = 0;
  uint32_t crypt_method = 0;
  uint64_t l1_offset = 0;
  uint64_t l1_entries = 0;
  std::string backing_name;  // read separately (ReadBackingName)

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t l2_entries() const { return uint64_t{1} << l2_bits; }
  uint64_t l2_bytes() const { return l2_entries() * 8; }
  uint64_t l1_bytes() const { return l1_entries * 8; }
  // The end of the metadata that lives at fixed places (header, name, L1 table).
  uint64_t fixed_metadata_end() const;
};

// Decodes and validates the header (the first kHeaderSize bytes) of a file of file_size
// bytes; errors name `path` and the cause. The backing name is not read yet.
Result<Header> ParseHeader(std::span<const std::byte, kHeaderSize> raw, uint64_t file_size,
                           const std::string& path);
// Reads the backing file name the header points at into h->backing_name.
Status ReadBackingName(File& file, uint64_t file_size, const std::string& path, Header* h);
int ProbeQcow(std::span<const std::byte> head);
// The number of L1 entries for a disk of `size` bytes with this geometry, or an error when
// qemu would call the image too large or the table would pass vimgfs's memory limit.
Result<uint64_t> L1Entries(uint64_t size, uint32_t cluster_bits, uint32_t l2_bits, const std::string& path);

// The ClusterMap of an open qcow image. The L1 table is held in memory; L2 tables go
// through a TableCache. Crash ordering (docs/ARCHITECTURE.md, "Crash ordering"):
//   data written by the engine -> host sync -> L2 tables -> host sync -> L1 entries.
// New L2 tables and clusters are appended at the end of the file and never reused, so a
// crash at any point leaves at worst unreferenced space at the end (qemu's qcow has no
// refcounts, so that is not even a leak it could report).
class QcowMap final : public ClusterMap {
 public:
  QcowMap(std::string path, std::unique_ptr<File> file, Header header, std::vector<uint64_t> l1,
          uint64_t file_size, bool read_only, uint64_t cache_bytes);

  uint64_t virtual_size() const override { return h_.virtual_size; }
  uint64_t cluster_size() const override { return h_.cluster_size(); }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) override;
  Status CommitWrite(const WritePlan& plan) override;
  Status WriteCompressed(uint64_t guest_off, std::span<const std::byte> stream) override;
  Status MakeEmpty() override;
  Status WriteBack() override;
  Status SyncFiles() override;
  Status Close() override;
  std::optional<BackingRef> backing() const override;
  FormatInfo Info() override;
  // qemu's qcow driver cannot resize: refused in qemu-img's words.
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) override {
    return Status::Unsupported("Image format driver does not support resize");
  }
  // Nor change the backing file name (rebase -u), in qemu-img's words.
  Status SetBacking(const std::optional<BackingRef>& ref) override {
    return Status::Unsupported("Operation not supported");
  }

  const Header& header() const { return h_; }

 private:
  Status CheckWritable() const;
  // The L2 table of L1 entry l1i; empty when there is none and !allocate. Allocating
  // appends a zeroed table at the end of the file and links it in the in-memory L1.
  Result<TableRef> GetL2(uint64_t l1i, bool allocate);
  // Host space of `bytes` at the end of the file (end_), aligned to `align`.
  Result<uint64_t> AppendSpace(uint64_t bytes, uint64_t align);
  // A plain data entry's cluster, when it may be read (and written in place).
  bool PlainEntryValid(uint64_t entry) const;
  // A plain data entry's cluster, when it may be written in place.
  bool PlainEntryWritable(uint64_t entry) const;
  Status WriteL1Entries();

  // Guest data: file_, or crypt_ over it (AES, IVs by guest sector). An AES image opened
  // without its key (info) has neither and reads no guest data.
  File* data() const { return crypt_ ? static_cast<File*>(crypt_.get()) : file_.get(); }
  Status CheckUnlocked() const;

  std::string path_;
  std::unique_ptr<File> file_;
  Header h_;
  std::vector<uint64_t> l1_;
  std::set<uint64_t> dirty_l1_;  // L1 indices changed in memory, not yet on disk
  std::unique_ptr<TableCache> l2_cache_;
  bool read_only_;
  bool closed_ = false;
  uint64_t end_ = 0;  // the end of the file, counting space handed out but not yet written

 public:
  std::unique_ptr<crypto::CryptFile> crypt_;
};

Result<std::unique_ptr<ClusterMap>> OpenQcow(OpenContext ctx);
Status CreateQcow(const CreateContext& ctx);

}  // namespace vimgfs::qcow

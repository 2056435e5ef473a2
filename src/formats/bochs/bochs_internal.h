// Bochs "growing" redolog images ("bochs"), read-only as in qemu 7.2.
//
// Layout (little-endian), as bximage writes it and qemu's block/bochs.c reads it:
//   header   512 bytes: magic "Bochs Virtual HD Image" (32), type "Redolog" (16), subtype
//            "Growing" (16), version (0x00020000, or 0x00010000 for the old layout), the
//            header size (where the catalog starts), catalog entries, bitmap bytes, extent
//            bytes, then the disk size: at 88 after a reserved word (v2), at 84 (v1).
//   catalog  one uint32 per extent of the disk: the index of the extent's block in the
//            data area, or 0xFFFFFFFF for an extent never written.
//   data     from header size + 4 * catalog entries: blocks of (bitmap sectors + extent
//            sectors), the bitmap first. Bit s (LSB first) of the bitmap says whether the
//            extent's sector s was written; a clear bit and an unallocated extent read as
//            zeros.
//
// Every field is validated as qemu validates it, with qemu's messages (iotest 078), and
// read with qemu's arithmetic (32-bit sums where qemu sums in 32 bits), so that an image
// qemu reads reads the same here: the catalog and blocks past the end of the file read as
// zeros, and a block whose offset passes the largest file offset is an I/O error.
//
// Files:
//   header.cc     probe, header and catalog: decode with validation
//   block_map.cc  BochsMap (the ClusterMap: bitmaps cached, lookups by sector runs), driver
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs::bochs {

inline constexpr uint64_t kSectorSize = 512;
inline constexpr size_t kHeaderSize = 512;
inline constexpr uint32_t kVersion1 = 0x00010000;
inline constexpr uint32_t kVersion2 = 0x00020000;
inline constexpr uint32_t kUnallocated = 0xFFFFFFFFu;
// qemu's limits: 1M catalog entries (the largest image bximage makes, ~8 TB), extents of
// 512 bytes to 8 MiB.
inline constexpr uint32_t kMaxCatalogEntries = 0x100000;
inline constexpr uint32_t kMinExtentSize = 512;
inline constexpr uint32_t kMaxExtentSize = 0x800000;
// qemu's BDRV_MAX_LENGTH: no read may reach past it (an I/O error in qemu).
inline constexpr uint64_t kMaxFileOffset = (uint64_t{INT64_MAX} / (1ull << 30)) * (1ull << 30);

// Byte offsets in the header.
namespace hdr {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kType = 32;
inline constexpr size_t kSubtype = 48;
inline constexpr size_t kVersion = 64;
inline constexpr size_t kHeaderSize = 68;
inline constexpr size_t kCatalog = 72;
inline constexpr size_t kBitmap = 76;
inline constexpr size_t kExtent = 80;
inline constexpr size_t kDiskV1 = 84;
inline constexpr size_t kDiskV2 = 88;  // after a reserved word
}  // namespace hdr

// The header's magic, type, subtype and version are Bochs growing redolog ones (qemu's
// strcmp tests: each string NUL-terminated within its field). `head` shorter than the header
// counts as zero-padded, as qemu's probe buffer is.
bool IsBochsHeader(std::span<const std::byte> head);
int ProbeBochs(std::span<const std::byte> head);

struct Header {
  uint32_t version = 0;
  uint32_t header_size = 0;  // the catalog's offset
  uint32_t catalog_entries = 0;
  uint32_t bitmap_bytes = 0;
  uint32_t extent_bytes = 0;
  uint64_t virtual_size = 0;  // the disk size rounded down to a sector, as qemu
  // As qemu computes them (32-bit arithmetic).
  uint32_t data_offset = 0;    // header_size + 4 * catalog_entries
  uint32_t bitmap_blocks = 0;  // 1 + (bitmap_bytes - 1) / 512: a zero bitmap size wraps
  uint32_t extent_blocks = 0;
};

// Decodes and validates the 512-byte header at the start of `file`, in qemu's order and
// words; the catalog is read into *catalog (host byte order). Errors name path.
Result<Header> ReadHeader(File& file, const std::string& path, std::vector<uint32_t>* catalog);

// The ClusterMap of an open Bochs image. The catalog is held in memory (at most 4 MiB);
// the bitmaps of the extents read are cached up to the metadata cache size.
class BochsMap final : public ClusterMap {
 public:
  BochsMap(std::string path, std::unique_ptr<File> file, Header header, std::vector<uint32_t> catalog,
           uint64_t cache_bytes);

  uint64_t virtual_size() const override { return h_.virtual_size; }
  uint64_t cluster_size() const override { return h_.extent_bytes; }
  bool read_only() const override { return true; }
  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return Status::Ok(); }
  Status Close() override;
  FormatInfo Info() override;

 private:
  // The bitmap bytes a lookup may consult for the block at host offset `block` (as qemu
  // computes it, wrapping): one bit per sector of the extent, read from block on whatever
  // the bitmap size says, as qemu reads them; cached. nullptr when they do not all lie below
  // the largest file offset: SectorWrittenAtEnd then reads them byte by byte.
  Result<const std::vector<uint8_t>*> Bitmap(uint64_t block);
  Result<bool> SectorWrittenAtEnd(uint64_t block, uint64_t sector);
  // Appends the runs of guest [from, to) inside one extent, merging into out[first..].
  Status LookupExtent(uint64_t extent, uint64_t from, uint64_t to, size_t first, std::vector<Mapping>* out);

  std::string path_;
  std::unique_ptr<File> file_;
  Header h_;
  std::vector<uint32_t> catalog_;
  size_t bitmap_window_ = 1;  // bytes of a bitmap a lookup may consult: one bit per sector
  size_t max_cached_bitmaps_ = 1;
  std::unordered_map<uint64_t, std::vector<uint8_t>> bitmaps_;  // block offset -> window
};

Result<std::unique_ptr<ClusterMap>> OpenBochs(OpenContext ctx);

}  // namespace vimgfs::bochs

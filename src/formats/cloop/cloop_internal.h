// cloop (compressed loop, Knoppix's V2.0 format), read-only as in qemu 7.2.
//
// Layout, as qemu's block/cloop.c reads it:
//   0    a shell script of 128 bytes, starting "#!/bin/sh\n#V2.0 Format\nmodprobe cloop ..."
//   128  block size (big-endian uint32): bytes of each uncompressed block, a multiple of 512
//   132  block count n (big-endian uint32)
//   136  n + 1 big-endian uint64 file offsets: block i is the zlib stream at
//        [offset[i], offset[i+1]), inflating to exactly one block.
// The disk is n blocks (in qemu's 32-bit sector count: n * block_size / 512 wraps at 2^32
// sectors). Each block is one compressed unit (Mapping::kCompressed, Codec::kZlib), which
// the engine inflates and keeps per thread; the stream must end at the block's end, as
// qemu's inflate(Z_FINISH) wants.
//
// Validation is qemu's, with its messages (iotest 075): block size, block count, table
// size, offsets monotonic and no gap above 128 MiB. The part of the offsets table past the
// end of the file reads as zeros (as in qemu) and is not held in memory.
//
// Files:
//   cloop.cc   probe, header and offsets table, CloopMap (the ClusterMap), the driver
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "util/limits.h"
#include "vimgfs/format.h"

namespace vimgfs::cloop {

inline constexpr std::string_view kMagicV2 =
    "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
inline constexpr uint64_t kBlockSizeOffset = 128;
inline constexpr uint64_t kBlockCountOffset = 132;
inline constexpr uint64_t kOffsetsOffset = 136;
// qemu's limits: a block of at most 64 MiB, a compressed block of at most twice that, an
// offsets table of at most 512 MiB (and a block count whose table size fits 32 bits).
inline constexpr uint32_t kMaxBlockSize = limits::kMaxCloopBlock;
inline constexpr uint64_t kMaxCompressedBlock = limits::kMaxCloopCompressedBlock;
inline constexpr uint64_t kMaxOffsetsBytes = 512ull << 20;
inline constexpr uint32_t kMaxBlocks = (UINT32_MAX - 1) / sizeof(uint64_t);  // 536870911
// qemu's BDRV_MAX_LENGTH: no read may reach past it (an I/O error in qemu).
inline constexpr uint64_t kMaxFileOffset = (uint64_t{INT64_MAX} / (1ull << 30)) * (1ull << 30);

int ProbeCloop(std::span<const std::byte> head);

class CloopMap final : public ClusterMap {
 public:
  // `offsets`: the table's entries that lie in the file; those past it are zero.
  CloopMap(std::string path, std::unique_ptr<File> file, uint32_t block_size, uint32_t blocks,
           std::vector<uint64_t> offsets);

  uint64_t virtual_size() const override { return virtual_size_; }
  // The engine's lock unit: the largest power of two dividing the block size.
  uint64_t cluster_size() const override { return block_size_ & (~block_size_ + 1); }
  bool read_only() const override { return true; }
  Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) override;
  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return Status::Ok(); }
  Status Close() override { return Status::Ok(); }
  FormatInfo Info() override;

 private:
  uint64_t offset(uint64_t i) const { return i < offsets_.size() ? offsets_[i] : 0; }

  std::string path_;
  std::unique_ptr<File> file_;
  uint32_t block_size_;
  uint32_t blocks_;
  uint64_t virtual_size_;
  std::vector<uint64_t> offsets_;
};

Result<std::unique_ptr<ClusterMap>> OpenCloop(OpenContext ctx);

}  // namespace vimgfs::cloop

// Sequential writer of streamOptimized VMDK images (convert -O vmdk -o subformat=
// streamOptimized). The layout is the one qemu-img produces: header, embedded descriptor,
// redundant and primary grain directories and tables preallocated after it, then each
// grain as a 12-byte marker (LBA, compressed size) followed by its zlib stream, padded to a
// sector, and an end-of-stream marker. Grains that are all zeros are not stored.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/env.h"
#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs {

class StreamOptimizedWriter final : public StreamWriter {
 public:
  // Creates `path` (truncating it) for a disk of `size` bytes. `options` are the vmdk
  // create options (-o): adapter_type, hwversion, compat6, toolsversion; subformat, if
  // given, must be streamOptimized.
  static Result<std::unique_ptr<StreamOptimizedWriter>> Open(
      Env& env, const std::string& path, uint64_t size,
      const std::map<std::string, std::string>& options = {});
  ~StreamOptimizedWriter() override;

  // StreamWriter: grains, zlib streams.
  uint64_t unit_size() const override { return grain_size_; }
  Codec codec() const override { return Codec::kZlib; }
  Status WriteCompressedUnit(uint64_t index, std::span<const std::byte> stream) override {
    return WriteCompressedGrain(index, stream);
  }

  uint64_t grain_size() const { return grain_size_; }
  uint64_t size() const { return size_; }

  // Stores grain `index` (guest bytes [index*grain_size, ...)). `data` is grain_size bytes,
  // or fewer for the last grain of the disk (zero-padded). Each grain may be written once;
  // grains may come in any order, ascending is what readers of streams expect.
  Status WriteGrain(uint64_t index, std::span<const std::byte> data);
  // Like WriteGrain with the grain already compressed (a zlib stream of the zero-padded
  // grain), so callers can compress grains on several threads. Zero grains: skip them.
  Status WriteCompressedGrain(uint64_t index, std::span<const std::byte> zlib_stream);
  // The longest zlib stream a grain may take (deflate's worst case on incompressible data).
  uint64_t max_stream_bytes() const override { return grain_size_ + grain_size_ / 16 + 1024; }
  // Writes the grain tables and the end-of-stream marker and syncs. Required for a valid
  // image; the writer is unusable afterwards.
  Status Finish() override;

 private:
  StreamOptimizedWriter() = default;
  Status FlushTables();

  std::unique_ptr<File> file_;
  uint64_t size_ = 0;
  uint64_t grain_size_ = 0;
  uint32_t gtes_ = 0;
  uint64_t gt_bytes_ = 0;
  uint64_t gd_offset_ = 0;   // bytes
  uint64_t rgd_offset_ = 0;  // bytes
  std::vector<uint32_t> gd_, rgd_;
  std::map<uint64_t, std::vector<uint32_t>> pending_;  // grain table index -> entries
  uint64_t next_ = 0;                                  // bytes, sector-aligned end of data
  bool finished_ = false;
};

}  // namespace vimgfs

// cloop: probe, header and offsets table (validated as qemu 7.2's block/cloop.c), the
// ClusterMap whose blocks are compressed units, and the driver.
#include <algorithm>
#include <array>
#include <cstring>

#include "formats/cloop/cloop_internal.h"
#include "formats/drivers.h"
#include "util/endian.h"

namespace vimgfs::cloop {

int ProbeCloop(std::span<const std::byte> head) {
  // qemu compares the whole script against its zero-padded probe buffer.
  if (head.size() < kMagicV2.size() || std::memcmp(head.data(), kMagicV2.data(), kMagicV2.size()) != 0)
    return 0;
  return 2;  // qemu's score: just above raw
}

CloopMap::CloopMap(std::string path, std::unique_ptr<File> file, uint32_t block_size, uint32_t blocks,
                   std::vector<uint64_t> offsets)
    : path_(std::move(path)),
      file_(std::move(file)),
      block_size_(block_size),
      blocks_(blocks),
      offsets_(std::move(offsets)) {
  // qemu: total_sectors = n_blocks * sectors_per_block, a uint32 product.
  const uint32_t sectors = blocks_ * (block_size_ / 512);
  virtual_size_ = uint64_t{sectors} * 512;
}

Status CloopMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  const uint64_t end = guest_off + len;
  for (uint64_t pos = guest_off; pos < end;) {
    const uint64_t block = pos / block_size_;
    const uint64_t block_start = block * block_size_;
    const uint64_t to = std::min(end, block_start + block_size_);
    if (block >= blocks_) return Status::Corrupt("'{}': offset {} lies past the last block", path_, pos);
    const uint64_t host = offset(block), size = offset(block + 1) - host;  // monotonic: checked at open
    if (host > kMaxFileOffset || size > kMaxFileOffset - host)
      return Status::Io("'{}': block {} at 0x{:x} lies past the largest file offset", path_, block, host);
    out->push_back(Mapping{.kind = Mapping::Kind::kCompressed,
                           .length = to - pos,
                           .file = file_.get(),
                           .host_offset = host,
                           .compressed_length = size,
                           .unit_guest_offset = block_start,
                           .unit_size = block_size_,
                           .codec = Codec::kZlib,
                           .stream_ends_unit = true});
    pos = to;
  }
  return Status::Ok();
}

FormatInfo CloopMap::Info() {
  FormatInfo info;
  info.format = "cloop";
  info.virtual_size = virtual_size();
  return info;  // no cluster size: qemu's driver has no bdrv_get_info
}

Result<std::unique_ptr<ClusterMap>> OpenCloop(OpenContext ctx) {
  const std::string& path = ctx.path;
  // The engine refuses a read-write open first (FormatTraits::read_only); this is its backstop.
  if (!ctx.options.read_only)
    return Status::Error(ErrorKind::kReadOnly, EACCES, fmt::format("'{}': Image is read-only", path));
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': cloop images have no internal snapshots", path);
  File& file = *ctx.file;
  // Fields past the end of the file read as zeros, as in qemu.
  std::array<std::byte, 8> head{};
  RETURN_IF_ERROR(file.PRead(kBlockSizeOffset, head).WithContext("'{}': reading the cloop header", path));
  const uint32_t block_size = LoadBE32(&head[0]);
  if (block_size % 512 != 0)
    return Status::InvalidFormat("'{}': block_size {} must be a multiple of 512", path, block_size);
  if (block_size == 0) return Status::InvalidFormat("'{}': block_size cannot be zero", path);
  if (block_size > kMaxBlockSize)
    return Status::InvalidFormat("'{}': block_size {} must be {} MB or less", path, block_size,
                                 kMaxBlockSize >> 20);
  const uint32_t blocks = LoadBE32(&head[4]);
  if (blocks > kMaxBlocks)
    return Status::InvalidFormat("'{}': n_blocks {} must be {} or less", path, blocks, kMaxBlocks);
  // qemu keeps the table size in a uint32: for the largest block count it wraps to 0, and
  // qemu's allocation of 0 bytes fails.
  const uint32_t offsets_size = static_cast<uint32_t>((uint64_t{blocks} + 1) * sizeof(uint64_t));
  if (offsets_size > kMaxOffsetsBytes)
    return Status::InvalidFormat("'{}': image requires too many offsets, try increasing block size", path);
  if (offsets_size == 0) return Status::InvalidFormat("'{}': Could not allocate offsets table", path);

  // Only the entries in the file are read and kept; the rest are zeros.
  ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  const uint64_t entries = uint64_t{blocks} + 1;
  const uint64_t in_file = file_size > kOffsetsOffset ? (file_size - kOffsetsOffset + 7) / 8 : 0;
  std::vector<uint64_t> offsets(std::min(entries, in_file));
  if (!offsets.empty()) {
    std::vector<std::byte> raw(offsets.size() * 8);
    RETURN_IF_ERROR(file.PRead(kOffsetsOffset, raw).WithContext("'{}': reading the cloop offsets", path));
    for (size_t i = 0; i < offsets.size(); ++i) offsets[i] = LoadBE64(&raw[i * 8]);
  }
  const auto at = [&](uint64_t i) { return i < offsets.size() ? offsets[i] : 0; };
  // The zeros past the file are monotonic among themselves: only the first one can fail.
  const uint64_t last = std::min(entries, uint64_t{offsets.size()} + 1);
  for (uint64_t i = 1; i < last; ++i) {
    if (at(i) < at(i - 1))
      return Status::InvalidFormat(
          "'{}': offsets not monotonically increasing at index {}, image file is corrupt", path, i);
    if (at(i) - at(i - 1) > kMaxCompressedBlock)
      return Status::InvalidFormat("'{}': invalid compressed block size at index {}, image file is corrupt",
                                   path, i);
  }
  return std::unique_ptr<ClusterMap>(
      std::make_unique<CloopMap>(path, std::move(ctx.file), block_size, blocks, std::move(offsets)));
}

namespace {

class CloopFormat final : public FormatDriver {
 public:
  const char* name() const override { return "cloop"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options = {},
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .block_status = false,  // qemu 7.2's cloop driver has no block status
        .read_only = true,
        .reports_dirty_flag = false,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeCloop(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return OpenCloop(std::move(ctx));
  }
};

}  // namespace
}  // namespace vimgfs::cloop

namespace vimgfs {
const FormatDriver* CloopDriver() {
  static const cloop::CloopFormat driver;
  return &driver;
}
}  // namespace vimgfs

// BochsMap: a Bochs growing image as a ClusterMap, opening it, and the driver.
#include <algorithm>

#include "formats/bochs/bochs_internal.h"
#include "formats/drivers.h"
#include "util/endian.h"

namespace vimgfs::bochs {
namespace {

void Append(std::vector<Mapping>* out, size_t first, const Mapping& m) {
  if (out->size() > first) {
    Mapping& prev = out->back();
    if (prev.kind == m.kind &&
        (m.kind != Mapping::Kind::kData || prev.host_offset + prev.length == m.host_offset)) {
      prev.length += m.length;
      return;
    }
  }
  out->push_back(m);
}

// Whether a read of `bytes` at `off` (computed with qemu's wrapping arithmetic) stays
// below qemu's largest file offset; past it qemu fails the read with EIO.
bool ReadableAt(uint64_t off, uint64_t bytes) {
  return off <= kMaxFileOffset && bytes <= kMaxFileOffset - off;
}

}  // namespace

BochsMap::BochsMap(std::string path, std::unique_ptr<File> file, Header header, std::vector<uint32_t> catalog,
                   uint64_t cache_bytes)
    : path_(std::move(path)), file_(std::move(file)), h_(header), catalog_(std::move(catalog)) {
  bitmap_window_ = (h_.extent_bytes / kSectorSize + 7) / 8;
  max_cached_bitmaps_ = std::max<uint64_t>(1, cache_bytes / bitmap_window_);
}

Result<const std::vector<uint8_t>*> BochsMap::Bitmap(uint64_t block) {
  if (!ReadableAt(block, bitmap_window_)) return nullptr;
  auto it = bitmaps_.find(block);
  if (it == bitmaps_.end()) {
    if (bitmaps_.size() >= max_cached_bitmaps_) bitmaps_.clear();
    std::vector<uint8_t> window(bitmap_window_);
    RETURN_IF_ERROR(file_->PRead(block, std::as_writable_bytes(std::span(window)))
                        .WithContext("'{}': reading the bitmap at 0x{:x}", path_, block));
    it = bitmaps_.emplace(block, std::move(window)).first;
  }
  return &it->second;
}

Result<bool> BochsMap::SectorWrittenAtEnd(uint64_t block, uint64_t sector) {
  const uint64_t at = block + sector / 8;  // wraps past 2^64 as qemu's sum does
  if (!ReadableAt(at, 1))
    return Status::Io("'{}': the bitmap byte at 0x{:x} lies past the largest file offset", path_, at);
  std::byte b{};
  RETURN_IF_ERROR(file_->PRead(at, std::span(&b, 1)));
  return ((static_cast<uint8_t>(b) >> (sector % 8)) & 1) != 0;
}

Status BochsMap::LookupExtent(uint64_t extent, uint64_t from, uint64_t to, size_t first,
                              std::vector<Mapping>* out) {
  const uint32_t entry = catalog_[extent];
  if (entry == kUnallocated) {
    Append(out, first, Mapping{.kind = Mapping::Kind::kUnallocated, .length = to - from});
    return Status::Ok();
  }
  // qemu: data_offset + 512 * entry * (extent_blocks + bitmap_blocks), in uint64 (wrapping).
  const uint64_t block =
      uint64_t{h_.data_offset} + kSectorSize * uint64_t{entry} * (h_.extent_blocks + h_.bitmap_blocks);
  const uint64_t extent_start = extent * h_.extent_bytes;
  ASSIGN_OR_RETURN(const std::vector<uint8_t>* bitmap, Bitmap(block));
  const auto written_at = [&](uint64_t sector) -> Result<bool> {
    if (!bitmap) return SectorWrittenAtEnd(block, sector);
    return (((*bitmap)[sector / 8] >> (sector % 8)) & 1) != 0;
  };
  for (uint64_t pos = from; pos < to;) {
    const uint64_t sector = (pos - extent_start) / kSectorSize;
    ASSIGN_OR_RETURN(bool written, written_at(sector));
    // The run of sectors with the same bit.
    uint64_t end = std::min(to, extent_start + (sector + 1) * kSectorSize);
    while (end < to) {
      ASSIGN_OR_RETURN(bool next, written_at((end - extent_start) / kSectorSize));
      if (next != written) break;
      end = std::min(to, end + kSectorSize);
    }
    const uint64_t sector_host = block + kSectorSize * (uint64_t{h_.bitmap_blocks} + sector);
    if (written && sector_host == 0) {
      // qemu takes a data offset of 0 (reached by wrapping) for "not allocated": zeros.
      end = std::min(to, extent_start + (sector + 1) * kSectorSize);
      written = false;
    }
    if (!written) {
      Append(out, first, Mapping{.kind = Mapping::Kind::kUnallocated, .length = end - pos});
    } else {
      const uint64_t host = sector_host + pos % kSectorSize;
      if (!ReadableAt(host, end - pos))
        return Status::Io("'{}': the data of extent {} lies past the largest file offset", path_, extent);
      Append(out, first,
             Mapping{.kind = Mapping::Kind::kData,
                     .length = end - pos,
                     .file = file_.get(),
                     .host_offset = host,
                     .opaque_data = true});
    }
    pos = end;
  }
  return Status::Ok();
}

Status BochsMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  const uint64_t end = guest_off + len;
  const size_t first = out->size();  // runs merge across extents from here on
  for (uint64_t pos = guest_off; pos < end;) {
    const uint64_t extent = pos / h_.extent_bytes;
    const uint64_t to = std::min(end, (extent + 1) * h_.extent_bytes);
    if (extent >= catalog_.size())  // the header checks made the catalog cover the disk
      return Status::Corrupt("'{}': offset {} lies past the catalog", path_, pos);
    RETURN_IF_ERROR(LookupExtent(extent, pos, to, first, out));
    pos = to;
  }
  return Status::Ok();
}

Status BochsMap::Close() {
  bitmaps_.clear();
  return Status::Ok();
}

FormatInfo BochsMap::Info() {
  FormatInfo info;
  info.format = "bochs";
  info.virtual_size = virtual_size();
  return info;  // no cluster size: qemu's driver has no bdrv_get_info
}

Result<std::unique_ptr<ClusterMap>> OpenBochs(OpenContext ctx) {
  // The engine refuses a read-write open first (FormatTraits::read_only); this is its backstop.
  if (!ctx.options.read_only)
    return Status::Error(ErrorKind::kReadOnly, EACCES, fmt::format("'{}': Image is read-only", ctx.path));
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': Bochs images have no internal snapshots", ctx.path);
  std::vector<uint32_t> catalog;
  ASSIGN_OR_RETURN(Header h, ReadHeader(*ctx.file, ctx.path, &catalog));
  return std::unique_ptr<ClusterMap>(std::make_unique<BochsMap>(ctx.path, std::move(ctx.file), h,
                                                                std::move(catalog), ctx.options.cache_bytes));
}

namespace {

class BochsFormat final : public FormatDriver {
 public:
  const char* name() const override { return "bochs"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options = {},
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .block_status = false,  // qemu 7.2's bochs driver has no block status
        .read_only = true,
        .reports_dirty_flag = false,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeBochs(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return OpenBochs(std::move(ctx));
  }
};

}  // namespace
}  // namespace vimgfs::bochs

namespace vimgfs {
const FormatDriver* BochsDriver() {
  static const bochs::BochsFormat driver;
  return &driver;
}
}  // namespace vimgfs

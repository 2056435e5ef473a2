// DmgMap: the chunk list as a read-only ClusterMap; opening, probing, the driver object.
#include <algorithm>

#include "formats/dmg/dmg_internal.h"

namespace vimgfs::dmg {
namespace {

// Appends m to out, joining it to the previous mapping where both are zeros or both are
// data contiguous in the file, so a run of small chunks does not become many mappings.
void Append(std::vector<Mapping>* out, size_t first, const Mapping& m) {
  if (out->size() > first) {
    Mapping& last = out->back();
    if (last.kind == m.kind && m.kind == Mapping::Kind::kZero) {
      last.length += m.length;
      return;
    }
    if (last.kind == m.kind && m.kind == Mapping::Kind::kData && last.file == m.file &&
        last.host_offset + last.length == m.host_offset) {
      last.length += m.length;
      return;
    }
  }
  out->push_back(m);
}

}  // namespace

DmgMap::DmgMap(std::string path, std::unique_ptr<File> file, Tables tables)
    : path_(std::move(path)), file_(std::move(file)), tables_(std::move(tables)) {}

Status DmgMap::Unreadable(uint64_t sector) const {
  for (const Chunk& c : tables_.unreadable) {
    // EIO to a mount's clients, as qemu fails the read.
    if (sector >= c.first_sector && sector < c.end_sector())
      return Status::Error(ErrorKind::kUnsupported, EIO,
                           fmt::format("'{}': cannot read sector {}: its chunk is {}, which is not "
                                       "supported",
                                       path_, sector, DescribeChunkType(c.type)));
  }
  return Status::Corrupt("'{}': cannot read sector {}: no chunk of the block tables covers it", path_,
                         sector);
}

Status DmgMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > virtual_size() || len > virtual_size() - guest_off)
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, virtual_size());
  const size_t first = out->size();
  const auto& chunks = tables_.readable;
  const uint64_t end = guest_off + len;
  // The chunk holding the first sector, then its successors in order.
  auto it = std::upper_bound(chunks.begin(), chunks.end(), guest_off / kSectorSize,
                             [](uint64_t sector, const Chunk& c) { return sector < c.first_sector; });
  if (it != chunks.begin()) --it;
  for (uint64_t pos = guest_off; pos < end; ++it) {
    const uint64_t sector = pos / kSectorSize;
    if (it == chunks.end() || sector < it->first_sector || sector >= it->end_sector())
      return Unreadable(sector);
    const Chunk& c = *it;
    const uint64_t chunk_start = c.first_sector * kSectorSize;
    const uint64_t n = std::min(end, c.end_sector() * kSectorSize) - pos;
    Mapping m{.length = n};
    switch (c.type) {
      case kChunkZero:
      case kChunkIgnore:
        m.kind = Mapping::Kind::kZero;
        break;
      case kChunkRaw:
        m.kind = Mapping::Kind::kData;
        m.file = file_.get();
        m.host_offset = c.host_offset + (pos - chunk_start);
        break;
      default:  // zlib, bzip2: the engine inflates the whole chunk and caches it
        m.kind = Mapping::Kind::kCompressed;
        m.file = file_.get();
        m.host_offset = c.host_offset;
        m.compressed_length = c.host_length;
        m.unit_guest_offset = chunk_start;
        m.unit_size = static_cast<uint32_t>(c.sector_count * kSectorSize);  // <= 64 MiB
        m.codec = c.type == kChunkZlib ? Codec::kZlib : Codec::kBzip2;
        break;
    }
    Append(out, first, m);
    pos += n;
  }
  return Status::Ok();
}

FormatInfo DmgMap::Info() {
  FormatInfo info;
  info.format = "dmg";
  info.virtual_size = virtual_size();
  return info;  // qemu's dmg driver reports no cluster size
}

Result<std::unique_ptr<ClusterMap>> OpenDmg(OpenContext ctx) {
  // Read-write opens never get here: the traits say read_only, and the engine refuses them.
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': dmg images have no internal snapshots", ctx.path);
  ASSIGN_OR_RETURN(Tables tables, ReadTables(*ctx.file, ctx.path));
  return std::unique_ptr<ClusterMap>(
      std::make_unique<DmgMap>(ctx.path, std::move(ctx.file), std::move(tables)));
}

namespace {

class DmgFormat final : public FormatDriver {
 public:
  const char* name() const override { return "dmg"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options = {},
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .block_status = false,  // qemu 7.2's dmg driver has no block status
        .read_only = true,      // qemu's dmg driver opens read-only only
        .reports_dirty_flag = false,
    };
    return kTraits;
  }
  // qemu knows a dmg by its name alone, scored just above raw; an empty file is raw to
  // qemu whatever its name (it does not probe it).
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return !head.empty() && path.size() > 4 && path.ends_with(".dmg") ? 2 : 0;
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override { return OpenDmg(std::move(ctx)); }
};

}  // namespace
}  // namespace vimgfs::dmg

namespace vimgfs {
const FormatDriver* DmgDriver() {
  static const dmg::DmgFormat driver;
  return &driver;
}
}  // namespace vimgfs

// Parallels header: probe, and decoding with validation of every field.
#include <cstring>

#include "formats/parallels/parallels_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::parallels {
namespace {

bool HasMagic(std::span<const std::byte> raw, const char* magic) {
  return raw.size() >= 16 && std::memcmp(raw.data() + off::kMagic, magic, 16) == 0;
}

}  // namespace

int ProbeParallels(std::span<const std::byte> head) {
  // qemu wants a whole header in its probe buffer.
  if (head.size() < kHeaderSize) return 0;
  if (!HasMagic(head, kMagicSectors) && !HasMagic(head, kMagicClusters)) return 0;
  return LoadLE32(&head[off::kVersion]) == kVersion ? 100 : 0;
}

Result<Header> ParseHeader(std::span<const std::byte, kHeaderSize> raw, const std::string& path) {
  Header h;
  const bool sectors = HasMagic(raw, kMagicSectors);
  h.cluster_entries = HasMagic(raw, kMagicClusters);
  if (LoadLE32(&raw[off::kVersion]) != kVersion || (!sectors && !h.cluster_entries))
    return Status::InvalidFormat("'{}': Image not in Parallels format", path);
  h.tracks = LoadLE32(&raw[off::kTracks]);
  if (h.tracks == 0) return Status::InvalidFormat("'{}': Invalid image: Zero sectors per track", path);
  if (h.tracks > kMaxTracks)
    return Status::Unsupported("'{}': Invalid image: Too big cluster ({} sectors, at most {})", path,
                               h.tracks, kMaxTracks);
  h.cluster_size = uint64_t{h.tracks} * kSectorSize;
  h.bat_entries = LoadLE32(&raw[off::kBatEntries]);
  // qemu's own cap is 2 GiB of entries; vimgfs holds the BAT in memory and caps it lower.
  if (uint64_t{h.bat_entries} * 4 > limits::kMaxMapBytes)
    return Status::Unsupported("'{}': Catalog too large ({} BAT entries; vimgfs reads at most {})", path,
                               h.bat_entries, limits::kMaxMapBytes / 4);
  uint64_t nb_sectors = LoadLE64(&raw[off::kNbSectors]);
  if (sectors) nb_sectors &= 0xffffffffu;  // the high half is not part of the old format
  if (nb_sectors > limits::kMaxVirtualSize / kSectorSize)
    return Status::Unsupported("'{}': Parallels disk of {} sectors is larger than vimgfs's limit of {} bytes",
                               path, nb_sectors, limits::kMaxVirtualSize);
  h.virtual_size = nb_sectors * kSectorSize;
  h.in_use = LoadLE32(&raw[off::kInUse]);
  h.data_start = uint64_t{LoadLE32(&raw[off::kDataOff])} * kSectorSize;
  if (h.data_start == 0) h.data_start = AlignUp(h.bat_end(), kSectorSize);
  const uint64_t ext_sectors = LoadLE64(&raw[off::kExtOff]);
  if (ext_sectors > limits::kMaxHostOffset / kSectorSize)
    return Status::InvalidFormat("'{}': Parallels format extension offset {} (sectors) is out of range", path,
                                 ext_sectors);
  h.ext_off = ext_sectors * kSectorSize;
  return h;
}

}  // namespace vimgfs::parallels

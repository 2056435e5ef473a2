// qcow2 persistent dirty bitmaps through a read-write open, as qemu keeps them: loaded at
// open and marked in use on disk; every guest write sets the bits of the enabled ones
// (NoteGuestWrite); qemu-img bitmap's changes (engine: Image::ChangeBitmap) replace them
// in memory; stored at close into new clusters, switched to by one header write, the
// in-use marks gone. A crash leaves them marked in use, which qemu reads as inconsistent:
// never a bitmap that misses a write. Spec: qemu docs/interop/qcow2.rst, "Bitmaps
// extension".
#include <algorithm>
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

constexpr uint64_t kTableEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kTableEntryAllOnes = 1;

// One directory entry as stored.
struct DirEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;
  uint32_t flags = 0;
  uint8_t type = 1;
  uint8_t granularity_bits = 16;
  std::string name;
  std::vector<std::byte> extra;
};

std::vector<std::byte> SerializeDirectory(const std::vector<DirEntry>& entries) {
  std::vector<std::byte> out;
  for (const DirEntry& e : entries) {
    const size_t at = out.size();
    out.resize(at + AlignUp(24 + e.extra.size() + e.name.size(), 8));
    std::byte* p = out.data() + at;
    StoreBE64(p, e.table_offset);
    StoreBE32(p + 8, e.table_size);
    StoreBE32(p + 12, e.flags);
    p[16] = static_cast<std::byte>(e.type);
    p[17] = static_cast<std::byte>(e.granularity_bits);
    StoreBE16(p + 18, static_cast<uint16_t>(e.name.size()));
    StoreBE32(p + 20, static_cast<uint32_t>(e.extra.size()));
    if (!e.extra.empty()) std::memcpy(p + 24, e.extra.data(), e.extra.size());
    std::memcpy(p + 24 + e.extra.size(), e.name.data(), e.name.size());
  }
  return out;
}

// The directory's entries as stored (ValidateBitmapDirectory checked them at open).
Result<std::vector<DirEntry>> ReadDirectory(File& file, uint64_t off, uint64_t size) {
  std::vector<std::byte> dir(size);
  RETURN_IF_ERROR(file.PRead(off, dir));
  std::vector<DirEntry> entries;
  for (uint64_t pos = 0; pos + 24 <= size;) {
    const std::byte* p = dir.data() + pos;
    DirEntry e;
    e.table_offset = LoadBE64(p);
    e.table_size = LoadBE32(p + 8);
    e.flags = LoadBE32(p + 12);
    e.type = static_cast<uint8_t>(p[16]);
    e.granularity_bits = static_cast<uint8_t>(p[17]);
    const uint16_t name_size = LoadBE16(p + 18);
    const uint32_t extra_size = LoadBE32(p + 20);
    if (pos + 24 + extra_size + name_size > size) break;
    e.extra.assign(p + 24, p + 24 + extra_size);
    e.name.assign(reinterpret_cast<const char*>(p + 24 + extra_size), name_size);
    entries.push_back(std::move(e));
    pos += AlignUp(24 + uint64_t{extra_size} + name_size, 8);
  }
  return entries;
}

}  // namespace

std::vector<Qcow2Bitmap> Qcow2Map::BitmapList() {
  std::vector<Qcow2Bitmap> list;
  if (!header_.bitmaps_ext || header_.bitmaps_ext->size() < 24 ||
      !(header_.autoclear_features & kAutoclearBitmaps))
    return list;
  const std::byte* p = header_.bitmaps_ext->data();
  const uint32_t count = LoadBE32(p);
  const uint64_t dir_size = LoadBE64(p + 8), dir_off = LoadBE64(p + 16);
  if (dir_size > limits::kMaxHeaderExtensionBytes * 16 || count > 65535) return list;
  auto entries = ReadDirectory(*file_, dir_off, dir_size);
  if (!entries.ok()) return list;
  for (size_t i = 0; i < count && i < entries->size(); i++) {
    const DirEntry& e = (*entries)[i];
    if (e.granularity_bits > 63) break;
    Qcow2Bitmap b;
    b.in_use = e.flags & kBitmapInUse;
    b.auto_enabled = e.flags & kBitmapAuto;
    b.name = e.name;
    b.granularity = uint64_t{1} << e.granularity_bits;
    list.push_back(b);
  }
  return list;
}

uint64_t Qcow2Map::LoadedBitmap::bits_for(uint64_t disk_size) const {
  return DivRoundUp(disk_size, uint64_t{1} << granularity_bits);
}

Result<std::vector<Qcow2Map::LoadedBitmap>> Qcow2Map::LoadStoredBitmaps() {
  std::vector<LoadedBitmap> out;
  if (!header_.bitmaps_ext || !(header_.autoclear_features & kAutoclearBitmaps)) return out;
  const std::byte* ext = header_.bitmaps_ext->data();
  const uint64_t dir_size = LoadBE64(ext + 8), dir_off = LoadBE64(ext + 16);
  ASSIGN_OR_RETURN(std::vector<DirEntry> entries, ReadDirectory(*file_, dir_off, dir_size));
  std::vector<std::byte> cluster(cluster_size_);
  uint64_t memory = 0;
  for (DirEntry& e : entries) {
    if (e.granularity_bits < kMinBitmapGranularityBits || e.granularity_bits > kMaxBitmapGranularityBits)
      return Status::InvalidFormat("'{}': bitmap granularity", path_);
    LoadedBitmap b;
    b.name = e.name;
    b.granularity_bits = e.granularity_bits;
    b.flags = e.flags;
    b.extra = e.extra;
    b.table_offset = e.table_offset;
    b.table_size = e.table_size;
    b.consistent = !(e.flags & kBitmapInUse);
    if (b.consistent) {
      const uint64_t nbits = b.bits_for(size_);
      b.bits = DirtyBits(nbits);
      std::vector<std::byte> table(uint64_t{e.table_size} * 8);
      RETURN_IF_ERROR(
          file_->PRead(e.table_offset, table).WithContext("'{}': reading bitmap '{}'", path_, e.name));
      const uint64_t bytes = DivRoundUp(nbits, 8);
      for (uint64_t i = 0; i < e.table_size && i * cluster_size_ < bytes; i++) {
        const uint64_t entry = LoadBE64(table.data() + i * 8);
        const uint64_t host = entry & kTableEntryOffsetMask;
        if (host == 0 && !(entry & kTableEntryAllOnes)) continue;
        if (host != 0) {
          RETURN_IF_ERROR(ValidateTableOffset(host, "bitmap data"));
          RETURN_IF_ERROR(
              file_->PRead(host, cluster).WithContext("'{}': reading bitmap '{}'", path_, e.name));
        } else {
          std::fill(cluster.begin(), cluster.end(), std::byte{0xff});
        }
        // Bit k of the bitmap is bit k % 8 of byte k / 8: little-endian 64-bit words.
        const uint64_t first_word = i * cluster_size_ / 8;
        for (uint64_t j = 0; j < cluster_size_ / 8 && first_word + j < b.bits.word_count(); j++) {
          uint64_t w = LoadLE64(cluster.data() + j * 8);
          // Bits past the disk's end (an all-ones entry covers them) are not the disk's.
          if (first_word + j == b.bits.word_count() - 1 && nbits % 64) w &= (uint64_t{1} << (nbits % 64)) - 1;
          b.bits.OrWord(first_word + j, w);
        }
      }
      // Memory in proportion to what is dirty; a cap all the same (a hostile image's).
      memory += b.bits.allocated_bytes();
      if (memory > limits::kMaxBitmapMemory)
        return Status::Unsupported("'{}': the dirty bitmaps would take more than {} bytes of memory", path_,
                                   limits::kMaxBitmapMemory);
    }
    out.push_back(std::move(b));
  }
  return out;
}

namespace {

DirEntry EntryOf(const std::string& name, uint8_t granularity_bits, uint32_t flags, uint64_t table_offset,
                 uint32_t table_size, const std::vector<std::byte>& extra) {
  DirEntry e;
  e.name = name;
  e.granularity_bits = granularity_bits;
  e.flags = flags;
  e.table_offset = table_offset;
  e.table_size = table_size;
  e.extra = extra;
  return e;
}

}  // namespace

Status Qcow2Map::LoadBitmapsForWriting() {
  ASSIGN_OR_RETURN(bitmaps_, LoadStoredBitmaps());
  if (bitmaps_.empty()) return Status::Ok();
  const std::byte* ext = header_.bitmaps_ext->data();
  bitmap_dir_size_ = LoadBE64(ext + 8);
  bitmap_dir_offset_ = LoadBE64(ext + 16);
  std::vector<DirEntry> entries;
  for (const LoadedBitmap& b : bitmaps_)
    entries.push_back(
        EntryOf(b.name, b.granularity_bits, b.flags | kBitmapInUse, b.table_offset, b.table_size, b.extra));
  // Marked in use on disk before any write: a crash from here on leaves them inconsistent.
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(file_->PWrite(bitmap_dir_offset_, SerializeDirectory(entries), IoTag::kHeader)
                      .WithContext("'{}': Can't update bitmap directory", path_));
  RETURN_IF_ERROR(file_->Sync(true));
  bitmaps_loaded_ = true;
  return Status::Ok();
}

void Qcow2Map::NoteGuestWrite(uint64_t off, uint64_t len) {
  if (!bitmaps_loaded_ || len == 0) return;
  for (LoadedBitmap& b : bitmaps_) {
    if (!b.consistent || !(b.flags & kBitmapAuto) || b.bits.size() == 0) continue;
    const uint64_t first = off >> b.granularity_bits;
    const uint64_t last = std::min((off + len - 1) >> b.granularity_bits, b.bits.size() - 1);
    if (first <= last) b.bits.Set(first, last);
  }
}

void Qcow2Map::MarkBitmapsAllDirty() { NoteGuestWrite(0, size_); }

Status Qcow2Map::CheckBitmapsResizable() const {
  for (const LoadedBitmap& b : bitmaps_)
    if (!b.consistent)
      return Status::InvalidArgument(
          "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this "
          "bitmap from disk",
          b.name);
  return Status::Ok();
}

void Qcow2Map::ResizeBitmaps(uint64_t new_size) {
  for (LoadedBitmap& b : bitmaps_) {
    if (!b.consistent) continue;
    // Bits past the new end are dropped; a grown area starts clean (qemu's truncate).
    b.bits.Resize(b.bits_for(new_size));
  }
}

Result<std::vector<DirtyBitmap>> Qcow2Map::ReadBitmaps() {
  std::vector<LoadedBitmap> stored;
  if (!bitmaps_loaded_) {
    ASSIGN_OR_RETURN(stored, LoadStoredBitmaps());
  }
  const std::vector<LoadedBitmap>& from = bitmaps_loaded_ ? bitmaps_ : stored;
  std::vector<DirtyBitmap> out;
  for (const LoadedBitmap& b : from) {
    DirtyBitmap d;
    d.name = b.name;
    d.granularity_bits = b.granularity_bits;
    d.enabled = b.flags & kBitmapAuto;
    d.consistent = b.consistent;
    d.bits = b.bits;
    out.push_back(std::move(d));
  }
  return out;
}

// qemu's qcow2_co_can_store_new_dirty_bitmap, its words.
Status Qcow2Map::CanStoreBitmap(const std::string& name, uint32_t granularity_bits,
                                const std::vector<DirtyBitmap>& existing) {
  if (!v3_) return Status::InvalidArgument("Cannot store dirty bitmaps in qcow2 v2 files");
  if (granularity_bits > kMaxBitmapGranularityBits)
    return Status::InvalidArgument("Granularity exceeds maximum ({} bytes)",
                                   uint64_t{1} << kMaxBitmapGranularityBits);
  if (granularity_bits < kMinBitmapGranularityBits)
    return Status::InvalidArgument("Granularity is under minimum ({} bytes)",
                                   uint64_t{1} << kMinBitmapGranularityBits);
  const uint64_t bytes = DivRoundUp(DivRoundUp(size_, uint64_t{1} << granularity_bits), 8);
  if (bytes > kMaxBitmapPhysBytes || bytes > uint64_t{kMaxBitmapTableSize} * cluster_size_)
    return Status::InvalidArgument("Too much space will be occupied by the bitmap. Use larger granularity");
  if (name.size() > kMaxBitmapNameBytes)
    return Status::InvalidArgument("Name length exceeds maximum ({} characters)", kMaxBitmapNameBytes);
  uint64_t dir_size = AlignUp(24 + name.size(), 8);
  for (const DirtyBitmap& b : existing) dir_size += AlignUp(24 + b.name.size(), 8);
  if (existing.size() + 1 > kMaxBitmaps)
    return Status::InvalidArgument("Maximum number of persistent bitmaps is already reached");
  if (dir_size > kMaxBitmapDirectoryBytes)
    return Status::InvalidArgument("Not enough space in the bitmap directory");
  return Status::Ok();
}

Status Qcow2Map::ReplaceBitmaps(std::vector<DirtyBitmap> bitmaps) {
  if (read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  if (!bitmaps_loaded_ && (header_.autoclear_features & kAutoclearBitmaps))
    return Status::Unsupported("'{}': this open did not load the image's bitmaps", path_);
  std::vector<LoadedBitmap> next;
  for (DirtyBitmap& d : bitmaps) {
    LoadedBitmap b;
    b.name = d.name;
    b.granularity_bits = static_cast<uint8_t>(d.granularity_bits);
    b.flags = d.enabled ? kBitmapAuto : 0;
    b.consistent = d.consistent;
    if (!d.consistent) {
      // Only kept as found: the stored entry stays as it is.
      auto old = std::find_if(bitmaps_.begin(), bitmaps_.end(),
                              [&](const LoadedBitmap& o) { return !o.consistent && o.name == d.name; });
      if (old == bitmaps_.end())
        return Status::InvalidArgument("'{}': bitmap '{}' has no stored bits to keep", path_, d.name);
      b.flags = old->flags;
      b.extra = old->extra;
      b.table_offset = old->table_offset;
      b.table_size = old->table_size;
    } else {
      if (d.bits.size() != b.bits_for(size_))
        return Status::InvalidArgument("'{}': bitmap '{}' does not cover the disk", path_, d.name);
      b.bits = std::move(d.bits);
    }
    next.push_back(std::move(b));
  }
  // Every stored table that no bitmap of `next` keeps is freed once the new set is stored.
  for (const LoadedBitmap& o : bitmaps_) {
    if (o.table_offset == 0) continue;
    const bool kept = std::any_of(next.begin(), next.end(),
                                  [&](const LoadedBitmap& b) { return b.table_offset == o.table_offset; });
    if (!kept) stale_bitmap_tables_.emplace_back(o.table_offset, o.table_size);
  }
  bitmaps_ = std::move(next);
  bitmaps_loaded_ = true;
  return Status::Ok();
}

Status Qcow2Map::StoreBitmaps() {
  if (!bitmaps_loaded_) return Status::Ok();
  // Everything to free is read before anything is: the old tables name their data.
  std::vector<uint64_t> to_free;
  auto free_table = [&](uint64_t table_offset, uint32_t table_size) -> Status {
    std::vector<std::byte> table(uint64_t{table_size} * 8);
    RETURN_IF_ERROR(file_->PRead(table_offset, table));
    for (uint64_t i = 0; i < table_size; i++) {
      const uint64_t host = LoadBE64(table.data() + i * 8) & kTableEntryOffsetMask;
      if (host != 0 && ValidateTableOffset(host, "bitmap data").ok()) to_free.push_back(host);
    }
    for (uint64_t c = 0; c < DivRoundUp(table.size(), cluster_size_); c++)
      to_free.push_back(table_offset + c * cluster_size_);
    return Status::Ok();
  };
  for (const auto& [off, size] : stale_bitmap_tables_) RETURN_IF_ERROR(free_table(off, size));
  for (const LoadedBitmap& b : bitmaps_)
    if (b.consistent && b.table_offset != 0) RETURN_IF_ERROR(free_table(b.table_offset, b.table_size));
  for (uint64_t c = 0; c < DivRoundUp(bitmap_dir_size_, cluster_size_); c++)
    to_free.push_back(bitmap_dir_offset_ + c * cluster_size_);

  std::vector<DirEntry> entries;
  std::vector<std::byte> cluster(cluster_size_);
  for (const LoadedBitmap& b : bitmaps_) {
    if (!b.consistent) {
      entries.push_back(EntryOf(b.name, b.granularity_bits, b.flags, b.table_offset, b.table_size, b.extra));
      continue;
    }
    const uint64_t bytes = DivRoundUp(b.bits_for(size_), 8);
    const uint64_t table_size = std::max<uint64_t>(1, DivRoundUp(bytes, cluster_size_));
    std::vector<std::byte> table(table_size * 8);
    const uint64_t words_per_cluster = cluster_size_ / 8;
    for (uint64_t i = 0; i < table_size; i++) {
      const uint64_t first_word = i * words_per_cluster;
      if (!b.bits.AnyInWords(first_word, words_per_cluster)) continue;  // reads as zeros: no cluster
      std::fill(cluster.begin(), cluster.end(), std::byte{0});
      for (uint64_t j = 0; j < words_per_cluster && first_word + j < b.bits.word_count(); j++)
        StoreLE64(cluster.data() + j * 8, b.bits.Word(first_word + j));
      ASSIGN_OR_RETURN(uint64_t at, AllocClusters(1));
      RETURN_IF_ERROR(file_->PWrite(at, cluster, IoTag::kHeader));
      StoreBE64(table.data() + i * 8, at);
    }
    ASSIGN_OR_RETURN(uint64_t table_at, AllocClusters(DivRoundUp(table.size(), cluster_size_)));
    RETURN_IF_ERROR(file_->PWrite(table_at, table, IoTag::kHeader));
    entries.push_back(EntryOf(b.name, b.granularity_bits, b.flags & ~kBitmapInUse, table_at,
                              static_cast<uint32_t>(table_size), b.extra));
  }
  if (entries.empty()) {
    // No bitmap left: no extension, and the autoclear bit goes with it (qemu's way).
    header_.bitmaps_ext.reset();
    header_.autoclear_features &= ~kAutoclearBitmaps;
  } else {
    const std::vector<std::byte> dir = SerializeDirectory(entries);
    ASSIGN_OR_RETURN(uint64_t dir_at, AllocClusters(DivRoundUp(dir.size(), cluster_size_)));
    RETURN_IF_ERROR(file_->PWrite(dir_at, dir, IoTag::kHeader));
    if (!header_.bitmaps_ext) header_.bitmaps_ext.emplace(24);
    std::vector<std::byte>& e = *header_.bitmaps_ext;
    e.resize(24);
    StoreBE32(e.data(), static_cast<uint32_t>(entries.size()));
    StoreBE32(e.data() + 4, 0);
    StoreBE64(e.data() + 8, dir.size());
    StoreBE64(e.data() + 16, dir_at);
    header_.autoclear_features |= kAutoclearBitmaps;
  }
  // Everything new is durable, with its refcounts, before the header names it.
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(WriteHeader());
  RETURN_IF_ERROR(file_->Sync(true));
  bitmaps_loaded_ = false;
  stale_bitmap_tables_.clear();
  bitmap_dir_offset_ = bitmap_dir_size_ = 0;
  // Once each, even where a hostile directory made two bitmaps share clusters.
  std::sort(to_free.begin(), to_free.end());
  to_free.erase(std::unique(to_free.begin(), to_free.end()), to_free.end());
  for (uint64_t off : to_free) RETURN_IF_ERROR(FreeRange(off, cluster_size_));
  return FlushAll();
}

}  // namespace vimgfs::qcow2

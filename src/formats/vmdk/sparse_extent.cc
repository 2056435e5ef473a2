// Sparse extents: a grain directory (GD, in memory) of grain-table sector numbers, grain
// tables (GT, through the TableCache) of grain sector numbers. A GT entry of 0 is not
// allocated, 1 is a zeroed grain when the header has the zeroed-grain flag, anything else
// is the sector where the grain starts (for compressed grains: its marker).
//
// Hosted sparse ("KDMV", versions 1-3) keeps a redundant GD and GTs, updated alongside the
// primary ones. ESX sparse ("COWD") is read-only here.
//
// Write order (crash-safe): the grain's data is written by the engine, and synced before
// any GT holding its entry is written (DependsOnFlush); a new GT is written before the GD
// entry pointing at it (the GD is written in Flush, after the GT cache).
#include <algorithm>
#include <cstring>

#include "formats/vmdk/vmdk_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vmdk {
namespace {

struct SparseParams {
  uint64_t capacity_sectors = 0;
  uint64_t grain_sectors = 0;
  uint32_t gtes = 0;
  uint64_t gd_entries = 0;
  uint64_t gd_offset = 0;   // bytes
  uint64_t rgd_offset = 0;  // bytes, 0: none
  bool zero_grain = false;
  bool compressed = false;
  bool markers = false;
  bool stream = false;  // createType streamOptimized: read-only in place
};

class SparseExtent final : public Extent {
 public:
  SparseExtent(File* file, std::unique_ptr<File> owned, const SparseParams& p, uint64_t file_size,
               uint64_t cache_bytes)
      : file_(file),
        owned_(std::move(owned)),
        p_(p),
        grain_(p.grain_sectors * kSector),
        gt_bytes_(uint64_t{p.gtes} * 4),
        cache_(file, static_cast<uint32_t>(gt_bytes_),
               std::max<uint64_t>(4, cache_bytes / std::max<uint64_t>(gt_bytes_, 1)), IoTag::kGrainTable),
        file_size_(file_size),
        next_alloc_(AlignUp(file_size, kSector)) {}

  std::vector<uint32_t> gd, rgd;

  File* file() override { return file_; }
  uint64_t grain_bytes() const override { return grain_; }
  bool compressed() const override { return p_.compressed; }

  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    const size_t first = out->size();
    auto push = [&](const Mapping& m) {
      if (out->size() > first) {
        Mapping& b = out->back();
        bool same =
            b.kind == m.kind && (m.kind == Mapping::Kind::kUnallocated || m.kind == Mapping::Kind::kZero ||
                                 (m.kind == Mapping::Kind::kData &&
                                  b.host_offset + b.length == m.host_offset && b.writable == m.writable));
        if (same) {
          b.length += m.length;
          return;
        }
      }
      out->push_back(m);
    };
    const uint64_t span = grain_ * p_.gtes;  // guest bytes one GT covers
    while (len > 0) {
      uint64_t g = off / grain_;
      uint64_t gi = g / p_.gtes;
      Mapping m;
      if (gi >= gd.size() || gd[gi] == 0) {
        // No grain table: the rest of its span is unallocated.
        m.length = std::min(len, (gi + 1) * span - off);
        push(m);
        off += m.length;
        len -= m.length;
        continue;
      }
      ASSIGN_OR_RETURN(uint32_t entry, GetEntry(g));
      uint64_t in = off - g * grain_;
      m.length = std::min(len, grain_ - in);
      if (entry == 0) {
        m.kind = Mapping::Kind::kUnallocated;
      } else if (entry == kGteZeroed && p_.zero_grain) {
        m.kind = Mapping::Kind::kZero;
      } else if (p_.compressed) {
        m.kind = Mapping::Kind::kCompressed;
        m.file = file_;
        m.host_offset = uint64_t{entry} * kSector + (p_.markers ? kGrainMarkerBytes : 0);
        // Any valid zlib stream of a grain fits in this (zlib's compressBound is smaller).
        m.compressed_length = grain_ + grain_ / 256 + kSector;
        m.unit_guest_offset = g * grain_;
        m.unit_size = static_cast<uint32_t>(grain_);
        m.codec = Codec::kZlib;
      } else {
        m.kind = Mapping::Kind::kData;
        m.file = file_;
        m.host_offset = uint64_t{entry} * kSector + in;
        m.writable = !read_only;
      }
      push(m);
      off += m.length;
      len -= m.length;
    }
    return Status::Ok();
  }

  Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) override {
    if (read_only) {
      if (p_.stream)
        return Status::ReadOnly(
            "'{}': a streamOptimized VMDK cannot be written in place; mount "
            "it with --overlay FILE or convert it to monolithicSparse first",
            file_->path());
      return Status::ReadOnly("'{}' is opened read-only", file_->path());
    }
    uint64_t g = off / grain_;
    uint64_t host = next_alloc_;
    auto end = CheckedAdd(host, grain_);
    if (!end || *end / kSector > UINT32_MAX)
      return Status::NoSpace("'{}': the sparse extent is full (grain sectors are 32-bit)", file_->path());
    next_alloc_ = *end;
    WritePlan plan;
    plan.guest_offset = g * grain_;
    plan.length = std::min(grain_, length - g * grain_);
    plan.file = file_;
    plan.host_offset = host;
    plan.cookie[1] = g;
    return plan;
  }

  Status CommitWrite(const WritePlan& plan) override {
    file_size_ = std::max(file_size_, plan.host_offset + plan.length);
    // The data is written; it must be durable before a GT entry points at it.
    cache_.DependsOnFlush();
    return SetEntry(plan.cookie[1], static_cast<uint32_t>(plan.host_offset / kSector));
  }

  Status ZeroRange(uint64_t off, uint64_t len) override {
    if (read_only || !p_.zero_grain)
      return Status::Unsupported("'{}': no zeroed-grain support", file_->path());
    if (off % grain_ != 0 || (len % grain_ != 0 && off + len != length))
      return Status::Unsupported("unaligned zero range");
    for (uint64_t g = off / grain_; g * grain_ < off + len; g++) {
      RETURN_IF_ERROR(SetEntry(g, kGteZeroed));
    }
    return Status::Ok();
  }

  Status WriteBack() override {
    if (read_only) return Status::Ok();
    RETURN_IF_ERROR(cache_.Flush());  // new grain tables land before directory entries name them
    for (auto* dir : {&rgd, &gd}) {
      if (dir->empty()) continue;
      uint64_t base = dir == &gd ? p_.gd_offset : p_.rgd_offset;
      // One sector of directory entries (128) at a time, where any changed.
      for (size_t chunk = 0; chunk * 128 < dir->size(); chunk++) {
        bool dirty = false;
        for (size_t i = chunk * 128; i < std::min(dir->size(), chunk * 128 + 128); i++)
          dirty |= gd_dirty_.size() > i && gd_dirty_[i];
        if (!dirty) continue;
        std::byte sector[kSector] = {};
        size_t n = std::min<size_t>(128, dir->size() - chunk * 128);
        for (size_t i = 0; i < n; i++) StoreLE32(sector + 4 * i, (*dir)[chunk * 128 + i]);
        RETURN_IF_ERROR(file_->PWrite(base + chunk * kSector, std::span(sector, 4 * n), IoTag::kGrainDir));
      }
    }
    std::fill(gd_dirty_.begin(), gd_dirty_.end(), false);
    return Status::Ok();
  }
  Status SyncFile() override { return read_only ? Status::Ok() : file_->Sync(true); }

  // qemu's check: every allocated grain must start before the end of the file.
  Result<std::string> CheckGrains(uint64_t guest_start) override {
    ASSIGN_OR_RETURN(uint64_t size, file_->Size());
    uint64_t grains = DivRoundUp(length, grain_);
    for (uint64_t g = 0; g < grains; g++) {
      uint64_t gi = g / p_.gtes;
      if (gi >= gd.size() || gd[gi] == 0) {
        g = (gi + 1) * p_.gtes - 1;
        continue;
      }
      auto entry = GetEntry(g);
      uint64_t sector = (guest_start + g * grain_) / kSector;
      if (!entry.ok()) return fmt::format("ERROR: could not get cluster_offset for sector {}", sector);
      if (*entry == 0 || (*entry == kGteZeroed && p_.zero_grain)) continue;
      if (uint64_t{*entry} * kSector >= size)
        return fmt::format("ERROR: cluster offset for sector {} points after EOF", sector);
    }
    return std::string();
  }

  Status ValidateTables() {
    for (auto* dir : {&gd, &rgd}) {
      for (uint32_t gt : *dir) {
        if (gt == 0) continue;
        if (uint64_t{gt} * kSector >= file_size_)
          return Status::Corrupt("'{}': grain table at {:#x} is past the end of the file ({} bytes)",
                                 file_->path(), uint64_t{gt} * kSector, file_size_);
      }
    }
    gd_dirty_.assign(gd.size(), false);
    return Status::Ok();
  }

 private:
  Result<uint32_t> GetEntry(uint64_t g) {
    uint64_t gi = g / p_.gtes;
    ASSIGN_OR_RETURN(TableRef t, cache_.Get(uint64_t{gd[gi]} * kSector));
    return LoadLE32(t.data() + 4 * (g % p_.gtes));
  }

  Status AllocateGt(uint64_t gi) {
    for (auto* dir : {&rgd, &gd}) {
      if (dir->empty()) continue;
      uint64_t off = next_alloc_;
      auto end = CheckedAdd(off, AlignUp(gt_bytes_, kSector));
      if (!end || *end / kSector > UINT32_MAX)
        return Status::NoSpace("'{}': the sparse extent is full", file_->path());
      next_alloc_ = *end;
      ASSIGN_OR_RETURN(TableRef t, cache_.GetEmpty(off));  // zeroed, dirty
      (*dir)[gi] = static_cast<uint32_t>(off / kSector);
    }
    gd_dirty_[gi] = true;
    return Status::Ok();
  }

  Status SetEntry(uint64_t g, uint32_t value) {
    uint64_t gi = g / p_.gtes;
    if (gi >= gd.size())
      return Status::Corrupt("'{}': grain {} is outside the grain directory", file_->path(), g);
    if (gd[gi] == 0 || (!rgd.empty() && rgd[gi] == 0)) {
      if (gd[gi] != 0 || (!rgd.empty() && rgd[gi] != 0))
        return Status::Corrupt("'{}': grain directories disagree at entry {}", file_->path(), gi);
      RETURN_IF_ERROR(AllocateGt(gi));
    }
    for (auto* dir : {&gd, &rgd}) {
      if (dir->empty()) continue;
      ASSIGN_OR_RETURN(TableRef t, cache_.Get(uint64_t{(*dir)[gi]} * kSector));
      StoreLE32(t.data() + 4 * (g % p_.gtes), value);
      t.MarkDirty();
    }
    return Status::Ok();
  }

  File* file_;
  std::unique_ptr<File> owned_;
  SparseParams p_;
  uint64_t grain_;
  uint64_t gt_bytes_;
  TableCache cache_;
  uint64_t file_size_;
  uint64_t next_alloc_;
  std::vector<bool> gd_dirty_;
};

Result<std::vector<uint32_t>> ReadDirectory(File& file, uint64_t offset, uint64_t entries, uint64_t file_size,
                                            const char* what) {
  uint64_t bytes = entries * 4;
  if (bytes > limits::kMaxMapBytes) return Status::InvalidFormat("'{}': L1 size too big", file.path());
  auto end = CheckedAdd(offset, bytes);
  if (!end || *end > file_size)
    return Status::InvalidFormat("'{}': {} at {:#x} ({} entries) is past the end of the file ({} bytes)",
                                 file.path(), what, offset, entries, file_size);
  std::vector<std::byte> raw(bytes);
  RETURN_IF_ERROR(file.PRead(offset, raw));
  std::vector<uint32_t> dir(entries);
  for (uint64_t i = 0; i < entries; i++) dir[i] = LoadLE32(raw.data() + 4 * i);
  return dir;
}

Result<SparseOpenResult> OpenCowd(File* file, std::unique_ptr<File> owned, const std::byte* h,
                                  uint64_t file_size, uint64_t cache_bytes) {
  // ESX sparse: u32 version, flags, numSectors, grainSize, gdOffset, numGDEntries, freeSector.
  SparseParams p;
  p.capacity_sectors = LoadLE32(h + 12);
  p.grain_sectors = LoadLE32(h + 16);
  p.gd_offset = uint64_t{LoadLE32(h + 20)} * kSector;
  p.gd_entries = LoadLE32(h + 24);
  p.gtes = kCowdGtesPerGt;
  const std::string& path = file->path();
  if (p.grain_sectors == 0 || p.grain_sectors > 0x200000)
    return Status::InvalidFormat("'{}': Invalid granularity, image may be corrupt", path);
  if (!IsPowerOfTwo(p.grain_sectors) || p.grain_sectors * kSector > kMaxGrainBytes)
    return Status::Unsupported("'{}': grain size of {} sectors is not supported", path, p.grain_sectors);
  if (p.gd_entries > kMaxGdEntries) return Status::InvalidFormat("'{}': L1 size too big", path);
  uint64_t need = DivRoundUp(p.capacity_sectors, p.grain_sectors * p.gtes);
  if (need > p.gd_entries)
    return Status::InvalidFormat("'{}': the grain directory ({} entries) does not cover the disk", path,
                                 p.gd_entries);
  ASSIGN_OR_RETURN(auto gd, ReadDirectory(*file, p.gd_offset, p.gd_entries, file_size, "grain directory"));
  auto ext = std::make_unique<SparseExtent>(file, std::move(owned), p, file_size, cache_bytes);
  ext->gd = std::move(gd);
  ext->length = p.capacity_sectors * kSector;
  ext->read_only = true;
  RETURN_IF_ERROR(ext->ValidateTables());
  SparseOpenResult r;
  r.is_cowd = true;
  r.extent = std::move(ext);
  return r;
}

}  // namespace

Result<std::string> ReadEmbeddedDescriptor(File& file, const SparseHeader& h) {
  if (h.desc_offset == 0) return std::string();
  ASSIGN_OR_RETURN(uint64_t size, file.Size());
  if (h.desc_offset > size / kSector) return std::string();  // qemu reads nothing there
  uint64_t off = h.desc_offset * kSector;
  uint64_t n = std::min<uint64_t>(limits::kMaxDescriptorBytes, size - off);
  if (h.desc_size != 0 && h.desc_size < n / kSector + 1) n = std::min(n, h.desc_size * kSector);
  std::string text(n, '\0');
  RETURN_IF_ERROR(file.PRead(off, std::as_writable_bytes(std::span(text.data(), text.size()))));
  auto nul = text.find('\0');
  if (nul != std::string::npos) text.resize(nul);
  return text;
}

Result<SparseOpenResult> OpenSparseExtent(File* file, std::unique_ptr<File> owned, bool read_only,
                                          uint64_t cache_bytes) {
  const std::string path = file->path();
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::byte raw[kSector];
  if (file_size < kSector) return Status::InvalidFormat("'{}': the sparse extent header is truncated", path);
  RETURN_IF_ERROR(file->PRead(0, raw));
  uint32_t magic = LoadLE32(raw);
  if (magic == kMagicCowd) return OpenCowd(file, std::move(owned), raw, file_size, cache_bytes);
  if (magic != kMagicKdmv) return Status::InvalidFormat("'{}': not a VMDK sparse extent (bad magic)", path);

  SparseHeader h = DecodeSparseHeader(raw);
  SparseHeader first = h;
  if (h.gd_offset == kGdAtEnd) {
    ASSIGN_OR_RETURN(h, ReadFooterHeader(*file));
  }
  if (h.version > 3) return Status::Unsupported("'{}': Unsupported VMDK version {}", path, h.version);
  if (h.num_gtes_per_gt > kMaxGtesPerGt) return Status::InvalidFormat("'{}': L2 table size too big", path);
  if (h.num_gtes_per_gt == 0 || h.grain_size == 0)
    return Status::InvalidFormat("'{}': L1 entry size is invalid", path);
  if (h.grain_size > 0x200000)
    return Status::InvalidFormat("'{}': Invalid granularity, image may be corrupt", path);

  SparseOpenResult r;
  r.header = h;
  ASSIGN_OR_RETURN(r.embedded_desc, ReadEmbeddedDescriptor(*file, first));
  if (h.capacity == 0 && h.desc_offset != 0) return r;  // a descriptor container (caller)

  uint64_t l1_entry_sectors = uint64_t{h.num_gtes_per_gt} * h.grain_size;
  uint64_t gd_entries = h.capacity / l1_entry_sectors + (h.capacity % l1_entry_sectors != 0);
  if (gd_entries > kMaxGdEntries) return Status::InvalidFormat("'{}': L1 size too big", path);
  if (h.capacity > limits::kMaxVirtualSize / kSector)
    return Status::InvalidFormat("'{}': capacity of {} sectors is too large", path, h.capacity);
  if (!IsPowerOfTwo(h.grain_size) || h.grain_size * kSector > kMaxGrainBytes)
    return Status::Unsupported("'{}': grain size of {} sectors is not supported", path, h.grain_size);
  if (h.overhead > file_size / kSector)
    return Status::InvalidFormat("'{}': File truncated, expecting at least {} bytes", path,
                                 h.overhead > UINT64_MAX / kSector ? UINT64_MAX : h.overhead * kSector);

  SparseParams p;
  p.capacity_sectors = h.capacity;
  p.grain_sectors = h.grain_size;
  p.gtes = h.num_gtes_per_gt;
  p.gd_entries = gd_entries;
  p.zero_grain = (h.flags & kFlagZeroedGrain) != 0;
  p.compressed = h.compress_algorithm == kCompressDeflate;
  p.markers = (h.flags & kFlagMarkers) != 0;
  p.stream = p.compressed;
  if (h.gd_offset > UINT64_MAX / kSector)
    return Status::InvalidFormat("'{}': grain directory offset is out of range", path);
  p.gd_offset = h.gd_offset * kSector;
  bool redundant = (h.flags & kFlagRedundantGt) != 0;
  if (redundant) {
    if (h.rgd_offset == 0 || h.rgd_offset > UINT64_MAX / kSector)
      return Status::InvalidFormat("'{}': redundant grain directory offset is out of range", path);
    p.rgd_offset = h.rgd_offset * kSector;
  }

  ASSIGN_OR_RETURN(auto gd, ReadDirectory(*file, p.gd_offset, gd_entries, file_size, "grain directory"));
  std::vector<uint32_t> rgd;
  if (redundant) {
    ASSIGN_OR_RETURN(rgd,
                     ReadDirectory(*file, p.rgd_offset, gd_entries, file_size, "redundant grain directory"));
  }
  auto ext = std::make_unique<SparseExtent>(file, std::move(owned), p, file_size, cache_bytes);
  ext->gd = std::move(gd);
  ext->rgd = std::move(rgd);
  ext->length = h.capacity * kSector;
  // Version 3 adds change tracking we would not maintain (qemu: must be read only).
  ext->read_only = read_only || p.compressed || h.version == 3;
  RETURN_IF_ERROR(ext->ValidateTables());
  r.extent = std::move(ext);
  return r;
}

}  // namespace vimgfs::vmdk

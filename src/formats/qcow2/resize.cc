// qcow2 whole-image operations: resize, backing file rewrite, internal snapshots.
// Each one flushes first and orders its own writes: new structures are written and
// synced before the header points at them; old ones are freed after.
#include <algorithm>
#include <chrono>
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

std::vector<std::byte> SerializeL1(const std::vector<uint64_t>& l1) {
  std::vector<std::byte> raw(l1.size() * 8);
  for (size_t i = 0; i < l1.size(); i++) StoreBE64(raw.data() + i * 8, l1[i]);
  return raw;
}

}  // namespace

// Writes a new L1 table of `entries` entries (the current ones copied), points the header
// at it and frees the old one.
static Status ReplaceL1(Qcow2Map& m, uint64_t entries) {
  std::vector<uint64_t> l1 = m.l1_;
  l1.resize(entries, 0);
  uint64_t bytes = std::max<uint64_t>(entries * 8, 8);
  uint64_t clusters = DivRoundUp(bytes, m.cluster_size_);
  ASSIGN_OR_RETURN(uint64_t off, m.AllocClusters(clusters));
  RETURN_IF_ERROR(m.FlushAll());
  auto raw = SerializeL1(l1);
  raw.resize(clusters * m.cluster_size_);
  RETURN_IF_ERROR(m.file_->PWrite(off, raw, IoTag::kL1));
  RETURN_IF_ERROR(m.file_->Sync(true));
  uint64_t old_off = m.header_.l1_table_offset;
  uint64_t old_bytes = uint64_t{m.header_.l1_size} * 8;
  m.header_.l1_table_offset = off;
  m.header_.l1_size = static_cast<uint32_t>(entries);
  m.l1_ = std::move(l1);
  m.l1_offset_ = off;
  m.l1_dirty_ = false;
  RETURN_IF_ERROR(m.WriteHeader());
  RETURN_IF_ERROR(m.file_->Sync(true));
  if (old_off && old_bytes) RETURN_IF_ERROR(m.FreeRange(old_off, old_bytes));
  return m.FlushAll();
}

Status Qcow2Map::Resize(uint64_t new_size, bool allow_shrink) {
  RETURN_IF_ERROR(CheckWritable());
  if (new_size % 512)
    return Status::InvalidArgument("'{}': the new size must be a multiple of 512", path_);
  if (new_size > limits::kMaxVirtualSize)
    return Status::InvalidArgument("'{}': new size {} is too large", path_, new_size);
  if (new_size < size_) {
    if (!allow_shrink)
      return Status::InvalidArgument("Use the --shrink option to perform a shrink operation.");
    // Free every whole cluster past the new end, and L2 tables left with nothing.
    uint64_t first = DivRoundUp(new_size, cluster_size_);
    uint64_t end = DivRoundUp(size_, cluster_size_);
    for (uint64_t c = first; c < end;) {
      uint64_t l1i = L1Index(c);
      uint64_t table_end = std::min(end, (l1i + 1) * l2_entries_);
      ASSIGN_OR_RETURN(uint64_t l2_off, L2Offset(l1i));
      if (l2_off) {
        ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, true));
        for (uint64_t i = c; i < table_end; i++) {
          uint64_t bm;
          uint64_t e = LoadL2(l2, L2Index(i), &bm);
          if (e == 0 && bm == 0) continue;
          StoreL2(l2, L2Index(i), 0, 0);
          if (e & ~(kFlagCopied | kFlagZero)) RETURN_IF_ERROR(FreeL2Entry(e));
        }
        if (L2Index(c) == 0) {
          // The whole table is past the end: unlink and free it.
          uint64_t off = l2.offset();
          l2.Release();
          RETURN_IF_ERROR(l2_cache_->Flush());
          l1_[l1i] = 0;
          RETURN_IF_ERROR(WriteL1());
          RETURN_IF_ERROR(file_->Sync(true));
          l2_cache_->Forget(off);
          RETURN_IF_ERROR(FreeRange(off, cluster_size_));
        }
      }
      c = table_end;
    }
  } else {
    uint64_t need = L1EntriesFor(new_size);
    if (need * 8 > limits::kMaxL1Bytes)
      return Status::InvalidArgument("'{}': new size {} needs an L1 table larger than {} bytes", path_,
                                     new_size, limits::kMaxL1Bytes);
    if (need > l1_.size()) RETURN_IF_ERROR(ReplaceL1(*this, need));
    if (data_file_) {
      ASSIGN_OR_RETURN(uint64_t dsize, data_file_->Size());
      if (dsize < new_size) RETURN_IF_ERROR(data_file_->Truncate(new_size));
    }
  }
  RETURN_IF_ERROR(FlushAll());
  uint64_t old_size = size_;
  header_.size = new_size;
  size_ = new_size;
  // Space a grow exposes must not show a (larger) backing file's data: zero-flag the new
  // whole clusters, as qemu does.
  uint64_t zero_from = AlignUp(old_size, cluster_size_);
  if (new_size > zero_from && !header_.backing_file.empty() && v3_)
    RETURN_IF_ERROR(ZeroRange(zero_from, new_size - zero_from, false));
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(WriteHeader());
  return file_->Sync(true);
}

Status Qcow2Map::SetBacking(const std::optional<BackingRef>& ref) {
  RETURN_IF_ERROR(CheckWritable());
  if (ref && (header_.autoclear_features & kAutoclearDataFileRaw))
    return Status::InvalidArgument("'{}': an image with a raw external data file cannot have a backing file",
                                   path_);
  if (ref && ref->name.size() > limits::kMaxBackingNameBytes)
    return Status::InvalidArgument("'{}': backing file name is too long", path_);
  Header h = header_;
  h.backing_file = ref ? ref->name : "";
  h.backing_format.reset();
  if (ref && !ref->format.empty()) h.backing_format = ref->format;
  h.backing_file_offset = 0;
  h.backing_file_size = 0;
  RETURN_IF_ERROR(SerializeHeader(h).status().WithContext("'{}'", path_));
  RETURN_IF_ERROR(FlushAll());
  header_ = std::move(h);
  RETURN_IF_ERROR(WriteHeader());
  return file_->Sync(true);
}

// ---- snapshots ----

namespace {

Result<std::vector<uint64_t>> ReadL1(Qcow2Map& m, uint64_t off, uint64_t entries) {
  std::vector<std::byte> raw(entries * 8);
  RETURN_IF_ERROR(m.file_->PRead(off, raw));
  std::vector<uint64_t> l1(entries);
  for (uint64_t i = 0; i < entries; i++) l1[i] = LoadBE64(raw.data() + i * 8);
  return l1;
}

// Adds delta to the refcount of every L2 table and data cluster reachable from l1.
Status UpdateTreeRefcounts(Qcow2Map& m, const std::vector<uint64_t>& l1, int64_t delta) {
  for (uint64_t i = 0; i < l1.size(); i++) {
    uint64_t l2_off = L1EntryOffset(l1[i]);
    if (!l2_off) continue;
    RETURN_IF_ERROR(m.ValidateTableOffset(l2_off, "L2 table"));
    {
      ASSIGN_OR_RETURN(TableRef t, m.l2_cache_->Get(l2_off));
      for (uint64_t j = 0; j < m.l2_entries_; j++) {
        uint64_t bm;
        uint64_t e = m.LoadL2(t, j, &bm);
        if (IsCompressed(e)) {
          uint64_t off = CompressedHostOffset(e, m.cluster_bits_);
          uint64_t len = CompressedLength(e, m.cluster_bits_);
          for (uint64_t c = off >> m.cluster_bits_; c <= (off + len - 1) >> m.cluster_bits_; c++)
            RETURN_IF_ERROR(m.AddRefcount(c, delta));
        } else if (L2EntryOffset(e)) {
          RETURN_IF_ERROR(m.AddRefcount(L2EntryOffset(e) >> m.cluster_bits_, delta));
        }
      }
    }
    RETURN_IF_ERROR(m.AddRefcount(l2_off >> m.cluster_bits_, delta));
    ASSIGN_OR_RETURN(uint64_t rc, m.GetRefcount(l2_off >> m.cluster_bits_));
    if (rc == 0) m.l2_cache_->Forget(l2_off);
  }
  return Status::Ok();
}

// Makes the COPIED flags of the active L1 and its L2 tables say "refcount is one".
Status RefreshCopiedFlags(Qcow2Map& m) {
  for (uint64_t i = 0; i < m.l1_.size(); i++) {
    uint64_t l2_off = L1EntryOffset(m.l1_[i]);
    if (!l2_off) continue;
    ASSIGN_OR_RETURN(uint64_t rc, m.GetRefcount(l2_off >> m.cluster_bits_));
    uint64_t want = rc == 1 ? (m.l1_[i] | kFlagCopied) : (m.l1_[i] & ~kFlagCopied);
    if (want != m.l1_[i]) {
      m.l1_[i] = want;
      m.l1_dirty_ = true;
    }
    ASSIGN_OR_RETURN(TableRef t, m.l2_cache_->Get(l2_off));
    for (uint64_t j = 0; j < m.l2_entries_; j++) {
      uint64_t bm;
      uint64_t e = m.LoadL2(t, j, &bm);
      if (IsCompressed(e) || !L2EntryOffset(e)) continue;
      ASSIGN_OR_RETURN(uint64_t drc, m.GetRefcount(L2EntryOffset(e) >> m.cluster_bits_));
      uint64_t ne = drc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied);
      if (ne != e) m.StoreL2(t, j, ne, bm);
    }
  }
  return Status::Ok();
}

// Writes the snapshot table to new clusters, points the header at it, frees the old one.
Status WriteSnapshotTable(Qcow2Map& m, std::vector<Snapshot> snaps) {
  std::vector<std::byte> raw = SerializeSnapshotTable(snaps);
  if (raw.size() > limits::kMaxSnapshotTableBytes)
    return Status::NoSpace("'{}': snapshot table would be too large", m.path_);
  uint64_t new_off = 0;
  if (!raw.empty()) {
    uint64_t clusters = DivRoundUp(raw.size(), m.cluster_size_);
    ASSIGN_OR_RETURN(new_off, m.AllocClusters(clusters));
    RETURN_IF_ERROR(m.FlushAll());
    RETURN_IF_ERROR(m.file_->PWrite(new_off, raw, IoTag::kOther));
  }
  RETURN_IF_ERROR(m.FlushAll());
  uint64_t old_off = m.header_.snapshots_offset;
  uint64_t old_bytes = SerializeSnapshotTable(m.snapshots_).size();
  // The stored entries may be shorter than what we write (less extra data): recount.
  old_bytes = 0;
  for (const Snapshot& s : m.snapshots_) old_bytes += AlignUp(40 + s.extra.size() + s.id.size() + s.name.size(), 8);
  m.header_.snapshots_offset = new_off;
  m.header_.nb_snapshots = static_cast<uint32_t>(snaps.size());
  RETURN_IF_ERROR(m.WriteHeader());
  RETURN_IF_ERROR(m.file_->Sync(true));
  m.snapshots_ = std::move(snaps);
  // Re-parse-equivalent: what we wrote has at least 24 bytes of extra data.
  for (Snapshot& s : m.snapshots_) {
    if (s.extra.size() < 24) s.extra.resize(24);
  }
  if (old_off && old_bytes) RETURN_IF_ERROR(m.FreeRange(old_off, old_bytes));
  return m.FlushAll();
}

const Snapshot* FindSnapshot(const std::vector<Snapshot>& snaps, const std::string& name) {
  for (const Snapshot& s : snaps)
    if (s.id == name) return &s;
  for (const Snapshot& s : snaps)
    if (s.name == name) return &s;
  return nullptr;
}

}  // namespace

Status Qcow2Map::SnapshotCreate(const std::string& name) {
  RETURN_IF_ERROR(CheckWritable());
  if (header_.has_data_file())
    return Status::Unsupported("'{}': internal snapshots are not supported with an external data file", path_);
  if (name.size() > 0xffff) return Status::InvalidArgument("snapshot name is too long");
  for (const Snapshot& s : snapshots_)
    if (s.name == name)
      return Status::InvalidArgument("Could not create snapshot '{}': snapshot with the same name exists", name);
  if (refcount_max_ < 2)
    return Status::Unsupported("'{}': a refcount width of 1 bit cannot share clusters with a snapshot",
                               path_);
  if (snapshots_.size() >= limits::kMaxSnapshots)
    return Status::NoSpace("'{}': too many snapshots", path_);
  RETURN_IF_ERROR(FlushAll());
  // The snapshot's L1: a copy of the active one.
  uint64_t clusters = DivRoundUp(std::max<uint64_t>(l1_.size() * 8, 8), cluster_size_);
  ASSIGN_OR_RETURN(uint64_t l1_off, AllocClusters(clusters));
  RETURN_IF_ERROR(UpdateTreeRefcounts(*this, l1_, +1));
  RETURN_IF_ERROR(RefreshCopiedFlags(*this));
  auto raw = SerializeL1(l1_);
  raw.resize(clusters * cluster_size_);
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(file_->PWrite(l1_off, raw, IoTag::kL1));
  RETURN_IF_ERROR(file_->Sync(true));

  Snapshot s;
  s.l1_table_offset = l1_off;
  s.l1_size = static_cast<uint32_t>(l1_.size());
  uint64_t max_id = 0;
  for (const Snapshot& o : snapshots_) max_id = std::max<uint64_t>(max_id, strtoull(o.id.c_str(), nullptr, 10));
  s.id = std::to_string(max_id + 1);
  s.name = name;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  s.date_sec = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(now).count());
  s.date_nsec = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() % 1000000000);
  s.disk_size = size_;
  s.has_disk_size = true;
  s.icount = UINT64_MAX;
  s.extra.resize(24);
  std::vector<Snapshot> snaps = snapshots_;
  snaps.push_back(std::move(s));
  return WriteSnapshotTable(*this, std::move(snaps));
}

Status Qcow2Map::SnapshotApply(const std::string& name) {
  RETURN_IF_ERROR(CheckWritable());
  const Snapshot* s = FindSnapshot(snapshots_, name);
  if (!s) return Status::NotFound("Could not apply snapshot '{}': snapshot not found", name);
  uint64_t new_size = s->disk_size;
  if (L1EntriesFor(new_size) > s->l1_size)
    return Status::Corrupt("'{}': snapshot '{}' has an L1 table too small for its size", path_, name);
  RETURN_IF_ERROR(FlushAll());
  ASSIGN_OR_RETURN(std::vector<uint64_t> snap_l1, ReadL1(*this, s->l1_table_offset, s->l1_size));
  // Take the snapshot's references first, then drop the current state's.
  RETURN_IF_ERROR(UpdateTreeRefcounts(*this, snap_l1, +1));
  std::vector<uint64_t> old_l1 = l1_;
  if (snap_l1.size() > l1_.size()) {
    RETURN_IF_ERROR(ReplaceL1(*this, snap_l1.size()));
  }
  for (uint64_t i = 0; i < l1_.size(); i++) l1_[i] = i < snap_l1.size() ? snap_l1[i] : 0;
  l1_dirty_ = true;
  RETURN_IF_ERROR(RefreshCopiedFlags(*this));
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(UpdateTreeRefcounts(*this, old_l1, -1));
  RETURN_IF_ERROR(RefreshCopiedFlags(*this));
  header_.size = new_size;
  size_ = new_size;
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(WriteHeader());
  return file_->Sync(true);
}

Status Qcow2Map::SnapshotDelete(const std::string& name) {
  RETURN_IF_ERROR(CheckWritable());
  const Snapshot* s = FindSnapshot(snapshots_, name);
  if (!s) return Status::NotFound("Could not delete snapshot '{}': snapshot not found", name);
  Snapshot victim = *s;
  std::vector<Snapshot> snaps;
  for (const Snapshot& o : snapshots_)
    if (&o != s) snaps.push_back(o);
  RETURN_IF_ERROR(FlushAll());
  ASSIGN_OR_RETURN(std::vector<uint64_t> snap_l1, ReadL1(*this, victim.l1_table_offset, victim.l1_size));
  // Unlink first; the references go after the table no longer names the snapshot.
  RETURN_IF_ERROR(WriteSnapshotTable(*this, std::move(snaps)));
  RETURN_IF_ERROR(UpdateTreeRefcounts(*this, snap_l1, -1));
  if (victim.l1_size) RETURN_IF_ERROR(FreeRange(victim.l1_table_offset, uint64_t{victim.l1_size} * 8));
  RETURN_IF_ERROR(RefreshCopiedFlags(*this));
  return FlushAll();
}

}  // namespace vimgfs::qcow2

// qcow2 whole-image operations: resize, backing file rewrite, internal snapshots.
// Each one flushes first and orders its own writes so that a crash at any point leaves
// the image as before or after, with leaks at worst: new structures are written and
// synced before the header points at them, old ones freed after. Snapshots switch the
// whole metadata in one header write (MetadataSwitch).
#include <algorithm>
#include <cerrno>
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

// Zeros for what a grow adds over a longer backing file, as qemu's truncate with
// BDRV_REQ_ZERO_WRITE gives them: zero flags from the first (sub)cluster boundary past the
// old end on, and zeros written in place over the rest of the old last (sub)cluster, whose
// bytes past the old end may still hold data from before a shrink. The engine
// (Image::Resize) has made that (sub)cluster writable data; size_ is the new size already,
// the header not yet. With `homes`, each whole cluster gets a host cluster under its zero
// flag, L2 table before data as qemu's metadata preallocation lays them out.
Status Qcow2Map::ZeroGrown(uint64_t old_size, uint64_t new_size, bool homes) {
  const uint64_t unit = extended_l2_ ? subcluster_size_ : cluster_size_;
  const uint64_t zero_start = AlignUp(old_size, unit);
  if (zero_start > old_size) {
    const uint64_t end = std::min(zero_start, new_size);
    std::vector<Mapping> maps;
    RETURN_IF_ERROR(Lookup(old_size, end - old_size, &maps));
    uint64_t pos = old_size;
    for (const Mapping& m : maps) {
      if (m.kind == Mapping::Kind::kData && m.writable) {
        std::vector<std::byte> zeros(m.length);
        RETURN_IF_ERROR(m.file->PWrite(m.host_offset, zeros, IoTag::kData));
      } else if (m.kind != Mapping::Kind::kZero) {
        return Status::Corrupt("'{}': the cluster at {:#x} cannot be zeroed in place", path_, pos);
      }
      pos += m.length;
    }
    if (data_file_) RETURN_IF_ERROR(data_file_->Sync(true));
  }
  if (new_size <= zero_start) return Status::Ok();
  uint64_t whole = AlignUp(zero_start, cluster_size_);
  if (whole > zero_start) {
    // Extended L2: the rest of the old last cluster gets zero subclusters.
    const uint64_t cluster = ClusterIndex(zero_start);
    const uint64_t cstart = cluster << cluster_bits_;
    int first = static_cast<int>((zero_start - cstart) / subcluster_size_);
    int last = static_cast<int>(DivRoundUp(std::min(new_size, whole) - cstart, subcluster_size_));
    ASSIGN_OR_RETURN(TableRef l2, GetL2(L1Index(cluster), true));
    uint64_t bm;
    uint64_t e = LoadL2(l2, L2Index(cluster), &bm);
    if (IsCompressed(e))  // no subclusters to zero (qemu's words)
      return Status::Unsupported("Failed to zero out new clusters: Operation not supported");
    uint32_t mask = SubMask(first, last);
    StoreL2(l2, L2Index(cluster), e, MakeSubBitmap(SubAllocBits(bm) & ~mask, SubZeroBits(bm) | mask));
  }
  if (new_size <= whole) return Status::Ok();
  if (!homes) return ZeroRange(whole, new_size - whole, false);
  const uint64_t end_cluster = DivRoundUp(new_size, cluster_size_);
  uint64_t file_end = 0;
  for (uint64_t c = ClusterIndex(whole); c < end_cluster;) {
    const uint64_t l1i = L1Index(c);
    const uint64_t table_end = std::min(end_cluster, (l1i + 1) * l2_entries_);
    ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, true));
    uint64_t host = c << cluster_bits_;  // an external data file: the guest offset
    if (!header_.has_data_file()) {
      ASSIGN_OR_RETURN(host, AllocClusters(table_end - c));
      RETURN_IF_ERROR(l2_cache_->SetDependency(ref_cache_.get()));
      file_end = host + ((table_end - c) << cluster_bits_);
    }
    for (; c < table_end; c++, host += cluster_size_) {
      uint64_t bm;
      uint64_t old = LoadL2(l2, L2Index(c), &bm);
      if (extended_l2_) {
        StoreL2(l2, L2Index(c), host | kFlagCopied, MakeSubBitmap(0, 0xffffffffu));
      } else {
        StoreL2(l2, L2Index(c), host | kFlagCopied | kFlagZero, 0);
      }
      if (old & ~(kFlagCopied | kFlagZero)) RETURN_IF_ERROR(FreeL2Entry(old));
    }
  }
  // Every cluster inside the file, as qemu-img check wants them.
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  if (file_end > file_size) RETURN_IF_ERROR(file_->Truncate(file_end));
  return Status::Ok();
}

// Maps the clusters a grow adds to the same offsets of a raw external data file (qemu
// preallocates their metadata), so the image keeps reading what the data file holds.
Status Qcow2Map::MapRawDataFile(uint64_t old_size, uint64_t new_size) {
  const uint64_t end = DivRoundUp(new_size, cluster_size_);
  for (uint64_t c = ClusterIndex(old_size); c < end; c++) {
    ASSIGN_OR_RETURN(TableRef l2, GetL2(L1Index(c), true));
    uint64_t bm;
    if (L2EntryOffset(LoadL2(l2, L2Index(c), &bm)) != 0) continue;
    // Subclusters stay unallocated, as in qemu's preallocation.
    StoreL2(l2, L2Index(c), (c << cluster_bits_) | kFlagCopied, 0);
  }
  return Status::Ok();
}

// After a shrink's frees, what qemu does too (iotests 163, 250): the host space of data
// clusters nothing references any more is given back (punched; qemu leaves freed L2 tables
// be), refcount blocks left counting nothing
// leave the refcount table, and the file is cut after the last cluster in use. Each step
// runs once the one before is durable, and touches only clusters nothing refers to: a
// crash leaves leaks at worst.
Status Qcow2Map::TrimAfterShrink(const std::vector<uint64_t>& freed) {
  RETURN_IF_ERROR(FlushAll());
  // Runs of neighbouring clusters go as one punch, as qemu merges its discards (the file
  // system then splits no extent more than it must).
  std::vector<uint64_t> gone;
  for (uint64_t c : freed) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(c));
    if (rc == 0) gone.push_back(c);  // else still shared with a snapshot
  }
  std::sort(gone.begin(), gone.end());
  for (size_t i = 0; i < gone.size();) {
    size_t j = i + 1;
    while (j < gone.size() && gone[j] == gone[j - 1] + 1) j++;
    Status s = file_->PunchHole(gone[i] << cluster_bits_, (j - i) << cluster_bits_);
    if (!s.ok() && s.kind() != ErrorKind::kUnsupported) return s;
    i = j;
  }

  // Refcount blocks that count nothing but (perhaps) themselves.
  std::vector<uint64_t> dropped;
  for (uint64_t b = 0; b < reftable_.size(); b++) {
    const uint64_t off = reftable_[b] & kOffsetMask;
    if (!off) continue;
    RETURN_IF_ERROR(ValidateTableOffset(off, "refcount block"));
    ASSIGN_OR_RETURN(TableRef t, ref_cache_->Get(off));
    const uint64_t self = off >> cluster_bits_;
    bool used = false;
    for (uint64_t i = 0; i < refblock_entries_ && !used; i++)
      used = ReadRefcountEntry(t.data(), i, refcount_bits_) != 0 && b * refblock_entries_ + i != self;
    if (!used) dropped.push_back(b);
  }
  if (!dropped.empty()) {
    std::vector<uint64_t> old = reftable_;
    for (uint64_t b : dropped) reftable_[b] = 0;
    RETURN_IF_ERROR(WriteRefTableEntries(0, reftable_.size()));
    RETURN_IF_ERROR(file_->Sync(true));
    for (uint64_t b : dropped) {
      const uint64_t off = old[b] & kOffsetMask;
      ref_cache_->Forget(off);
      // Counted in itself it went with the block; counted in another, that count drops.
      if ((off >> cluster_bits_) / refblock_entries_ != b) RETURN_IF_ERROR(FreeRange(off, cluster_size_));
      Status s = file_->PunchHole(off, cluster_size_);
      if (!s.ok() && s.kind() != ErrorKind::kUnsupported) return s;
    }
    RETURN_IF_ERROR(FlushAll());
  }

  // The file ends after the last cluster in use.
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  uint64_t end = DivRoundUp(file_size, cluster_size_);
  while (end > 1) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(end - 1));
    if (rc != 0) break;
    end--;
  }
  if ((end << cluster_bits_) < file_size) {
    RETURN_IF_ERROR(file_->Truncate(end << cluster_bits_));
    RETURN_IF_ERROR(file_->Sync(true));
    host_end_ = std::min(host_end_, end << cluster_bits_);
    free_hint_ = std::min(free_hint_, end);
  }
  return Status::Ok();
}

Status Qcow2Map::Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) {
  RETURN_IF_ERROR(CheckWritable());
  if (new_size % 512) return Status::InvalidArgument("'{}': the new size must be a multiple of 512", path_);
  if (new_size > limits::kMaxVirtualSize)
    return Status::InvalidArgument("'{}': new size {} is too large", path_, new_size);
  // A v2 snapshot need not record its disk size, so applying one after a resize could not
  // restore the size it had (qemu refuses the same way).
  if (!v3_ && !snapshots_.empty()) return Status::Unsupported("Can't resize a v2 image which has snapshots");
  RETURN_IF_ERROR(CheckBitmapsResizable());
  const bool raw_data_file = header_.autoclear_features & kAutoclearDataFileRaw;
  if (new_size < size_) {
    if (!allow_shrink)
      return Status::InvalidArgument("Use the --shrink option to perform a shrink operation.");
    uint64_t first = DivRoundUp(new_size, cluster_size_);
    uint64_t end = DivRoundUp(size_, cluster_size_);
    // The header shrinks first: a crash after it leaves the tail referenced but out of
    // the guest's reach (before or after, nothing between), and the frees below can only
    // leak.
    RETURN_IF_ERROR(FlushAll());
    header_.size = new_size;
    size_ = new_size;
    RETURN_IF_ERROR(WriteHeader());
    RETURN_IF_ERROR(file_->Sync(true));
    // Free every whole cluster past the new end, and L2 tables left with nothing.
    std::vector<uint64_t> freed;  // data clusters that may have lost their last reference
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
          if (!IsCompressed(e) && L2EntryOffset(e) && !data_file_)
            freed.push_back(L2EntryOffset(e) >> cluster_bits_);
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
    RETURN_IF_ERROR(TrimAfterShrink(freed));
    // qemu cuts an external data file to the new size too (the guest reaches no further).
    if (data_file_) {
      RETURN_IF_ERROR(FlushAll());
      RETURN_IF_ERROR(data_file_->Truncate(new_size));
    }
  } else {
    const uint64_t zero_unit = extended_l2_ ? subcluster_size_ : cluster_size_;
    if (zero_grown != GrowZeros::kNone && !v3_ && new_size > AlignUp(size_, zero_unit))
      return Status::Unsupported("Failed to zero out new clusters: Operation not supported");
    uint64_t need = L1EntriesFor(new_size);
    if (need * 8 > limits::kMaxL1Bytes)
      return Status::InvalidArgument("'{}': new size {} needs an L1 table larger than {} bytes", path_,
                                     new_size, limits::kMaxL1Bytes);
    if (need > l1_.size()) RETURN_IF_ERROR(ReplaceL1(*this, need));
    if (data_file_) {
      // As qemu: a raw data file only grows (it may hold data past the old end already),
      // another one takes the new size exactly.
      ASSIGN_OR_RETURN(uint64_t dsize, data_file_->Size());
      if (dsize < new_size || (!raw_data_file && dsize != new_size))
        RETURN_IF_ERROR(data_file_->Truncate(new_size));
    }
  }
  RETURN_IF_ERROR(FlushAll());
  uint64_t old_size = size_;
  header_.size = new_size;
  size_ = new_size;
  // What the grow adds is reached only once the header says the new size: everything
  // below is written before it.
  Status s;
  if (new_size > old_size && raw_data_file) s = MapRawDataFile(old_size, new_size);
  if (s.ok() && new_size > old_size && zero_grown != GrowZeros::kNone)
    s = ZeroGrown(old_size, new_size, zero_grown == GrowZeros::kWithHomes);
  if (!s.ok()) {  // the old size stays (a later header write must not carry the new one)
    header_.size = size_ = old_size;
    return s;
  }
  ResizeBitmaps(new_size);
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

// Snapshot create, delete and apply change refcounts and COPIED flags together: a data
// cluster that gains a sharer must lose its COPIED flag at the instant its refcount
// becomes 2, and one that loses its last sharer must get the flag back as its refcount
// drops to 1 (qemu-img check calls a mismatch either way corruption). Writes to two
// clusters cannot do that. So the whole new state is built beside the old one, in
// clusters past everything the old refcounts count: a copy of each active L2 table with
// its flags right, a new L1, a new snapshot table, and a refcount table with blocks that
// count the result (the old refcounts plus what the change adds and removes, so leaks and
// bitmaps are kept). It is synced, then one header write switches to it. Before that write
// the new clusters are unreferenced free space; after it the old tables are.
class MetadataSwitch {
 public:
  // A refcount per host cluster is kept in memory: refuse absurd files (as check does).
  static constexpr uint64_t kMaxClusters = 256ull << 20;

  explicit MetadataSwitch(Qcow2Map& m) : m_(m) {}

  // new_l1 names the L2 tables the active image is to use (each gets a private copy);
  // snaps is the new snapshot table, whose L1 tables are on disk already.
  Status Run(const std::vector<uint64_t>& new_l1, std::vector<Snapshot> snaps, uint64_t new_size) {
    RETURN_IF_ERROR(m_.FlushAll());  // the old state complete on disk, and the caches clean
    ASSIGN_OR_RETURN(uint64_t file_size, m_.file_->Size());
    const uint64_t cs = m_.cluster_size_;
    region_ = std::max(AlignUp(file_size, cs), AlignUp(m_.host_end_, cs)) >> m_.cluster_bits_;
    if (region_ > kMaxClusters)
      return Status::Unsupported("'{}': image file has too many clusters ({}) for this", m_.path_, region_);
    rc_.resize(region_);
    for (uint64_t c = 0; c < region_; c++) {
      ASSIGN_OR_RETURN(rc_[c], m_.GetRefcount(c));
    }

    // What goes away: the active tree, every old snapshot, the snapshot and refcount tables.
    RETURN_IF_ERROR(Tree(m_.header_.l1_table_offset, m_.l1_, -1));
    for (const Snapshot& s : m_.snapshots_) {
      ASSIGN_OR_RETURN(std::vector<uint64_t> l1, m_.ReadSnapshotL1(s));
      RETURN_IF_ERROR(Tree(s.l1_table_offset, l1, -1));
    }
    RETURN_IF_ERROR(Add(m_.header_.snapshots_offset, SnapshotTableExtent(m_.snapshots_), -1));
    RETURN_IF_ERROR(Add(m_.header_.refcount_table_offset, m_.reftable_.size() * 8, -1));
    for (uint64_t e : m_.reftable_)
      if (e & kOffsetMask) RETURN_IF_ERROR(Add(e & kOffsetMask, cs, -1));

    // What comes: private copies of the active L2 tables, a new L1, the snapshots, their table.
    std::vector<uint64_t> l1(new_l1.size(), 0);
    std::vector<uint64_t> l2_copies;
    for (uint64_t i = 0; i < new_l1.size(); i++) {
      uint64_t src = L1EntryOffset(new_l1[i]);
      if (!src) continue;
      RETURN_IF_ERROR(m_.ValidateTableOffset(src, "L2 table"));
      ASSIGN_OR_RETURN(TableRef t, m_.l2_cache_->Get(src));
      uint64_t off = Place(1);
      std::memcpy(At(off), t.data(), cs);
      l1[i] = off;
      l2_copies.push_back(off);
      RETURN_IF_ERROR(Add(off, cs, +1));
      RETURN_IF_ERROR(Entries(At(off), +1));
    }
    const uint64_t l1_off = l1.empty() ? 0 : Place(DivRoundUp(l1.size() * 8, cs));
    RETURN_IF_ERROR(Add(l1_off, l1.size() * 8, +1));
    for (const Snapshot& s : snaps) {
      ASSIGN_OR_RETURN(std::vector<uint64_t> sl1, m_.ReadSnapshotL1(s));
      RETURN_IF_ERROR(Tree(s.l1_table_offset, sl1, +1));
    }
    std::vector<std::byte> table = SerializeSnapshotTable(snaps);
    if (table.size() > limits::kMaxSnapshotTableBytes)
      return Status::NoSpace("'{}': snapshot table would be too large", m_.path_);
    const uint64_t table_off = table.empty() ? 0 : Place(DivRoundUp(table.size(), cs));
    if (table_off) std::memcpy(At(table_off), table.data(), table.size());
    RETURN_IF_ERROR(Add(table_off, table.size(), +1));

    // COPIED now says what the new refcounts will.
    for (uint64_t off : l2_copies) {
      for (uint64_t j = 0; j < m_.l2_entries_; j++) {
        uint64_t bm;
        uint64_t e = LoadL2Raw(At(off), j, &bm);
        uint64_t host = L2EntryOffset(e);
        if (IsCompressed(e) || !host || m_.header_.has_data_file()) continue;
        uint64_t ne = rc_[host >> m_.cluster_bits_] == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied);
        StoreL2Raw(At(off), j, ne, bm);
      }
    }
    for (uint64_t& e : l1)
      if (e) e |= kFlagCopied;  // a private copy: refcount one
    for (uint64_t i = 0; i < l1.size(); i++) StoreBE64(At(l1_off) + i * 8, l1[i]);

    ASSIGN_OR_RETURN(std::vector<uint64_t> reftable, LayOutRefcounts());

    // Everything new is written and durable before the header names it.
    const uint64_t start = region_ << m_.cluster_bits_;
    constexpr uint64_t kChunk = 8 << 20;
    for (uint64_t pos = 0; pos < meta_.size(); pos += kChunk) {
      std::span<const std::byte> part(meta_.data() + pos, std::min<uint64_t>(kChunk, meta_.size() - pos));
      RETURN_IF_ERROR(m_.file_->PWrite(start + pos, part, IoTag::kOther));
    }
    RETURN_IF_ERROR(m_.file_->Sync(true));

    Header h = m_.header_;
    h.l1_table_offset = l1_off;
    h.l1_size = static_cast<uint32_t>(l1.size());
    h.snapshots_offset = table_off;
    h.nb_snapshots = static_cast<uint32_t>(snaps.size());
    h.refcount_table_offset = reftable_off_;
    h.refcount_table_clusters = static_cast<uint32_t>(DivRoundUp(reftable.size() * 8, cs));
    h.size = new_size;
    ASSIGN_OR_RETURN(std::vector<std::byte> raw, SerializeHeader(h));
    RETURN_IF_ERROR(m_.file_->PWrite(0, raw, IoTag::kHeader));
    RETURN_IF_ERROR(m_.file_->Sync(true));

    // The switch happened: the in-memory state follows.
    for (uint64_t e : m_.reftable_)
      if (e & kOffsetMask) m_.ref_cache_->Forget(e & kOffsetMask);
    for (uint64_t c = 0; c < region_; c++)
      if (rc_[c] == 0) m_.l2_cache_->Forget(c << m_.cluster_bits_);
    m_.header_ = std::move(h);
    m_.reftable_ = std::move(reftable);
    m_.l1_ = std::move(l1);
    m_.l1_offset_ = l1_off;
    m_.l1_dirty_ = m_.header_dirty_ = false;
    m_.size_ = new_size;
    for (Snapshot& s : snaps) {
      if (s.extra.size() < 24) s.extra.resize(24);  // as serialized
      s.dropped_extra = 0;
    }
    m_.snapshots_ = std::move(snaps);
    m_.free_hint_ = 0;
    m_.host_end_ = rc_.size() << m_.cluster_bits_;
    return Status::Ok();
  }

 private:
  // Adds delta to every cluster of [off, off+len).
  Status Add(uint64_t off, uint64_t len, int64_t delta) {
    if (!off || !len) return Status::Ok();
    for (uint64_t c = off >> m_.cluster_bits_; c <= (off + len - 1) >> m_.cluster_bits_; c++) {
      if (c >= rc_.size())
        return Status::Corrupt("'{}': a table refers to {:#x}, past the end of the image file", m_.path_,
                               off);
      if (delta < 0 && rc_[c] < static_cast<uint64_t>(-delta))
        return Status::Corrupt("'{}': refcount of cluster {} would drop below zero", m_.path_, c);
      // Checked here, not only when the result is stored: a 64-bit count would wrap.
      if (delta > 0 && m_.refcount_max_ - rc_[c] < static_cast<uint64_t>(delta))
        return Status::InvalidArgument("'{}': refcount of cluster {} would exceed the {}-bit maximum",
                                       m_.path_, c, m_.refcount_bits_);
      rc_[c] += delta;
    }
    return Status::Ok();
  }
  // The references an L2 table's entries hold.
  Status Entries(const std::byte* l2, int64_t delta) {
    for (uint64_t j = 0; j < m_.l2_entries_; j++) {
      uint64_t bm;
      uint64_t e = LoadL2Raw(l2, j, &bm);
      if (IsCompressed(e)) {
        RETURN_IF_ERROR(
            Add(CompressedHostOffset(e, m_.cluster_bits_), CompressedLength(e, m_.cluster_bits_), delta));
      } else if (L2EntryOffset(e) && !m_.header_.has_data_file()) {
        if (!IsAligned(L2EntryOffset(e), m_.cluster_size_))
          return Status::Corrupt("'{}': L2 entry {:#x} is not cluster aligned", m_.path_, e);
        RETURN_IF_ERROR(Add(L2EntryOffset(e), m_.cluster_size_, delta));
      }
    }
    return Status::Ok();
  }
  // An L1 table and everything under it (counted per path, as check counts).
  Status Tree(uint64_t l1_off, const std::vector<uint64_t>& l1, int64_t delta) {
    RETURN_IF_ERROR(Add(l1_off, l1.size() * 8, delta));
    for (uint64_t e : l1) {
      uint64_t l2 = L1EntryOffset(e);
      if (!l2) continue;
      RETURN_IF_ERROR(m_.ValidateTableOffset(l2, "L2 table"));
      RETURN_IF_ERROR(Add(l2, m_.cluster_size_, delta));
      ASSIGN_OR_RETURN(TableRef t, m_.l2_cache_->Get(l2));
      RETURN_IF_ERROR(Entries(t.data(), delta));
    }
    return Status::Ok();
  }

  // n new clusters at the end of the new region; returns the host offset.
  uint64_t Place(uint64_t n) {
    uint64_t off = (region_ << m_.cluster_bits_) + meta_.size();
    meta_.resize(meta_.size() + n * m_.cluster_size_);
    rc_.resize(region_ + meta_.size() / m_.cluster_size_, 0);
    return off;
  }
  std::byte* At(uint64_t off) { return meta_.data() + (off - (region_ << m_.cluster_bits_)); }
  uint64_t LoadL2Raw(const std::byte* t, uint64_t j, uint64_t* bm) const {
    const std::byte* p = t + j * m_.l2_entry_bytes();
    *bm = m_.extended_l2_ ? LoadBE64(p + 8) : 0;
    return LoadBE64(p);
  }
  void StoreL2Raw(std::byte* t, uint64_t j, uint64_t e, uint64_t bm) const {
    std::byte* p = t + j * m_.l2_entry_bytes();
    StoreBE64(p, e);
    if (m_.extended_l2_) StoreBE64(p + 8, bm);
  }

  // Places refcount blocks for every block with a non-zero count, then the refcount table,
  // after the rest; both count themselves. Returns the table's entries.
  Result<std::vector<uint64_t>> LayOutRefcounts() {
    const uint64_t per_block = m_.refblock_entries_;
    const uint64_t first = (region_ << m_.cluster_bits_) + meta_.size();  // host offset
    const uint64_t first_c = first >> m_.cluster_bits_;
    uint64_t blocks = 0, table_clusters = 0;
    for (;;) {  // grows monotonically: more clusters can only need more blocks
      uint64_t end = first_c + blocks + table_clusters;
      uint64_t need_blocks = 0;
      for (uint64_t b = 0; b * per_block < end; b++) {
        bool used = b * per_block < end && (b + 1) * per_block > first_c;  // holds new clusters
        for (uint64_t c = b * per_block; !used && c < std::min(end, (b + 1) * per_block); c++)
          used = c < rc_.size() && rc_[c] != 0;
        need_blocks += used;
      }
      uint64_t entries = DivRoundUp(end, per_block) + 1;  // one spare block slot
      uint64_t need_table = DivRoundUp(entries * 8, m_.cluster_size_);
      if (need_blocks == blocks && need_table == table_clusters) break;
      blocks = std::max(blocks, need_blocks);
      table_clusters = std::max(table_clusters, need_table);
    }
    uint64_t blocks_off = Place(blocks);
    reftable_off_ = Place(table_clusters);
    RETURN_IF_ERROR(Add(blocks_off, (blocks + table_clusters) * m_.cluster_size_, +1));
    std::vector<uint64_t> table(table_clusters * m_.cluster_size_ / 8, 0);
    uint64_t next = blocks_off;
    for (uint64_t b = 0; b * per_block < rc_.size(); b++) {
      bool used = false;
      for (uint64_t c = b * per_block; !used && c < std::min<uint64_t>(rc_.size(), (b + 1) * per_block); c++)
        used = rc_[c] != 0;
      if (!used) continue;
      if (b >= table.size() || next >= reftable_off_)
        return Status::Corrupt("'{}': refcount layout came out short", m_.path_);
      table[b] = next;
      for (uint64_t c = b * per_block; c < std::min<uint64_t>(rc_.size(), (b + 1) * per_block); c++)
        WriteRefcountEntry(At(next), c - b * per_block, m_.refcount_bits_,
                           std::min(rc_[c], m_.refcount_max_));
      next += m_.cluster_size_;
    }
    for (uint64_t i = 0; i < table.size(); i++) StoreBE64(At(reftable_off_) + i * 8, table[i]);
    return table;
  }

  Qcow2Map& m_;
  uint64_t region_ = 0;          // first cluster of the new structures
  std::vector<uint64_t> rc_;     // the refcounts after the switch, per host cluster
  std::vector<std::byte> meta_;  // the new structures, from region_ on
  uint64_t reftable_off_ = 0;
};

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
    return Status::Unsupported("'{}': internal snapshots are not supported with an external data file",
                               path_);
  if (name.size() > 0xffff) return Status::InvalidArgument("snapshot name is too long");
  // A name may repeat, as in qemu: each snapshot has its own ID.
  if (refcount_max_ < 2)
    return Status::InvalidArgument("'{}': a refcount width of 1 bit cannot share clusters with a snapshot",
                                   path_);
  if (snapshots_.size() >= limits::kMaxSnapshots)
    return Status::FromErrno(EFBIG, "'{}': too many snapshots", path_);  // qemu's errno
  RETURN_IF_ERROR(FlushAll());
  // The snapshot keeps the active L1 table as it is on disk; the active image moves to
  // copies (MetadataSwitch).
  Snapshot s;
  s.l1_table_offset = header_.l1_table_offset;
  s.l1_size = static_cast<uint32_t>(l1_.size());
  uint64_t max_id = 0;
  for (const Snapshot& o : snapshots_)
    max_id = std::max<uint64_t>(max_id, strtoull(o.id.c_str(), nullptr, 10));
  s.id = std::to_string(max_id + 1);
  s.name = name;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  s.date_sec = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(now).count());
  s.date_nsec =
      static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() % 1000000000);
  s.disk_size = size_;
  s.has_disk_size = true;
  s.icount = 0;  // as qemu-img writes it (no instruction counter ran)
  s.extra.resize(24);
  std::vector<Snapshot> snaps = snapshots_;
  snaps.push_back(std::move(s));
  return MetadataSwitch(*this).Run(l1_, std::move(snaps), size_);
}

Status Qcow2Map::SnapshotApply(const std::string& name) {
  RETURN_IF_ERROR(CheckWritable());
  const Snapshot* s = FindSnapshot(snapshots_, name);
  if (!s) return Status::NotFound("Failed to load snapshot: {}", std::strerror(ENOENT));
  uint64_t new_size = s->disk_size;
  if (L1EntriesFor(new_size) > s->l1_size)
    return Status::Corrupt("'{}': snapshot '{}' has an L1 table too small for its size", path_, name);
  RETURN_IF_ERROR(FlushAll());
  ASSIGN_OR_RETURN(std::vector<uint64_t> l1, ReadSnapshotL1(*s));
  l1.resize(std::max<uint64_t>(l1.size(), l1_.size()), 0);
  if (new_size != size_) RETURN_IF_ERROR(CheckBitmapsResizable());
  RETURN_IF_ERROR(MetadataSwitch(*this).Run(l1, snapshots_, new_size));
  // The whole disk may differ now: every enabled bitmap says so.
  ResizeBitmaps(new_size);
  MarkBitmapsAllDirty();
  return Status::Ok();
}

Status WriteSnapshotTable(Qcow2Map& m, std::vector<Snapshot> snaps) {
  return MetadataSwitch(m).Run(m.l1_, std::move(snaps), m.size_);
}

Status Qcow2Map::SnapshotDelete(const std::string& name) {
  RETURN_IF_ERROR(CheckWritable());
  const Snapshot* s = FindSnapshot(snapshots_, name);
  if (!s) return Status::NotFound("snapshot not found");
  std::vector<Snapshot> snaps;
  for (const Snapshot& o : snapshots_)
    if (&o != s) snaps.push_back(o);
  return MetadataSwitch(*this).Run(l1_, std::move(snaps), size_);
}

}  // namespace vimgfs::qcow2

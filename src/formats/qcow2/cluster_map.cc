// qcow2 open and lookup: L1 in memory, L2 tables through the TableCache, standard and
// extended (subcluster) L2 entries, zero flags and compressed clusters.
#include <algorithm>
#include <cstring>

#include "crypto/qcow_aes.h"
#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {

Qcow2Map::~Qcow2Map() {
  if (!closed_) (void)Close();
}

Result<std::unique_ptr<ClusterMap>> Qcow2Map::Open(OpenContext ctx) {
  auto m = std::make_unique<Qcow2Map>();
  m->path_ = ctx.path;
  m->env_ = ctx.env ? ctx.env : Env::Default();
  m->file_ = std::move(ctx.file);
  const std::string& path = m->path_;
  ASSIGN_OR_RETURN(uint64_t file_size, m->file_->Size());
  ASSIGN_OR_RETURN(m->header_, ParseHeader(*m->file_, path, file_size, ctx.options.for_check));
  Header& h = m->header_;
  m->v3_ = h.version >= 3;
  m->cluster_bits_ = h.cluster_bits;
  m->cluster_size_ = h.cluster_size();
  m->extended_l2_ = h.extended_l2();
  m->l2_entries_ = m->cluster_size_ / m->l2_entry_bytes();
  m->subcluster_size_ = m->extended_l2_ ? m->cluster_size_ / kSubclusters : m->cluster_size_;
  m->refcount_bits_ = h.refcount_bits();
  m->refcount_max_ = m->refcount_bits_ == 64 ? UINT64_MAX : (1ull << m->refcount_bits_) - 1;
  m->refblock_entries_ = m->cluster_size_ * 8 / m->refcount_bits_;
  m->corrupt_ = h.incompatible_features & kIncompatCorrupt;
  m->size_ = h.size;
  m->snapshot_view_ = !ctx.options.snapshot.empty();
  // A corrupt image opens read-write only for check -r, which may clear the mark (qemu's
  // BDRV_O_CHECK).
  m->read_only_ = ctx.options.read_only || m->snapshot_view_ || !m->file_->writable() ||
                  (m->corrupt_ && !ctx.options.for_check);
  m->host_end_ = AlignUp(file_size, m->cluster_size_);

  const OpenMode data_mode = m->read_only_ ? OpenMode::kReadOnly : OpenMode::kReadWrite;
  if (h.has_data_file() && ctx.options.no_io) {
    // info: the data file is not opened (qemu's NO_IO), so an untrusted image can be
    // inspected without touching the file it names. No guest data can be read.
    m->data_ = nullptr;
  } else if (h.has_data_file()) {
    if (!ctx.options.data_file.empty()) {
      // The user's own command line names it: any host file, as qemu opens it.
      auto f = m->env_->Open(ctx.options.data_file, data_mode);
      if (!f.ok()) return f.error().WithContext("Could not open '{}'", ctx.options.data_file);
      m->data_file_ = std::move(f).value();
    } else {
      if (!h.data_file || h.data_file->empty())
        return Status::InvalidFormat("'data-file' is required for this image");
      ASSIGN_OR_RETURN(OpenedReference ref,
                       OpenReference(*m->env_, path, *h.data_file, data_mode, ctx.options.untrusted));
      m->data_file_ = std::move(ref.file);
    }
    m->data_ = m->data_file_.get();
  } else {
    if (!ctx.options.data_file.empty())
      return Status::InvalidArgument("'data-file' can only be set for images with an external data file");
    m->data_ = m->file_.get();
  }
  if (h.crypt_method != 0) RETURN_IF_ERROR(m->OpenEncryption(ctx.options));

  if (ctx.options.for_check) {
    // What qemu's limits refuse is the check's to report (and check -r all's to drop).
    auto snaps = ParseSnapshotTable(*m->file_, path, h, SnapshotRead::kCheck);
    if (snaps.ok()) {
      m->snapshots_ = std::move(*snaps);
    } else {
      m->snapshot_table_error_ = snaps.error();
    }
  } else {
    ASSIGN_OR_RETURN(m->snapshots_, ParseSnapshotTable(*m->file_, path, h, SnapshotRead::kOpen));
  }

  uint64_t l1_offset = h.l1_table_offset;
  uint64_t l1_size = h.l1_size;
  std::optional<std::vector<uint64_t>> snapshot_l1;
  if (m->snapshot_view_) {
    const Snapshot* found = nullptr;
    for (const Snapshot& s : m->snapshots_)
      if (s.id == ctx.options.snapshot) found = &s;
    if (!found)
      for (const Snapshot& s : m->snapshots_)
        if (s.name == ctx.options.snapshot) found = &s;
    if (!found) return Status::NotFound("Failed to load snapshot: Can't find snapshot");  // qemu-img's words
    auto l1 = m->ReadSnapshotL1(*found);
    if (!l1.ok()) return l1.error().WithContext("Failed to load snapshot");
    snapshot_l1 = std::move(l1).value();
    l1_offset = found->l1_table_offset;
    l1_size = found->l1_size;
    if (found->has_disk_size) m->size_ = found->disk_size;
    if (m->size_ > limits::kMaxVirtualSize || m->L1EntriesFor(m->size_) > l1_size)
      return Status::InvalidFormat("'{}': snapshot '{}' has a size its L1 table cannot describe", path,
                                   ctx.options.snapshot);
  }
  m->l1_offset_ = l1_offset;
  m->l1_.resize(l1_size);
  if (snapshot_l1) {
    m->l1_ = std::move(*snapshot_l1);
  } else if (l1_size) {
    std::vector<std::byte> raw(l1_size * 8);
    RETURN_IF_ERROR(m->file_->PRead(l1_offset, raw).WithContext("'{}': reading the L1 table", path));
    for (uint64_t i = 0; i < l1_size; i++) m->l1_[i] = LoadBE64(raw.data() + i * 8);
  }

  uint64_t rt_entries = uint64_t{h.refcount_table_clusters} * m->cluster_size_ / 8;
  m->reftable_.resize(rt_entries);
  {
    std::vector<std::byte> raw(rt_entries * 8);
    RETURN_IF_ERROR(
        m->file_->PRead(h.refcount_table_offset, raw).WithContext("'{}': reading the refcount table", path));
    for (uint64_t i = 0; i < rt_entries; i++) m->reftable_[i] = LoadBE64(raw.data() + i * 8);
  }

  uint64_t cache = ctx.options.cache_bytes ? ctx.options.cache_bytes : limits::kDefaultCacheBytes;
  m->l2_cache_ = std::make_unique<TableCache>(m->file_.get(), static_cast<uint32_t>(m->cluster_size_),
                                              cache / 4 * 3 / m->cluster_size_, IoTag::kL2);
  m->ref_cache_ = std::make_unique<TableCache>(m->file_.get(), static_cast<uint32_t>(m->cluster_size_),
                                               cache / 4 / m->cluster_size_, IoTag::kRefBlock);

  RETURN_IF_ERROR(m->ValidateBitmapDirectory());

  if (!m->read_only_) {
    bool rewrite = false;
    if ((h.incompatible_features & kIncompatDirty) && !ctx.options.for_check) {
      // Lazy refcounts left the counts stale: as qemu, check -r all runs before any write,
      // says what it found, and clears the mark once nothing is left wrong.
      ASSIGN_OR_RETURN(CheckReport fixed, m->Check(RepairMode::kAll));
      if (ctx.options.notice)
        for (const std::string& line : fixed.messages) ctx.options.notice(line);
      if (fixed.check_errors || !fixed.failure.empty())
        return Status::Io("Could not repair dirty image: Input/output error");
    }
    // Persistent bitmaps are kept up to date through the writes of this open (bitmaps.cc);
    // a bitmap directory that cannot be loaded is dropped as a program without bitmap
    // support drops it (qemu then reads them as inconsistent), never written over.
    bool bitmaps_kept = ctx.options.keep_bitmaps;
    if (!bitmaps_kept && !ctx.options.for_check && (h.autoclear_features & kAutoclearBitmaps))
      bitmaps_kept = m->LoadBitmapsForWriting().ok();
    // Auto-clear features we do not maintain must be cleared before we write.
    uint64_t keep = h.autoclear_features & (kAutoclearDataFileRaw | (bitmaps_kept ? kAutoclearBitmaps : 0));
    if (keep != h.autoclear_features) {
      h.autoclear_features = keep;
      rewrite = true;
    }
    if (rewrite) {
      RETURN_IF_ERROR(m->FlushAll());
      RETURN_IF_ERROR(m->WriteHeader());
      RETURN_IF_ERROR(m->file_->Sync(true));
    }
  }
  return std::unique_ptr<ClusterMap>(std::move(m));
}

Result<std::vector<Snapshot>> ParseSnapshotTable(File& file, const std::string& path, const Header& h,
                                                 SnapshotRead how, SnapshotTableRepair* repair) {
  // Entries past the end of the file read as zeros, as qemu reads them (its limits on the
  // table's size below bound what that costs).
  const uint64_t end = uint64_t{INT64_MAX};
  uint64_t count = h.nb_snapshots;
  if (count > limits::kMaxSnapshots) {
    if (how != SnapshotRead::kRepair)
      return Status::InvalidFormat(
          "'{}': snapshot table too large\nYou can force-remove all {} overhanging snapshots with qemu-img "
          "check -r all",
          path, count - limits::kMaxSnapshots);
    repair->messages.push_back(
        fmt::format("Discarding {} overhanging snapshots", count - limits::kMaxSnapshots));
    repair->discarded += count - limits::kMaxSnapshots;
    count = limits::kMaxSnapshots;
  }
  std::vector<Snapshot> out;
  uint64_t pos = h.snapshots_offset;
  uint64_t table_length = 0;  // as qemu counts it: what is kept of each entry
  for (uint64_t i = 0; i < count; i++) {
    pos = AlignUp(pos, 8);
    table_length = AlignUp(table_length, 8);
    std::byte fixed[40];
    if (pos > end - 40)
      return Status::InvalidFormat("'{}': snapshot table is past the end of the file", path);
    RETURN_IF_ERROR(file.PRead(pos, fixed));
    Snapshot s;
    s.l1_table_offset = LoadBE64(fixed);
    s.l1_size = LoadBE32(fixed + 8);
    uint16_t id_len = LoadBE16(fixed + 12);
    uint16_t name_len = LoadBE16(fixed + 14);
    s.date_sec = LoadBE32(fixed + 16);
    s.date_nsec = LoadBE32(fixed + 20);
    s.vm_clock_nsec = LoadBE64(fixed + 24);
    s.vm_state_size = LoadBE32(fixed + 32);
    const uint32_t extra_len = LoadBE32(fixed + 36);
    uint32_t kept_extra = extra_len;
    if (extra_len > kMaxSnapshotExtraData) {
      if (how != SnapshotRead::kRepair)
        return Status::InvalidFormat(
            "'{}': Too much extra metadata in snapshot table entry {}\nYou can force-remove this extra "
            "metadata with qemu-img check -r all",
            path, i);
      repair->messages.push_back(
          fmt::format("Discarding too much extra metadata in snapshot table entry {} "
                      "({} > {})",
                      i, extra_len, kMaxSnapshotExtraData));
      repair->extra_dropped++;
      kept_extra = kMaxSnapshotExtraData;
      s.dropped_extra = extra_len - kept_extra;
    }
    const uint64_t entry_end = pos + 40 + uint64_t{extra_len} + id_len + name_len;
    if (entry_end > end)
      return Status::InvalidFormat("'{}': snapshot table entry {} is past the end of the file", path, i);
    table_length += 40 + uint64_t{kept_extra} + id_len + name_len;
    if (table_length > limits::kMaxSnapshotTableBytes || entry_end - h.snapshots_offset > INT32_MAX) {
      if (how != SnapshotRead::kRepair)
        return Status::InvalidFormat(
            "'{}': Snapshot table is too big\nYou can force-remove all {} overhanging snapshots with "
            "qemu-img check -r all",
            path, count - i);
      repair->messages.push_back(
          fmt::format("Discarding {} overhanging snapshots (snapshot table is too big)", count - i));
      repair->discarded += count - i;
      break;
    }
    std::vector<std::byte> extra(kept_extra);
    RETURN_IF_ERROR(file.PRead(pos + 40, extra));
    std::vector<std::byte> names(uint64_t{id_len} + name_len);
    RETURN_IF_ERROR(file.PRead(pos + 40 + extra_len, names));
    s.extra = std::move(extra);
    if (kept_extra >= 8) s.vm_state_size = LoadBE64(s.extra.data());
    if (kept_extra >= 16) {
      s.disk_size = LoadBE64(s.extra.data() + 8);
      s.has_disk_size = true;
    }
    if (kept_extra >= 24) s.icount = LoadBE64(s.extra.data() + 16);
    s.id.assign(reinterpret_cast<const char*>(names.data()), id_len);
    s.name.assign(reinterpret_cast<const char*>(names.data() + id_len), name_len);
    if (!s.has_disk_size) s.disk_size = h.size;
    out.push_back(std::move(s));
    pos = entry_end;
  }
  return out;
}

Result<std::vector<uint64_t>> Qcow2Map::ReadSnapshotL1(const Snapshot& s) {
  if (uint64_t{s.l1_size} * 8 > limits::kMaxL1Bytes)
    return Status::FromErrno(EFBIG, "Snapshot L1 table too large");
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  const uint64_t bytes = uint64_t{s.l1_size} * 8;
  if (bytes && (!IsAligned(s.l1_table_offset, cluster_size_) || s.l1_table_offset == 0 ||
                s.l1_table_offset > file_size || bytes > file_size - s.l1_table_offset))
    return Status::InvalidArgument("Snapshot L1 table offset invalid");
  std::vector<std::byte> raw(bytes);
  RETURN_IF_ERROR(file_->PRead(s.l1_table_offset, raw));
  std::vector<uint64_t> l1(s.l1_size);
  for (uint64_t i = 0; i < s.l1_size; i++) l1[i] = LoadBE64(raw.data() + i * 8);
  return l1;
}

uint64_t SnapshotTableExtent(const std::vector<Snapshot>& snaps) {
  uint64_t bytes = 0;
  for (size_t i = 0; i < snaps.size(); i++) {
    const Snapshot& s = snaps[i];
    uint64_t entry = 40 + s.extra.size() + s.dropped_extra + s.id.size() + s.name.size();
    bytes += i + 1 < snaps.size() ? AlignUp(entry, 8) : entry;  // the last one unpadded
  }
  return bytes;
}

std::vector<std::byte> SerializeSnapshotTable(const std::vector<Snapshot>& snaps) {
  std::vector<std::byte> out;
  for (const Snapshot& s : snaps) {
    std::vector<std::byte> extra = s.extra;
    if (extra.size() < 24) extra.resize(24);
    StoreBE64(extra.data(), s.vm_state_size);
    StoreBE64(extra.data() + 8, s.disk_size);
    StoreBE64(extra.data() + 16, s.icount);
    size_t at = out.size();
    size_t entry = AlignUp(40 + extra.size() + s.id.size() + s.name.size(), 8);
    out.resize(at + entry);
    std::byte* p = out.data() + at;
    StoreBE64(p, s.l1_table_offset);
    StoreBE32(p + 8, s.l1_size);
    StoreBE16(p + 12, static_cast<uint16_t>(s.id.size()));
    StoreBE16(p + 14, static_cast<uint16_t>(s.name.size()));
    StoreBE32(p + 16, s.date_sec);
    StoreBE32(p + 20, s.date_nsec);
    StoreBE64(p + 24, s.vm_clock_nsec);
    StoreBE32(p + 32, static_cast<uint32_t>(std::min<uint64_t>(s.vm_state_size, UINT32_MAX)));
    StoreBE32(p + 36, static_cast<uint32_t>(extra.size()));
    std::memcpy(p + 40, extra.data(), extra.size());
    std::memcpy(p + 40 + extra.size(), s.id.data(), s.id.size());
    std::memcpy(p + 40 + extra.size() + s.id.size(), s.name.data(), s.name.size());
  }
  return out;
}

Status Qcow2Map::ValidateTableOffset(uint64_t off, const char* what) {
  if (!IsAligned(off, cluster_size_))
    return Status::Corrupt("'{}': {} offset {:#x} is not aligned to a cluster", path_, what, off);
  if (off < cluster_size_)
    return Status::Corrupt("'{}': {} offset {:#x} overlaps the header", path_, what, off);
  return Status::Ok();
}

Result<uint64_t> Qcow2Map::L2Offset(uint64_t l1_index) {
  if (l1_index >= l1_.size()) return uint64_t{0};
  uint64_t off = L1EntryOffset(l1_[l1_index]);
  if (off == 0) return uint64_t{0};
  RETURN_IF_ERROR(ValidateTableOffset(off, "L2 table"));
  return off;
}

uint64_t Qcow2Map::LoadL2(const TableRef& t, uint64_t idx, uint64_t* bitmap) const {
  const std::byte* p = t.data() + idx * l2_entry_bytes();
  if (bitmap) *bitmap = extended_l2_ ? LoadBE64(p + 8) : 0;
  return LoadBE64(p);
}

void Qcow2Map::StoreL2(const TableRef& t, uint64_t idx, uint64_t entry, uint64_t bitmap) const {
  std::byte* p = t.data() + idx * l2_entry_bytes();
  StoreBE64(p, entry);
  if (extended_l2_) StoreBE64(p + 8, bitmap);
  t.MarkDirty();
}

namespace {

// Appends m, merging it into the previous mapping of this call when they continue.
void Push(std::vector<Mapping>* out, size_t first, const Mapping& m) {
  if (m.length == 0) return;
  if (out->size() > first) {
    Mapping& p = out->back();
    bool same = p.kind == m.kind && p.file == m.file && p.writable == m.writable;
    if (same && m.kind == Mapping::Kind::kData && p.host_offset + p.length == m.host_offset) {
      p.length += m.length;
      return;
    }
    if (same && m.kind == Mapping::Kind::kUnallocated) {
      p.length += m.length;
      return;
    }
    if (same && m.kind == Mapping::Kind::kZero &&
        (m.file == nullptr || p.host_offset + p.length == m.host_offset)) {
      p.length += m.length;
      return;
    }
  }
  out->push_back(m);
}

}  // namespace

Status Qcow2Map::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (locked()) return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
  if (!data_)
    return Status::InvalidArgument("'{}': opened for its metadata only, without its data file", path_);
  bool missed = false;
  return LookupIn(false, &missed, guest_off, len, out);
}

bool Qcow2Map::LookupCached(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (locked() || !data_) return false;
  bool missed = false;
  // An error (a bad entry) is left for Lookup to report, under the exclusive lock.
  return LookupIn(true, &missed, guest_off, len, out).ok() && !missed;
}

Status Qcow2Map::LookupIn(bool cached_only, bool* missed, uint64_t guest_off, uint64_t len,
                          std::vector<Mapping>* out) {
  const size_t first = out->size();
  const uint64_t end = guest_off + len;
  uint64_t pos = guest_off;
  const bool writable_image = !read_only_;
  while (pos < end) {
    uint64_t cluster = ClusterIndex(pos);
    uint64_t l1i = L1Index(cluster);
    ASSIGN_OR_RETURN(uint64_t l2_off, L2Offset(l1i));
    uint64_t l2_span_end = std::min(end, (l1i + 1) * l2_entries_ * cluster_size_);
    if (l2_off == 0) {
      Mapping m;
      m.length = l2_span_end - pos;
      Push(out, first, m);
      pos = l2_span_end;
      continue;
    }
    TableRef l2;
    if (cached_only) {
      l2 = l2_cache_->Peek(l2_off);
      if (!l2) {
        *missed = true;
        return Status::Ok();
      }
    } else {
      ASSIGN_OR_RETURN(l2, l2_cache_->Get(l2_off));
    }
    // A table shared with a snapshot is never written in place, whatever its entries say.
    const bool writable_ok = writable_image && IsCopied(l1_[l1i]);
    while (pos < l2_span_end) {
      cluster = ClusterIndex(pos);
      uint64_t cstart = cluster << cluster_bits_;
      uint64_t cend = std::min(cstart + cluster_size_, l2_span_end);
      uint64_t bitmap = 0;
      uint64_t e = LoadL2(l2, L2Index(cluster), &bitmap);
      Mapping m;
      if (IsCompressed(e)) {
        if (header_.has_data_file())
          return Status::Corrupt("'{}': compressed cluster in an image with an external data file", path_);
        m.kind = Mapping::Kind::kCompressed;
        m.file = file_.get();
        m.host_offset = CompressedHostOffset(e, cluster_bits_);
        m.compressed_length = CompressedLength(e, cluster_bits_);
        m.unit_guest_offset = cstart;
        m.unit_size = static_cast<uint32_t>(cluster_size_);
        m.codec = header_.compression_type == kCompressionZstd ? Codec::kZstd : Codec::kDeflateRaw;
        m.length = cend - pos;
        out->push_back(m);
        pos = cend;
        continue;
      }
      uint64_t host = L2EntryOffset(e);
      bool has_host = host != 0 || (header_.has_data_file() && IsCopied(e));
      if (has_host && !IsAligned(host, cluster_size_))
        return Status::Corrupt("'{}': L2 entry for guest offset {:#x} has an unaligned host offset {:#x}",
                               path_, cstart, host);
      if (!extended_l2_) {
        if (v3_ && HasZeroFlag(e)) {
          m.kind = Mapping::Kind::kZero;
          if (has_host) {
            m.file = data_;
            m.host_offset = host + (pos - cstart);
            m.encrypted = crypt_ != nullptr;
          }
        } else if (has_host) {
          m.kind = Mapping::Kind::kData;
          m.file = data_;
          m.host_offset = host + (pos - cstart);
          m.writable = writable_ok && IsCopied(e);
          m.encrypted = crypt_ != nullptr;
        }
        m.length = cend - pos;
        Push(out, first, m);
        pos = cend;
        continue;
      }
      // Extended L2: one run per group of subclusters in the same state.
      uint32_t alloc = SubAllocBits(bitmap), zero = SubZeroBits(bitmap);
      if (alloc & zero)
        return Status::Corrupt("'{}': subcluster of guest offset {:#x} is both allocated and zero", path_,
                               cstart);
      if (alloc && !has_host)
        return Status::Corrupt("'{}': allocated subclusters at guest offset {:#x} have no host cluster",
                               path_, cstart);
      while (pos < cend) {
        int sc = static_cast<int>((pos - cstart) / subcluster_size_);
        Mapping s;
        if (alloc & (1u << sc)) {
          s.kind = Mapping::Kind::kData;
          s.file = data_;
          s.host_offset = host + (pos - cstart);
          s.encrypted = crypt_ != nullptr;
          s.writable = writable_ok && IsCopied(e);
        } else if (zero & (1u << sc)) {
          s.kind = Mapping::Kind::kZero;
        }
        uint64_t send = std::min(cend, cstart + (sc + 1) * subcluster_size_);
        s.length = send - pos;
        Push(out, first, s);
        pos = send;
      }
    }
  }
  return Status::Ok();
}

Result<TableRef> Qcow2Map::GetL2(uint64_t l1_index, bool allocate) {
  if (l1_index >= l1_.size())
    return Status::Corrupt("'{}': L1 index {} is past the L1 table", path_, l1_index);
  uint64_t l1e = l1_[l1_index];
  ASSIGN_OR_RETURN(uint64_t off, L2Offset(l1_index));
  if (off != 0 && (!allocate || IsCopied(l1e))) return l2_cache_->Get(off);
  if (!allocate) return TableRef();
  // A new table, or a private copy of one shared with a snapshot.
  ASSIGN_OR_RETURN(uint64_t new_off, AllocClusters(1));
  RETURN_IF_ERROR(l2_cache_->SetDependency(ref_cache_.get()));
  std::vector<std::byte> copy;
  if (off != 0) {
    ASSIGN_OR_RETURN(TableRef old, l2_cache_->Get(off));
    copy.assign(old.bytes().begin(), old.bytes().end());
  }
  ASSIGN_OR_RETURN(TableRef t, l2_cache_->GetEmpty(new_off));
  if (!copy.empty()) {
    std::memcpy(t.data(), copy.data(), copy.size());
    // The data clusters are still shared: no entry of the copy may claim refcount one.
    for (uint64_t i = 0; i < l2_entries_; i++) {
      uint64_t bm;
      uint64_t e = LoadL2(t, i, &bm);
      if (IsCopied(e)) {
        ASSIGN_OR_RETURN(uint64_t rc, GetRefcount(L2EntryOffset(e) >> cluster_bits_));
        if (rc != 1) StoreL2(t, i, e & ~kFlagCopied, bm);
      }
    }
  }
  t.MarkDirty();
  l1_[l1_index] = new_off | kFlagCopied;
  l1_dirty_ = true;
  if (off != 0) {
    // The shared table loses the active L1's reference only once the new L1 is on disk.
    RETURN_IF_ERROR(l2_cache_->Flush());
    RETURN_IF_ERROR(WriteL1());
    RETURN_IF_ERROR(file_->Sync(true));
    RETURN_IF_ERROR(AddRefcount(off >> cluster_bits_, -1));
  }
  return t;
}

std::optional<BackingRef> Qcow2Map::backing() const {
  if (header_.backing_file.empty()) return std::nullopt;
  BackingRef r;
  r.name = header_.backing_file;
  r.format = header_.backing_format.value_or("");
  return r;
}

std::vector<File*> Qcow2Map::host_files() {
  if (data_file_) return {data_file_.get()};
  return {};
}

// qemu looks through data clusters into the host file's holes only when it takes the
// image for metadata-preallocated: more clusters carry a refcount than the file has
// allocated on the host (by a ninth, and at least two). Its rule, so map reads the same;
// as in qemu, a refcount that cannot be read makes the answer no, not a failed map.
Result<bool> Qcow2Map::MapShowsHostHoles() {
  if (!preallocated_checked_) {
    preallocated_checked_ = true;
    auto file_size = file_->Size();
    auto allocated = file_->AllocatedSize();
    if (!file_size.ok() || !allocated.ok()) return preallocated_;
    const uint64_t real = *allocated / cluster_size_;
    const uint64_t threshold = std::max(real * 10 / 9, real + 2);
    const uint64_t end = DivRoundUp(*file_size, cluster_size_);
    uint64_t counted = 0;
    for (uint64_t c = 0; c < end && counted < threshold; c++) {
      auto rc = GetRefcount(c);
      if (!rc.ok()) return preallocated_;
      counted += *rc != 0;
    }
    preallocated_ = counted >= threshold;
  }
  return preallocated_;
}

Status Qcow2Map::ValidateBitmapDirectory() {
  // Without the autoclear bit the bitmaps are stale and ignored (qemu warns and drops them).
  if (!header_.bitmaps_ext || !(header_.autoclear_features & kAutoclearBitmaps)) return Status::Ok();
  const std::vector<std::byte>& ext = *header_.bitmaps_ext;
  if (ext.size() != 24) return Status::InvalidFormat("'{}': bitmaps_ext: Invalid extension length", path_);
  const uint32_t count = LoadBE32(ext.data());
  if (LoadBE32(ext.data() + 4) != 0)
    return Status::InvalidFormat("'{}': bitmaps_ext: Reserved field is not zero", path_);
  const uint64_t dir_size = LoadBE64(ext.data() + 8), dir_off = LoadBE64(ext.data() + 16);
  if (count > kMaxBitmaps)
    return Status::InvalidFormat(
        "'{}': bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}", path_, count,
        kMaxBitmaps);
  if (count == 0) return Status::InvalidFormat("'{}': found bitmaps extension with zero bitmaps", path_);
  if (!IsAligned(dir_off, cluster_size_))
    return Status::InvalidFormat("'{}': bitmaps_ext: invalid bitmap directory offset", path_);
  if (dir_size > kMaxBitmapDirectoryBytes)
    return Status::InvalidFormat(
        "'{}': bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})", path_,
        dir_size, kMaxBitmapDirectoryBytes);
  if (dir_size == 0) return Status::InvalidFormat("'{}': Requested bitmap directory size is zero", path_);
  std::vector<std::byte> dir(dir_size);
  RETURN_IF_ERROR(file_->PRead(dir_off, dir).WithContext("'{}': Failed to read bitmap directory", path_));
  uint64_t pos = 0;
  uint32_t entries = 0;
  auto broken = [&] { return Status::InvalidFormat("'{}': Broken bitmap directory", path_); };
  while (pos < dir_size) {
    if (dir_size - pos < 24) return broken();
    if (++entries > count)
      return Status::InvalidFormat("'{}': More bitmaps found than specified in header extension", path_);
    const std::byte* e = dir.data() + pos;
    const uint64_t table_off = LoadBE64(e);
    const uint32_t table_size = LoadBE32(e + 8), flags = LoadBE32(e + 12);
    const uint8_t type = static_cast<uint8_t>(e[16]), gran_bits = static_cast<uint8_t>(e[17]);
    const uint16_t name_size = LoadBE16(e + 18);
    const uint32_t extra = LoadBE32(e + 20);
    const uint64_t entry_size = AlignUp(24 + uint64_t{name_size} + extra, 8);
    if (entry_size > dir_size - pos) return broken();
    if (extra != 0) return Status::Unsupported("'{}': Bitmap extra data is not supported", path_);
    const uint64_t phys = uint64_t{table_size} * cluster_size_;
    bool ok = table_size != 0 && table_off != 0 && IsAligned(table_off, cluster_size_) &&
              table_size <= kMaxBitmapTableSize && gran_bits <= kMaxBitmapGranularityBits &&
              gran_bits >= kMinBitmapGranularityBits && !(flags & kBitmapReservedFlags) &&
              name_size <= kMaxBitmapNameBytes && type == 1 && phys <= kMaxBitmapPhysBytes;
    // A bitmap not in use must cover the disk (one saved before a resize need not).
    if (ok && !(flags & 1) && size_ > ((phys * 8) << gran_bits)) ok = false;
    if (!ok) {
      std::string name(reinterpret_cast<const char*>(e + 24), name_size);
      return Status::InvalidFormat("'{}': Bitmap '{}' doesn't satisfy the constraints", path_, name);
    }
    pos += entry_size;
  }
  if (entries != count)
    return Status::InvalidFormat("'{}': Less bitmaps found than specified in header extension", path_);
  return Status::Ok();
}

// encrypt.format=luks: the header from its clusters, and the key from the caller's secret
// (none for info, which reads no guest data).
Status Qcow2Map::OpenEncryption(const OpenOptions& options) {
  if (header_.crypt_method == 1) {           // the legacy AES
    if (options.no_io) return Status::Ok();  // info: not even the secret is read (qemu's NO_IO)
    auto cipher = crypto::OpenQcowAesCipher(options.secrets, options.key_secret, "encrypt.key-secret");
    if (!cipher.ok()) return cipher.error().WithContext("'{}'", path_);
    crypt_ = std::make_unique<crypto::CryptFile>(*data_, 0, 0, std::move(cipher).value(), /*guest_iv=*/true);
    data_ = crypt_.get();
    return Status::Ok();
  }
  std::vector<std::byte> head(crypto::kLuksHeaderSize);
  if (header_.crypto_header_length < head.size())
    return Status::InvalidFormat("'{}': Request for data outside of extension header", path_);
  RETURN_IF_ERROR(file_->PRead(header_.crypto_header_offset, head));
  auto parsed = crypto::ParseLuksHeader(head, header_.crypto_header_length);
  if (!parsed.ok()) return parsed.error().WithContext("'{}'", path_);
  luks_ = std::move(parsed).value();
  if (options.no_io) return Status::Ok();
  key_secret_ = options.key_secret;
  auto cipher = crypto::OpenLuksCipher(*luks_, *file_, header_.crypto_header_offset, options.secrets,
                                       options.key_secret, "encrypt.key-secret");
  if (!cipher.ok()) return cipher.error().WithContext("'{}'", path_);
  crypt_ = std::make_unique<crypto::CryptFile>(*data_, 0, 0, std::move(cipher).value());
  data_ = crypt_.get();
  return Status::Ok();
}

FormatInfo Qcow2Map::Info() {
  FormatInfo fi;
  fi.format = "qcow2";
  fi.virtual_size = size_;
  fi.cluster_size = cluster_size_;
  fi.dirty = header_.incompatible_features & kIncompatDirty;
  fi.encrypted = header_.crypt_method != 0;
  fi.compression = header_.compression_type == kCompressionZstd ? Codec::kZstd : Codec::kDeflateRaw;
  fi.zero_clusters = v3_;
  for (const Snapshot& s : snapshots_) {
    SnapshotInfo si;
    si.id = s.id;
    si.name = s.name;
    si.vm_state_size = s.vm_state_size;
    si.date_sec = s.date_sec;
    si.date_nsec = s.date_nsec;
    si.vm_clock_nsec = s.vm_clock_nsec;
    si.icount = s.icount;
    si.disk_size = s.disk_size;
    fi.snapshots.push_back(si);
  }
  Qcow2Details d;
  d.v3 = v3_;
  d.zstd = header_.compression_type == kCompressionZstd;
  d.lazy_refcounts = (header_.compatible_features & kCompatLazyRefcounts) != 0;
  d.bitmaps = BitmapList();
  d.refcount_bits = refcount_bits_;
  if (header_.has_data_file()) {
    d.has_data_file = true;
    d.data_file = header_.data_file;
    d.data_file_raw = (header_.autoclear_features & kAutoclearDataFileRaw) != 0;
  }
  d.corrupt = corrupt_;
  d.extended_l2 = extended_l2_;
  if (header_.crypt_method == 1) d.encrypt_format = "aes";
  if (luks_) {
    d.encrypt_format = "luks";
    d.encrypt = crypto::DescribeLuks(*luks_);
  }
  fi.format_specific = std::move(d);
  return fi;
}

}  // namespace vimgfs::qcow2

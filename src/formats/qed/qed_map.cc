// QedMap: a QED image as a ClusterMap. The L1 table is held in memory; L2 tables go
// through the engine's TableCache, which writes them only after the data they name is
// synced; dirty L1 sectors are written after the cache has flushed (docs/ARCHITECTURE.md,
// "Crash ordering").
#include <algorithm>
#include <cstring>

#include "formats/format_util.h"
#include "formats/qed/qed_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qed {
namespace {

enum PlanKind : uint64_t { kPlanInPlace = 1, kPlanNew = 2 };
// Largest run allocated by one plan (the engine may stage it for copy-on-write).
constexpr uint64_t kMaxPlanBytes = 8ull << 20;

// Appends m to out, merging it into the last mapping (from index `first` on) where the
// two are one run.
void Append(std::vector<Mapping>* out, size_t first, const Mapping& m) {
  if (out->size() > first) {
    Mapping& prev = out->back();
    if (prev.kind == m.kind && prev.writable == m.writable &&
        (m.kind != Mapping::Kind::kData || prev.host_offset + prev.length == m.host_offset)) {
      prev.length += m.length;
      return;
    }
  }
  out->push_back(m);
}

}  // namespace

Result<std::unique_ptr<ClusterMap>> QedMap::Open(OpenContext ctx) {
  std::unique_ptr<QedMap> m(new QedMap());
  m->path_ = ctx.path;
  m->file_ = std::move(ctx.file);
  const std::string& path = m->path_;
  ASSIGN_OR_RETURN(uint64_t file_size, m->file_->Size());
  ASSIGN_OR_RETURN(m->header_, ParseHeader(*m->file_, path, file_size));
  Header& h = m->header_;
  m->read_only_ = ctx.options.read_only || !m->file_->writable();
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': QED images have no internal snapshots", path);
  m->file_size_ = AlignDown(file_size, h.cluster_size);

  if (h.autoclear_features != 0 && !m->read_only_) {
    // No autoclear feature is known: an older writer's bits are cleared before we write.
    h.autoclear_features = 0;
    RETURN_IF_ERROR(m->WriteHeaderFields().WithContext("'{}': Failed to update header", path));
    RETURN_IF_ERROR(m->file_->Sync(true));
  }

  m->l1_.resize(h.table_bytes());
  RETURN_IF_ERROR(
      m->file_->PRead(h.l1_table_offset, m->l1_).WithContext("'{}': Failed to read L1 table", path));
  const uint64_t cache = ctx.options.cache_bytes ? ctx.options.cache_bytes : limits::kDefaultCacheBytes;
  m->l2_cache_ = std::make_unique<TableCache>(m->file_.get(), static_cast<uint32_t>(h.table_bytes()),
                                              cache / h.table_bytes(), IoTag::kL2);

  // An image not closed cleanly is checked and repaired before it is written, as qemu
  // does; read-only it is opened as it is (nothing can make it worse).
  if ((h.features & kFeatureNeedCheck) && !m->read_only_ && !ctx.options.for_check) {
    auto report = m->Check(RepairMode::kAll);
    if (!report.ok()) return report.error().WithContext("'{}': Image corrupted", path);
    if (report->check_errors > 0) return Status::Corrupt("'{}': Image corrupted", path);
  }
  return std::unique_ptr<ClusterMap>(std::move(m));
}

QedMap::~QedMap() {
  if (!closed_) (void)Close();
}

uint64_t QedMap::L1Entry(uint64_t i) const { return LoadLE64(&l1_[i * 8]); }

void QedMap::SetL1Entry(uint64_t i, uint64_t value) {
  StoreLE64(&l1_[i * 8], value);
  dirty_l1_.insert(i * 8 / 512);
}

bool QedMap::ValidClusterOffset(uint64_t off) const {
  return IsAligned(off, header_.cluster_size) &&
         off >= uint64_t{header_.header_size} * header_.cluster_size && off < file_size_;
}

bool QedMap::ValidTableOffset(uint64_t off) const {
  const uint64_t last = off + uint64_t{header_.table_size - 1} * header_.cluster_size;
  if (last <= off) return false;  // qemu's overflow test (see ParseHeader)
  return ValidClusterOffset(off) && ValidClusterOffset(last);
}

Result<TableRef> QedMap::L2Table(uint64_t l1_index, bool create) {
  const uint64_t off = L1Entry(l1_index);
  if (off == kUnallocated) {
    if (!create) return TableRef();
    const uint64_t at = file_size_;
    if (at > limits::kMaxHostOffset - header_.table_bytes())
      return Status::Unsupported("'{}': the QED file is full", path_);
    file_size_ += header_.table_bytes();
    ASSIGN_OR_RETURN(TableRef t, l2_cache_->GetEmpty(at));
    SetL1Entry(l1_index, at);
    return t;
  }
  if (!ValidTableOffset(off))
    return Status::Corrupt("'{}': L1 entry {} names an invalid L2 table offset {:#x} (run 'vimgfs check')",
                           path_, l1_index, off);
  auto table = l2_cache_->Get(off);
  if (!table.ok()) return table.error().WithContext("'{}': reading an L2 table", path_);
  return table;
}

Status QedMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > virtual_size() || len > virtual_size() - guest_off)
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, virtual_size());
  const size_t first = out->size();
  const uint64_t cs = header_.cluster_size;
  const uint64_t span = header_.table_entries() * cs;  // guest bytes one L2 table covers
  while (len > 0) {
    const uint64_t l1i = L1Index(guest_off);
    ASSIGN_OR_RETURN(TableRef l2, L2Table(l1i, false));
    const uint64_t table_end = std::min(guest_off + len, (l1i + 1) * span);
    if (!l2) {
      Append(out, first, Mapping{.kind = Mapping::Kind::kUnallocated, .length = table_end - guest_off});
      len -= table_end - guest_off;
      guest_off = table_end;
      continue;
    }
    while (guest_off < table_end) {
      const uint64_t in_cluster = guest_off % cs;
      const uint64_t n = std::min(table_end - guest_off, cs - in_cluster);
      const uint64_t e = LoadLE64(l2.data() + L2Index(guest_off) * 8);
      Mapping m{.length = n};
      if (e == kUnallocated) {
        m.kind = Mapping::Kind::kUnallocated;
      } else if (e == kZeroCluster) {
        m.kind = Mapping::Kind::kZero;
      } else if (!ValidClusterOffset(e)) {
        return Status::Corrupt(
            "'{}': guest offset {:#x} maps to an invalid cluster offset {:#x} (run 'vimgfs check')", path_,
            guest_off, e);
      } else {
        m.kind = Mapping::Kind::kData;
        m.file = file_.get();
        m.host_offset = e + in_cluster;
        m.writable = !read_only_;
        // qemu's block status for QED does not ask the file for holes (no recursion).
        m.opaque_data = true;
      }
      Append(out, first, m);
      guest_off += n;
      len -= n;
    }
  }
  return Status::Ok();
}

Status QedMap::CheckWritable() const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  return Status::Ok();
}

Status QedMap::WriteHeaderFields() {
  // The 64 bytes of known fields only: the backing name after them stays as it is.
  return file_->PWrite(0, SerializeHeader(header_), IoTag::kHeader)
      .WithContext("'{}': writing the header", path_);
}

Status QedMap::MarkNeedCheck() {
  if (header_.has_backing() || (header_.features & kFeatureNeedCheck)) return Status::Ok();
  header_.features |= kFeatureNeedCheck;
  RETURN_IF_ERROR(WriteHeaderFields());
  // Durable before any table changes, so a crash leaves the mark behind.
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Result<WritePlan> QedMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (guest_off >= virtual_size())
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off, virtual_size());
  const uint64_t cs = header_.cluster_size;
  const uint64_t cstart = AlignDown(guest_off, cs);
  const uint64_t l1i = L1Index(guest_off);
  const uint64_t span = header_.table_entries() * cs;
  uint64_t end = std::min({guest_off + std::max<uint64_t>(len, 1), AlignUp(virtual_size(), cs),
                           (l1i + 1) * span, cstart + std::max<uint64_t>(kMaxPlanBytes, cs)});
  end = AlignUp(end, cs);
  ASSIGN_OR_RETURN(TableRef l2, L2Table(l1i, false));
  auto entry = [&](uint64_t guest) { return l2 ? LoadLE64(l2.data() + L2Index(guest) * 8) : kUnallocated; };

  WritePlan plan;
  plan.file = file_.get();
  plan.guest_offset = cstart;
  plan.cookie[1] = cstart;
  const uint64_t e = entry(cstart);
  if (e != kUnallocated && e != kZeroCluster) {
    if (!ValidClusterOffset(e))
      return Status::Corrupt(
          "'{}': guest offset {:#x} maps to an invalid cluster offset {:#x} (run 'vimgfs check')", path_,
          cstart, e);
    plan.length = cs;
    plan.host_offset = e;
    plan.cookie[0] = kPlanInPlace;
    return plan;
  }
  // A run of clusters with no data of their own, placed at the end of the file.
  uint64_t n = 1;
  while (cstart + n * cs < end) {
    const uint64_t next = entry(cstart + n * cs);
    if (next != kUnallocated && next != kZeroCluster) break;
    ++n;
  }
  l2.Release();
  if (file_size_ > limits::kMaxHostOffset - n * cs)
    return Status::Unsupported("'{}': the QED file is full", path_);
  RETURN_IF_ERROR(MarkNeedCheck());
  plan.length = n * cs;
  plan.host_offset = file_size_;
  // Not `fresh`: the whole cluster is written, zeros included, as qemu writes it. A fresh
  // plan's zero tail is skipped and the file then extended by truncation, which races
  // with writers past it (several allocations are in flight at once here) and can cut
  // their data off; and every cluster an L2 entry names must lie inside the file.
  plan.fresh = false;
  file_size_ += n * cs;
  plan.cookie[0] = kPlanNew;
  plan.cookie[2] = n;
  return plan;
}

Status QedMap::CommitWrite(const WritePlan& plan) {
  RETURN_IF_ERROR(CheckWritable());
  if (plan.cookie[0] != kPlanNew) return Status::Ok();  // in place: nothing to link
  const uint64_t cs = header_.cluster_size;
  const uint64_t cstart = plan.cookie[1];
  ASSIGN_OR_RETURN(TableRef l2, L2Table(L1Index(cstart), true));
  for (uint64_t i = 0; i < plan.cookie[2]; ++i)
    StoreLE64(l2.data() + L2Index(cstart + i * cs) * 8, plan.host_offset + i * cs);
  l2.MarkDirty();
  // The data must be durable before the table that names it.
  l2_cache_->DependsOnFlush();
  return Status::Ok();
}

void QedMap::AbortWrite(const WritePlan& plan) {
  // The clusters stay unnamed: give them back when nothing was placed after them, else
  // they are a leak (as a failed write leaves one in qemu).
  if (plan.cookie[0] == kPlanNew && plan.host_offset + plan.length == file_size_)
    file_size_ = plan.host_offset;
}

Status QedMap::ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) {
  RETURN_IF_ERROR(CheckWritable());
  const uint64_t cs = header_.cluster_size;
  const uint64_t end = std::min(AlignUp(guest_off + len, cs), AlignUp(virtual_size(), cs));
  RETURN_IF_ERROR(MarkNeedCheck());
  for (uint64_t pos = AlignDown(guest_off, cs); pos < end;) {
    const uint64_t l1i = L1Index(pos);
    const uint64_t table_end = std::min(end, (l1i + 1) * header_.table_entries() * cs);
    // Zero markers need an L2 table to live in (qemu allocates one too).
    ASSIGN_OR_RETURN(TableRef l2, L2Table(l1i, true));
    for (; pos < table_end; pos += cs) {
      std::byte* slot = l2.data() + L2Index(pos) * 8;
      const uint64_t e = LoadLE64(slot);
      if (e == kZeroCluster) continue;
      if (e == kUnallocated) {
        StoreLE64(slot, kZeroCluster);
        l2.MarkDirty();  // at once: an error below must not leave a changed clean table
        continue;
      }
      // A cluster of data stays allocated (QED cannot give it back: without a table
      // naming it, it is a leak); its bytes are zeroed in the file.
      if (!ValidClusterOffset(e))
        return Status::Corrupt("'{}': guest offset {:#x} maps to an invalid cluster offset {:#x}", path_, pos,
                               e);
      Status s = file_->PunchHole(e, cs);
      if (s.ok() && !unmap) (void)file_->Allocate(e, cs);
      if (s.kind() == ErrorKind::kUnsupported) return Status::Unsupported("zero range");
      RETURN_IF_ERROR(s);
    }
  }
  return Status::Ok();
}

Status QedMap::WriteBack() {
  if (read_only_ || closed_ || !l2_cache_) return Status::Ok();
  // L2 tables first (after the data they name), synced before an L1 entry points at them.
  RETURN_IF_ERROR(l2_cache_->Flush().WithContext("'{}': writing L2 tables", path_));
  return WriteDirtySectors(*file_, header_.l1_table_offset, l1_, &dirty_l1_, IoTag::kL1)
      .WithContext("'{}': writing the L1 table", path_);
}

Status QedMap::SyncFiles() {
  if (read_only_ || closed_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status QedMap::Close() {
  if (closed_) return Status::Ok();
  Status s = Flush();
  // A clean close: no check needed on the next open (qemu clears the mark here too).
  if (s.ok() && !read_only_ && (header_.features & kFeatureNeedCheck)) {
    header_.features &= ~kFeatureNeedCheck;
    s = WriteHeaderFields();
    if (s.ok()) s = file_->Sync(true).WithContext("'{}': syncing", path_);
  }
  closed_ = true;
  return s;
}

std::optional<BackingRef> QedMap::backing() const {
  if (!header_.has_backing()) return std::nullopt;
  // QED_F_BACKING_FORMAT_NO_PROBE: the backing file is raw, never probed.
  return BackingRef{.name = header_.backing_name,
                    .format = (header_.features & kFeatureBackingNoProbe) ? "raw" : ""};
}

FormatInfo QedMap::Info() {
  FormatInfo info;
  info.format = "qed";
  info.virtual_size = virtual_size();
  info.cluster_size = header_.cluster_size;
  // qemu never shows a QED image as dirty: its need-check timer, started at open for a
  // marked image, fires at the first drain and clears the mark in memory (on a read-only
  // open the header write that follows fails silently), before info asks.
  info.dirty = false;
  info.zero_clusters = true;
  return info;
}

Status QedMap::Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown) {
  RETURN_IF_ERROR(CheckWritable());
  // qemu's truncate takes no flags: a grow that must hide a longer backing file fails.
  if (zero_grown != GrowZeros::kNone)
    return Status::Unsupported("Block driver does not support requested flags");
  if (!IsValidImageSize(new_size, header_.cluster_size, header_.table_size))
    return Status::InvalidArgument("Invalid image size specified");
  if (new_size < header_.image_size)
    return Status::Unsupported("Shrinking images is currently not supported");
  const uint64_t old_size = header_.image_size;
  header_.image_size = new_size;
  Status s = WriteHeaderFields();
  if (s.ok()) s = file_->Sync(true).WithContext("'{}': syncing", path_);
  if (!s.ok()) {
    header_.image_size = old_size;
    return s.WithContext("Failed to update the image size");
  }
  return Status::Ok();
}

Status QedMap::SetBacking(const std::optional<BackingRef>& ref) {
  RETURN_IF_ERROR(CheckWritable());
  const bool has = ref && !ref->name.empty();
  if (has && header_.compat_features != 0)
    return Status::Unsupported("'{}': the image has compatible features vimgfs does not know", path_);
  Header h = header_;
  h.features &= ~(kFeatureBackingFile | kFeatureBackingNoProbe);
  if (has) {
    h.features |= kFeatureBackingFile;
    if (ref->format == "raw") h.features |= kFeatureBackingNoProbe;
  }
  h.backing_name_offset = kHeaderBytes;
  h.backing_name_size = has ? static_cast<uint32_t>(ref->name.size()) : 0;
  h.backing_name = has ? ref->name : "";
  if (kHeaderBytes + h.backing_name.size() > uint64_t{h.header_size} * h.cluster_size ||
      h.backing_name.size() > kMaxBackingNameBytes)
    return Status::NoSpace("'{}': the backing file name does not fit in the QED header", path_);
  // Metadata written before stays ordered before the new header.
  RETURN_IF_ERROR(Flush());
  std::vector<std::byte> raw(kHeaderBytes + h.backing_name.size());
  const auto fields = SerializeHeader(h);
  std::memcpy(raw.data(), fields.data(), kHeaderBytes);
  std::memcpy(raw.data() + kHeaderBytes, h.backing_name.data(), h.backing_name.size());
  RETURN_IF_ERROR(file_->PWrite(0, raw, IoTag::kHeader).WithContext("'{}': writing the header", path_));
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  header_ = std::move(h);
  return Status::Ok();
}

}  // namespace vimgfs::qed

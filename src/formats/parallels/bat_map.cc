// ParallelsMap: the BAT as a ClusterMap, and opening an image.
#include <algorithm>
#include <cstring>

#include "formats/format_util.h"
#include "formats/parallels/parallels_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::parallels {
namespace {

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

Result<std::unique_ptr<ClusterMap>> OpenParallels(OpenContext ctx) {
  File* file = ctx.file.get();
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': Parallels images have no internal snapshots", ctx.path);
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  // A file shorter than the header reads as zeros past its end (no magic), as in qemu.
  std::array<std::byte, kHeaderSize> raw{};
  RETURN_IF_ERROR(file->PRead(0, raw).WithContext("'{}': reading the Parallels header", ctx.path));
  ASSIGN_OR_RETURN(Header h, ParseHeader(raw, ctx.path));
  // Whole sectors, so a changed entry is written back as the sector around it. A BAT cut
  // short by the end of the file reads as zeros there, as qemu reads it.
  std::vector<std::byte> meta(AlignUp(h.bat_end(), kSectorSize));
  const uint64_t present = std::min<uint64_t>(meta.size(), file_size);
  RETURN_IF_ERROR(file->PRead(0, std::span(meta).first(present))
                      .WithContext("'{}': reading the Parallels BAT", ctx.path));
  const bool read_only = ctx.options.read_only || !file->writable();
  // As qemu: only a check may open for writing an image whose last writer did not close it.
  if (h.in_use == kInUse && !read_only && !ctx.options.for_check)
    return Status::Corrupt("'{}': parallels: Image was not closed correctly; cannot be opened read/write",
                           ctx.path);
  auto map =
      std::make_unique<ParallelsMap>(ctx.path, std::move(ctx.file), h, std::move(meta), file_size, read_only);
  if (!read_only) RETURN_IF_ERROR(map->MarkInUse());
  return std::unique_ptr<ClusterMap>(std::move(map));
}

ParallelsMap::ParallelsMap(std::string path, std::unique_ptr<File> file, Header header,
                           std::vector<std::byte> meta, uint64_t file_size, bool read_only)
    : path_(std::move(path)),
      file_(std::move(file)),
      h_(header),
      meta_(std::move(meta)),
      read_only_(read_only),
      unclean_(header.in_use == kInUse) {
  Scan(file_size);
}

uint32_t ParallelsMap::entry(uint64_t cluster) const { return LoadLE32(&meta_[kHeaderSize + cluster * 4]); }

void ParallelsMap::SetEntry(uint64_t cluster, uint32_t value) {
  const uint64_t at = kHeaderSize + cluster * 4;
  StoreLE32(&meta_[at], value);
  dirty_sectors_.insert(at / kSectorSize);
}

void ParallelsMap::Scan(uint64_t file_size) {
  inconsistency_.clear();
  const uint64_t cs = h_.cluster_size;
  const uint64_t meta_end = meta_.size();
  uint64_t end = std::max(h_.data_start, meta_end);
  std::vector<std::pair<uint64_t, uint32_t>> used;  // host offset, cluster
  for (uint32_t i = 0; i < h_.bat_entries; ++i) {
    const uint32_t e = entry(i);
    if (e == 0) continue;
    const uint64_t start = HostOffset(e);
    used.emplace_back(start, i);
    end = std::max(end, start + cs);
    if (!inconsistency_.empty()) continue;
    if (start < meta_end)
      inconsistency_ = fmt::format("cluster {} at 0x{:x} overlaps the Parallels header or BAT", i, start);
    else if (start > file_size)
      inconsistency_ = fmt::format("cluster {} is outside the image (at 0x{:x}, the file ends at 0x{:x})", i,
                                   start, file_size);
  }
  // Where new clusters would go: never far past the end of the file (a hostile offset
  // would make the file huge).
  if (inconsistency_.empty() && h_.data_start > file_size)
    inconsistency_ = fmt::format("the data area (at 0x{:x}) starts past the end of the file (0x{:x})",
                                 h_.data_start, file_size);
  if (inconsistency_.empty() && h_.ext_off > file_size)
    inconsistency_ = fmt::format("the format extension (at 0x{:x}) lies past the end of the file (0x{:x})",
                                 h_.ext_off, file_size);
  std::sort(used.begin(), used.end());
  for (size_t k = 1; k < used.size() && inconsistency_.empty(); ++k) {
    if (used[k].first < used[k - 1].first + cs)
      inconsistency_ =
          fmt::format("clusters {} and {} overlap in the file", used[k - 1].second, used[k].second);
  }
  if (!IsPowerOfTwo(cs))
    unwritable_ = fmt::format("writing clusters of {} bytes (not a power of two) is not supported", cs);
  else if (cs > kMaxWritableClusterSize)
    unwritable_ = fmt::format("clusters of {} bytes are too large to write into", cs);
  // The format extension and its bitmaps are not named by the BAT: new clusters go past
  // all of them (past the end of the file), never over them.
  if (h_.ext_off != 0) end = std::max({end, file_size, h_.ext_off + cs});
  const uint64_t unit = h_.entry_unit();
  next_alloc_ = DivRoundUp(end, unit) * unit;
}

uint64_t ParallelsMap::DataEnd() const {
  uint64_t end = h_.data_start;
  for (uint32_t i = 0; i < h_.bat_entries; ++i) {
    if (const uint32_t e = entry(i)) end = std::max(end, HostOffset(e) + h_.cluster_size);
  }
  return end;
}

Status ParallelsMap::WriteHeaderSector() {
  return file_->PWrite(0, std::span(meta_).first(kSectorSize), IoTag::kHeader)
      .WithContext("'{}': writing the Parallels header", path_);
}

Status ParallelsMap::MarkInUse() {
  StoreLE32(&meta_[off::kInUse], kInUse);
  RETURN_IF_ERROR(WriteHeaderSector());
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status ParallelsMap::CheckWritable(const char* what) const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (read_only_) return Status::ReadOnly("'{}': cannot {}: image is opened read-only", path_, what);
  if (!inconsistency_.empty())
    return Status::Corrupt("'{}': cannot {}: {} (run 'vimgfs check')", path_, what, inconsistency_);
  if (!unwritable_.empty()) return Status::Unsupported("'{}': cannot {}: {}", path_, what, unwritable_);
  return Status::Ok();
}

Status ParallelsMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > h_.virtual_size || len > h_.virtual_size - guest_off)
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, h_.virtual_size);
  const size_t first = out->size();
  const bool writable = !read_only_ && inconsistency_.empty() && unwritable_.empty();
  const uint64_t cs = h_.cluster_size;
  const uint64_t covered = uint64_t{h_.bat_entries} * cs;  // < 2^57: no overflow
  while (len > 0) {
    if (guest_off >= covered) {  // past what the BAT maps (qemu reads it as unallocated)
      Append(out, first, Mapping{.kind = Mapping::Kind::kUnallocated, .length = len});
      break;
    }
    const uint64_t cluster = guest_off / cs;
    const uint64_t in_cluster = guest_off % cs;
    const uint64_t n = std::min(len, cs - in_cluster);
    const uint32_t e = entry(cluster);
    if (e == 0) {
      Append(out, first, Mapping{.kind = Mapping::Kind::kUnallocated, .length = n});
    } else {
      // qemu reports the cluster as data as it is, without asking the file for holes.
      Append(out, first,
             Mapping{.kind = Mapping::Kind::kData,
                     .length = n,
                     .file = file_.get(),
                     .host_offset = HostOffset(e) + in_cluster,
                     .writable = writable,
                     .opaque_data = true});
    }
    guest_off += n;
    len -= n;
  }
  return Status::Ok();
}

Result<WritePlan> ParallelsMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable("write"));
  if (guest_off >= h_.virtual_size)
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off,
                              h_.virtual_size);
  const uint64_t cs = h_.cluster_size;
  const uint64_t cluster = guest_off / cs;
  if (cluster >= h_.bat_entries)
    return Status::Unsupported("'{}': write at {} is past the {} clusters the Parallels BAT maps", path_,
                               guest_off, h_.bat_entries);
  WritePlan plan;
  plan.guest_offset = cluster * cs;
  plan.length = cs;  // whole clusters: the engine fills the rest (zeros past the disk end)
  plan.file = file_.get();
  plan.cookie[0] = cluster;
  if (const uint32_t e = entry(cluster)) {  // allocated while the engine waited
    plan.host_offset = HostOffset(e);
    return plan;
  }
  uint64_t host;
  if (!reusable_.empty()) {
    host = reusable_.back();
    reusable_.pop_back();
  } else {
    host = next_alloc_;
    if (host / h_.entry_unit() > 0xffffffffu)
      return Status::NoSpace("'{}': the Parallels file is full (BAT entries are 32-bit)", path_);
    ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
    plan.fresh = host >= file_size;
    // The file covers the cluster before its data is written: a fill that skips zeros
    // then never has to grow the file itself, which could race with (and cut off) the
    // data of a later cluster written at the same time. Only later reservations lie
    // beyond, so nobody writes past host + cs meanwhile.
    if (host + cs > file_size)
      RETURN_IF_ERROR(file_->Truncate(host + cs).WithContext("'{}': growing the file", path_));
    next_alloc_ = host + cs;
  }
  plan.host_offset = host;
  plan.cookie[1] = host;
  plan.cookie[2] = 1;
  return plan;
}

Status ParallelsMap::CommitWrite(const WritePlan& plan) {
  if (plan.cookie[2] != 1) return Status::Ok();
  const uint64_t cluster = plan.cookie[0];
  if (entry(cluster) != 0)
    return Status::Corrupt("'{}': Parallels cluster {} was allocated twice", path_, cluster);
  // Reaches the disk at the next flush, after the data is synced.
  SetEntry(cluster, static_cast<uint32_t>(plan.cookie[1] / h_.entry_unit()));
  return Status::Ok();
}

void ParallelsMap::AbortWrite(const WritePlan& plan) {
  if (plan.cookie[2] == 1) reusable_.push_back(plan.cookie[1]);  // never named by the BAT
}

Status ParallelsMap::ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) {
  RETURN_IF_ERROR(CheckWritable("zero"));
  // A cluster never written reads as zeros already; one that was cannot be given back
  // (qemu's driver has no way either), so the engine writes zeros into it.
  const uint64_t cs = h_.cluster_size;
  const uint64_t end = std::min<uint64_t>(guest_off + len, uint64_t{h_.bat_entries} * cs);
  for (uint64_t c = guest_off / cs; c * cs < end; ++c) {
    if (entry(c) != 0) return Status::Unsupported("zero clusters");
  }
  return Status::Ok();
}

Status ParallelsMap::WriteBack() {
  if (closed_ || read_only_ || dirty_sectors_.empty()) return Status::Ok();
  // Data durable before an entry names it.
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  return WriteDirtySectors(*file_, 0, meta_, &dirty_sectors_, IoTag::kBlockMap)
      .WithContext("'{}': writing the Parallels BAT", path_);
}

Status ParallelsMap::SyncFiles() {
  if (closed_ || read_only_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status ParallelsMap::Close() {
  if (closed_) return Status::Ok();
  if (read_only_) {
    closed_ = true;
    return Status::Ok();
  }
  Status st = Flush();
  if (st.ok() && inconsistency_.empty() && unwritable_.empty() && h_.ext_off == 0) {
    // As qemu's close: the file ends where the last cluster does (space reserved by failed
    // writes goes; an empty data area cut by a leak repair comes back as zeros).
    const uint64_t end = DataEnd();
    auto size = file_->Size();
    if (!size.ok()) st = size.status();
    if (st.ok() && *size != end) st = file_->Truncate(end).WithContext("'{}': truncating", path_);
  }
  if (st.ok()) {
    StoreLE32(&meta_[off::kInUse], 0);  // closed cleanly
    st = WriteHeaderSector();
    if (st.ok()) st = file_->Sync(true).WithContext("'{}': syncing", path_);
  }
  closed_ = true;
  return st;
}

FormatInfo ParallelsMap::Info() {
  FormatInfo info;
  info.format = "parallels";
  info.virtual_size = h_.virtual_size;
  info.cluster_size = 0;  // qemu-img info shows none for parallels
  return info;
}

}  // namespace vimgfs::parallels

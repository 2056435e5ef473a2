// VhdxMap: the VHDX BAT as a ClusterMap, and opening an image.
#include <algorithm>
#include <cstring>

#include "formats/vhdx/vhdx_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vhdx {
namespace {

// Writes h->current to both header slots, the inactive one first, each synced, so one
// valid header survives a crash at any point.
Status WriteBothHeaders(File* file, Headers* h, const std::string& path) {
  for (int i = 0; i < 2; ++i) {
    h->current.sequence += 1;
    const int slot = 1 - h->slot;
    const auto b = EncodeHeader(h->current);
    RETURN_IF_ERROR(file->PWrite(slot == 0 ? kHeader1Offset : kHeader2Offset, b, IoTag::kHeader)
                        .WithContext("'{}': writing VHDX header {}", path, slot + 1));
    RETURN_IF_ERROR(file->Sync(true).WithContext("'{}': syncing", path));
    h->slot = slot;
  }
  return Status::Ok();
}

bool Overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) { return a < b + blen && b < a + alen; }

}  // namespace

Result<std::unique_ptr<ClusterMap>> OpenVhdx(OpenContext ctx) {
  File* file = ctx.file.get();
  const std::string& path = ctx.path;
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  ASSIGN_OR_RETURN(Headers headers, ReadHeaders(file, file_size, path));
  const bool read_only = ctx.options.read_only || !file->writable();

  std::map<uint64_t, std::vector<std::byte>> overlay;
  uint64_t last_file_offset = 0, last_sequence = 0;
  bool log_active = false;
  RETURN_IF_ERROR(ReadLog(file, file_size, headers.current, path, &overlay, &last_file_offset, &last_sequence,
                          &log_active));
  if (read_only && log_active && ctx.options.for_check) {
    // `check` without -r reports what qemu-img reports: it will not look at an image whose
    // log is pending (other read-only opens replay it in memory).
    return Status::InvalidFormat(
        "VHDX image file '{}' opened read-only, but contains a log that needs to be replayed\n"
        "To replay the log, run:\nqemu-img check -r all '{}'",
        path, path);
  }
  if (!read_only && !IsNullGuid(headers.current.log_guid)) {
    // Replay into the file, make it durable, then retire the log.
    for (const auto& [off, sector] : overlay) {
      RETURN_IF_ERROR(file->PWrite(off, sector, IoTag::kOther)
                          .WithContext("'{}': replaying the VHDX log at 0x{:x}", path, off));
    }
    ASSIGN_OR_RETURN(uint64_t size_now, file->Size());
    if (size_now < last_file_offset) RETURN_IF_ERROR(file->Truncate(last_file_offset));
    RETURN_IF_ERROR(file->Sync(true).WithContext("'{}': syncing", path));
    headers.current.log_guid = Guid{};
    RETURN_IF_ERROR(WriteBothHeaders(file, &headers, path));
    overlay.clear();
    ASSIGN_OR_RETURN(file_size, file->Size());
  } else if (!overlay.empty()) {
    file_size = std::max(file_size, last_file_offset);
  }
  const Reader reader(file, &overlay);
  ASSIGN_OR_RETURN(Params p, ReadRegionsAndMetadata(reader, file_size, path));
  const uint64_t log_off = headers.current.log_offset, log_len = headers.current.log_length;
  if (Overlaps(p.bat_offset, p.bat_length, log_off, log_len) ||
      Overlaps(p.metadata_offset, p.metadata_length, log_off, log_len)) {
    return Status::InvalidFormat("'{}': the VHDX log overlaps the BAT or metadata region", path);
  }
  for (const auto& [off, sector] : overlay) {
    if (off >= MiB && !Overlaps(off, kLogSector, p.bat_offset, p.bat_length) &&
        !Overlaps(off, kLogSector, p.metadata_offset, p.metadata_length)) {
      return Status::Unsupported(
          "'{}': the VHDX log holds writes to payload data (at 0x{:x}); open it read-write to "
          "replay the log",
          path, off);
    }
  }
  // Read in pieces: a 64 TiB disk of 1 MiB blocks has a 512 MiB BAT, held once.
  std::vector<uint64_t> bat(p.bat_entries);
  {
    std::vector<std::byte> raw(std::min<uint64_t>(p.bat_entries * 8, 4 * MiB));
    for (uint64_t done = 0; done < p.bat_entries;) {
      const uint64_t n = std::min<uint64_t>(p.bat_entries - done, raw.size() / 8);
      RETURN_IF_ERROR(reader.Read(p.bat_offset + done * 8, std::span(raw.data(), n * 8))
                          .WithContext("'{}': reading the VHDX BAT", path));
      for (uint64_t i = 0; i < n; ++i) bat[done + i] = LoadLE64(&raw[i * 8]);
      done += n;
    }
  }

  // Validate every entry: a known state, and data inside the file, clear of the metadata.
  for (uint64_t i = 0; i < p.bat_entries; ++i) {
    const uint64_t e = bat[i], st = EntryState(e), off = EntryOffset(e);
    const bool is_bitmap = i % (p.chunk_ratio + 1) == p.chunk_ratio;
    uint64_t len = 0;
    if (is_bitmap) {
      if (st != kNotPresent && st != kSbPresent) {
        return Status::Corrupt("'{}': VHDX BAT entry {} (sector bitmap) has invalid state {}", path, i, st);
      }
      if (st == kSbPresent) len = kSectorBitmapBlockSize;
    } else {
      if (st == 4 || st == 5) {
        return Status::Corrupt("'{}': VHDX BAT entry {} has invalid state {}", path, i, st);
      }
      if (st == kPartiallyPresent && !p.has_parent) {
        return Status::Corrupt("'{}': VHDX BAT entry {} is partially present in an image without a parent",
                               path, i);
      }
      if (st == kFullyPresent || st == kPartiallyPresent) {
        // The last block may end with the file where the disk ends (qemu's fixed images).
        const uint64_t b = i - i / (p.chunk_ratio + 1);
        len = std::min<uint64_t>(p.block_size, p.virtual_size - std::min(p.virtual_size, b * p.block_size));
        if (len == 0) len = p.block_size;
      }
    }
    if (len == 0) continue;
    if (off < MiB || Overlaps(off, len, p.bat_offset, p.bat_length) ||
        Overlaps(off, len, p.metadata_offset, p.metadata_length) || Overlaps(off, len, log_off, log_len)) {
      return Status::Corrupt("'{}': VHDX BAT entry {} (offset 0x{:x}) overlaps the image metadata", path, i,
                             off);
    }
    if ((off > file_size || len > file_size - off) && !ctx.options.for_check) {
      return Status::Corrupt(
          "'{}': VHDX BAT entry {} (offset 0x{:x}, {} bytes) points past the end of the file ({} bytes)",
          path, i, off, len, file_size);
    }
  }
  if (p.has_parent && !p.parent.contains("relative_path") && !p.parent.contains("absolute_win32_path") &&
      !p.parent.contains("volume_path")) {
    return Status::InvalidFormat("'{}': VHDX parent locator names no parent path", path);
  }
  auto map =
      std::make_unique<VhdxMap>(path, std::move(ctx.file), headers, std::move(p), std::move(bat), read_only);
  map->set_file_size_at_open(file_size);
  map->set_log_cursor(last_sequence);
  map->set_log_replayed(!read_only && log_active);
  return std::unique_ptr<ClusterMap>(std::move(map));
}

VhdxMap::VhdxMap(std::string path, std::unique_ptr<File> file, Headers headers, Params params,
                 std::vector<uint64_t> bat, bool read_only)
    : path_(std::move(path)),
      file_(std::move(file)),
      h_(headers),
      p_(std::move(params)),
      bat_(std::move(bat)),
      read_only_(read_only) {}

Status VhdxMap::CheckWritable() const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (read_only_) return Status::ReadOnly("'{}': cannot write: image is opened read-only", path_);
  return Status::Ok();
}

Status VhdxMap::LoadBitmap(uint64_t chunk, const std::vector<std::byte>** out) {
  auto it = bitmaps_.find(chunk);
  if (it == bitmaps_.end()) {
    std::vector<std::byte> b(kSectorBitmapBlockSize);
    const uint64_t e = bat_[p_.BitmapIndex(chunk)];
    if (EntryState(e) == kSbPresent) {
      RETURN_IF_ERROR(file_->PRead(EntryOffset(e), b)
                          .WithContext("'{}': reading the VHDX sector bitmap of chunk {}", path_, chunk));
    }
    if (bitmaps_.size() >= 16) bitmaps_.erase(bitmaps_.begin());  // bounded cache
    it = bitmaps_.emplace(chunk, std::move(b)).first;
  }
  *out = &it->second;
  return Status::Ok();
}

Status VhdxMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > p_.virtual_size || len > p_.virtual_size - guest_off) {
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, p_.virtual_size);
  }
  const size_t first = out->size();
  auto push = [&](Mapping m) {
    Mapping* prev = out->size() > first ? &out->back() : nullptr;
    if (prev && prev->kind == m.kind &&
        (m.kind != Mapping::Kind::kData ||
         (prev->host_offset + prev->length == m.host_offset && prev->writable == m.writable))) {
      prev->length += m.length;
    } else {
      out->push_back(m);
    }
  };
  const bool writable = !read_only_ && wrote_;
  while (len > 0) {
    const uint64_t block = guest_off / p_.block_size;
    const uint64_t in_block = guest_off % p_.block_size;
    const uint64_t n = std::min<uint64_t>(len, p_.block_size - in_block);
    const uint64_t e = bat_[p_.PayloadIndex(block)];
    const uint64_t st = EntryState(e);
    if (st == kFullyPresent) {
      push({.kind = Mapping::Kind::kData,
            .length = n,
            .file = file_.get(),
            .host_offset = EntryOffset(e) + in_block,
            .writable = writable});
    } else if (st == kPartiallyPresent) {
      const std::vector<std::byte>* bm = nullptr;
      RETURN_IF_ERROR(LoadBitmap(block / p_.chunk_ratio, &bm));
      const uint64_t ls = p_.logical_sector;
      const uint64_t base_bit = (block % p_.chunk_ratio) * (p_.block_size / ls);
      uint64_t at = in_block;
      while (at < in_block + n) {
        const uint64_t sec = at / ls;
        const uint64_t bit = base_bit + sec;
        const bool present = (static_cast<uint8_t>((*bm)[bit / 8]) >> (bit % 8)) & 1;
        const uint64_t run = std::min<uint64_t>((sec + 1) * ls, in_block + n) - at;
        if (present) {
          push({.kind = Mapping::Kind::kData,
                .length = run,
                .file = file_.get(),
                .host_offset = EntryOffset(e) + at,
                .writable = false});
        } else {
          push({.kind = Mapping::Kind::kUnallocated, .length = run});
        }
        at += run;
      }
    } else if (st == kZero || !p_.has_parent) {
      push({.kind = Mapping::Kind::kZero, .length = n});
    } else {
      push({.kind = Mapping::Kind::kUnallocated, .length = n});
    }
    guest_off += n;
    len -= n;
  }
  return Status::Ok();
}

Status VhdxMap::UpdateHeaders() { return WriteBothHeaders(file_.get(), &h_, path_); }

Status VhdxMap::FirstWrite() {
  if (wrote_) return Status::Ok();
  // MS-VHDX: the first change to the file after opening gets a new FileWriteGuid, the
  // first user-visible data change a new DataWriteGuid (both happen here, with the write).
  h_.current.file_write_guid = NewGuid();
  h_.current.data_write_guid = NewGuid();
  RETURN_IF_ERROR(UpdateHeaders());
  ASSIGN_OR_RETURN(uint64_t size, file_->Size());
  next_alloc_ = AlignUp(size, MiB);
  wrote_ = true;
  return Status::Ok();
}

Result<WritePlan> VhdxMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (guest_off >= p_.virtual_size) {
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off,
                              p_.virtual_size);
  }
  RETURN_IF_ERROR(FirstWrite());
  const uint64_t block = guest_off / p_.block_size;
  const uint64_t e = bat_[p_.PayloadIndex(block)];
  WritePlan plan;
  plan.guest_offset = block * p_.block_size;
  plan.length = p_.block_size;  // whole blocks (the engine zero-fills past the disk end)
  plan.file = file_.get();
  plan.cookie[0] = block;
  if (EntryState(e) == kFullyPresent) {
    plan.host_offset = EntryOffset(e);
    plan.cookie[2] = 0;
    return plan;
  }
  const uint64_t at = next_alloc_;
  if (at + p_.block_size > limits::kMaxHostOffset || (at >> 20) >= (uint64_t{1} << 44)) {
    return Status::NoSpace("'{}': VHDX file offset limit reached", path_);
  }
  next_alloc_ += p_.block_size;
  plan.host_offset = at;
  plan.cookie[2] = 1;
  return plan;
}

Status VhdxMap::CommitWrite(const WritePlan& plan) {
  if (plan.cookie[2] != 1) return Status::Ok();
  const uint64_t idx = p_.PayloadIndex(plan.cookie[0]);
  if (EntryState(bat_[idx]) == kFullyPresent) {
    return Status::Corrupt("'{}': VHDX block {} was allocated twice", path_, plan.cookie[0]);
  }
  // Reaches the disk at the next flush, after the data is synced.
  bat_[idx] = plan.host_offset | kFullyPresent;
  dirty_bat_sectors_.insert(idx * 8 / kLogSector);
  return Status::Ok();
}

void VhdxMap::AbortWrite(const WritePlan& plan) {
  if (plan.cookie[2] != 1) return;
  if (plan.host_offset + p_.block_size == next_alloc_) next_alloc_ = plan.host_offset;  // else leaked
}

Status VhdxMap::WriteBat() {
  if (dirty_bat_sectors_.empty() || read_only_) return Status::Ok();
  // Data durable before any entry names it.
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  const uint64_t log_len = h_.current.log_length;
  const bool use_log = log_len >= LogEntrySize(1);
  if (use_log && IsNullGuid(h_.current.log_guid)) {
    h_.current.log_guid = NewGuid();
    RETURN_IF_ERROR(UpdateHeaders());
    log_pos_ = 0;
  }
  // The dirty sectors, encoded.
  std::map<uint64_t, std::vector<std::byte>> enc;
  for (uint64_t s : dirty_bat_sectors_) {
    std::vector<std::byte> b(kLogSector);
    RETURN_IF_ERROR(
        file_->PRead(p_.bat_offset + s * kLogSector, b).WithContext("'{}': reading the VHDX BAT", path_));
    for (uint64_t i = 0; i < kLogSector / 8; ++i) {
      const uint64_t idx = s * (kLogSector / 8) + i;
      if (idx < bat_.size()) StoreLE64(&b[i * 8], bat_[idx]);
    }
    enc.emplace(p_.bat_offset + s * kLogSector, std::move(b));
  }
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  auto it = enc.begin();
  while (it != enc.end()) {
    std::map<uint64_t, const std::byte*> batch;
    while (it != enc.end() && (!use_log || LogEntrySize(batch.size() + 1) <= log_len)) {
      batch.emplace(it->first, it->second.data());
      ++it;
    }
    if (use_log) {
      const uint64_t size = LogEntrySize(batch.size());
      if (log_pos_ + size > log_len) {
        // Wrapping: a new log GUID first, so no entry left from before can be read as
        // part of a sequence with the new ones (qemu chains any valid entry that follows).
        h_.current.log_guid = NewGuid();
        RETURN_IF_ERROR(UpdateHeaders());
        log_pos_ = 0;
      }
      ++log_sequence_;
      const auto entry = BuildLogEntry(h_.current.log_guid, log_sequence_, log_pos_, batch, file_size);
      RETURN_IF_ERROR(file_->PWrite(h_.current.log_offset + log_pos_, entry, IoTag::kOther)
                          .WithContext("'{}': writing the VHDX log", path_));
      RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
      log_pos_ += size;
    }
    for (const auto& [off, data] : batch) {
      RETURN_IF_ERROR(file_->PWrite(off, std::span<const std::byte>(data, kLogSector), IoTag::kBlockMap)
                          .WithContext("'{}': writing the VHDX BAT", path_));
    }
    if (use_log) RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  }
  dirty_bat_sectors_.clear();
  return Status::Ok();
}

Status VhdxMap::WriteBack() {
  if (closed_ || read_only_) return Status::Ok();
  return WriteBat();
}

Status VhdxMap::SyncFiles() {
  if (closed_ || read_only_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status VhdxMap::Close() {
  if (closed_) return Status::Ok();
  Status st = Flush();
  if (st.ok() && !read_only_ && !IsNullGuid(h_.current.log_guid)) {
    // Every logged entry is applied and synced: the log is empty.
    h_.current.log_guid = Guid{};
    st = UpdateHeaders();
  }
  closed_ = true;
  return st;
}

std::optional<BackingRef> VhdxMap::backing() const {
  if (!p_.has_parent) return std::nullopt;
  for (const char* key : {"relative_path", "absolute_win32_path", "volume_path"}) {
    auto it = p_.parent.find(key);
    if (it == p_.parent.end() || it->second.empty()) continue;
    std::string name = it->second;
    std::replace(name.begin(), name.end(), '\\', '/');
    if (name.starts_with("./")) name = name.substr(2);
    return BackingRef{name, "vhdx"};
  }
  return std::nullopt;
}

FormatInfo VhdxMap::Info() {
  FormatInfo info;
  info.format = "vhdx";
  info.virtual_size = p_.virtual_size;
  info.cluster_size = p_.block_size;
  return info;
}

}  // namespace vimgfs::vhdx

// VdiMap: the VDI block map as a ClusterMap, and opening an image.
#include <algorithm>
#include <cstring>
#include <optional>

#include "formats/format_util.h"
#include "formats/vdi/vdi_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vdi {

Result<std::unique_ptr<ClusterMap>> OpenVdi(OpenContext ctx) {
  File* file = ctx.file.get();
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::array<std::byte, kSectorSize> sector{};
  RETURN_IF_ERROR(file->PRead(0, sector).WithContext("'{}': reading the VDI header", ctx.path));
  const bool no_writes = ctx.options.for_check || ctx.options.read_only || !file->writable();
  ASSIGN_OR_RETURN(Header h, ParseHeader(sector, file_size, ctx.path, no_writes));

  const bool read_only = ctx.options.read_only || !file->writable() || !h.writable_layout();
  auto map = std::make_unique<VdiMap>(ctx.path, std::move(ctx.file), std::move(h), read_only);
  if (!read_only) RETURN_IF_ERROR(map->ScanForInconsistency());
  return std::unique_ptr<ClusterMap>(std::move(map));
}

// Version 1.x keeps the map sector-aligned with room up to offset_data: whole sectors, so
// that a changed entry is written back as the sector around it.
VdiMap::VdiMap(std::string path, std::unique_ptr<File> file, Header header, bool read_only)
    : path_(std::move(path)),
      file_(std::move(file)),
      h_(std::move(header)),
      bmap_(file_.get(), h_.offset_bmap,
            h_.writable_layout() ? AlignUp(h_.bmap_bytes(), kSectorSize) : h_.bmap_bytes(), path_),
      read_only_(read_only) {
  count_ = free_top_ = disk_count_ = h_.blocks_allocated;
}

Status VdiMap::ScanForInconsistency() {
  const uint32_t limit = std::min(h_.blocks_allocated, h_.blocks_in_image);
  std::vector<bool> used(limit);
  for (uint64_t b = 0; b < h_.blocks_in_image; ++b) {
    ASSIGN_OR_RETURN(const uint32_t e, bmap_.Get(b));
    if (!IsAllocated(e)) continue;
    if (e >= limit) {
      inconsistency_ = fmt::format("block map entry {} points to data block {}, past the {} allocated blocks",
                                   b, e, limit);
      return Status::Ok();
    }
    if (used[e]) {
      inconsistency_ = fmt::format("data block {} is used by two block map entries", e);
      return Status::Ok();
    }
    used[e] = true;
  }
  return Status::Ok();
}

Status VdiMap::CheckWritable(const char* what) const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (!h_.writable_layout()) {
    return Status::Unsupported("'{}': cannot {}: writing VDI version {}.{} images is not supported", path_,
                               what, h_.version >> 16, h_.version & 0xffff);
  }
  if (read_only_) return Status::ReadOnly("'{}': cannot {}: image is opened read-only", path_, what);
  if (!inconsistency_.empty()) {
    return Status::Corrupt("'{}': cannot {}: {} (run 'vimgfs check')", path_, what, inconsistency_);
  }
  return Status::Ok();
}

Status VdiMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > h_.virtual_size || len > h_.virtual_size - guest_off) {
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, h_.virtual_size);
  }
  const size_t first = out->size();
  const bool writable = !read_only_ && inconsistency_.empty();
  while (len > 0) {
    const uint64_t block = guest_off / h_.block_size;
    const uint64_t in_block = guest_off % h_.block_size;
    const uint64_t n = std::min<uint64_t>(len, h_.block_size - in_block);
    ASSIGN_OR_RETURN(const uint32_t e, bmap_.Get(block));
    Mapping m;
    m.length = n;
    if (IsAllocated(e)) {
      m.kind = Mapping::Kind::kData;
      m.file = file_.get();
      m.host_offset = HostOffset(e) + in_block;
      m.writable = writable;
    } else {
      // Free and zero blocks both read as zeros (VDI has no backing file here); qemu
      // reports both as present zeros ("present": true, "zero": true in qemu-img map).
      m.kind = Mapping::Kind::kZero;
    }
    Mapping* prev = out->size() > first ? &out->back() : nullptr;
    if (prev && prev->kind == m.kind &&
        (m.kind == Mapping::Kind::kZero ||
         (prev->host_offset + prev->length == m.host_offset && prev->writable == m.writable))) {
      prev->length += n;
    } else {
      out->push_back(m);
    }
    guest_off += n;
    len -= n;
  }
  return Status::Ok();
}

Result<WritePlan> VdiMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable("write"));
  if (guest_off >= h_.virtual_size) {
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off,
                              h_.virtual_size);
  }
  const uint64_t block = guest_off / h_.block_size;
  WritePlan plan;
  plan.guest_offset = block * h_.block_size;
  // Whole blocks, as qemu writes them (the engine zero-fills past the disk end).
  plan.length = h_.block_size;
  plan.file = file_.get();
  plan.cookie[0] = block;
  ASSIGN_OR_RETURN(const uint32_t e, bmap_.Get(block));
  if (IsAllocated(e)) {  // already there (e.g. allocated while the engine waited)
    plan.host_offset = HostOffset(e);
    plan.cookie[1] = e;
    plan.cookie[2] = 0;
    return plan;
  }
  uint32_t idx;
  if (!reusable_.empty()) {
    idx = reusable_.back();
    reusable_.pop_back();
  } else {
    // Blocks freed since the last flush may still be named by durable entries: make the
    // frees durable before their indices are handed out again.
    if (free_top_ < count_) RETURN_IF_ERROR(WriteMetadata());
    if (count_ >= h_.blocks_in_image || count_ >= kBlockZero) {
      return Status::Corrupt("'{}': no free VDI block left ({} of {} blocks allocated; run 'vimgfs check')",
                             path_, count_, h_.blocks_in_image);
    }
    idx = count_++;
    free_top_ = count_;
  }
  in_flight_.insert(idx);
  plan.host_offset = HostOffset(idx);
  plan.cookie[1] = idx;
  plan.cookie[2] = 1;
  return plan;
}

Status VdiMap::CommitWrite(const WritePlan& plan) {
  if (plan.cookie[2] != 1) return Status::Ok();
  const uint64_t block = plan.cookie[0];
  const uint32_t idx = static_cast<uint32_t>(plan.cookie[1]);
  in_flight_.erase(idx);
  if (block >= h_.blocks_in_image) return Status::Corrupt("'{}': VDI block {} is past the map", path_, block);
  ASSIGN_OR_RETURN(const uint32_t old, bmap_.Get(block));
  if (IsAllocated(old)) return Status::Corrupt("'{}': VDI block {} was allocated twice", path_, block);
  // The entry reaches the disk at the next flush, after the data is synced.
  return bmap_.Set(block, idx);
}

void VdiMap::AbortWrite(const WritePlan& plan) {
  if (plan.cookie[2] != 1) return;
  const uint32_t idx = static_cast<uint32_t>(plan.cookie[1]);
  in_flight_.erase(idx);
  if (idx + 1 == count_ && free_top_ == count_) {
    --count_;
    --free_top_;
  } else {
    reusable_.push_back(idx);  // never referenced: safe to hand out again
  }
}

Status VdiMap::ZeroHostBlock(uint64_t block, uint32_t e, bool keep_allocated) {
  const uint64_t len = std::min<uint64_t>(h_.block_size, h_.virtual_size - block * h_.block_size);
  Status st = file_->PunchHole(HostOffset(e), len);
  if (st.ok() && keep_allocated) {
    // Zeroing without unmap: reserve the space again. Best effort: the range already
    // reads as zeros, and a later write allocates what it needs.
    (void)file_->Allocate(HostOffset(e), len);
  }
  if (st.ok() || st.kind() != ErrorKind::kUnsupported) return st;
  static const std::vector<std::byte> zeros(1 << 20);
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(len - done, zeros.size());
    RETURN_IF_ERROR(file_->PWrite(HostOffset(e) + done, std::span(zeros.data(), n), IoTag::kData));
    done += n;
  }
  return Status::Ok();
}

Status VdiMap::ClearBlocks(uint64_t first_block, uint64_t end_block, uint32_t new_entry, bool unmap) {
  // Only the block at the top of the data area can be given back (the next one is always
  // appended at blocks_allocated); the others keep their place and are zeroed in place
  // (hole punched). Taking the highest first frees a run of top blocks in one go.
  std::vector<std::pair<uint32_t, uint64_t>> allocated;  // (data index, block)
  for (uint64_t b = first_block; b < end_block; ++b) {
    ASSIGN_OR_RETURN(const uint32_t e, bmap_.Get(b));
    if (IsAllocated(e)) allocated.emplace_back(e, b);
  }
  std::sort(allocated.rbegin(), allocated.rend());
  const bool can_free = h_.image_type != kTypeStatic;
  for (const auto& [e, b] : allocated) {
    if (can_free && e + 1 == free_top_) {
      RETURN_IF_ERROR(bmap_.Set(b, new_entry));
      --free_top_;
    } else {
      RETURN_IF_ERROR(ZeroHostBlock(b, e, !unmap)
                          .WithContext("'{}': zeroing VDI block {} at 0x{:x}", path_, b, HostOffset(e)));
    }
  }
  return Status::Ok();
}

Status VdiMap::ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) {
  RETURN_IF_ERROR(CheckWritable("zero"));
  if (guest_off % h_.block_size != 0 || guest_off > h_.virtual_size || len > h_.virtual_size - guest_off ||
      ((guest_off + len) % h_.block_size != 0 && guest_off + len != h_.virtual_size)) {
    return Status::InvalidArgument("'{}': zero range {}+{} is not aligned to VDI blocks", path_, guest_off,
                                   len);
  }
  const uint64_t first = guest_off / h_.block_size;
  const uint64_t end = DivRoundUp(guest_off + len, h_.block_size);
  return ClearBlocks(first, end, kBlockZero, unmap);
}

Status VdiMap::Discard(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable("discard"));
  if (guest_off > h_.virtual_size || len > h_.virtual_size - guest_off) {
    return Status::OutOfRange("'{}': discard {}+{} is past the disk size", path_, guest_off, len);
  }
  // Whole blocks only; partial ones keep their data.
  const uint64_t first = DivRoundUp(guest_off, h_.block_size);
  const uint64_t end_off = guest_off + len;
  const uint64_t end =
      end_off == h_.virtual_size ? DivRoundUp(end_off, h_.block_size) : end_off / h_.block_size;
  if (first >= end) return Status::Ok();
  return ClearBlocks(first, end, kBlockFree, true);
}

Status VdiMap::WriteHeader(uint32_t blocks_allocated) {
  h_.blocks_allocated = blocks_allocated;
  EncodeHeader(&h_);
  return file_->PWrite(0, h_.raw, IoTag::kHeader).WithContext("'{}': writing the VDI header", path_);
}

Status VdiMap::WriteMetadata(bool durable) {
  if (read_only_) return Status::Ok();
  // qemu-img check wants blocks_allocated to equal the entries in use, exactly: a count
  // that changes goes out together with the entries that change it.
  uint32_t new_count = std::min(count_, free_top_);
  // Blocks reserved at the top whose data is still being written are not counted yet: a
  // kill before their entries land would leave a count that names unreferenced blocks.
  while (new_count > disk_count_ && in_flight_.contains(new_count - 1)) --new_count;
  const bool count_changes = new_count != disk_count_;
  const bool grew = new_count > disk_count_;
  if (!count_changes && !bmap_.dirty()) return Status::Ok();
  // Data durable before any entry points at it.
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  RETURN_IF_ERROR(WriteHeaderAndMap(count_changes ? std::optional(new_count) : std::nullopt, grew));
  // Blocks given back (below) must not be named by entries that could still reach the disk.
  const bool gives_back = free_top_ < count_ || (!grew && count_changes);
  if (durable || gives_back) RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  disk_count_ = new_count;
  if (free_top_ < count_) {
    // The cleared entries are durable: the top blocks can be given back.
    count_ = free_top_;
    std::erase_if(reusable_, [&](uint32_t i) { return i >= count_; });
  }
  const uint64_t end = HostOffset(disk_count_);
  ASSIGN_OR_RETURN(uint64_t size, file_->Size());
  // qemu writes whole blocks; keep the file ending on a block like it does, even when the
  // last block is only partly inside the disk.
  if ((grew && size < end) || (!grew && count_changes && size > end)) RETURN_IF_ERROR(file_->Truncate(end));
  return Status::Ok();
}

Status VdiMap::WriteHeaderAndMap(std::optional<uint32_t> header_count, bool header_first) {
  // Where the map follows the header (qemu's layout) and the span is small, one write
  // carries both, so a killed process never leaves one without the other.
  const uint64_t header_bytes = h_.raw.size();
  const uint64_t dirty_end = bmap_.dirty_end();
  if (header_count && h_.offset_bmap == header_bytes && dirty_end <= (1u << 20)) {
    h_.blocks_allocated = *header_count;
    EncodeHeader(&h_);
    std::vector<std::byte> buf(header_bytes + dirty_end);
    std::memcpy(buf.data(), h_.raw.data(), header_bytes);
    RETURN_IF_ERROR(bmap_.CopyPrefix(dirty_end, buf.data() + header_bytes));
    RETURN_IF_ERROR(file_->PWrite(0, buf, IoTag::kBlockMap)
                        .WithContext("'{}': writing the VDI header and block map", path_));
    bmap_.ForgetDirty();
    return Status::Ok();
  }
  // Otherwise back to back, in the order that errs toward what qemu calls a leak.
  if (header_count && header_first) RETURN_IF_ERROR(WriteHeader(*header_count));
  RETURN_IF_ERROR(bmap_.WriteDirty(IoTag::kBlockMap));
  if (header_count && !header_first) RETURN_IF_ERROR(WriteHeader(*header_count));
  return Status::Ok();
}

Status VdiMap::WriteBack() {
  if (closed_ || read_only_) return Status::Ok();
  return WriteMetadata(/*durable=*/false);  // SyncFiles follows
}

Status VdiMap::SyncFiles() {
  if (closed_ || read_only_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status VdiMap::Close() {
  if (closed_) return Status::Ok();
  Status st = Flush();
  closed_ = true;
  return st;
}

FormatInfo VdiMap::Info() {
  FormatInfo info;
  info.format = "vdi";
  info.virtual_size = h_.virtual_size;
  info.cluster_size = h_.block_size;
  return info;
}

Result<CheckReport> VdiMap::Check(RepairMode mode) {
  // qemu-img check -r on a VDI image fails with this message (exit 63).
  if (mode != RepairMode::kNone) {
    return Status::Unsupported("This image format does not support checks");
  }
  return CheckBlockMap(h_, bmap_, count_);
}

Status VdiMap::Resize(uint64_t new_size, bool allow_shrink, GrowZeros /*VDI has no backing file*/) {
  RETURN_IF_ERROR(CheckWritable("resize"));
  new_size = AlignUp(new_size, kSectorSize);
  if (new_size < h_.virtual_size) {
    return Status::Unsupported("'{}': shrinking VDI images is not supported", path_);
  }
  if (new_size == h_.virtual_size) return Status::Ok();
  if (new_size > kMaxDiskSize) {
    return Status::Unsupported("'{}': Unsupported VDI image size (size is 0x{:x}, max supported is 0x{:x})",
                               path_, new_size, kMaxDiskSize);
  }
  const uint64_t blocks = DivRoundUp(new_size, h_.block_size);
  const uint64_t room = (h_.offset_data - h_.offset_bmap) / 4;
  if (blocks > room || blocks > kMaxBlocks) {
    return Status::Unsupported(
        "'{}': the VDI block map has room for {} blocks ({} bytes); growing beyond that "
        "would move data blocks, which vimgfs does not do",
        path_, room, room * h_.block_size);
  }
  RETURN_IF_ERROR(WriteMetadata());
  const uint64_t old_blocks = h_.blocks_in_image;
  const bool is_static = h_.image_type == kTypeStatic;
  if (blocks > old_blocks) {
    if (is_static && !reusable_.empty()) {
      return Status::Unsupported("'{}': cannot grow a static VDI image after a failed write", path_);
    }
    bmap_.Grow(AlignUp(blocks * 4, kSectorSize));
    for (uint64_t b = old_blocks; b < blocks; ++b) {
      RETURN_IF_ERROR(bmap_.Set(b, is_static ? count_++ : kBlockFree));
    }
    free_top_ = count_;
    if (is_static) RETURN_IF_ERROR(file_->Truncate(HostOffset(count_)));
    // The new entries lie past blocks_in_image until the header below names them, and
    // for a static image that one header write also raises the allocated count:
    // qemu-img check wants count and entries to agree at every crash point.
    RETURN_IF_ERROR(WriteHeaderAndMap(std::nullopt, false));
    RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  }
  h_.disk_size = new_size;
  h_.virtual_size = new_size;
  h_.blocks_in_image = static_cast<uint32_t>(blocks);
  RETURN_IF_ERROR(WriteHeader(is_static ? count_ : disk_count_));
  if (is_static) disk_count_ = count_;
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

}  // namespace vimgfs::vdi

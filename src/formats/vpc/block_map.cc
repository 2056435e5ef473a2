// VpcMap: a VHD as a ClusterMap, and opening an image.
#include <algorithm>
#include <cstring>

#include "formats/format_util.h"
#include "formats/vpc/vpc_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vpc {
namespace {

// Appends m to out, merging it into the last mapping (from index `first` on) where the
// two are one run.
void Append(std::vector<Mapping>* out, size_t first, const Mapping& m) {
  if (out->size() > first) {
    Mapping& prev = out->back();
    if (prev.kind == m.kind && prev.writable == m.writable &&
        (m.kind != Mapping::Kind::kData ||
         (prev.file == m.file && prev.host_offset + prev.length == m.host_offset))) {
      prev.length += m.length;
      return;
    }
  }
  out->push_back(m);
}

bool BitSet(const std::vector<uint8_t>& bitmap, uint64_t sector) {
  return bitmap[sector / 8] & (0x80 >> (sector % 8));  // sector 0 is the high bit
}

}  // namespace

Result<std::unique_ptr<ClusterMap>> OpenVpc(OpenContext ctx) {
  File* file = ctx.file.get();
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  if (file_size < kFooterSize)
    return Status::InvalidFormat("'{}': File too small for a VHD header", ctx.path);
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': VHD images have no internal snapshots", ctx.path);
  std::array<std::byte, kFooterSize> raw{};
  RETURN_IF_ERROR(file->PRead(0, raw).WithContext("'{}': Unable to read VHD header", ctx.path));
  const bool read_only = ctx.options.read_only || !file->writable();
  if (!HasFooterCookie(raw)) {
    // A fixed disk has its footer at the end only.
    RETURN_IF_ERROR(
        file->PRead(file_size - kFooterSize, raw).WithContext("'{}': reading the VHD footer", ctx.path));
    if (!HasFooterCookie(raw) || LoadBE32(&raw[foot::kDiskType]) != kTypeFixed)
      return Status::InvalidFormat("'{}': invalid VPC image", ctx.path);
    ASSIGN_OR_RETURN(Footer footer, ParseFooter(raw, ctx.path));
    return std::unique_ptr<ClusterMap>(
        std::make_unique<VpcMap>(ctx.path, std::move(ctx.file), std::move(footer), read_only));
  }
  ASSIGN_OR_RETURN(Footer footer, ParseFooter(raw, ctx.path));
  if (footer.disk_type != kTypeDynamic && footer.disk_type != kTypeDifferencing)
    return Status::InvalidFormat("'{}': invalid VPC image (disk type {} with a footer at the start)",
                                 ctx.path, footer.disk_type);
  if (footer.data_offset >= file_size)
    return Status::InvalidFormat("'{}': VHD dynamic header offset 0x{:x} is outside the file ({} bytes)",
                                 ctx.path, footer.data_offset, file_size);
  // A header cut short by the end of the file reads as zeros past it, as in qemu: its
  // fields are then validated like any others (so the same image gives qemu's message).
  std::array<std::byte, kDynHeaderSize> draw{};
  const uint64_t present = std::min<uint64_t>(kDynHeaderSize, file_size - footer.data_offset);
  RETURN_IF_ERROR(file->PRead(footer.data_offset, std::span(draw).first(present))
                      .WithContext("'{}': Error reading dynamic VHD header", ctx.path));
  ASSIGN_OR_RETURN(DynHeader dh, ParseDynHeader(draw, footer.virtual_size, file_size, *file, ctx.path));
  std::vector<std::byte> bat(AlignUp(uint64_t{dh.max_table_entries} * 4, kSectorSize));
  if (!bat.empty())
    RETURN_IF_ERROR(file->PRead(dh.table_offset, bat).WithContext("'{}': Error reading pagetable", ctx.path));
  if (footer.disk_type == kTypeDifferencing && !ParentName(dh))
    return Status::InvalidFormat("'{}': differencing VHD names no parent", ctx.path);
  auto map = std::make_unique<VpcMap>(ctx.path, std::move(ctx.file), std::move(footer), std::move(dh),
                                      std::move(bat), file_size, read_only);
  return std::unique_ptr<ClusterMap>(std::move(map));
}

VpcMap::VpcMap(std::string path, std::unique_ptr<File> file, Footer footer, bool read_only)
    : path_(std::move(path)), file_(std::move(file)), footer_(std::move(footer)), read_only_(read_only) {
  auto size = file_->Size();
  // Guest bytes that would land on the footer: readable (as qemu reads them), not writable.
  if (!size.ok() || footer_.virtual_size > size.value() - kFooterSize)
    inconsistency_ = "the disk size reaches into the VHD footer";
}

VpcMap::VpcMap(std::string path, std::unique_ptr<File> file, Footer footer, DynHeader header,
               std::vector<std::byte> bat, uint64_t file_size, bool read_only)
    : path_(std::move(path)),
      file_(std::move(file)),
      footer_(std::move(footer)),
      dyn_(std::move(header)),
      bat_(std::move(bat)),
      read_only_(read_only) {
  ScanForInconsistency(file_size);
}

uint64_t VpcMap::cluster_size() const { return fixed() ? kSectorSize : dyn_.block_size; }

uint32_t VpcMap::entry(uint64_t block) const { return LoadBE32(&bat_[block * 4]); }

void VpcMap::SetEntry(uint64_t block, uint32_t value) {
  StoreBE32(&bat_[block * 4], value);
  dirty_sectors_.insert(block * 4 / kSectorSize);
}

void VpcMap::ScanForInconsistency(uint64_t file_size) {
  // Metadata at the start of the file: footer copy, dynamic header, BAT.
  const uint64_t meta_end =
      std::max({kFooterSize, footer_.data_offset + kDynHeaderSize,
                AlignUp(dyn_.table_offset + uint64_t{dyn_.max_table_entries} * 4, kSectorSize)});
  next_block_ = meta_end;
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // start, block index
  for (uint64_t b = 0; b < dyn_.max_table_entries; ++b) {
    const uint32_t e = entry(b);
    if (e == kBatUnused) continue;
    const uint64_t start = BlockStart(e);
    blocks.emplace_back(start, b);
    next_block_ = std::max(next_block_, start + BlockBytes());
    if (start < meta_end && start + BlockBytes() > dyn_.table_offset) {
      inconsistency_ = fmt::format("block {} at 0x{:x} overlaps the VHD metadata", b, start);
    } else if (start < footer_.data_offset + kDynHeaderSize && start + BlockBytes() > footer_.data_offset) {
      inconsistency_ = fmt::format("block {} at 0x{:x} overlaps the VHD dynamic header", b, start);
    } else if (start < kFooterSize) {
      inconsistency_ = fmt::format("block {} at 0x{:x} overlaps the VHD footer copy", b, start);
    }
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t i = 1; i < blocks.size() && inconsistency_.empty(); ++i) {
    if (blocks[i].first < blocks[i - 1].first + BlockBytes())
      inconsistency_ =
          fmt::format("blocks {} and {} overlap in the file", blocks[i - 1].second, blocks[i].second);
  }
  // qemu refuses the open here; the image was cut short.
  if (next_block_ > file_size && inconsistency_.empty())
    inconsistency_ = "a block lies past the end of the file (the image has been truncated)";
  if (dyn_.block_size > kMaxWritableBlockSize && inconsistency_.empty())
    inconsistency_ = fmt::format("blocks of {} bytes are too large to write into", dyn_.block_size);
}

Status VpcMap::CheckWritable(const char* what) const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  if (read_only_) return Status::ReadOnly("'{}': cannot {}: image is opened read-only", path_, what);
  if (!inconsistency_.empty())
    return Status::Corrupt("'{}': cannot {}: {} (run 'vimgfs check')", path_, what, inconsistency_);
  return Status::Ok();
}

Result<const std::vector<uint8_t>*> VpcMap::Bitmap(uint64_t block, uint32_t e) {
  if (auto it = bitmaps_.find(block); it != bitmaps_.end()) return &it->second;
  if (bitmaps_.size() * dyn_.bitmap_size >= cache_bytes_) {
    // Evict what was not changed since the last flush; changed ones are written first.
    RETURN_IF_ERROR(WriteBack());
    bitmaps_.clear();
  }
  std::vector<uint8_t> bits(dyn_.bitmap_size);
  RETURN_IF_ERROR(file_->PRead(BlockStart(e), std::as_writable_bytes(std::span(bits)))
                      .WithContext("'{}': reading the sector bitmap of VHD block {}", path_, block));
  return &bitmaps_.emplace(block, std::move(bits)).first->second;
}

Status VpcMap::LookupFixed(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  // All data (qemu reports a fixed disk's holes as data that reads as zeros).
  out->push_back(Mapping{.kind = Mapping::Kind::kData,
                         .length = len,
                         .file = file_.get(),
                         .host_offset = guest_off,
                         .writable = !read_only_ && inconsistency_.empty()});
  return Status::Ok();
}

Status VpcMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  if (guest_off > virtual_size() || len > virtual_size() - guest_off)
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, virtual_size());
  if (fixed()) return LookupFixed(guest_off, len, out);
  const size_t first = out->size();
  const bool writable = !read_only_ && inconsistency_.empty();
  const Mapping::Kind absent = differencing() ? Mapping::Kind::kUnallocated : Mapping::Kind::kZero;
  while (len > 0) {
    const uint64_t block = guest_off / dyn_.block_size;
    const uint64_t in_block = guest_off % dyn_.block_size;
    const uint64_t n = std::min<uint64_t>(len, dyn_.block_size - in_block);
    const uint32_t e = entry(block);
    if (e == kBatUnused) {
      Append(out, first, Mapping{.kind = absent, .length = n});
    } else if (!differencing()) {
      // qemu reads a dynamic disk's blocks whole, whatever their bitmaps say.
      Append(out, first,
             Mapping{.kind = Mapping::Kind::kData,
                     .length = n,
                     .file = file_.get(),
                     .host_offset = DataStart(e) + in_block,
                     .writable = writable,
                     .opaque_data = true});
    } else {
      ASSIGN_OR_RETURN(const std::vector<uint8_t>* bits, Bitmap(block, e));
      const bool full =
          std::all_of(bits->begin(), bits->begin() + DivRoundUp(dyn_.block_size / kSectorSize, 8),
                      [](uint8_t b) { return b == 0xff; });
      for (uint64_t pos = in_block; pos < in_block + n;) {
        const uint64_t sector = pos / kSectorSize;
        const bool here = BitSet(*bits, sector);
        uint64_t run_end = std::min(in_block + n, (sector + 1) * kSectorSize);
        while (run_end < in_block + n && BitSet(*bits, run_end / kSectorSize) == here)
          run_end = std::min(in_block + n, run_end + kSectorSize);
        Mapping m{.kind = absent, .length = run_end - pos};
        if (here) {
          m.kind = Mapping::Kind::kData;
          m.file = file_.get();
          m.host_offset = DataStart(e) + pos;
          // A partly present block is written through PrepareWrite, which fills it.
          m.writable = writable && full;
          m.opaque_data = true;
        }
        Append(out, first, m);
        pos = run_end;
      }
    }
    guest_off += n;
    len -= n;
  }
  return Status::Ok();
}

Result<WritePlan> VpcMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable("write"));
  if (guest_off >= virtual_size())
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off, virtual_size());
  WritePlan plan;
  plan.file = file_.get();
  if (fixed()) {  // the bytes land where they belong
    plan.guest_offset = guest_off;
    plan.length = std::min(len, virtual_size() - guest_off);
    plan.host_offset = guest_off;
    return plan;
  }
  const uint64_t block = guest_off / dyn_.block_size;
  plan.guest_offset = block * dyn_.block_size;
  plan.length = dyn_.block_size;  // whole blocks: the engine fills the rest (copy-on-write)
  plan.cookie[0] = block;
  const uint32_t e = entry(block);
  if (e != kBatUnused) {
    // Present (a partly present block of a differencing disk): rewritten whole in place;
    // its bitmap is completed after the data is durable.
    plan.host_offset = DataStart(e);
    plan.cookie[2] = 2;
    return plan;
  }
  uint64_t start;
  bool fresh = false;
  if (!reusable_.empty()) {
    start = reusable_.back();
    reusable_.pop_back();
  } else {
    start = next_block_;
    ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
    fresh = start + dyn_.bitmap_size >= file_size;  // only the old footer lies past start
    if (start / kSectorSize >= kBatUnused)
      return Status::Unsupported("'{}': the VHD file is full (block offsets are 32-bit sector numbers)",
                                 path_);
    // The footer moves first, so the file always ends in one.
    RETURN_IF_ERROR(file_->PWrite(start + BlockBytes(), footer_.raw, IoTag::kHeader)
                        .WithContext("'{}': writing the VHD footer", path_));
    // Durable before the old footer is overwritten by the block.
    RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
    next_block_ = start + BlockBytes();
  }
  // Every sector of a new block is present: the engine writes all of them.
  const std::vector<std::byte> bitmap(dyn_.bitmap_size, std::byte{0xff});
  RETURN_IF_ERROR(
      file_->PWrite(start, bitmap, IoTag::kBlockMap).WithContext("'{}': writing a VHD sector bitmap", path_));
  plan.host_offset = start + dyn_.bitmap_size;
  plan.fresh = fresh;
  plan.cookie[1] = start;
  plan.cookie[2] = 1;
  return plan;
}

Status VpcMap::CommitWrite(const WritePlan& plan) {
  const uint64_t block = plan.cookie[0];
  if (plan.cookie[2] == 1) {
    if (entry(block) != kBatUnused)
      return Status::Corrupt("'{}': VHD block {} was allocated twice", path_, block);
    SetEntry(block, static_cast<uint32_t>(plan.cookie[1] / kSectorSize));  // written at the next flush
    bitmaps_.erase(block);
  } else if (plan.cookie[2] == 2) {
    auto it = bitmaps_.find(block);
    if (it == bitmaps_.end()) {
      ASSIGN_OR_RETURN(const std::vector<uint8_t>* loaded, Bitmap(block, entry(block)));
      (void)loaded;
      it = bitmaps_.find(block);
    }
    std::fill(it->second.begin(), it->second.end(), 0xff);
    dirty_bitmaps_.insert(block);
  }
  return Status::Ok();
}

void VpcMap::AbortWrite(const WritePlan& plan) {
  if (plan.cookie[2] == 1) reusable_.push_back(plan.cookie[1]);  // never named by the BAT
}

Status VpcMap::ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) {
  RETURN_IF_ERROR(CheckWritable("zero"));
  // A fixed disk zeroes in the file; a sparse one writes zeros (a block, once in the BAT,
  // stays there: VHD has no way to give it back).
  if (!fixed()) return Status::Unsupported("zero blocks");
  Status st = file_->PunchHole(guest_off, std::min(len, virtual_size() - guest_off));
  if (st.ok() && !unmap) (void)file_->Allocate(guest_off, std::min(len, virtual_size() - guest_off));
  return st.kind() == ErrorKind::kUnsupported ? Status::Unsupported("zero range") : st;
}

Status VpcMap::Discard(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable("discard"));
  return Status::Ok();  // qemu's vpc discards nothing either
}

Status VpcMap::WriteBack() {
  if (closed_ || read_only_ || (dirty_sectors_.empty() && dirty_bitmaps_.empty())) return Status::Ok();
  // Data durable before a BAT entry or a bitmap bit names it.
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  for (uint64_t block : dirty_bitmaps_) {
    RETURN_IF_ERROR(
        file_
            ->PWrite(BlockStart(entry(block)), std::as_bytes(std::span(bitmaps_.at(block))), IoTag::kBlockMap)
            .WithContext("'{}': writing the sector bitmap of VHD block {}", path_, block));
  }
  dirty_bitmaps_.clear();
  return WriteDirtySectors(*file_, dyn_.table_offset, bat_, &dirty_sectors_, IoTag::kBlockMap)
      .WithContext("'{}': writing the VHD block allocation table", path_);
}

Status VpcMap::SyncFiles() {
  if (closed_ || read_only_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status VpcMap::Close() {
  if (closed_) return Status::Ok();
  Status st = Flush();
  closed_ = true;
  return st;
}

std::optional<BackingRef> VpcMap::backing() const {
  if (!differencing()) return std::nullopt;
  std::optional<std::string> name = ParentName(dyn_);
  if (!name) return std::nullopt;
  return BackingRef{.name = *name, .format = "vpc"};
}

FormatInfo VpcMap::Info() {
  FormatInfo info;
  info.format = "vpc";
  info.virtual_size = virtual_size();
  info.cluster_size = fixed() ? 0 : dyn_.block_size;
  return info;
}

}  // namespace vimgfs::vpc

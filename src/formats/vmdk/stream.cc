// streamOptimized: the footer of a stream whose header says GD_AT_END, and the sequential
// writer used by convert. Reading compressed grains is the sparse extent's Lookup
// (kCompressed mappings past each grain's 12-byte marker); this file adds what only
// streams have.
#include "formats/vmdk/stream_writer.h"

#include <algorithm>
#include <cstring>

#include "engine/codec.h"
#include "formats/vmdk/vmdk_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs {
namespace vmdk {

// The last three sectors: footer marker, a copy of the header with the real gdOffset, and
// the end-of-stream marker.
Result<SparseHeader> ReadFooterHeader(File& file) {
  ASSIGN_OR_RETURN(uint64_t size, file.Size());
  uint64_t end = AlignUp(size, kSector);
  if (end < 4 * kSector) return Status::InvalidFormat("'{}': Invalid footer (file too short)", file.path());
  std::byte f[3 * kSector];
  RETURN_IF_ERROR(file.PRead(end - 3 * kSector, f));
  const std::byte* marker = f;
  const std::byte* header = f + kSector;
  const std::byte* eos = f + 2 * kSector;
  if (LoadLE32(header) != kMagicKdmv || LoadLE32(marker + 8) != 0 || LoadLE32(marker + 12) != kMarkerFooter ||
      LoadLE64(eos) != 0 || LoadLE32(eos + 8) != 0 || LoadLE32(eos + 12) != kMarkerEos)
    return Status::InvalidFormat("'{}': Invalid footer", file.path());
  SparseHeader h = DecodeSparseHeader(header);
  if (h.gd_offset == kGdAtEnd)
    return Status::InvalidFormat("'{}': the footer has no grain directory offset", file.path());
  return h;
}

}  // namespace vmdk

using namespace vmdk;

Result<std::unique_ptr<StreamOptimizedWriter>> StreamOptimizedWriter::Open(
    Env& env, const std::string& path, uint64_t size, const std::map<std::string, std::string>& options) {
  std::map<std::string, std::string> opts = options;
  auto sub = opts.find("subformat");
  if (sub != opts.end() && sub->second != "streamOptimized")
    return Status::InvalidArgument("StreamOptimizedWriter writes streamOptimized images only");
  opts["subformat"] = "streamOptimized";
  CreateContext ctx;
  ctx.env = &env;
  ctx.path = path;
  ctx.size = size;
  ctx.options = opts;
  RETURN_IF_ERROR(CreateVmdk(ctx));

  std::unique_ptr<StreamOptimizedWriter> w(new StreamOptimizedWriter());
  ASSIGN_OR_RETURN(w->file_, env.Open(path, OpenMode::kReadWrite));
  std::byte raw[kSector];
  RETURN_IF_ERROR(w->file_->PRead(0, raw));
  SparseHeader h = DecodeSparseHeader(raw);
  w->size_ = size;
  w->grain_size_ = h.grain_size * kSector;
  w->gtes_ = h.num_gtes_per_gt;
  w->gt_bytes_ = uint64_t{w->gtes_} * 4;
  w->gd_offset_ = h.gd_offset * kSector;
  w->rgd_offset_ = h.rgd_offset * kSector;
  uint64_t entries = DivRoundUp(h.capacity, h.grain_size * h.num_gtes_per_gt);
  for (auto [dir, off] : {std::pair{&w->gd_, w->gd_offset_}, std::pair{&w->rgd_, w->rgd_offset_}}) {
    std::vector<std::byte> b(entries * 4);
    RETURN_IF_ERROR(w->file_->PRead(off, b));
    dir->resize(entries);
    for (uint64_t i = 0; i < entries; i++) (*dir)[i] = LoadLE32(b.data() + 4 * i);
  }
  ASSIGN_OR_RETURN(uint64_t fsize, w->file_->Size());
  w->next_ = AlignUp(fsize, kSector);
  return w;
}

StreamOptimizedWriter::~StreamOptimizedWriter() = default;

Status StreamOptimizedWriter::WriteGrain(uint64_t index, std::span<const std::byte> data) {
  if (finished_) return Status::InvalidArgument("'{}': the stream is finished", file_->path());
  uint64_t grains = DivRoundUp(size_, grain_size_);
  if (index >= grains || data.size() > grain_size_)
    return Status::OutOfRange("'{}': grain {} is outside the disk", file_->path(), index);
  if (std::all_of(data.begin(), data.end(), [](std::byte b) { return b == std::byte{0}; }))
    return Status::Ok();  // unallocated grains read as zeros
  std::vector<std::byte> full;
  if (data.size() < grain_size_) {
    full.assign(grain_size_, std::byte{0});
    std::memcpy(full.data(), data.data(), data.size());
    data = full;
  }
  ASSIGN_OR_RETURN(std::vector<std::byte> z, Compress(Codec::kZlib, data, max_stream_bytes()));
  if (z.empty()) return Status::Io("'{}': compressing grain {} failed", file_->path(), index);
  return WriteCompressedGrain(index, z);
}

Status StreamOptimizedWriter::WriteCompressedGrain(uint64_t index, std::span<const std::byte> z) {
  if (finished_) return Status::InvalidArgument("'{}': the stream is finished", file_->path());
  uint64_t grains = DivRoundUp(size_, grain_size_);
  if (index >= grains) return Status::OutOfRange("'{}': grain {} is outside the disk", file_->path(), index);
  if (z.empty() || z.size() > max_stream_bytes() || z.size() > UINT32_MAX)
    return Status::InvalidArgument("'{}': compressed grain {} has an impossible size", file_->path(), index);
  uint64_t total = AlignUp(kGrainMarkerBytes + z.size(), kSector);
  if ((next_ + total) / kSector > UINT32_MAX)
    return Status::NoSpace("'{}': the stream is full (grain sectors are 32-bit)", file_->path());
  std::vector<std::byte> out(total, std::byte{0});
  StoreLE64(out.data(), index * (grain_size_ / kSector));
  StoreLE32(out.data() + 8, static_cast<uint32_t>(z.size()));
  std::memcpy(out.data() + kGrainMarkerBytes, z.data(), z.size());
  RETURN_IF_ERROR(file_->PWrite(next_, out, IoTag::kData));
  uint64_t gi = index / gtes_;
  auto& gt = pending_[gi];
  if (gt.empty()) {
    gt.resize(gtes_);
    std::vector<std::byte> b(gt_bytes_);
    RETURN_IF_ERROR(file_->PRead(uint64_t{gd_[gi]} * kSector, b));
    for (uint32_t i = 0; i < gtes_; i++) gt[i] = LoadLE32(b.data() + 4 * i);
  }
  gt[index % gtes_] = static_cast<uint32_t>(next_ / kSector);
  next_ += total;
  if (pending_.size() > 16) return FlushTables();
  return Status::Ok();
}

Status StreamOptimizedWriter::FlushTables() {
  for (auto& [gi, gt] : pending_) {
    std::vector<std::byte> b(gt_bytes_);
    for (uint32_t i = 0; i < gtes_; i++) StoreLE32(b.data() + 4 * i, gt[i]);
    RETURN_IF_ERROR(file_->PWrite(uint64_t{rgd_[gi]} * kSector, b, IoTag::kGrainTable));
    RETURN_IF_ERROR(file_->PWrite(uint64_t{gd_[gi]} * kSector, b, IoTag::kGrainTable));
  }
  pending_.clear();
  return Status::Ok();
}

Status StreamOptimizedWriter::Finish() {
  if (finished_) return Status::Ok();
  RETURN_IF_ERROR(FlushTables());
  std::byte eos[kSector] = {};  // value 0, size 0, type 0: end of stream
  RETURN_IF_ERROR(file_->PWrite(next_, eos, IoTag::kOther));
  next_ += kSector;
  finished_ = true;
  return file_->Sync(false);
}

}  // namespace vimgfs

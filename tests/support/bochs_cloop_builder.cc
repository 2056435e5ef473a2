#include "support/bochs_cloop_builder.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace vimgfs::test {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint32_t kUnallocated = 0xFFFFFFFFu;

void PutLE32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutLE64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutBE32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * (3 - i)));
}
void PutBE64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * (7 - i)));
}

// Writes pieces at file offsets; the file is as long as its last piece (or `length`).
class SparseFile {
 public:
  explicit SparseFile(const std::string& path) : fd_(open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644)) {
    if (fd_ < 0) throw std::runtime_error("cannot create " + path);
  }
  ~SparseFile() { close(fd_); }
  void Put(uint64_t off, const void* data, size_t n) {
    if (n == 0) return;
    if (pwrite(fd_, data, n, static_cast<off_t>(off)) != static_cast<ssize_t>(n))
      throw std::runtime_error("short write");
  }
  void Put(uint64_t off, const std::vector<uint8_t>& v) { Put(off, v.data(), v.size()); }
  void Truncate(uint64_t n) {
    if (ftruncate(fd_, static_cast<off_t>(n)) != 0) throw std::runtime_error("ftruncate");
  }

 private:
  int fd_;
};

}  // namespace

std::vector<uint8_t> ZlibCompress(const std::vector<uint8_t>& data, int level) {
  uLongf n = compressBound(data.size());
  std::vector<uint8_t> out(n);
  if (compress2(out.data(), &n, data.data(), data.size(), level) != Z_OK)
    throw std::runtime_error("compress2");
  out.resize(n);
  return out;
}

// ---- Bochs ----

BochsBuilder::BochsBuilder(uint64_t disk_size, uint32_t extent_size, uint32_t bitmap_bytes,
                           uint32_t catalog_entries, uint32_t version)
    : version(version), bitmap_bytes(bitmap_bytes), extent_size(extent_size), disk_size(disk_size) {
  const uint64_t sectors = disk_size / kSector, per_extent = extent_size / kSector;
  this->catalog_entries =
      catalog_entries ? catalog_entries : static_cast<uint32_t>((sectors + per_extent - 1) / per_extent);
  catalog.assign(this->catalog_entries, kUnallocated);
}

uint64_t BochsBuilder::BitmapSectors() const { return 1 + static_cast<uint32_t>(bitmap_bytes - 1) / 512; }
uint64_t BochsBuilder::BlockBytes() const { return (BitmapSectors() + extent_size / kSector) * kSector; }

void BochsBuilder::AllocateExtent(uint64_t extent, std::optional<uint32_t> block) {
  if (catalog.at(extent) != kUnallocated) return;
  const uint32_t idx = block.value_or(next_block_);
  next_block_ = std::max(next_block_, idx + 1);
  catalog[extent] = idx;
  // The bitmap (one bit per sector, as qemu reads it) then the extent's data.
  blocks_[idx].assign((extent_size / kSector + 7) / 8 + extent_size, 0);
}

void BochsBuilder::WriteSector(uint64_t sector, const std::vector<uint8_t>& data,
                               std::optional<uint32_t> block) {
  const uint64_t per_extent = extent_size / kSector;
  const uint64_t extent = sector / per_extent, s = sector % per_extent;
  AllocateExtent(extent, block);
  std::vector<uint8_t>& b = blocks_[catalog[extent]];
  const uint64_t bitmap = (per_extent + 7) / 8;
  b[s / 8] |= static_cast<uint8_t>(1u << (s % 8));
  std::copy(data.begin(), data.begin() + kSector, b.begin() + bitmap + s * kSector);
  written_[sector].assign(data.begin(), data.begin() + kSector);
}

void BochsBuilder::ClearBit(uint64_t sector) {
  const uint64_t per_extent = extent_size / kSector;
  std::vector<uint8_t>& b = blocks_.at(catalog.at(sector / per_extent));
  const uint64_t s = sector % per_extent;
  b[s / 8] &= static_cast<uint8_t>(~(1u << (s % 8)));
  written_.erase(sector);
}

std::vector<uint8_t> BochsBuilder::Expected() const {
  std::vector<uint8_t> disk(disk_size / kSector * kSector, 0);
  for (const auto& [sector, data] : written_)
    if ((sector + 1) * kSector <= disk.size())
      std::copy(data.begin(), data.end(), disk.begin() + sector * kSector);
  return disk;
}

void BochsBuilder::Write(const std::string& path) const {
  SparseFile f(path);
  uint8_t h[512] = {};
  std::memcpy(h, magic.data(), std::min<size_t>(magic.size(), 32));
  std::memcpy(h + 32, type.data(), std::min<size_t>(type.size(), 16));
  std::memcpy(h + 48, subtype.data(), std::min<size_t>(subtype.size(), 16));
  PutLE32(h + 64, version);
  PutLE32(h + 68, header_size);
  PutLE32(h + 72, catalog_entries);
  PutLE32(h + 76, bitmap_bytes);
  PutLE32(h + 80, extent_size);
  PutLE64(h + (version == 0x00010000 ? 84 : 88), disk_size);
  f.Put(0, h, sizeof h);
  std::vector<uint8_t> cat(catalog.size() * 4);
  for (size_t i = 0; i < catalog.size(); ++i) PutLE32(&cat[i * 4], catalog[i]);
  if (write_catalog) f.Put(header_size, cat);
  const uint64_t data = data_offset.value_or(uint64_t{header_size} + uint64_t{catalog_entries} * 4);
  uint64_t end = write_catalog ? std::max<uint64_t>(512, header_size + cat.size()) : 512;
  const uint64_t bitmap = (extent_size / kSector + 7) / 8;
  for (const auto& [idx, b] : blocks_) {
    const uint64_t at = data + idx * BlockBytes();
    f.Put(at, b.data(), bitmap);
    f.Put(at + BitmapSectors() * kSector, b.data() + bitmap, extent_size);
    end = std::max(end, at + BlockBytes());
  }
  for (const auto& [off, bytes] : patches) {
    f.Put(off, bytes);
    end = std::max(end, off + bytes.size());
  }
  f.Truncate(end);
}

// ---- cloop ----

void CloopBuilder::AddBlock(const std::vector<uint8_t>& data, int level) {
  streams_.push_back(ZlibCompress(data, level));
  expected_.push_back(data);
}

void CloopBuilder::AddRawBlock(const std::vector<uint8_t>& stream,
                               std::optional<std::vector<uint8_t>> reads_as) {
  streams_.push_back(stream);
  expected_.push_back(reads_as.value_or(std::vector<uint8_t>(block_size, 0)));
}

std::vector<uint64_t> CloopBuilder::Offsets(size_t room) const {
  std::vector<uint64_t> out;
  uint64_t at = 128 + 8 + 8 * std::max(room, streams_.size() + 1);
  out.push_back(at);
  for (const auto& s : streams_) out.push_back(at += s.size());
  return out;
}

std::vector<uint8_t> CloopBuilder::Expected() const {
  std::vector<uint8_t> disk;
  for (const auto& b : expected_) disk.insert(disk.end(), b.begin(), b.end());
  return disk;
}

void CloopBuilder::Write(const std::string& path) const {
  SparseFile f(path);
  std::vector<uint8_t> head(136, 0);
  std::memcpy(head.data(), script.data(), std::min<size_t>(script.size(), 128));
  PutBE32(&head[128], block_size);
  PutBE32(&head[132], block_count.value_or(static_cast<uint32_t>(streams_.size())));
  f.Put(0, head);
  const std::vector<uint64_t> layout = Offsets(offsets ? offsets->size() : 0);
  const std::vector<uint64_t>& table = offsets ? *offsets : layout;
  std::vector<uint8_t> t(table.size() * 8);
  for (size_t i = 0; i < table.size(); ++i) PutBE64(&t[i * 8], table[i]);
  f.Put(136, t);
  for (size_t i = 0; i < streams_.size(); ++i) f.Put(layout[i], streams_[i]);
  uint64_t end = std::max<uint64_t>(136 + t.size(), layout.back());
  f.Truncate(truncate_at.value_or(end));
}

}  // namespace vimgfs::test

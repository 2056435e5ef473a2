// BlockMapPages: the VDI block map, paged in from the file as entries are used.
#include <algorithm>
#include <cstring>

#include "formats/vdi/vdi_internal.h"
#include "util/checked.h"
#include "util/endian.h"

namespace vimgfs::vdi {

BlockMapPages::BlockMapPages(File* file, uint64_t offset, uint64_t bytes, std::string path)
    : file_(file), offset_(offset), bytes_(bytes), path_(std::move(path)) {}

Result<std::byte*> BlockMapPages::Page(uint64_t page) {
  if (auto it = pages_.find(page); it != pages_.end()) return it->second.data();
  if (pages_.size() >= kMaxPages) DropCleanPages();
  const uint64_t start = page * kPageBytes;
  const uint64_t len = std::min(kPageBytes, bytes_ - start);
  std::vector<std::byte> buf(kPageBytes);
  // Past the end of the file the map reads as zeros, as qemu reads it.
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  const uint64_t from = offset_ + start;
  if (from < file_size) {
    const uint64_t n = std::min(len, file_size - from);
    RETURN_IF_ERROR(file_->PRead(from, std::span(buf.data(), n))
                        .WithContext("'{}': reading the VDI block map at 0x{:x}", path_, from));
  }
  return pages_.emplace(page, std::move(buf)).first->second.data();
}

void BlockMapPages::DropCleanPages() {
  for (auto it = pages_.begin(); it != pages_.end();) {
    const uint64_t first_sector = it->first * (kPageBytes / kSectorSize);
    auto d = dirty_sectors_.lower_bound(first_sector);
    const bool dirty = d != dirty_sectors_.end() && *d < first_sector + kPageBytes / kSectorSize;
    it = dirty ? std::next(it) : pages_.erase(it);
  }
}

Result<uint32_t> BlockMapPages::Get(uint64_t index) {
  const uint64_t at = index * 4;
  if (at + 4 > bytes_) return Status::Corrupt("'{}': VDI block map entry {} is past the map", path_, index);
  ASSIGN_OR_RETURN(std::byte * p, Page(at / kPageBytes));
  return LoadLE32(p + at % kPageBytes);
}

Status BlockMapPages::Set(uint64_t index, uint32_t value) {
  const uint64_t at = index * 4;
  if (at + 4 > bytes_) return Status::Corrupt("'{}': VDI block map entry {} is past the map", path_, index);
  ASSIGN_OR_RETURN(std::byte * p, Page(at / kPageBytes));
  StoreLE32(p + at % kPageBytes, value);
  dirty_sectors_.insert(at / kSectorSize);
  return Status::Ok();
}

void BlockMapPages::Grow(uint64_t bytes) {
  // A partial last page read before holds what the file had past the old end: read again.
  if (bytes_ % kPageBytes != 0) {
    const uint64_t last = bytes_ / kPageBytes;
    const uint64_t first_sector = last * (kPageBytes / kSectorSize);
    auto d = dirty_sectors_.lower_bound(first_sector);
    if (d == dirty_sectors_.end() || *d >= first_sector + kPageBytes / kSectorSize) pages_.erase(last);
  }
  bytes_ = std::max(bytes_, bytes);
}

Result<uint64_t> BlockMapPages::EntriesInFile() const {
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  return file_size <= offset_ ? 0 : std::min(bytes_, file_size - offset_) / 4;
}

uint64_t BlockMapPages::dirty_end() const {
  return dirty_sectors_.empty() ? 0 : std::min(bytes_, (*dirty_sectors_.rbegin() + 1) * kSectorSize);
}

Status BlockMapPages::CopyPrefix(uint64_t n, std::byte* out) {
  for (uint64_t done = 0; done < n;) {
    const uint64_t page = done / kPageBytes, in = done % kPageBytes;
    const uint64_t len = std::min(n - done, kPageBytes - in);
    ASSIGN_OR_RETURN(std::byte * p, Page(page));
    std::memcpy(out + done, p + in, len);
    done += len;
  }
  return Status::Ok();
}

Status BlockMapPages::WriteDirty(IoTag tag) {
  auto it = dirty_sectors_.begin();
  while (it != dirty_sectors_.end()) {
    // A run of dirty sectors inside one page: one write.
    const uint64_t page = *it * kSectorSize / kPageBytes;
    const uint64_t page_end_sector = (page + 1) * (kPageBytes / kSectorSize);
    uint64_t end = *it + 1;
    auto next = std::next(it);
    while (next != dirty_sectors_.end() && *next == end && end < page_end_sector) {
      ++end;
      ++next;
    }
    const uint64_t lo = *it * kSectorSize, hi = std::min(end * kSectorSize, bytes_);
    ASSIGN_OR_RETURN(std::byte * p, Page(page));
    RETURN_IF_ERROR(file_->PWrite(offset_ + lo, std::span(p + lo % kPageBytes, hi - lo), tag)
                        .WithContext("'{}': writing the VDI block map", path_));
    it = dirty_sectors_.erase(it, next);
  }
  return Status::Ok();
}

}  // namespace vimgfs::vdi

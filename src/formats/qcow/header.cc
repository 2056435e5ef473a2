// qcow header: probe, decode with validation of every field, the backing file name.
#include <algorithm>
#include <climits>
#include <cstring>

#include "formats/qcow/qcow_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow {

uint64_t Header::fixed_metadata_end() const {
  uint64_t end = std::max<uint64_t>(kHeaderSize, l1_offset + l1_bytes());
  if (backing_offset != 0) end = std::max(end, backing_offset + backing_size);
  return end;
}

int ProbeQcow(std::span<const std::byte> head) {
  // qemu wants the whole header in the probe buffer; the version tells qcow2 apart.
  if (head.size() < kHeaderSize) return 0;
  return LoadBE32(&head[off::kMagic]) == kMagic && LoadBE32(&head[off::kVersion]) == kVersion ? 100 : 0;
}

Result<uint64_t> L1Entries(uint64_t size, uint32_t cluster_bits, uint32_t l2_bits, const std::string& path) {
  const uint32_t shift = cluster_bits + l2_bits;  // <= 29
  if (size > UINT64_MAX - (uint64_t{1} << shift)) return Status::InvalidFormat("'{}': Image too large", path);
  const uint64_t entries = DivRoundUp(size, uint64_t{1} << shift);
  // qemu's bound (the table's byte size must fit an int), then vimgfs's memory limit.
  if (entries > INT_MAX / 8) return Status::InvalidFormat("'{}': Image too large", path);
  if (entries * 8 > limits::kMaxMapBytes) {
    return Status::Unsupported("'{}': qcow L1 table of {} bytes ({} GiB disk) exceeds the limit of {} bytes",
                               path, entries * 8, size >> 30, limits::kMaxMapBytes);
  }
  return entries;
}

Result<Header> ParseHeader(std::span<const std::byte, kHeaderSize> raw, uint64_t file_size,
                           const std::string& path) {
  if (file_size < kHeaderSize) {
    return Status::InvalidFormat("'{}': file of {} bytes is too small for a qcow header", path, file_size);
  }
  if (LoadBE32(&raw[off::kMagic]) != kMagic)
    return Status::InvalidFormat("'{}': Image not in qcow format", path);
  const uint32_t version = LoadBE32(&raw[off::kVersion]);
  if (version != kVersion) {
    return Status::Unsupported("'{}': qcow (v1) does not support qcow version {}{}", path, version,
                               version == 2 || version == 3 ? " (try the 'qcow2' format)" : "");
  }
  Header h;
  h.backing_offset = LoadBE64(&raw[off::kBackingOffset]);
  h.backing_size = LoadBE32(&raw[off::kBackingSize]);
  h.size = LoadBE64(&raw[off::kSize]);
  h.cluster_bits = static_cast<uint8_t>(raw[off::kClusterBits]);
  h.l2_bits = static_cast<uint8_t>(raw[off::kL2Bits]);
  h.crypt_method = LoadBE32(&raw[off::kCryptMethod]);
  h.l1_offset = LoadBE64(&raw[off::kL1Offset]);

  if (h.size <= 1) {
    return Status::InvalidFormat("'{}': Image size is too small (must be at least 2 bytes)", path);
  }
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Status::InvalidFormat("'{}': Cluster size must be between 512 and 64k (cluster_bits is {})", path,
                                 h.cluster_bits);
  }
  if (h.l2_bits < kMinL2Bits || h.l2_bits > kMaxL2Bits) {
    return Status::InvalidFormat("'{}': L2 table size must be between 512 and 64k (l2_bits is {})", path,
                                 h.l2_bits);
  }
  if (h.crypt_method != kCryptNone && h.crypt_method != kCryptAes) {
    return Status::InvalidFormat("'{}': invalid encryption method in qcow header ({})", path, h.crypt_method);
  }
  ASSIGN_OR_RETURN(h.l1_entries, L1Entries(h.size, h.cluster_bits, h.l2_bits, path));
  // qemu counts whole sectors only.
  h.virtual_size = AlignDown(h.size, kSectorSize);
  if (h.virtual_size > limits::kMaxVirtualSize) {
    return Status::Unsupported("'{}': qcow disk size {} exceeds the limit of {} bytes", path, h.size,
                               limits::kMaxVirtualSize);
  }
  const auto l1_end = CheckedAdd(h.l1_offset, h.l1_bytes());
  if (!l1_end || *l1_end > file_size) {
    return Status::InvalidFormat(
        "'{}': qcow L1 table (offset 0x{:x}, {} bytes) extends past the end of the file ({} bytes)", path,
        h.l1_offset, h.l1_bytes(), file_size);
  }
  if (h.l1_bytes() > 0 && h.l1_offset < kHeaderSize) {
    return Status::InvalidFormat("'{}': qcow L1 table offset 0x{:x} is inside the header", path, h.l1_offset);
  }
  if (h.backing_offset != 0) {
    if (h.backing_size > limits::kMaxBackingNameBytes) {
      return Status::InvalidFormat("'{}': Backing file name too long ({} bytes, at most {})", path,
                                   h.backing_size, limits::kMaxBackingNameBytes);
    }
    const auto name_end = CheckedAdd(h.backing_offset, h.backing_size);
    if (!name_end || *name_end > file_size) {
      return Status::InvalidFormat(
          "'{}': qcow backing file name (offset 0x{:x}, {} bytes) extends past the end of the file", path,
          h.backing_offset, h.backing_size);
    }
  }
  return h;
}

Status ReadBackingName(File& file, uint64_t file_size, const std::string& path, Header* h) {
  if (h->backing_offset == 0 || h->backing_size == 0) return Status::Ok();
  std::string name(h->backing_size, '\0');
  RETURN_IF_ERROR(file.PRead(h->backing_offset, std::as_writable_bytes(std::span(name)))
                      .WithContext("'{}': reading the backing file name", path));
  // qemu keeps the name as a C string: a NUL ends it.
  name.resize(std::strlen(name.c_str()));
  h->backing_name = std::move(name);
  return Status::Ok();
}

}  // namespace vimgfs::qcow

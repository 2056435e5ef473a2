// qcow2 header: parsing with validation of every field, and serialization of cluster 0
// (header, extensions, feature name table, backing file name).
#include <cstring>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

struct FeatureName {
  uint8_t type;
  uint8_t bit;
  const char* name;
};
// The names qemu writes into the feature name table, so tools that do not know a
// feature can say which one blocks them.
constexpr FeatureName kFeatureNames[] = {
    {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
    {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},          {2, 1, "raw external data"},
};

// qemu's list of unsupported incompatible features: the names the feature table gives
// for set bits, in table order, then one mask of the set bits it does not name.
std::string FeatureList(uint64_t bits, const std::vector<std::pair<int, std::string>>& names) {
  std::string out;
  for (const auto& [bit, name] : names) {
    if (!(bits & (1ull << bit))) continue;
    out += (out.empty() ? "" : ", ") + name;
    bits &= ~(1ull << bit);
  }
  if (bits) out += fmt::format("{}Unknown incompatible feature: {:x}", out.empty() ? "" : ", ", bits);
  return out;
}

}  // namespace

Result<Header> ParseHeader(File& file, const std::string& path, uint64_t file_size, bool for_check) {
  Header h;
  std::byte fixed[kV3HeaderLength] = {};
  if (file_size < kV2HeaderLength)
    return Status::InvalidFormat("'{}': file is too small ({} bytes) to be a qcow2 image", path, file_size);
  RETURN_IF_ERROR(file.PRead(0, fixed));
  const std::byte* p = fixed;
  if (LoadBE32(p) != kMagic) return Status::InvalidFormat("'{}': image is not in qcow2 format", path);
  h.version = LoadBE32(p + 4);
  if (h.version != 2 && h.version != 3)
    return Status::Unsupported("'{}': unsupported qcow2 version {}", path, h.version);
  h.backing_file_offset = LoadBE64(p + 8);
  h.backing_file_size = LoadBE32(p + 16);
  h.cluster_bits = LoadBE32(p + 20);
  h.size = LoadBE64(p + 24);
  h.crypt_method = LoadBE32(p + 32);
  h.l1_size = LoadBE32(p + 36);
  h.l1_table_offset = LoadBE64(p + 40);
  h.refcount_table_offset = LoadBE64(p + 48);
  h.refcount_table_clusters = LoadBE32(p + 56);
  h.nb_snapshots = LoadBE32(p + 60);
  h.snapshots_offset = LoadBE64(p + 64);

  if (h.cluster_bits < limits::kMinClusterBits || h.cluster_bits > limits::kMaxClusterBits)
    return Status::InvalidFormat("'{}': cluster size 2^{} is out of range (512 B .. 2 MiB)", path,
                                 h.cluster_bits);
  const uint64_t cs = h.cluster_size();

  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    if (file_size < kV3HeaderLength)
      return Status::InvalidFormat("'{}': file is too small for a version 3 header", path);
    h.incompatible_features = LoadBE64(p + 72);
    h.compatible_features = LoadBE64(p + 80);
    h.autoclear_features = LoadBE64(p + 88);
    h.refcount_order = LoadBE32(p + 96);
    h.header_length = LoadBE32(p + 100);
    if (h.header_length < kV3HeaderLength || h.header_length % 8 != 0 || h.header_length > cs)
      return Status::InvalidFormat("'{}': header length {} is invalid", path, h.header_length);
    if (h.header_length > file_size)
      return Status::InvalidFormat("'{}': header length {} is past the end of the file", path,
                                   h.header_length);
    if (h.refcount_order > 6)
      return Status::InvalidFormat("'{}': refcount width 2^{} bits is out of range (max 64)", path,
                                   h.refcount_order);
    if (h.header_length > kV3HeaderLength) {
      std::vector<std::byte> extra(h.header_length - kV3HeaderLength);
      RETURN_IF_ERROR(file.PRead(kV3HeaderLength, extra));
      h.compression_type = static_cast<uint8_t>(extra[0]);
      h.extra_header_fields.assign(extra.begin() + 1, extra.end());
    }
  }

  // Extensions: from the end of the header to the end of cluster 0 (or the backing name).
  std::vector<std::pair<int, std::string>> incompat_names;
  uint64_t ext_end = std::min<uint64_t>(cs, file_size);
  if (h.backing_file_offset != 0 && h.backing_file_offset < ext_end) ext_end = h.backing_file_offset;
  uint64_t pos = h.header_length;
  bool seen_data = false;
  while (pos + 8 <= ext_end) {
    std::byte eh[8];
    RETURN_IF_ERROR(file.PRead(pos, eh));
    uint32_t type = LoadBE32(eh);
    uint32_t len = LoadBE32(eh + 4);
    pos += 8;
    if (type == kExtEnd) break;
    if (len > limits::kMaxHeaderExtensionBytes || len > ext_end - pos)
      return Status::InvalidFormat(
          "'{}': header extension {:#x} of {} bytes does not fit in the header "
          "cluster",
          path, type, len);
    std::vector<std::byte> data(len);
    RETURN_IF_ERROR(file.PRead(pos, data));
    pos += AlignUp(len, 8);
    std::string str(reinterpret_cast<const char*>(data.data()), data.size());
    switch (type) {
      case kExtBackingFormat:
        // A later one replaces an earlier one, as in qemu (iotest 114).
        h.backing_format = std::string(str.c_str());
        break;
      case kExtDataFile:
        if (seen_data) return Status::InvalidFormat("'{}': duplicate data file extension", path);
        seen_data = true;
        h.data_file = std::string(str.c_str());
        break;
      case kExtFeatureTable:
        // As qemu reads it: a later table replaces an earlier one, a short last entry is
        // padded with zeros, and an entry with an empty name ends the table (iotest 036).
        h.has_feature_table = true;
        incompat_names.clear();
        data.resize(AlignUp(data.size(), 48));
        for (size_t i = 0; i < data.size(); i += 48) {
          const char* n = reinterpret_cast<const char*>(data.data() + i + 2);
          std::string name(n, strnlen(n, 46));
          if (name.empty()) break;
          const uint8_t bit = static_cast<uint8_t>(data[i + 1]);
          if (static_cast<uint8_t>(data[i]) == 0 && bit < 64)
            incompat_names.emplace_back(bit, std::move(name));
        }
        break;
      case kExtBitmaps:
        h.bitmaps_ext = std::move(data);
        break;
      case kExtCrypto:
        if (data.size() != 16)
          return Status::InvalidFormat("'{}': CRYPTO header extension size {}, but expected size 16", path,
                                       data.size());
        h.crypto_header_offset = LoadBE64(data.data());
        h.crypto_header_length = LoadBE64(data.data() + 8);
        if (h.crypto_header_offset % h.cluster_size())
          return Status::InvalidFormat(
              "'{}': Encryption header offset '{}' is not a multiple of cluster size '{}'", path,
              h.crypto_header_offset, h.cluster_size());
        if (h.crypt_method != 2) h.unknown_extensions.push_back({type, std::move(data)});  // kept as read
        break;
      default:
        h.unknown_extensions.push_back({type, std::move(data)});
        break;
    }
  }

  uint64_t unknown_incompat = h.incompatible_features & ~kIncompatKnown;
  if (unknown_incompat)
    return Status::Unsupported("'{}': Unsupported qcow2 feature(s): {}", path,
                               FeatureList(unknown_incompat, incompat_names));
  if (h.crypt_method > 2)
    return Status::InvalidFormat("'{}': Unsupported encryption method: {}", path, h.crypt_method);
  if (h.crypt_method == 2 && h.crypto_header_length == 0)
    return Status::InvalidFormat("'{}': Could not read encryption header", path);
  if (h.incompatible_features & kIncompatCompression) {
    if (h.header_length <= kV3HeaderLength)
      return Status::InvalidFormat("'{}': compression type bit set without a compression type field", path);
    if (h.compression_type != kCompressionZstd)
      return Status::Unsupported("'{}': unknown compression type {}", path, h.compression_type);
  } else if (h.compression_type != kCompressionZlib) {
    return Status::InvalidFormat("'{}': compression type {} set without the compression type feature bit",
                                 path, h.compression_type);
  }
  if (h.extended_l2() && h.cluster_bits < 14)
    return Status::InvalidFormat("'{}': extended L2 entries need clusters of at least 16 KiB", path);
  if ((h.autoclear_features & kAutoclearDataFileRaw) && !h.has_data_file())
    return Status::InvalidFormat("'{}': raw external data bit set without an external data file", path);
  if (h.data_file && !h.has_data_file())
    h.data_file.reset();  // qemu ignores the name without the feature bit

  if (h.size > limits::kMaxVirtualSize)
    return Status::InvalidFormat("'{}': virtual size {} is too large", path, h.size);

  // L1 table.
  const uint64_t l2_entries = cs / (h.extended_l2() ? 16 : 8);
  if (uint64_t{h.l1_size} * 8 > limits::kMaxL1Bytes)
    return Status::InvalidFormat("'{}': Active L1 table too large", path);
  uint64_t need_l1 = DivRoundUp(DivRoundUp(h.size, cs), l2_entries);
  if (need_l1 > INT32_MAX) return Status::InvalidFormat("'{}': Image is too big", path);
  if (h.l1_size < need_l1) return Status::InvalidFormat("'{}': L1 table is too small", path);
  if (h.l1_size > 0) {
    if (!IsAligned(h.l1_table_offset, cs) || (h.l1_table_offset == 0 && !for_check))
      return Status::InvalidFormat("'{}': L1 table offset {:#x} is invalid", path, h.l1_table_offset);
    auto end = CheckedAdd(h.l1_table_offset, uint64_t{h.l1_size} * 8);
    if (!end || *end > (for_check ? uint64_t{INT64_MAX} : file_size))
      return Status::InvalidFormat("'{}': L1 table offset {:#x} is past the end of the file", path,
                                   h.l1_table_offset);
  }

  // Refcount table.
  if (h.refcount_table_clusters == 0 && !for_check)
    return Status::InvalidFormat("'{}': image has no refcount table", path);
  auto rt_bytes = CheckedMul(h.refcount_table_clusters, cs);
  if (!rt_bytes || *rt_bytes > limits::kMaxRefTableBytes)
    return Status::InvalidFormat("'{}': refcount table of {} clusters is too large", path,
                                 h.refcount_table_clusters);
  if (!IsAligned(h.refcount_table_offset, cs) || (h.refcount_table_offset == 0 && !for_check))
    return Status::InvalidFormat("'{}': refcount table offset {:#x} is invalid", path,
                                 h.refcount_table_offset);
  auto rt_end = CheckedAdd(h.refcount_table_offset, *rt_bytes);
  if (!rt_end || *rt_end > (for_check ? uint64_t{INT64_MAX} : AlignUp(file_size, cs)))
    return Status::InvalidFormat("'{}': refcount table offset {:#x} is past the end of the file", path,
                                 h.refcount_table_offset);

  // Snapshot table (entries parsed later).
  // More than qemu's limit: the check reports it (and check -r all drops the rest).
  if (h.nb_snapshots > limits::kMaxSnapshots && !for_check)
    return Status::InvalidFormat("'{}': Snapshot table too large", path);
  if (h.nb_snapshots > 0) {
    // Past the end of the file is allowed: qemu reads the entries there as zeros.
    if (!IsAligned(h.snapshots_offset, cs) || h.snapshots_offset > uint64_t{INT64_MAX} ||
        (!for_check && h.snapshots_offset == 0))
      return Status::InvalidFormat("'{}': snapshot table offset {:#x} is invalid", path, h.snapshots_offset);
  }

  // Backing file name: inside cluster 0 and inside the file.
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > limits::kMaxBackingNameBytes)
      return Status::InvalidFormat("'{}': backing file name of {} bytes is too long (max {})", path,
                                   h.backing_file_size, limits::kMaxBackingNameBytes);
    auto end = CheckedAdd(h.backing_file_offset, h.backing_file_size);
    if (!end || *end > cs || *end > file_size)
      return Status::InvalidFormat("'{}': backing file name at {:#x} is outside the header cluster", path,
                                   h.backing_file_offset);
    std::string name(h.backing_file_size, '\0');
    RETURN_IF_ERROR(
        file.PRead(h.backing_file_offset, {reinterpret_cast<std::byte*>(name.data()), name.size()}));
    if (name.find('\0') != std::string::npos)
      return Status::InvalidFormat("'{}': backing file name contains a NUL byte", path);
    h.backing_file = std::move(name);
  }
  if (h.has_data_file() && !h.backing_file.empty() && (h.autoclear_features & kAutoclearDataFileRaw))
    return Status::InvalidFormat("'{}': a raw external data file cannot have a backing file", path);
  return h;
}

namespace {

void PutExtension(std::vector<std::byte>& out, uint32_t type, std::span<const std::byte> data) {
  size_t at = out.size();
  out.resize(at + 8 + AlignUp(data.size(), 8));
  StoreBE32(out.data() + at, type);
  StoreBE32(out.data() + at + 4, static_cast<uint32_t>(data.size()));
  if (!data.empty()) std::memcpy(out.data() + at + 8, data.data(), data.size());
}
std::span<const std::byte> AsBytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace

Result<std::vector<std::byte>> SerializeHeader(const Header& h) {
  std::vector<std::byte> out(h.version == 2 ? kV2HeaderLength : h.header_length);
  std::byte* p = out.data();
  StoreBE32(p, kMagic);
  StoreBE32(p + 4, h.version);
  // backing offset/size filled below
  StoreBE32(p + 20, h.cluster_bits);
  StoreBE64(p + 24, h.size);
  StoreBE32(p + 32, h.crypt_method);
  StoreBE32(p + 36, h.l1_size);
  StoreBE64(p + 40, h.l1_table_offset);
  StoreBE64(p + 48, h.refcount_table_offset);
  StoreBE32(p + 56, h.refcount_table_clusters);
  StoreBE32(p + 60, h.nb_snapshots);
  StoreBE64(p + 64, h.snapshots_offset);
  if (h.version >= 3) {
    StoreBE64(p + 72, h.incompatible_features);
    StoreBE64(p + 80, h.compatible_features);
    StoreBE64(p + 88, h.autoclear_features);
    StoreBE32(p + 96, h.refcount_order);
    StoreBE32(p + 100, h.header_length);
    if (h.header_length > kV3HeaderLength) {
      out[kV3HeaderLength] = static_cast<std::byte>(h.compression_type);
      size_t n = std::min<size_t>(h.extra_header_fields.size(), h.header_length - kV3HeaderLength - 1);
      if (n) std::memcpy(p + kV3HeaderLength + 1, h.extra_header_fields.data(), n);
    }
  }
  if (h.backing_format) PutExtension(out, kExtBackingFormat, AsBytes(*h.backing_format));
  if (h.data_file) PutExtension(out, kExtDataFile, AsBytes(*h.data_file));
  if (h.crypt_method == 2) {
    std::byte ext[16];
    StoreBE64(ext, h.crypto_header_offset);
    StoreBE64(ext + 8, h.crypto_header_length);
    PutExtension(out, kExtCrypto, ext);
  }
  // qemu leaves the table out with clusters of 4 KiB and less (room for the backing name).
  if (h.version >= 3 && h.cluster_size() > 4096) {
    std::vector<std::byte> table(sizeof(kFeatureNames) / sizeof(kFeatureNames[0]) * 48);
    size_t i = 0;
    for (const FeatureName& f : kFeatureNames) {
      table[i] = static_cast<std::byte>(f.type);
      table[i + 1] = static_cast<std::byte>(f.bit);
      std::memcpy(table.data() + i + 2, f.name, strlen(f.name));
      i += 48;
    }
    PutExtension(out, kExtFeatureTable, table);
  }
  if (h.bitmaps_ext) PutExtension(out, kExtBitmaps, *h.bitmaps_ext);
  for (const UnknownExtension& e : h.unknown_extensions) PutExtension(out, e.type, e.data);
  PutExtension(out, kExtEnd, {});  // end marker: 8 zero bytes

  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > limits::kMaxBackingNameBytes)
      return Status::InvalidArgument("backing file name is too long ({} bytes, max {})",
                                     h.backing_file.size(), limits::kMaxBackingNameBytes);
    p = out.data();  // PutExtension above may have reallocated `out` [fix by the mount helper]
    StoreBE64(p + 8, out.size());
    StoreBE32(p + 16, static_cast<uint32_t>(h.backing_file.size()));
    auto b = AsBytes(h.backing_file);
    out.insert(out.end(), b.begin(), b.end());
    p = out.data();
    StoreBE64(p + 8, out.size() - h.backing_file.size());
  }
  if (out.size() > h.cluster_size())
    return Status::InvalidArgument("header and extensions ({} bytes) do not fit in one cluster ({} bytes)",
                                   out.size(), h.cluster_size());
  return out;
}

}  // namespace vimgfs::qcow2

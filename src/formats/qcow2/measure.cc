// qemu-img measure for qcow2: qemu's qcow2_measure, number for number. The size of a fully
// allocated image (header, L2 and L1 tables, refcount structures by their fixed point,
// data), and of what the source's data needs of it (every target cluster its data
// touches; all of them with a backing file named or with full preallocation).
#include <algorithm>

#include "formats/format_util.h"
#include "crypto/luks.h"
#include "formats/qcow2/qcow2_internal.h"
#include "vimgfs/image.h"

namespace vimgfs::qcow2 {
namespace {

constexpr uint64_t kMaxL1Bytes = 32ull << 20;  // qemu's QCOW_MAX_L1_SIZE

// qemu's qcow2_refcount_metadata_size: refcount blocks and table clusters for `clusters`
// clusters, themselves counted (found as a fixed point).
uint64_t RefcountMetadataSize(uint64_t clusters, uint64_t cluster_size, uint32_t refcount_order) {
  const uint64_t blocks_per_table_cluster = cluster_size / 8;
  const uint64_t refcounts_per_block = cluster_size * 8 / (uint64_t{1} << refcount_order);
  uint64_t table = 0, blocks = 0, n = 0, last;
  do {
    last = n;
    blocks = DivRoundUp(clusters + table + blocks, refcounts_per_block);
    table = DivRoundUp(blocks, blocks_per_table_cluster);
    n = clusters + blocks + table;
  } while (n != last);
  return (blocks + table) * cluster_size;
}

// qemu's qcow2_calc_prealloc_size: the bytes of a fully allocated image.
uint64_t FullyAllocatedSize(uint64_t total, uint64_t cluster_size, uint32_t refcount_order,
                            bool extended_l2) {
  const uint64_t aligned = AlignUp(total, cluster_size);
  const uint64_t l2e = extended_l2 ? 16 : 8;
  uint64_t meta = cluster_size;  // header
  const uint64_t nl2e = AlignUp(aligned / cluster_size, cluster_size / l2e);
  meta += nl2e * l2e;
  const uint64_t nl1e = AlignUp(nl2e * l2e / cluster_size, cluster_size / 8);
  meta += nl1e * 8;
  meta += RefcountMetadataSize((meta + aligned) / cluster_size, cluster_size, refcount_order);
  return meta + aligned;
}

// The options as qemu's measure reads them (its qcow2_opt_get_* helpers, whose words
// differ from create's).
struct MeasureParams {
  bool extended_l2 = false;
  uint64_t cluster_size = 65536;
  int version = 3;
  uint64_t refcount_bits = 16;
  std::string prealloc = "off";
  bool has_backing_file = false;
  uint64_t size = 0;
  uint64_t luks_payload = 0;  // encrypt.format=luks: the LUKS header's clusters
};

Result<MeasureParams> ParseMeasureParams(const std::map<std::string, std::string>& o) {
  MeasureParams p;
  auto get = [&](const char* k) -> const std::string* {
    auto it = o.find(k);
    return it == o.end() ? nullptr : &it->second;
  };
  if (auto v = get("extended_l2")) {
    ASSIGN_OR_RETURN(p.extended_l2, ParseBoolOption("extended_l2", *v));
  }
  if (auto v = get("cluster_size")) {
    ASSIGN_OR_RETURN(p.cluster_size, ParseSize(*v));
  }
  if (!IsPowerOfTwo(p.cluster_size) || p.cluster_size < 512 || p.cluster_size > (2u << 20))
    return Status::InvalidArgument("Cluster size must be a power of two between 512 and 2048k");
  if (p.extended_l2 && p.cluster_size < 16384)
    return Status::InvalidArgument(
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  if (auto v = get("compat")) {
    if (*v == "0.10") {
      p.version = 2;
    } else if (*v != "1.1") {
      return Status::InvalidArgument("Invalid compatibility level: '{}'", *v);
    }
  }
  if (auto v = get("refcount_bits")) {
    ASSIGN_OR_RETURN(p.refcount_bits, ParseSize(*v));
  }
  if (p.refcount_bits > 64 || !IsPowerOfTwo(p.refcount_bits))
    return Status::InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
  if (p.version < 3 && p.refcount_bits != 16)
    return Status::InvalidArgument(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
        "compat=1.1 or greater)");
  if (auto v = get("preallocation")) {
    if (*v != "off" && *v != "metadata" && *v != "falloc" && *v != "full")
      return Status::InvalidArgument("invalid parameter value: {}", *v);
    p.prealloc = *v;
  }
  p.has_backing_file = get("backing_file") != nullptr;
  if (auto v = get("encrypt.format"); v && *v == "luks") {
    if (!get("encrypt.key-secret"))
      return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
    crypto::CipherSpec spec;
    ASSIGN_OR_RETURN(spec.alg, crypto::CipherAlg::Named(get("encrypt.cipher-alg") ? *get("encrypt.cipher-alg")
                                                                                  : std::string("aes-256")));
    ASSIGN_OR_RETURN(spec.mode,
                     crypto::CipherModeNamed(get("encrypt.cipher-mode") ? *get("encrypt.cipher-mode")
                                                                        : std::string("xts")));
    p.luks_payload = AlignUp(crypto::LuksPayloadOffset(spec), p.cluster_size);
  }
  if (auto v = get("size")) {
    ASSIGN_OR_RETURN(p.size, ParseSize(*v));
  }
  return p;
}

// qemu's get_bitmap_bytes_needed and calc_dir_entry_size, summed as
// qcow2_get_persistent_dirty_bitmap_size sums them: every bitmap fully allocated.
uint64_t BitmapsSize(const std::vector<Qcow2Bitmap>& bitmaps, uint64_t disk_size, uint64_t cluster_size) {
  uint64_t total = 0, dir = 0;
  for (const Qcow2Bitmap& b : bitmaps) {
    const uint64_t bytes = DivRoundUp(DivRoundUp(disk_size, b.granularity), 8);
    const uint64_t clusters = DivRoundUp(bytes, cluster_size);
    total += clusters * cluster_size;
    total += AlignUp(clusters * 8, cluster_size);
    dir += AlignUp(24 + b.name.size(), 8);
  }
  return total + AlignUp(dir, cluster_size);
}

}  // namespace

Result<MeasureResult> Measure(const MeasureRequest& req) {
  ASSIGN_OR_RETURN(MeasureParams p, ParseMeasureParams(req.options));
  const uint64_t cs = p.cluster_size;
  uint64_t virtual_size = AlignUp(p.size, cs);
  const uint64_t l2e = p.extended_l2 ? 16 : 8;
  if (DivRoundUp(virtual_size / cs, cs / l2e) * 8 > kMaxL1Bytes)
    return Status::InvalidArgument("The image size is too large (try using a larger cluster size)");

  uint64_t required = 0;
  if (Image* src = req.source) {
    const uint64_t ssize = src->size();
    virtual_size = AlignUp(ssize, cs);
    if (p.has_backing_file) {
      // Nothing is known to be shared with the new backing file: every cluster counts.
      required = virtual_size;
    } else {
      // Every target cluster that data of the source touches (zeros need none).
      uint64_t counted_end = 0;  // clusters below this are counted
      constexpr uint64_t kWindow = 1ull << 30;
      for (uint64_t pos = 0; pos < ssize; pos += kWindow) {
        ASSIGN_OR_RETURN(auto runs, src->MapAsQemu(pos, std::min(kWindow, ssize - pos)));
        for (const BlockStatus& r : runs) {
          if (r.zero || !(r.present && r.data)) continue;
          const uint64_t from = std::max(AlignDown(r.offset, cs), counted_end);
          const uint64_t to = AlignUp(r.offset + r.length, cs);
          if (to > from) required += to - from;
          counted_end = std::max(counted_end, to);
        }
      }
    }
  }
  if (p.prealloc == "full" || p.prealloc == "falloc") required = virtual_size;

  MeasureResult m;
  m.fully_allocated =
      p.luks_payload + FullyAllocatedSize(virtual_size, cs,
                                          static_cast<uint32_t>(__builtin_ctzll(p.refcount_bits)),
                                          p.extended_l2);
  // Data clusters not needed come off; the metadata of a full image stays counted.
  m.required = m.fully_allocated - virtual_size + required;
  if (p.version >= 3 && req.source) {
    // Shown only where the source keeps persistent bitmaps too (a qcow2 v3 image).
    FormatInfo info = req.source->Info();
    if (const auto* d = std::get_if<Qcow2Details>(&info.format_specific); d && d->v3)
      m.bitmaps = BitmapsSize(d->bitmaps, req.source->size(), cs);
  }
  return m;
}

}  // namespace vimgfs::qcow2

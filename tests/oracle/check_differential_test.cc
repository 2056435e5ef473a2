// `vimgfs check` against `qemu-img check` on thousands of deterministically mutated images.
//
// Small images made by qemu-img/qemu-io (many cluster sizes, refcount widths, compat
// levels, snapshots, extended L2, compressed clusters; VMDK and VDI too) get one targeted
// metadata mutation each: a header field, an L1/L2 entry, a refcount table entry, a
// refcount, a snapshot table field, the file length. qemu-img check judges every one.
// A failure is an image qemu calls corrupt (exit 2) that vimgfs does not, a vimgfs crash
// or hang, or a `vimgfs check -r all` that says it repaired an image (exit 0) that qemu
// still calls corrupt or cannot check.
//
// VIMGFS_CHECK_DIFF_SCALE=N multiplies the image counts (default 1: 2000 qcow2, 300 VMDK,
// 250 VDI). VIMGFS_CHECK_DIFF_SAVE=DIR keeps copies of the failing images.
// Every failure names the base image (how qemu made it) and the mutation (offset, old
// and new value), so it can be rebuilt by hand.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "support/test_util.h"

namespace vimgfs::test {
namespace {

// splitmix64: the same stream on every platform (std distributions are not).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t Below(uint64_t n) { return n ? Next() % n : 0; }
  template <typename T>
  const T& Pick(const std::vector<T>& v) {
    return v[Below(v.size())];
  }

 private:
  uint64_t s_;
};

using Bytes = std::vector<uint8_t>;

uint64_t GetBE(const Bytes& b, uint64_t off, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; i++) v = v << 8 | (off + i < b.size() ? b[off + i] : 0);
  return v;
}
uint64_t GetLE(const Bytes& b, uint64_t off, int width) {
  uint64_t v = 0;
  for (int i = width - 1; i >= 0; i--) v = v << 8 | (off + i < b.size() ? b[off + i] : 0);
  return v;
}

// One mutated image: the bytes and what was done to them.
struct Mutant {
  Bytes bytes;
  std::string what;
  // Writes `width` bytes of v at off, big- or little-endian, and records it.
  void Put(uint64_t off, int width, uint64_t v, bool big_endian, const std::string& label) {
    if (off + width > bytes.size()) bytes.resize(off + width, 0);
    uint64_t old = big_endian ? GetBE(bytes, off, width) : GetLE(bytes, off, width);
    for (int i = 0; i < width; i++) {
      int shift = big_endian ? 8 * (width - 1 - i) : 8 * i;
      bytes[off + i] = static_cast<uint8_t>(v >> shift);
    }
    Note(fmt::format("{} at {:#x}: {:#x} -> {:#x}", label, off, old, v));
  }
  void Note(const std::string& s) { what += (what.empty() ? "" : "; ") + s; }
};

struct Base {
  std::string name;
  std::string recipe;  // the commands that made it
  Bytes bytes;
};

// ---------------------------------------------------------------------------------------
// qcow2

struct Qcow2Layout {
  uint32_t cluster_bits = 16;
  uint64_t cs = 65536;
  uint32_t refcount_bits = 16;
  bool extended_l2 = false;
  uint64_t l1_off = 0, l1_size = 0, rt_off = 0, rt_clusters = 0, snap_off = 0, nb_snaps = 0;
  std::vector<uint64_t> l1_entries;       // file offsets of L1 entries (active and snapshots)
  std::vector<uint64_t> l2_entries;       // file offsets of L2 entries that are in use
  std::vector<uint64_t> l2_free_entries;  // file offsets of some unused L2 entries
  std::vector<uint64_t> rt_entries;       // refcount table entries in use (+ a few unused)
  std::vector<uint64_t> refblocks;        // refcount block offsets
  std::vector<uint64_t> snap_entries;     // offsets of snapshot table entries
  std::vector<uint64_t> clusters;         // offsets of clusters in use (any kind)
};

Qcow2Layout ParseQcow2(const Bytes& b) {
  Qcow2Layout q;
  q.cluster_bits = static_cast<uint32_t>(GetBE(b, 20, 4));
  q.cs = 1ull << q.cluster_bits;
  uint32_t version = static_cast<uint32_t>(GetBE(b, 4, 4));
  if (version >= 3) {
    q.refcount_bits = 1u << GetBE(b, 96, 4);
    q.extended_l2 = GetBE(b, 72, 8) & 16;
  }
  q.l1_size = GetBE(b, 36, 4);
  q.l1_off = GetBE(b, 40, 8);
  q.rt_off = GetBE(b, 48, 8);
  q.rt_clusters = GetBE(b, 56, 4);
  q.nb_snaps = GetBE(b, 60, 4);
  q.snap_off = GetBE(b, 64, 8);
  const uint64_t mask = 0x00fffffffffffe00ull;
  const uint64_t entry = q.extended_l2 ? 16 : 8;
  std::vector<std::pair<uint64_t, uint64_t>> l1s = {{q.l1_off, q.l1_size}};
  uint64_t pos = q.snap_off;
  for (uint64_t i = 0; i < q.nb_snaps && pos + 40 <= b.size(); i++) {
    q.snap_entries.push_back(pos);
    l1s.push_back({GetBE(b, pos, 8), GetBE(b, pos + 8, 4)});
    uint64_t len = 40 + GetBE(b, pos + 36, 4) + GetBE(b, pos + 12, 2) + GetBE(b, pos + 14, 2);
    pos += (len + 7) / 8 * 8;
  }
  std::vector<uint64_t> l2_tables;
  for (auto [off, n] : l1s) {
    for (uint64_t i = 0; i < n; i++) {
      uint64_t e = GetBE(b, off + i * 8, 8);
      if (i < 4 || e) q.l1_entries.push_back(off + i * 8);
      if (e & mask) l2_tables.push_back(e & mask);
    }
  }
  std::sort(l2_tables.begin(), l2_tables.end());
  l2_tables.erase(std::unique(l2_tables.begin(), l2_tables.end()), l2_tables.end());
  for (uint64_t t : l2_tables) {
    q.clusters.push_back(t);
    int free_seen = 0;
    for (uint64_t i = 0; i < q.cs / entry; i++) {
      uint64_t at = t + i * entry;
      uint64_t e = GetBE(b, at, 8);
      uint64_t bm = q.extended_l2 ? GetBE(b, at + 8, 8) : 0;
      if (e || bm) {
        q.l2_entries.push_back(at);
        if (!(e >> 62 & 1) && (e & mask)) q.clusters.push_back(e & mask);
      } else if (free_seen++ < 4) {
        q.l2_free_entries.push_back(at);
      }
    }
  }
  for (uint64_t i = 0; i < q.rt_clusters * q.cs / 8; i++) {
    uint64_t e = GetBE(b, q.rt_off + i * 8, 8);
    if (e) {
      q.refblocks.push_back(e & mask);
      q.clusters.push_back(e & mask);
    }
    if (e || i < q.refblocks.size() + 2) q.rt_entries.push_back(q.rt_off + i * 8);
  }
  q.clusters.push_back(0);
  q.clusters.push_back(q.l1_off / q.cs * q.cs);
  q.clusters.push_back(q.rt_off);
  if (q.nb_snaps) q.clusters.push_back(q.snap_off);
  return q;
}

// A qcow2 mutation: one metadata field changed, or the file length.
Mutant MutateQcow2(const Base& base, const Qcow2Layout& q, Rng& rng) {
  Mutant m{base.bytes, ""};
  const uint64_t cs = q.cs;
  const uint64_t file_end = (base.bytes.size() + cs - 1) / cs * cs;
  const uint64_t mask = 0x00fffffffffffe00ull;
  // Offsets a pointer may be bent to: other metadata, data, just past EOF, far away.
  auto some_offset = [&]() -> uint64_t {
    switch (rng.Below(6)) {
      case 0:
        return file_end + rng.Below(4) * cs;
      case 1:
        return uint64_t{1} << (30 + rng.Below(25));
      case 2:
        return cs;  // often the L1 or refcount table of qemu's layout
      default:
        return rng.Pick(q.clusters);
    }
  };
  // A changed table entry (L1, L2, refcount table): bits, offsets, flags.
  auto bend_entry = [&](uint64_t at, const char* label, uint64_t reserved) {
    uint64_t e = GetBE(m.bytes, at, 8);
    uint64_t v = e;
    switch (rng.Below(9)) {
      case 0:
        v = e | (uint64_t{1} << rng.Pick(std::vector<uint64_t>{1, 2, 8, 56, 60, 61, 62}));
        v |= reserved & (uint64_t{1} << rng.Below(64));
        break;
      case 1:
        v = e ^ (uint64_t{1} << 63);
        break;  // COPIED
      case 2:
        v = (e & ~mask) | (((e & mask) + 512 * (1 + rng.Below(std::max<uint64_t>(cs / 512 - 1, 1)))) & mask);
        break;
      case 3:
        v = (e & ~mask) | (some_offset() & mask);
        break;
      case 4:
        v = 0;
        break;
      case 5:
        v = e | (reserved ? (reserved & (uint64_t{1} << rng.Below(64))) : 0);
        break;
      case 6:
        v = e ^ (uint64_t{1} << rng.Below(64));
        break;
      case 7:
        v = (e & ~mask) | ((e & mask) + cs);
        break;
      default:
        v = some_offset() | (e & (uint64_t{1} << 63));
        break;
    }
    if (v == e) v = e ^ (uint64_t{1} << (9 + rng.Below(20)));
    m.Put(at, 8, v, true, label);
  };

  uint64_t kind = rng.Below(100);
  if (kind < 14) {
    // Header fields.
    struct Field {
      const char* name;
      uint64_t off;
      int width;
    };
    static const std::vector<Field> fields = {
        {"version", 4, 4},
        {"backing_file_offset", 8, 8},
        {"backing_file_size", 16, 4},
        {"cluster_bits", 20, 4},
        {"size", 24, 8},
        {"crypt_method", 32, 4},
        {"l1_size", 36, 4},
        {"l1_table_offset", 40, 8},
        {"refcount_table_offset", 48, 8},
        {"refcount_table_clusters", 56, 4},
        {"nb_snapshots", 60, 4},
        {"snapshots_offset", 64, 8},
        {"incompatible_features", 72, 8},
        {"compatible_features", 80, 8},
        {"autoclear_features", 88, 8},
        {"refcount_order", 96, 4},
        {"header_length", 100, 4},
    };
    // Fields that matter most are picked more often.
    static const std::vector<int> weighted = {0, 1, 2, 3,  4,  5,  6,  6,  7,  7,  7,  8,  8,  8,
                                              9, 9, 9, 10, 10, 11, 11, 12, 12, 13, 14, 15, 15, 16};
    const Field& f = fields[rng.Pick(weighted)];
    uint64_t old = GetBE(m.bytes, f.off, f.width);
    std::vector<uint64_t> c = {0,
                               1,
                               old + 1,
                               old - 1,
                               old * 2,
                               old + cs,
                               old + 512,
                               old - cs,
                               file_end,
                               file_end + cs,
                               uint64_t{1} << (20 + rng.Below(40)),
                               rng.Next()};
    if (f.off == 72)
      c = {old | 1, old | 2, old | 4, old | 8, old | 16, old & ~16ull, old | 32, old | (1ull << 63)};
    if (f.off == 80 || f.off == 88) c = {old | 1, old | 2, old | 4, old | (1ull << 40)};
    if (f.off == 96) c = {0, 1, 2, 3, 4, 5, 6, 7};
    if (f.off == 20) c = {old - 1, old + 1, 8, 9, 16, 21, 22};
    uint64_t v = rng.Pick(c);
    if (f.width == 4) v &= 0xffffffff;
    if (v == old) v ^= 1;
    m.Put(f.off, f.width, v, true, std::string("header ") + f.name);
  } else if (kind < 30) {
    if (q.l1_entries.empty()) return MutateQcow2(base, q, rng);
    uint64_t at = rng.Pick(q.l1_entries);
    bend_entry(at, "L1 entry", 0x7f000000000001ffull);
  } else if (kind < 52) {
    if (q.l2_entries.empty()) return MutateQcow2(base, q, rng);
    uint64_t at = rng.Below(8) == 0 && !q.l2_free_entries.empty() ? rng.Pick(q.l2_free_entries)
                                                                  : rng.Pick(q.l2_entries);
    uint64_t e = GetBE(m.bytes, at, 8);
    uint64_t op = rng.Below(10);
    if (q.extended_l2 && op < 3) {
      uint64_t bm = GetBE(m.bytes, at + 8, 8);
      std::vector<uint64_t> c = {
          bm | 1, bm | (1ull << 32),  bm | (bm << 32), bm ^ (1ull << rng.Below(64)), 0xffffffffull,
          ~0ull,  bm & 0xffffffffull, rng.Next()};
      uint64_t v = rng.Pick(c);
      if (v == bm) v ^= 1ull << (32 + rng.Below(32));
      m.Put(at + 8, 8, v, true, "L2 subcluster bitmap");
    } else if (op == 3) {
      m.Put(at, 8, e | 1, true, "L2 entry (zero flag)");
    } else if (op == 4) {
      // A compressed descriptor: flag on a normal entry, or a bent sector count/offset.
      uint32_t x = 62 - (q.cluster_bits - 8);
      uint64_t v = e >> 62 & 1 ? e ^ (uint64_t{1} << (x + rng.Below(62 - x)))
                               : (e | (uint64_t{1} << 62)) & ~(uint64_t{1} << 63);
      if (rng.Below(3) == 0) v = (e >> 62 & 1) ? e + 512 * (1 + rng.Below(8)) : e | (uint64_t{1} << 62);
      if (v == e) v ^= 1ull << x;
      m.Put(at, 8, v, true, "L2 entry (compressed descriptor)");
    } else if (op == 5 && q.l2_entries.size() > 1) {
      // Two entries naming the same cluster.
      uint64_t other = GetBE(m.bytes, rng.Pick(q.l2_entries), 8);
      if (other == e) other ^= 1ull << 63;
      m.Put(at, 8, other, true, "L2 entry (copy of another)");
    } else {
      bend_entry(at, "L2 entry", 0x3f000000000001feull);
    }
  } else if (kind < 68) {
    if (q.rt_entries.empty()) return MutateQcow2(base, q, rng);
    uint64_t at = rng.Pick(q.rt_entries);
    uint64_t e = GetBE(m.bytes, at, 8);
    std::vector<uint64_t> c = {e | (uint64_t{1} << rng.Below(9)),
                               e + 512 * (1 + rng.Below(7)),
                               file_end + rng.Below(4) * cs,
                               uint64_t{1} << (30 + rng.Below(25)),
                               0,
                               rng.Pick(q.clusters),
                               e | (uint64_t{1} << (56 + rng.Below(8))),
                               e + cs,
                               rng.Pick(q.clusters) | 0x100,
                               uint64_t{256} * cs};
    uint64_t v = rng.Pick(c);
    if (v == e) v = e ^ (1ull << (9 + rng.Below(12)));
    m.Put(at, 8, v, true, "refcount table entry");
  } else if (kind < 86) {
    // One refcount: of a cluster in use, or any cluster of the file (and just past it).
    if (q.refblocks.empty()) return MutateQcow2(base, q, rng);
    const uint64_t per_block = q.cs * 8 / q.refcount_bits;
    uint64_t file_clusters = file_end / cs;
    uint64_t cluster = rng.Below(2) ? rng.Pick(q.clusters) / cs : rng.Below(file_clusters + 2);
    uint64_t block = cluster / per_block;
    uint64_t rt_e = GetBE(m.bytes, q.rt_off + block * 8, 8) & mask;
    if (!rt_e || block >= q.rt_clusters * cs / 8) return MutateQcow2(base, q, rng);
    uint64_t idx = cluster % per_block;
    uint64_t maxv = q.refcount_bits == 64 ? ~0ull : (1ull << q.refcount_bits) - 1;
    uint64_t bit = idx * q.refcount_bits;
    std::string label = fmt::format("refcount of cluster {}", cluster);
    if (q.refcount_bits < 8) {
      uint64_t byte_at = rt_e + bit / 8;
      uint64_t byte = m.bytes[byte_at];
      uint64_t cur = byte >> (bit % 8) & maxv;
      uint64_t v = rng.Pick(std::vector<uint64_t>{0, cur + 1, cur - 1, maxv, rng.Below(maxv + 1)}) & maxv;
      if (v == cur) v = (cur + 1) & maxv;
      byte = (byte & ~(maxv << (bit % 8))) | (v << (bit % 8));
      m.Put(byte_at, 1, byte, true, label + fmt::format(" ({} -> {}, byte)", cur, v));
    } else {
      int width = static_cast<int>(q.refcount_bits / 8);
      uint64_t at = rt_e + bit / 8;
      uint64_t cur = GetBE(m.bytes, at, width);
      uint64_t v =
          rng.Pick(std::vector<uint64_t>{0, cur + 1, cur - 1, maxv, rng.Below(maxv) + 1, 2, 0}) & maxv;
      if (v == cur) v = (cur + 1) & maxv;
      m.Put(at, width, v, true, label);
    }
  } else if (kind < 94) {
    if (q.snap_entries.empty()) return MutateQcow2(base, q, rng);
    uint64_t at = rng.Pick(q.snap_entries);
    switch (rng.Below(7)) {
      case 0: {
        uint64_t l1 = GetBE(m.bytes, at, 8);
        m.Put(at, 8,
              rng.Pick(std::vector<uint64_t>{l1 + 512, 0, file_end + cs, l1 + cs, rng.Pick(q.clusters),
                                             uint64_t{1} << 40}),
              true, "snapshot l1_table_offset");
        break;
      }
      case 1: {
        uint64_t n = GetBE(m.bytes, at + 8, 4);
        m.Put(at + 8, 4, rng.Pick(std::vector<uint64_t>{0, n + 1, n - 1, 1 << 22, (1 << 22) + 1, 0xffffffff}),
              true, "snapshot l1_size");
        break;
      }
      case 2:
        m.Put(at + 12, 2, GetBE(m.bytes, at + 12, 2) + 1 + rng.Below(3), true, "snapshot id_str_size");
        break;
      case 3:
        m.Put(at + 14, 2, rng.Below(2) ? 0 : 0xffff, true, "snapshot name_size");
        break;
      case 4:
        m.Put(at + 36, 4, rng.Pick(std::vector<uint64_t>{0, 8, 1024, 0x10000, 0xffffffff}), true,
              "snapshot extra_data_size");
        break;
      case 5:
        m.Put(at + 48, 8, rng.Pick(std::vector<uint64_t>{0, 1ull << 40, 512, GetBE(m.bytes, at + 48, 8) * 4}),
              true, "snapshot disk_size");
        break;
      default:
        bend_entry(at, "snapshot l1_table_offset (as entry)", 0);
        break;
    }
  } else if (kind < 98) {
    // The file length: cut metadata or data off the end, or grow it.
    uint64_t size = m.bytes.size();
    std::vector<uint64_t> c = {size - cs, size - 512,          size / 2,
                               size + cs, size + 3 * cs + 512, size - 2 * cs};
    uint64_t v = rng.Pick(c);
    if (v > size + 64 * cs || v < cs) v = size + cs;
    m.bytes.resize(v, rng.Below(2) ? 0 : 0xa5);
    m.Note(fmt::format("file length {:#x} -> {:#x}", size, v));
  } else {
    // Random bytes in a metadata cluster.
    uint64_t cl = rng.Pick(q.clusters);
    for (int i = 0; i < 3; i++) {
      uint64_t at = cl + rng.Below(std::min<uint64_t>(cs, 512));
      if (at < m.bytes.size()) m.Put(at, 1, rng.Below(256), true, "byte");
    }
  }
  return m;
}

// ---------------------------------------------------------------------------------------
// VMDK (sparse extents) and VDI: little-endian headers and one flat map each.

Mutant MutateVmdk(const Base& base, Rng& rng) {
  Mutant m{base.bytes, ""};
  const Bytes& b = base.bytes;
  uint64_t hdr = 0;
  if (GetLE(b, 56, 8) == ~0ull && b.size() >= 1536) hdr = b.size() - 1024;  // stream footer
  uint64_t grain = GetLE(b, hdr + 20, 8) * 512, gtes = GetLE(b, hdr + 44, 4);
  uint64_t cap = GetLE(b, hdr + 12, 8) * 512, gd = GetLE(b, hdr + 56, 8) * 512;
  uint64_t n_gt = gtes && grain ? (cap + grain * gtes - 1) / (grain * gtes) : 0;
  std::vector<uint64_t> gd_entries, gt_entries;
  for (uint64_t i = 0; i < n_gt && gd + i * 4 + 4 <= b.size(); i++) {
    gd_entries.push_back(gd + i * 4);
    uint64_t gt = GetLE(b, gd + i * 4, 4) * 512;
    for (uint64_t j = 0; gt && j < gtes && gt + j * 4 + 4 <= b.size(); j++)
      if (GetLE(b, gt + j * 4, 4) || j < 2) gt_entries.push_back(gt + j * 4);
  }
  const uint64_t file_sectors = b.size() / 512;
  auto bent = [&](uint64_t v) {
    return rng.Pick(std::vector<uint64_t>{0, 1, v + 1, v - 1, file_sectors, file_sectors + 128, 0xffffffff,
                                          v * 2, rng.Below(file_sectors + 256)});
  };
  uint64_t kind = rng.Below(100);
  if (kind < 25) {
    struct Field {
      const char* name;
      uint64_t off;
      int width;
    };
    static const std::vector<Field> fields = {{"version", 4, 4},           {"flags", 8, 4},
                                              {"capacity", 12, 8},         {"grainSize", 20, 8},
                                              {"descriptorOffset", 28, 8}, {"descriptorSize", 36, 8},
                                              {"numGTEsPerGT", 44, 4},     {"rgdOffset", 48, 8},
                                              {"gdOffset", 56, 8},         {"overHead", 64, 8},
                                              {"compressAlgorithm", 77, 2}};
    const Field& f = rng.Pick(fields);
    uint64_t old = GetLE(m.bytes, hdr + f.off, f.width);
    uint64_t v = rng.Below(3) == 0 ? old ^ (uint64_t{1} << rng.Below(f.width * 8)) : bent(old);
    if (f.width == 4) v &= 0xffffffff;
    if (f.width == 2) v &= 0xffff;
    if (v == old) v ^= 1;
    m.Put(hdr + f.off, f.width, v, false, std::string("header ") + f.name);
  } else if (kind < 45 && !gd_entries.empty()) {
    uint64_t at = rng.Pick(gd_entries);
    m.Put(at, 4, bent(GetLE(b, at, 4)) & 0xffffffff, false, "grain directory entry");
  } else if (kind < 90 && !gt_entries.empty()) {
    uint64_t at = rng.Pick(gt_entries);
    m.Put(at, 4, bent(GetLE(b, at, 4)) & 0xffffffff, false, "grain table entry");
  } else {
    uint64_t size = m.bytes.size();
    uint64_t v = rng.Pick(std::vector<uint64_t>{size - 512, size - grain, size / 2, size + 4096});
    if (v > size + (1 << 20) || v < 1024) v = size - 512;
    m.bytes.resize(v, 0);
    m.Note(fmt::format("file length {:#x} -> {:#x}", size, v));
  }
  return m;
}

Mutant MutateVdi(const Base& base, Rng& rng) {
  Mutant m{base.bytes, ""};
  const Bytes& b = base.bytes;
  uint64_t bmap = GetLE(b, 340, 4), blocks = GetLE(b, 384, 4), allocated = GetLE(b, 388, 4);
  uint64_t kind = rng.Below(100);
  if (kind < 25) {
    struct Field {
      const char* name;
      uint64_t off;
      int width;
    };
    static const std::vector<Field> fields = {
        {"signature", 64, 4},         {"version", 68, 4},          {"header_size", 72, 4},
        {"image_type", 76, 4},        {"offset_bmap", 340, 4},     {"offset_data", 344, 4},
        {"sector_size", 360, 4},      {"disk_size", 368, 8},       {"block_size", 376, 4},
        {"block_extra", 380, 4},      {"blocks_in_image", 384, 4}, {"blocks_allocated", 388, 4},
        {"blocks_allocated", 388, 4}, {"blocks_allocated", 388, 4}};
    const Field& f = rng.Pick(fields);
    uint64_t old = GetLE(m.bytes, f.off, f.width);
    uint64_t v = rng.Pick(std::vector<uint64_t>{0, 1, old + 1, old - 1, old * 2, old / 2, 0xffffffff,
                                                old ^ (uint64_t{1} << rng.Below(f.width * 8))});
    if (f.width == 4) v &= 0xffffffff;
    if (v == old) v ^= 1;
    m.Put(f.off, f.width, v, false, std::string("header ") + f.name);
  } else if (kind < 92 && blocks) {
    uint64_t i = rng.Below(std::min<uint64_t>(blocks, allocated + 4));
    uint64_t at = bmap + i * 4;
    uint64_t old = GetLE(b, at, 4);
    uint64_t v = rng.Pick(std::vector<uint64_t>{0, 1, old + 1, old - 1, blocks, blocks - 1, allocated,
                                                0xffffffff, 0xfffffffe, 0x7fffffff, rng.Below(blocks + 2)}) &
                 0xffffffff;
    if (v == old) v = old + 1;
    m.Put(at, 4, v & 0xffffffff, false, fmt::format("block map entry {}", i));
  } else {
    uint64_t size = m.bytes.size();
    uint64_t v = rng.Below(2) ? size - 512 : size / 2;
    m.bytes.resize(std::max<uint64_t>(v, 512), 0);
    m.Note(fmt::format("file length {:#x} -> {:#x}", size, m.bytes.size()));
  }
  return m;
}

// ---------------------------------------------------------------------------------------
// The harness.

struct Verdicts {
  int qemu = -1, vimgfs = -1, repair = -1, after = -1;
  std::string vimgfs_out, repair_out, after_out, qemu_out;
};

class CheckDifferentialTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveProgram("qemu-img") || !HaveProgram("qemu-io"))
      GTEST_SKIP() << "qemu-img/qemu-io not installed (apt-get install qemu-utils)";
    // Fractions are for quick local runs; the default counts are what CI runs.
    if (const char* s = std::getenv("VIMGFS_CHECK_DIFF_SCALE")) scale_ = std::max(0.01, std::atof(s));
  }

  // Runs a shell line in the temp folder that must succeed.
  void MustSh(const std::string& line) {
    CommandResult r = RunCommand("cd " + Quote(dir_.path()) + " && " + line);
    ASSERT_EQ(r.exit_code, 0) << line << "\n" << r.out << r.err;
  }

  // Makes a base image with `recipe` (shell, in the temp folder, writing `name`).
  void AddBase(const std::string& name, const std::string& recipe) {
    MustSh(recipe);
    if (::testing::Test::HasFatalFailure()) return;
    bases_.push_back({name, recipe, ReadWholeFile(dir_.File(name))});
    std::filesystem::remove(dir_.File(name));
  }

  // Checks every mutant with both tools, in parallel batches, then repairs the ones qemu
  // calls corrupt with vimgfs and asks qemu again.
  std::vector<Verdicts> Judge(const std::string& fmt, const std::vector<std::string>& files, bool repair) {
    const std::string vimgfs = Quote(VimgfsBinary());
    // One line per image: qemu's and vimgfs's exit codes, then (after repair) vimgfs's
    // and qemu's. A crash or hang (SIGXCPU) becomes 128+signal.
    std::string script = dir_.File("judge_" + fmt + ".sh");
    {
      std::ofstream s(script);
      // 128 MiB: a repair must not grow a small image without bound. 60 s of CPU: a hang
      // ends in SIGXCPU (cheaper than a `timeout` process per run).
      s << "ulimit -f 262144 -t 60\n"
        << "for f in \"$@\"; do\n"
        << "  qemu-img check -f " << fmt << " \"$f\" >\"$f.q\" 2>&1; q=$?\n"
        << "  " << vimgfs << " check -f " << fmt << " \"$f\" >\"$f.v\" 2>&1; v=$?\n"
        << "  r=-1; a=-1\n";
      if (repair) {
        s << "  if [ $q = 2 ]; then\n"
          << "    cp \"$f\" \"$f.rep\"\n"
          << "    " << vimgfs << " check -f " << fmt << " -r all \"$f.rep\" >\"$f.r\" 2>&1; r=$?\n"
          << "    if [ $r = 0 ]; then qemu-img check -f " << fmt << " \"$f.rep\" >\"$f.a\" 2>&1; a=$?; fi\n"
          << "    rm -f \"$f.rep\"\n"
          << "  fi\n";
      }
      s << "  echo \"$f $q $v $r $a\"\n"
        << "done\n";
    }
    unsigned jobs = std::clamp(std::thread::hardware_concurrency(), 1u, 8u);
    std::string list = dir_.File("list_" + fmt);
    {
      std::ofstream l(list);
      for (const std::string& f : files) l << f << "\n";
    }
    CommandResult r = RunCommand("cd " + Quote(dir_.path()) + " && xargs -P " + std::to_string(jobs) +
                                 " -n 25 sh " + Quote(script) + " <" + Quote(list));
    EXPECT_EQ(r.exit_code, 0) << r.err.substr(0, 2000);
    std::map<std::string, Verdicts> by_name;
    std::istringstream in(r.out);
    std::string name;
    Verdicts v;
    while (in >> name >> v.qemu >> v.vimgfs >> v.repair >> v.after) by_name[name] = v;
    std::vector<Verdicts> out;
    for (const std::string& f : files) {
      Verdicts x = by_name.count(f) ? by_name[f] : Verdicts{};
      auto slurp = [&](const std::string& ext) {
        std::ifstream i(dir_.File(f + ext));
        std::string s((std::istreambuf_iterator<char>(i)), std::istreambuf_iterator<char>());
        return s.size() > 3000 ? s.substr(0, 3000) + "...\n" : s;
      };
      x.qemu_out = slurp(".q");
      x.vimgfs_out = slurp(".v");
      x.repair_out = slurp(".r");
      x.after_out = slurp(".a");
      out.push_back(std::move(x));
    }
    return out;
  }

  // Generates `count` mutants of the bases, judges them, reports failures and a summary.
  void Run(const std::string& fmt, uint64_t seed_base, int count,
           const std::function<Mutant(const Base&, Rng&)>& mutate) {
    ASSERT_FALSE(bases_.empty());
    std::vector<std::string> files;
    std::vector<std::string> whats;
    for (int i = 0; i < count; i++) {
      const Base& base = bases_[i % bases_.size()];
      Rng rng(seed_base + static_cast<uint64_t>(i) * 7919);
      Mutant m = mutate(base, rng);
      std::string file = fmt::format("m{:05}.{}", i, fmt);
      WriteWholeFile(dir_.File(file), m.bytes);
      files.push_back(file);
      whats.push_back(fmt::format("#{} base {} [{}]: {}", i, base.name, base.recipe, m.what));
    }
    std::vector<Verdicts> v = Judge(fmt, files, true);
    const char* save = std::getenv("VIMGFS_CHECK_DIFF_SAVE");
    std::map<std::pair<int, int>, int> matrix;
    int corrupt = 0, misses = 0, bad_repairs = 0, crashes = 0, repaired = 0;
    for (size_t i = 0; i < files.size(); i++) {
      const Verdicts& x = v[i];
      matrix[{x.qemu, x.vimgfs}]++;
      std::string why;
      auto sanitizer = [](const std::string& s) {
        return s.find("Sanitizer") != std::string::npos || s.find("runtime error:") != std::string::npos;
      };
      if (x.vimgfs >= 128 || x.repair >= 128 || x.vimgfs < 0 || sanitizer(x.vimgfs_out) ||
          sanitizer(x.repair_out)) {
        crashes++;
        why = "vimgfs crashed or hung";
      }
      if (x.qemu == 2) {
        corrupt++;
        if (x.vimgfs != 2) {
          misses++;
          why = fmt::format("qemu-img check says corrupt (2), vimgfs check says {}", x.vimgfs);
        }
        if (x.repair == 0) {
          repaired++;
          if (x.after == 1 || x.after == 2) {
            bad_repairs++;
            why = fmt::format("vimgfs check -r all said repaired (0), qemu-img check then says {}", x.after);
          }
        }
      }
      if (why.empty()) continue;
      ADD_FAILURE() << fmt << " " << files[i] << " " << whats[i] << "\n  " << why << "\nqemu-img check:\n"
                    << x.qemu_out << "vimgfs check:\n"
                    << x.vimgfs_out
                    << (x.repair >= 0 ? "vimgfs check -r all:\n" + x.repair_out + "qemu-img check after:\n" +
                                            x.after_out
                                      : "");
      if (save) {
        std::filesystem::create_directories(save);
        std::filesystem::copy_file(dir_.File(files[i]), std::string(save) + "/" + files[i],
                                   std::filesystem::copy_options::overwrite_existing);
      }
    }
    std::string summary = fmt::format(
        "{}: {} mutated images, qemu-img calls {} corrupt; vimgfs misses {}, "
        "repairs said done {}, still corrupt after repair {}, crashes {}\n"
        "  (qemu exit, vimgfs exit) -> images:",
        fmt, files.size(), corrupt, misses, repaired, bad_repairs, crashes);
    for (auto& [k, n] : matrix) summary += fmt::format(" ({},{})={}", k.first, k.second, n);
    std::printf("%s\n", summary.c_str());
    RecordProperty(fmt + "_summary", summary);
  }

  TempDir dir_;
  std::vector<Base> bases_;
  double scale_ = 1;
};

TEST_F(CheckDifferentialTest, Qcow2) {
  // Writes that leave data, zeroed, compressed and discarded clusters over several L2 tables.
  const std::string io =
      "qemu-io -f qcow2 -c 'write -P 1 0 70k' -c 'write -P 2 200k 3k' -c 'write -z 300k 8k' "
      "-c 'write -c -P 3 512k 64k' -c 'write -P 4 900k 130k' -c 'discard 0 4k' ";
  const std::string io2 = "qemu-io -f qcow2 -c 'write -P 5 60k 20k' -c 'write -P 6 1100k 40k' ";
  // Compressed clusters share host clusters: with narrow refcounts a snapshot would
  // overflow them, so those bases get plain writes only.
  const std::string io_plain =
      "qemu-io -f qcow2 -c 'write -P 1 0 70k' -c 'write -P 2 200k 3k' "
      "-c 'write -z 300k 8k' -c 'write -P 4 900k 130k' ";
  struct Spec {
    const char* name;
    const char* opts;
    const char* size;
    bool write, snapshots;
    bool plain = false;
  };
  const std::vector<Spec> specs = {
      {"c64k", "", "4M", true, false},
      {"c64k-snap", "", "4M", true, true},
      {"c512-r1", "cluster_size=512,refcount_bits=1", "2M", true, false},
      {"c512-r16", "cluster_size=512", "2M", true, true},
      {"c1k-r2", "cluster_size=1024,refcount_bits=2", "2M", true, false},
      {"c2k-r4", "cluster_size=2048,refcount_bits=4", "2M", true, false},
      {"c4k-r2-snap", "cluster_size=4096,refcount_bits=2", "2M", true, true, true},  // 3 is the maximum
      {"c4k-r4-snap", "cluster_size=4096,refcount_bits=4", "2M", true, true, true},
      {"c4k-v2", "cluster_size=4096,compat=0.10", "2M", true, true},
      {"c8k-r8", "cluster_size=8192,refcount_bits=8", "3M", true, false},
      {"c16k-r32-ext", "cluster_size=16384,refcount_bits=32,extended_l2=on", "2M", true, true},
      {"c32k-r64-ext", "cluster_size=32768,refcount_bits=64,extended_l2=on", "2M", true, false},
      {"c4k-lazy", "cluster_size=4096,lazy_refcounts=on", "2M", true, false},
      {"c4k-empty", "cluster_size=4096", "2M", false, false},
  };
  for (const Spec& s : specs) {
    std::string f = std::string(s.name) + ".qcow2";
    std::string recipe =
        fmt::format("qemu-img create -q -f qcow2 {}{} {} {}", *s.opts ? "-o " : "", s.opts, f, s.size);
    if (s.write) recipe += " && " + (s.plain ? io_plain : io) + f + " >/dev/null";
    if (s.snapshots)
      recipe += " && qemu-img snapshot -c s1 " + f + " && " + io2 + f +
                " >/dev/null && qemu-img snapshot -c s2 " + f;
    AddBase(f, recipe);
  }
  AddBase("bitmap.qcow2", "qemu-img create -q -f qcow2 -o cluster_size=4096 bitmap.qcow2 2M && " + io +
                              "bitmap.qcow2 >/dev/null && qemu-img bitmap --add bitmap.qcow2 b0");
  std::vector<Qcow2Layout> layouts;
  for (const Base& b : bases_) layouts.push_back(ParseQcow2(b.bytes));
  Run("qcow2", 0x5eed0000, static_cast<int>(2000 * scale_),
      [&](const Base& b, Rng& rng) { return MutateQcow2(b, layouts[&b - bases_.data()], rng); });
}

TEST_F(CheckDifferentialTest, Vmdk) {
  MustSh(
      "qemu-img create -q -f raw data.raw 3M && qemu-io -f raw -c 'write -P 7 0 200k' "
      "-c 'write -P 8 1M 64k' -c 'write -P 9 2900k 20k' data.raw >/dev/null");
  AddBase("sparse.vmdk", "qemu-img convert -f raw -O vmdk data.raw sparse.vmdk");
  AddBase("stream.vmdk", "qemu-img convert -f raw -O vmdk -o subformat=streamOptimized data.raw stream.vmdk");
  AddBase("empty.vmdk", "qemu-img create -q -f vmdk empty.vmdk 3M");
  Run("vmdk", 0x5eed1000, static_cast<int>(300 * scale_), MutateVmdk);
}

TEST_F(CheckDifferentialTest, Vdi) {
  MustSh(
      "qemu-img create -q -f raw data.raw 5M && qemu-io -f raw -c 'write -P 7 0 1200k' "
      "-c 'write -P 8 3M 64k' data.raw >/dev/null");
  AddBase("dynamic.vdi", "qemu-img convert -f raw -O vdi data.raw dynamic.vdi");
  AddBase("static.vdi", "qemu-img convert -f raw -O vdi -o static=on data.raw static.vdi");
  AddBase("empty.vdi", "qemu-img create -q -f vdi empty.vdi 5M");
  Run("vdi", 0x5eed2000, static_cast<int>(250 * scale_), MutateVdi);
}

}  // namespace
}  // namespace vimgfs::test

// Persistent dirty bitmaps as qemu's block layer handles them: qemu-img bitmap's
// operations with qemu's checks and words, over the bitmaps a format loads and stores
// (ClusterMap::ReadBitmaps / ReplaceBitmaps). docs/ARCHITECTURE.md, "Dirty bitmaps".
#include <algorithm>
#include <bit>
#include <optional>

#include "util/checked.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

uint64_t BitsFor(uint64_t disk_size, uint32_t granularity_bits) {
  return DivRoundUp(disk_size, uint64_t{1} << granularity_bits);
}

template <typename Maps>  // const or not
auto Find(Maps& maps, const std::string& name) -> decltype(&maps.front()) {
  auto it = std::find_if(maps.begin(), maps.end(), [&](const DirtyBitmap& b) { return b.name == name; });
  return it == maps.end() ? nullptr : &*it;
}

Status Inconsistent(const std::string& name) {
  return Status::InvalidArgument(
      "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap "
      "from disk",
      name);
}

// dst |= src over a disk of disk_size bytes. Granularities may differ: every granule of
// src that is set marks the granules of dst it overlaps (qemu's hbitmap_merge).
void MergeInto(DirtyBitmap& dst, const DirtyBitmap& src, uint64_t disk_size) {
  if (&dst == &src) return;
  const uint64_t dst_words = dst.bits.word_count(), dst_bits = dst.bits.size();
  if (dst.granularity_bits == src.granularity_bits) {
    src.bits.ForEachSetWord([&](uint64_t i, uint64_t w) {
      if (i < dst_words) dst.bits.OrWord(i, w);
    });
    return;
  }
  // Runs of set bits, each marking its bytes in dst once (hbitmap's merge of dirty areas):
  // a fully dirty source costs a pass over its words, not one step per bit.
  const auto mark = [&](uint64_t first_bit, uint64_t last_bit) {
    const uint64_t start = first_bit << src.granularity_bits;
    if (start >= disk_size || dst_bits == 0) return;
    const uint64_t end = std::min(disk_size, (last_bit + 1) << src.granularity_bits);
    dst.bits.Set(start >> dst.granularity_bits, std::min((end - 1) >> dst.granularity_bits, dst_bits - 1));
  };
  bool open = false;
  uint64_t run_first = 0, run_last = 0;
  src.bits.ForEachSetWord([&](uint64_t i, uint64_t w) {
    while (w != 0) {
      const int lo = std::countr_zero(w);
      const int ones = std::countr_one(w >> lo);
      const uint64_t first = i * 64 + lo, last = first + ones - 1;
      if (open && first == run_last + 1) {
        run_last = last;
      } else {
        if (open) mark(run_first, run_last);
        open = true;
        run_first = first;
        run_last = last;
      }
      w = ones + lo >= 64 ? 0 : w & ~((uint64_t{1} << (lo + ones)) - 1);
    }
  });
  if (open) mark(run_first, run_last);
}

}  // namespace

bool Image::BitmapsSupported() {
  std::lock_guard lk(meta_mu_);
  return map_->BitmapsSupported();
}

Result<std::vector<DirtyBitmap>> Image::Bitmaps() {
  std::optional<Result<std::vector<DirtyBitmap>>> maps;
  RETURN_IF_ERROR(ChangeWhole(false, [&](ClusterMap& m) {
    maps.emplace(m.ReadBitmaps());
    return Status::Ok();
  }));
  return std::move(*maps);
}

Status Image::ChangeBitmap(const BitmapChange& change) {
  using Op = BitmapChange::Op;
  const std::string& name = change.name;
  if (change.op == Op::kAdd) {
    if (name.empty()) return Status::InvalidArgument("Bitmap name cannot be empty");
    if (change.granularity != 0 && (change.granularity < 512 || !IsPowerOfTwo(change.granularity)))
      return Status::InvalidArgument("Granularity must be power of 2 and at least 512");
  }
  const uint64_t source_size = change.source ? change.source_size : size();
  return ChangeWhole(true, [&](ClusterMap& m) -> Status {
    ASSIGN_OR_RETURN(std::vector<DirtyBitmap> maps, m.ReadBitmaps());
    DirtyBitmap* target = Find(maps, name);
    if (change.op == Op::kAdd) {
      if (target) return Status::InvalidArgument("Bitmap already exists: {}", name);
      // qemu's default: the cluster size, within [4 KiB, 64 KiB].
      const uint64_t granularity =
          change.granularity ? change.granularity : std::clamp<uint64_t>(m.cluster_size(), 4096, 65536);
      const auto bits = static_cast<uint32_t>(std::countr_zero(granularity));
      if (Status s = m.CanStoreBitmap(name, bits, maps); !s.ok()) {
        if (s.kind() == ErrorKind::kUnsupported)
          return Status::Unsupported("Can't store persistent bitmaps to {}: {}", path_, s.message());
        return Status::InvalidArgument("Can't make bitmap '{}' persistent in '{}': {}", name, path_,
                                       s.message());
      }
      DirtyBitmap b;
      b.name = name;
      b.granularity_bits = bits;
      b.enabled = change.enabled;
      b.bits = DirtyBits(BitsFor(size_, bits));
      maps.push_back(std::move(b));
      return m.ReplaceBitmaps(std::move(maps));
    }
    if (!target) return Status::InvalidArgument("Dirty bitmap '{}' not found", name);
    // Removing is what an inconsistent bitmap still allows.
    if (change.op != Op::kRemove && !target->consistent) return Inconsistent(name);
    switch (change.op) {
      case Op::kRemove:
        maps.erase(maps.begin() + (target - maps.data()));
        break;
      case Op::kClear:
        target->bits.ClearAll();
        break;
      case Op::kEnable:
      case Op::kDisable:
        target->enabled = change.op == Op::kEnable;
        break;
      case Op::kMerge: {
        const DirtyBitmap* src =
            change.source ? Find(*change.source, change.source_name) : Find(maps, change.source_name);
        if (!src) return Status::InvalidArgument("Dirty bitmap '{}' not found", change.source_name);
        if (!src->consistent) return Inconsistent(src->name);
        if (source_size != size_)
          return Status::InvalidArgument(
              "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be "
              "merged",
              size_, source_size);
        MergeInto(*target, *src, size_);
        break;
      }
      case Op::kAdd:
        break;
    }
    return m.ReplaceBitmaps(std::move(maps));
  });
}

}  // namespace vimgfs

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

DirtyBitmap* Find(std::vector<DirtyBitmap>& maps, const std::string& name) {
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
  src.bits.ForEachSetWord([&](uint64_t i, uint64_t w) {
    for (; w != 0; w &= w - 1) {
      const uint64_t granule = i * 64 + std::countr_zero(w);
      const uint64_t start = granule << src.granularity_bits;
      if (start >= disk_size || dst_bits == 0) continue;
      const uint64_t end = std::min(disk_size, (granule + 1) << src.granularity_bits);
      const uint64_t first = start >> dst.granularity_bits;
      const uint64_t last = std::min((end - 1) >> dst.granularity_bits, dst_bits - 1);
      dst.bits.Set(first, last);
    }
  });
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
  // Another image's bitmaps are read before this one is locked.
  std::optional<std::vector<DirtyBitmap>> other;
  uint64_t source_size = size();
  if (change.op == Op::kMerge && change.source && change.source != this) {
    ASSIGN_OR_RETURN(other, change.source->Bitmaps());
    source_size = change.source->size();
  }
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
        DirtyBitmap* src = Find(other ? *other : maps, change.source_name);
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

// qcow2 amend (qemu-img amend -o): compat 0.10 <-> 1.1, lazy_refcounts, refcount_bits,
// data_file, data_file_raw, the LUKS keyslots of encrypt.format=luks images, and the
// backing check; `size` is the engine's (Image::Amend). Steps, checks and words follow
// qemu's qcow2_amend_options: upgrade first, downgrade last.
//
// Crash safety (ARCHITECTURE.md, "Crash ordering"): each step leaves a valid image of the
// old or the new kind. A new refcount structure is written beside the old one and one
// header write switches to it; a downgrade first turns zero clusters into data clusters
// (valid in both versions) and only then writes the version 2 header.
#include <algorithm>
#include <cstdlib>
#include <functional>

#include "crypto/luks.h"
#include "formats/format_util.h"
#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"

namespace vimgfs::qcow2 {
namespace {

bool IsTrue(const std::string& v) { return v == "on"; }

// The options given, as qemu's loop over them reads them.
struct AmendParams {
  std::optional<uint32_t> version;
  std::optional<std::string> backing_file, backing_format, data_file;
  std::optional<bool> lazy_refcounts, data_file_raw;
  std::optional<uint64_t> refcount_bits;
  bool encryption = false;  // any encrypt.* option
};

Result<AmendParams> ReadParams(const AmendRequest& req) {
  AmendParams p;
  for (const auto& [key, v] : req.options) {
    if (key == "compat") {
      if (v == "0.10" || v == "v2")
        p.version = 2;
      else if (v == "1.1" || v == "v3")
        p.version = 3;
      else
        return Status::InvalidArgument("Unknown compatibility level {}", v);
    } else if (key == "backing_file") {
      p.backing_file = v;
    } else if (key == "backing_fmt") {
      p.backing_format = v;
    } else if (key == "data_file") {
      p.data_file = v;
    } else if (key == "data_file_raw") {
      p.data_file_raw = IsTrue(v);
    } else if (key == "lazy_refcounts") {
      p.lazy_refcounts = IsTrue(v);
    } else if (key == "refcount_bits") {
      uint64_t bits = std::strtoull(v.c_str(), nullptr, 10);
      if (bits == 0 || bits > 64 || (bits & (bits - 1)) != 0)
        return Status::InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
      p.refcount_bits = bits;
    } else if (key.rfind("encrypt.", 0) == 0) {
      p.encryption = true;
    }
  }
  return p;
}

}  // namespace

Status Qcow2Map::Amend(const AmendRequest& req, AmendStage stage) {
  RETURN_IF_ERROR(CheckWritable());
  ASSIGN_OR_RETURN(AmendParams p, ReadParams(req));
  const uint32_t old_version = header_.version;
  const uint32_t new_version = p.version.value_or(old_version);
  // Progress as qemu's amend counts it: each operation an equal share.
  const bool refcount_change = p.refcount_bits && *p.refcount_bits != refcount_bits_;
  const int operations = (new_version != old_version) + refcount_change + p.encryption;
  int done = stage == AmendStage::kAfterResize ? operations - 1 : 0;
  auto report = [&](double fraction) {
    if (req.progress && operations > 0) req.progress((done + fraction) / operations);
  };
  if (stage == AmendStage::kAfterResize) {
    if (new_version < old_version) return Downgrade(report);
    return Status::Ok();
  }

  // qemu checks these while reading the options, before changing anything.
  if (p.encryption) {
    if (header_.crypt_method == 0)
      return Status::InvalidArgument("Can't amend encryption options - encryption not present");
    if (header_.crypt_method != 2) return Status::Unsupported("Only LUKS encryption options can be amended");
  }
  if (p.data_file && !p.data_file->empty() && !header_.has_data_file())
    return Status::InvalidArgument("data-file can only be set for images that use an external data file");
  const bool raw_now = (header_.autoclear_features & kAutoclearDataFileRaw) != 0;
  const bool data_file_raw = p.data_file_raw.value_or(raw_now);
  if (data_file_raw && !raw_now)
    return Status::InvalidArgument("data-file-raw cannot be set on existing images");

  if (new_version > old_version) {
    RETURN_IF_ERROR(Upgrade(report));
    done++;
  }
  if (p.encryption) {
    RETURN_IF_ERROR(AmendKeyslots(req));
    report(1);
    done++;
  }
  if (refcount_change) {
    if (new_version < 3 && *p.refcount_bits != 16)
      return Status::InvalidArgument(
          "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
          "compat=1.1 or greater)");
    RETURN_IF_ERROR(ChangeRefcountBits(static_cast<uint32_t>(*p.refcount_bits)));
    report(1);
    done++;
  }

  if (data_file_raw)
    header_.autoclear_features |= kAutoclearDataFileRaw;
  else
    header_.autoclear_features &= ~kAutoclearDataFileRaw;
  // qemu's "data_file=" (empty) drops the name; the image then needs one at open.
  if (p.data_file) header_.data_file = p.data_file->empty() ? std::nullopt : p.data_file;
  RETURN_IF_ERROR(FlushAll());
  RETURN_IF_ERROR(WriteHeader());
  RETURN_IF_ERROR(file_->Sync(true));

  if (p.backing_file || p.backing_format) {
    // Both compared, an absent one included, as qemu compares them.
    const std::optional<std::string> stored_file =
        header_.backing_file.empty() ? std::nullopt : std::optional(header_.backing_file);
    if (p.backing_file != stored_file || p.backing_format != header_.backing_format)
      return Status::InvalidArgument("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
  }

  const bool lazy_now = (header_.compatible_features & kCompatLazyRefcounts) != 0;
  if (p.lazy_refcounts && *p.lazy_refcounts != lazy_now) {
    if (*p.lazy_refcounts) {
      if (new_version < 3)
        return Status::InvalidArgument(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or "
            "greater)");
      header_.compatible_features |= kCompatLazyRefcounts;
    } else {
      // Refcounts are current once flushed: the image is clean.
      RETURN_IF_ERROR(FlushAll());
      header_.incompatible_features &= ~kIncompatDirty;
      header_.compatible_features &= ~kCompatLazyRefcounts;
      clear_dirty_on_close_ = false;
    }
    RETURN_IF_ERROR(WriteHeader());
    RETURN_IF_ERROR(file_->Sync(true));
  }
  return Status::Ok();
}

Status Qcow2Map::Upgrade(const Progress& progress) {
  progress(0);
  // Version 3 snapshot entries carry the large VM state size and the disk size; the
  // table writer always writes them.
  if (std::any_of(snapshots_.begin(), snapshots_.end(),
                  [](const Snapshot& s) { return s.extra.size() < 16; }))
    RETURN_IF_ERROR(WriteSnapshotTable(*this, snapshots_).WithContext("Failed to update the snapshot table"));
  progress(0.5);
  RETURN_IF_ERROR(FlushAll());
  Header h = header_;
  h.version = 3;
  h.header_length = kV3HeaderLengthWithCompression;
  h.extra_header_fields.clear();
  h.compression_type = kCompressionZlib;
  h.incompatible_features = h.compatible_features = h.autoclear_features = 0;
  h.refcount_order = 4;
  Header old = std::exchange(header_, h);
  Status s = WriteHeader();
  if (s.ok()) s = file_->Sync(true);
  if (!s.ok()) {
    header_ = std::move(old);
    return s.WithContext("Failed to update the image header");
  }
  v3_ = true;
  progress(1);
  return Status::Ok();
}

Status Qcow2Map::Downgrade(const Progress& progress) {
  if (refcount_bits_ != 16) return Status::Unsupported("compat=0.10 requires refcount_bits=16");
  if (header_.has_data_file()) return Status::Unsupported("Cannot downgrade an image with a data file");
  // A version 2 program would not know the disk size and large VM state size that these
  // snapshots need.
  for (const Snapshot& s : snapshots_)
    if (s.vm_state_size > UINT32_MAX || s.disk_size != size_)
      return Status::Unsupported("Internal snapshots prevent downgrade of image");
  // Refcounts are current once flushed: the dirty mark goes.
  RETURN_IF_ERROR(FlushAll());
  header_.incompatible_features &= ~kIncompatDirty;
  clear_dirty_on_close_ = false;
  if (uint64_t left = header_.incompatible_features & ~kIncompatCompression)
    return Status::Unsupported("Cannot downgrade an image with incompatible features {:#x} set", left);
  header_.compatible_features = 0;
  header_.autoclear_features = 0;
  RETURN_IF_ERROR(ExpandZeroClusters(progress).WithContext("Failed to turn zero into data clusters"));
  if (header_.incompatible_features & kIncompatCompression) {
    ASSIGN_OR_RETURN(bool compressed, HasCompressedClusters());
    if (compressed)
      return Status::Unsupported(
          "Cannot downgrade an image with zstd compression type and existing compressed clusters");
    header_.incompatible_features &= ~kIncompatCompression;
    header_.compression_type = kCompressionZlib;
  }
  RETURN_IF_ERROR(FlushAll());
  header_.version = 2;
  Status s = WriteHeader();
  if (s.ok()) s = file_->Sync(true);
  if (!s.ok()) {
    header_.version = 3;
    return s.WithContext("Failed to update the image header");
  }
  v3_ = false;
  return Status::Ok();
}

// Each L2 table of the active L1 and of every snapshot's L1, once per L1 entry naming it
// (as qemu walks them), with the guest offset of its first entry.
Status Qcow2Map::ForEachL2Table(const std::function<Status(uint64_t l2_off, uint64_t guest)>& fn,
                                const Progress& progress) {
  std::vector<std::vector<uint64_t>> tables{l1_};
  for (const Snapshot& s : snapshots_) {
    ASSIGN_OR_RETURN(std::vector<uint64_t> t, ReadSnapshotL1(s));
    tables.push_back(std::move(t));
  }
  uint64_t total = 0, visited = 0;
  for (const std::vector<uint64_t>& l1 : tables) total += l1.size();
  for (const std::vector<uint64_t>& l1 : tables) {
    for (uint64_t i = 0; i < l1.size(); i++) {
      const uint64_t l2_off = L1EntryOffset(l1[i]);
      if (l2_off != 0) {
        RETURN_IF_ERROR(ValidateTableOffset(l2_off, "L2 table"));
        RETURN_IF_ERROR(fn(l2_off, (i * l2_entries_) << cluster_bits_));
      }
      if (progress) progress(static_cast<double>(++visited) / static_cast<double>(total));
    }
  }
  return Status::Ok();
}

Result<bool> Qcow2Map::HasCompressedClusters() {
  bool found = false;
  RETURN_IF_ERROR(ForEachL2Table([&](uint64_t l2_off, uint64_t) -> Status {
    ASSIGN_OR_RETURN(TableRef t, l2_cache_->Get(l2_off));
    for (uint64_t j = 0; j < l2_entries_ && !found; j++) found = IsCompressed(LoadL2(t, j, nullptr));
    return Status::Ok();
  }));
  return found;
}

// Version 2 has no zero flag: a zero cluster becomes unallocated when nothing lies behind
// it, else a data cluster of zeros (its own one, or a new one where it had none or shared
// it with a snapshot).
Status Qcow2Map::ExpandZeroClusters(const Progress& progress) {
  const bool backed = !header_.backing_file.empty();
  std::vector<std::byte> zeros;
  return ForEachL2Table(
      [&](uint64_t l2_off, uint64_t guest_base) -> Status {
        ASSIGN_OR_RETURN(uint64_t l2_refs, GetRefcount(l2_off >> cluster_bits_));
        ASSIGN_OR_RETURN(TableRef t, l2_cache_->Get(l2_off));
        for (uint64_t j = 0; j < l2_entries_; j++) {
          const uint64_t e = LoadL2(t, j, nullptr);
          if (!HasZeroFlag(e)) continue;
          uint64_t host = L2EntryOffset(e);
          if (host == 0 && !backed) {
            StoreL2(t, j, 0, 0);
            continue;
          }
          // Each holder of a shared table (snapshots) holds the entry's cluster once. A cluster
          // that other tables hold as well is not zeroed in place: they may read it as data.
          uint64_t refs = 0;
          if (host != 0) {
            ASSIGN_OR_RETURN(refs, GetRefcount(host >> cluster_bits_));
          }
          if (host == 0 || refs > l2_refs) {
            ASSIGN_OR_RETURN(uint64_t at, AllocClusters(1));
            if (l2_refs > 1) RETURN_IF_ERROR(SetRefcount(at >> cluster_bits_, l2_refs));
            if (host != 0) RETURN_IF_ERROR(SetRefcount(host >> cluster_bits_, refs - l2_refs));
            host = at;
          }
          if (zeros.empty()) zeros.resize(cluster_size_);
          RETURN_IF_ERROR(data_->PWriteFor(host, zeros, guest_base + (j << cluster_bits_), IoTag::kData));
          // The zeros are durable before the entry that stops calling them zeros.
          RETURN_IF_ERROR(l2_cache_->SetDependency(ref_cache_.get()));
          l2_cache_->DependsOnFlush();
          StoreL2(t, j, host | (l2_refs == 1 ? kFlagCopied : 0), 0);
        }
        return Status::Ok();
      },
      progress);
}

Status Qcow2Map::ChangeRefcountBits(uint32_t bits) {
  RETURN_IF_ERROR(FlushAll());
  // The stored counts are copied, not recounted (qemu's qcow2_change_refcount_order): a
  // count that does not fit the new width stops the change.
  std::vector<uint32_t> counts;
  std::vector<uint64_t> old_clusters;  // the old table's and blocks' clusters, freed after
  std::vector<std::byte> block(cluster_size_);
  for (uint64_t b = 0; b < reftable_.size(); b++) {
    const uint64_t off = reftable_[b] & kOffsetMask;
    if (off == 0) continue;
    RETURN_IF_ERROR(ValidateTableOffset(off, "refcount block"));
    old_clusters.push_back(off >> cluster_bits_);
    RETURN_IF_ERROR(file_->PRead(off, block).WithContext("'{}': reading a refcount block", path_));
    for (uint64_t i = 0; i < refblock_entries_; i++) {
      const uint64_t v = ReadRefcountEntry(block.data(), i, refcount_bits_);
      if (v == 0) continue;
      const uint64_t cluster = b * refblock_entries_ + i;
      if (bits < 64 && (v >> bits) != 0)
        return Status::InvalidArgument(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {}",
            bits, cluster << cluster_bits_, v);
      if (cluster >= counts.size()) counts.resize(cluster + 1, 0);
      counts[cluster] = static_cast<uint32_t>(std::min<uint64_t>(v, UINT32_MAX));
    }
  }
  for (uint64_t c = 0; c < header_.refcount_table_clusters; c++)
    old_clusters.push_back((header_.refcount_table_offset >> cluster_bits_) + c);

  const uint32_t old_order = header_.refcount_order;
  auto set_width = [&](uint32_t order) {
    header_.refcount_order = order;
    refcount_bits_ = 1u << order;
    refcount_max_ = refcount_bits_ == 64 ? UINT64_MAX : (1ull << refcount_bits_) - 1;
    refblock_entries_ = cluster_size_ * 8 / refcount_bits_;
  };
  uint32_t order = 0;
  while ((1u << order) < bits) order++;
  set_width(order);
  // Written beside the old structure; one header write (with the new width) switches.
  const std::vector<uint32_t> before = counts;
  Status s = RebuildRefcountStructure(&counts);
  if (!s.ok()) {
    if (header_.refcount_order != old_order) set_width(old_order);
    return s;
  }
  // Freed after the switch: the old structure, and the clusters the rebuild took for a
  // table it then had to place again (counted, but neither the table nor a block).
  std::vector<bool> in_new(counts.size(), false);
  auto mark = [&](uint64_t c) {
    if (c < in_new.size()) in_new[c] = true;
  };
  for (uint64_t e : reftable_)
    if (e & kOffsetMask) mark((e & kOffsetMask) >> cluster_bits_);
  for (uint64_t c = 0; c < header_.refcount_table_clusters; c++)
    mark((header_.refcount_table_offset >> cluster_bits_) + c);
  for (uint64_t c = 0; c < counts.size(); c++)
    if (counts[c] != 0 && (c >= before.size() || before[c] == 0) && !in_new[c]) old_clusters.push_back(c);
  for (uint64_t c : old_clusters) {
    ASSIGN_OR_RETURN(uint64_t refs, GetRefcount(c));
    if (refs > 0) RETURN_IF_ERROR(SetRefcount(c, refs - 1));
  }
  return FlushAll();
}

Status Qcow2Map::AmendKeyslots(const AmendRequest& req) {
  if (!luks_ || !crypt_) return Status::ReadOnly("'{}' is opened read-only", path_);
  ASSIGN_OR_RETURN(crypto::LuksAmendOptions o, crypto::ReadLuksAmendOptions(req.options, "encrypt."));
  RETURN_IF_ERROR(FlushAll());
  return crypto::AmendLuks(&*luks_, *file_, header_.crypto_header_offset, o, req.secrets, key_secret_,
                           req.force);
}

}  // namespace vimgfs::qcow2

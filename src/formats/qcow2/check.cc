// qcow2 consistency: counting every reference from the header down the way qemu-img check
// (qemu 7.2) does, so both call the same images corrupt; repair (-r leaks|all), with a
// rebuild of the whole refcount structure when the refcount blocks themselves are bad;
// and the recount of dirty lazy-refcount images.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow2 {
namespace {

// A reference-count array of one uint32 per host cluster; refuse absurd files.
constexpr uint64_t kMaxCheckedClusters = 256ull << 20;
// A refcount block past the end of the file is grown into only this many clusters past
// it (qemu has no limit; a block a crash left unwritten lies just past the end): a hostile
// entry must not make the counts of terabytes of sparse file.
constexpr uint64_t kMaxGrownClusters = 1ull << 20;
// A hostile image can make millions of findings; past this many only the counts grow.
constexpr size_t kMaxMessages = 100000;

void Report(CheckReport* r, std::string msg) {
  if (r->messages.size() < kMaxMessages) {
    r->messages.push_back(std::move(msg));
  } else if (r->messages.size() == kMaxMessages) {
    r->messages.push_back("(further findings are counted but not listed)");
  }
}

// The reference counts the tables imply, one per host cluster of the file. Like qemu's
// in-memory refcount table it holds at most the image's refcount maximum per cluster.
class Counter {
 public:
  Counter(std::vector<uint32_t>* refs, CheckReport* r, uint32_t cluster_bits, uint64_t file_size,
          uint64_t refcount_max)
      : refs_(refs),
        r_(r),
        bits_(cluster_bits),
        cs_(1ull << cluster_bits),
        file_size_(file_size),
        max_(std::min<uint64_t>(refcount_max, UINT32_MAX)) {}

  void SetFileSize(uint64_t file_size) { file_size_ = file_size; }

  // Adds `times` references to every cluster [off, off+len) touches.
  void Add(uint64_t off, uint64_t len, uint64_t times = 1) {
    if (len == 0 || times == 0) return;
    // The last cluster may be partly past the end of the file; anything further is not.
    if (off > UINT64_MAX - len - cs_ || off + len >= file_size_ + cs_) {
      r_->corruptions += times;
      Report(r_, fmt::format("ERROR: counting reference for region exceeding the end of the file by one "
                             "cluster or more: offset {:#x} size {:#x}",
                             off, len));
      return;
    }
    uint64_t first = off >> bits_, last = (off + len - 1) >> bits_;
    if (last >= refs_->size()) refs_->resize(last + 1, 0);
    for (uint64_t c = first; c <= last; c++) {
      uint64_t room = max_ - (*refs_)[c];
      if (times > room) {
        r_->corruptions += times - room;
        Report(r_, fmt::format("ERROR: overflow cluster offset={:#x}\n"
                               "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                               "to create a clean copy if the image cannot be opened for writing",
                               c << bits_));
      }
      (*refs_)[c] += static_cast<uint32_t>(std::min(times, room));
    }
  }

 private:
  std::vector<uint32_t>* refs_;
  CheckReport* r_;
  uint32_t bits_;
  uint64_t cs_;
  uint64_t file_size_;
  uint64_t max_;
};

}  // namespace

Result<std::vector<uint64_t>> Qcow2Map::ReadTableForCheck(uint64_t off, uint64_t entries) {
  // Past the end of the file: zeros, as qemu reads (and no read at absurd offsets).
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  std::vector<std::byte> raw(entries * 8);
  if (off < file_size) RETURN_IF_ERROR(file_->PRead(off, raw));
  std::vector<uint64_t> out(entries);
  for (uint64_t i = 0; i < entries; i++) out[i] = LoadBE64(raw.data() + i * 8);
  return out;
}

std::string Qcow2Map::GrowFileToCover(uint64_t block_offset, uint64_t file_size) {
  // qemu's wording is strerror's: an end past INT64_MAX is EINVAL; past our own limit the
  // file is too large to grow into.
  if (block_offset > uint64_t{INT64_MAX} - cluster_size_) return std::strerror(EINVAL);
  if (((block_offset + cluster_size_) >> cluster_bits_) >
      DivRoundUp(file_size, cluster_size_) + kMaxGrownClusters)
    return std::strerror(EFBIG);
  Status s = file_->Truncate(block_offset + cluster_size_);
  if (!s.ok()) return std::strerror(s.err() ? s.err() : EIO);
  return {};
}

Status Qcow2Map::CountReferences(std::vector<uint32_t>* refs, CheckReport* report, RepairMode mode,
                                 bool* rebuild) {
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  uint64_t n = DivRoundUp(file_size, cluster_size_);
  if (n > kMaxCheckedClusters)
    return Status::Io("'{}': image file has too many clusters ({}) to check", path_, n);
  refs->assign(n, 0);
  Counter cnt(refs, report, cluster_bits_, file_size, refcount_max_);
  const bool data_file = header_.has_data_file();
  cnt.Add(0, cluster_size_);

  // L1 tables first; every L2 table is then read once however many L1 entries name it
  // (a hostile image may name one table millions of times).
  struct L2Use {
    uint64_t times = 0;
    uint64_t active_times = 0;  // from the active L1: these feed the allocation figures
  };
  std::map<uint64_t, L2Use> l2_tables;
  auto walk_l1 = [&](uint64_t l1_off, uint64_t l1_size, bool active) -> Status {
    if (l1_size == 0) return Status::Ok();
    cnt.Add(l1_off, l1_size * 8);
    ASSIGN_OR_RETURN(std::vector<uint64_t> l1, ReadTableForCheck(l1_off, l1_size));
    for (uint64_t e : l1) {
      if (e == 0) continue;
      if (e & kL1Reserved) {
        report->corruptions++;
        Report(report, fmt::format("ERROR found L1 entry with reserved bits set: {:x}", e));
      }
      uint64_t l2_off = L1EntryOffset(e);
      cnt.Add(l2_off, cluster_size_);
      if (!IsAligned(l2_off, cluster_size_)) {
        report->corruptions++;
        Report(report,
               fmt::format("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2_off));
      }
      L2Use& u = l2_tables[l2_off];
      u.times++;
      if (active) u.active_times++;
    }
    return Status::Ok();
  };
  RETURN_IF_ERROR(walk_l1(header_.l1_table_offset, header_.l1_size, true));

  if (data_file && !snapshots_.empty()) {
    report->corruptions++;
    Report(report, fmt::format("ERROR {} snapshots in image with data file", snapshots_.size()));
  }
  const uint64_t snap_bytes = SnapshotTableExtent(snapshots_);
  for (size_t i = 0; i < snapshots_.size(); i++) {
    const Snapshot& s = snapshots_[i];
    if (!IsAligned(s.l1_table_offset, cluster_size_)) {
      report->corruptions++;
      Report(report, fmt::format("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; "
                                 "snapshot table entry corrupted",
                                 s.id, s.name, s.l1_table_offset));
      continue;
    }
    if (uint64_t{s.l1_size} * 8 > limits::kMaxL1Bytes) {
      report->corruptions++;
      Report(report, fmt::format("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot "
                                 "table entry corrupted",
                                 s.id, s.name, s.l1_size));
      continue;
    }
    RETURN_IF_ERROR(walk_l1(s.l1_table_offset, s.l1_size, false));
  }

  std::vector<std::byte> table(cluster_size_);
  for (const auto& [l2_off, use] : l2_tables) {
    if (l2_off >= file_size) continue;  // reads as zeros: nothing allocated
    const bool cached = IsAligned(l2_off, cluster_size_);
    TableRef t;
    if (cached) {
      ASSIGN_OR_RETURN(t, l2_cache_->Get(l2_off));
    } else {
      RETURN_IF_ERROR(file_->PRead(l2_off, table));
    }
    auto entry_at = [&](uint64_t j, uint64_t* bm) {
      if (cached) return LoadL2(t, j, bm);
      const std::byte* p = table.data() + j * l2_entry_bytes();
      *bm = extended_l2_ ? LoadBE64(p + 8) : 0;
      return LoadBE64(p);
    };
    uint64_t next_contiguous = 0;
    for (uint64_t j = 0; j < l2_entries_; j++) {
      uint64_t bm;
      uint64_t e = entry_at(j, &bm);
      if (IsCompressed(e)) {
        uint64_t coff = CompressedHostOffset(e, cluster_bits_);
        if (IsCopied(e)) {
          report->corruptions += use.times;
          Report(report, fmt::format("ERROR: coffset={:#x}: copied flag must never be set for compressed "
                                     "clusters",
                                     coff));
        }
        if (data_file) {
          report->corruptions += use.times;
          Report(report, fmt::format("ERROR compressed cluster {} with data file, entry={:#x}", j, e));
          continue;
        }
        if (bm) {
          report->corruptions += use.times;
          Report(report,
                 fmt::format("ERROR compressed cluster {} with non-zero subcluster allocation bitmap, "
                             "entry={:#x}",
                             j, e));
          continue;
        }
        cnt.Add(coff, CompressedLength(e, cluster_bits_), use.times);
        report->allocated_clusters += use.active_times;
        report->compressed_clusters += use.active_times;
        report->fragmented_clusters += use.active_times;  // re-reads shared sectors: fragmented by nature
        continue;
      }
      if (e & kL2StandardReserved) {
        report->corruptions += use.times;
        Report(report, fmt::format("ERROR found l2 entry with reserved bits set: {:x}", e));
      }
      uint64_t host = L2EntryOffset(e);
      bool zero_flag = !extended_l2_ && (e & kFlagZero);
      if (host == 0 && !(data_file && IsCopied(e))) {
        // Unallocated, or reads as zeros without a cluster.
        if (!zero_flag && SubAllocBits(bm)) {
          report->corruptions += use.times;
          Report(report, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
        continue;
      }
      if (SubAllocBits(bm) & SubZeroBits(bm)) {
        report->corruptions += use.times;
        Report(report, fmt::format("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation "
                                   "bitmap",
                                   host));
      }
      if (!IsAligned(host, cluster_size_)) {
        bool has_data = extended_l2_ ? SubAllocBits(bm) != 0 : !zero_flag;
        if (has_data) {
          report->corruptions += use.times;
          Report(report, fmt::format("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry "
                                     "corrupted.",
                                     host));
        } else if (mode == RepairMode::kAll && cached) {
          // A preallocated zero cluster loses its (bad) cluster and keeps reading zeros.
          Report(report, fmt::format("Repairing offset={:x}: Preallocated cluster is not properly aligned; "
                                     "L2 entry corrupted.",
                                     host));
          StoreL2(t, j, extended_l2_ ? 0 : kFlagZero,
                  extended_l2_ ? MakeSubBitmap(0, SubZeroBits(bm) | SubAllocBits(bm)) : 0);
          report->corruptions_fixed++;
          continue;
        } else {
          report->corruptions += use.times;
          Report(report, fmt::format("ERROR offset={:x}: Preallocated cluster is not properly aligned; L2 "
                                     "entry corrupted.",
                                     host));
        }
      }
      if (use.active_times) {
        report->allocated_clusters += use.active_times;
        if (next_contiguous && host != next_contiguous) report->fragmented_clusters += use.active_times;
        next_contiguous = host + cluster_size_;
      }
      if (!data_file) cnt.Add(host, cluster_size_, use.times);
    }
  }

  if (snap_bytes) cnt.Add(header_.snapshots_offset, snap_bytes);
  cnt.Add(header_.refcount_table_offset, reftable_.size() * 8);
  if (header_.crypt_method == 2 && header_.crypto_header_length)  // the LUKS header's clusters
    cnt.Add(header_.crypto_header_offset, header_.crypto_header_length);

  if (header_.bitmaps_ext && header_.bitmaps_ext->size() >= 24) {
    const std::byte* p = header_.bitmaps_ext->data();
    uint64_t dir_size = LoadBE64(p + 8), dir_off = LoadBE64(p + 16);
    if (dir_size <= limits::kMaxHeaderExtensionBytes * 16 && dir_off + dir_size <= file_size) {
      cnt.Add(dir_off, dir_size);
      std::vector<std::byte> dir(dir_size);
      RETURN_IF_ERROR(file_->PRead(dir_off, dir));
      for (uint64_t pos = 0; pos + 24 <= dir_size;) {
        uint64_t table_off = LoadBE64(dir.data() + pos);
        uint64_t table_size = LoadBE32(dir.data() + pos + 8);
        uint64_t name_size = LoadBE16(dir.data() + pos + 18);
        uint64_t extra_size = LoadBE32(dir.data() + pos + 20);
        if (table_size * 8 <= limits::kMaxL1Bytes && table_off + table_size * 8 <= file_size) {
          cnt.Add(table_off, table_size * 8);
          std::vector<std::byte> bt(table_size * 8);
          RETURN_IF_ERROR(file_->PRead(table_off, bt));
          for (uint64_t i = 0; i < table_size; i++) {
            uint64_t off = LoadBE64(bt.data() + i * 8) & kOffsetMask;
            if (off) cnt.Add(off, cluster_size_);
          }
        }
        pos += AlignUp(24 + name_size + extra_size, 8);
      }
    }
  }

  // The refcount blocks, judged by their raw table entries as qemu does.
  for (uint64_t i = 0; i < reftable_.size(); i++) {
    if (reftable_[i] & kRefTableReserved) {
      report->corruptions++;
      Report(report, fmt::format("ERROR refcount table entry {} has reserved bits set", i));
      *rebuild = true;
      continue;
    }
    // Bits 56..63 are not masked off: such a block lies far outside the file.
    uint64_t e = reftable_[i] & ~kRefTableReserved;
    if (!IsAligned(e, cluster_size_)) {
      report->corruptions++;
      Report(report, fmt::format("ERROR refcount block {} is not cluster aligned; refcount table entry "
                                 "corrupted",
                                 i));
      *rebuild = true;
      continue;
    }
    if ((e >> cluster_bits_) >= refs->size()) {
      report->corruptions++;
      const bool fix = mode == RepairMode::kAll;
      Report(report, fmt::format("{} refcount block {} is outside image", fix ? "Repairing" : "ERROR", i));
      if (!fix) continue;
      // As qemu does: grow the file so the block exists (reading zeros); if that fails,
      // the structure is rebuilt without it.
      if (std::string why = GrowFileToCover(e, file_size); !why.empty()) {
        Report(report, fmt::format("ERROR could not resize image: {}", why));
        *rebuild = true;
        continue;
      }
      ASSIGN_OR_RETURN(file_size, file_->Size());
      cnt.SetFileSize(file_size);
      refs->resize(DivRoundUp(file_size, cluster_size_), 0);
      report->corruptions--;
      report->corruptions_fixed++;
      cnt.Add(e, cluster_size_);
      continue;
    }
    if (e == 0) continue;
    cnt.Add(e, cluster_size_);
    uint32_t ref = (*refs)[e >> cluster_bits_];
    if (ref != 1) {
      report->corruptions++;
      Report(report, fmt::format("ERROR refcount block {} refcount={}", i, ref));
      *rebuild = true;
    }
  }
  return Status::Ok();
}

Status Qcow2Map::CompareRefcounts(const std::vector<uint32_t>& refs, RepairMode mode, CheckReport* r,
                                  bool* rebuild) {
  uint64_t highest = 0;
  for (uint64_t c = 0; c < refs.size(); c++) {
    auto got = GetRefcount(c);
    if (!got.ok()) {
      r->check_errors++;
      Report(r, fmt::format("Can't get refcount for cluster {}: {}", c, got.error().message()));
      *rebuild = true;
      continue;
    }
    uint64_t stored = *got, ref = refs[c];
    if (stored || ref) highest = c;
    if (stored == ref) continue;
    // A referenced cluster counted as free needs the structure rebuilt (qemu: the block
    // holding its count may itself be what is wrong).
    if (stored == 0) *rebuild = true;
    bool fix = stored != 0 &&
               ((stored > ref && mode != RepairMode::kNone) || (stored < ref && mode == RepairMode::kAll));
    Report(r, fmt::format("{} cluster {} refcount={} reference={}",
                          fix            ? "Repairing"
                          : stored < ref ? "ERROR"
                                         : "Leaked",
                          c, stored, ref));
    if (fix) {
      RETURN_IF_ERROR(SetRefcount(c, std::min<uint64_t>(ref, refcount_max_)));
      (stored < ref ? r->corruptions_fixed : r->leaks_fixed)++;
    } else {
      (stored < ref ? r->corruptions : r->leaks)++;
    }
  }
  r->image_end_offset = (highest + 1) << cluster_bits_;
  return Status::Ok();
}

namespace {

// First fit of `count` clusters in the in-memory refcounts, from *first_free on, as qemu's
// rebuild allocates (so a rebuilt image has qemu's layout, and a file that cannot grow,
// such as a block device, is rebuilt inside itself when it has room). *first_free ends at
// the first free cluster seen.
uint64_t AllocInMemory(std::vector<uint32_t>* refs, uint64_t count, uint64_t* first_free) {
  uint64_t c = *first_free, run = 0;
  bool first_gap = true;
  for (; c < refs->size() && run < count; c++) {
    if ((*refs)[c] != 0) {
      run = 0;
      continue;
    }
    run++;
    if (first_gap) {
      *first_free = c;
      first_gap = false;
    }
  }
  if (run < count) refs->resize(c + count - run, 0);
  c -= run;
  for (uint64_t i = 0; i < count; i++) (*refs)[c + i] = 1;
  return c;
}

}  // namespace

Result<bool> Qcow2Map::WriteRebuiltRefblocks(std::vector<uint32_t>* refs, uint64_t first, uint64_t end,
                                             std::vector<uint64_t>* table) {
  const uint64_t per_table_cluster = cluster_size_ / 8;
  uint64_t first_free = 0;
  bool grown = false;
  std::vector<std::byte> buf(cluster_size_);
  for (uint64_t c = first; c < end && c < refs->size(); c++) {
    if ((*refs)[c] == 0) continue;
    const uint64_t index = c / refblock_entries_;
    const uint64_t block_start = index * refblock_entries_;
    if (index >= table->size() || (*table)[index] == 0) {
      // Never inside a block already written: its counts would miss the new block.
      first_free = std::max(first_free, block_start);
      const uint64_t at = AllocInMemory(refs, 1, &first_free);
      end = std::max(end, at + 1);  // the block counting this block must be written too
      if (index >= table->size()) {
        uint64_t entries = AlignUp(index + 1, per_table_cluster);
        if (entries * 8 > limits::kMaxRefTableBytes)
          return Status::NoSpace("'{}': a rebuilt refcount table would exceed {} bytes", path_,
                                 limits::kMaxRefTableBytes);
        table->resize(entries, 0);
        grown = true;
      }
      (*table)[index] = at << cluster_bits_;
    }
    std::fill(buf.begin(), buf.end(), std::byte{0});
    for (uint64_t i = 0; i < refblock_entries_ && block_start + i < refs->size(); i++)
      WriteRefcountEntry(buf.data(), i, refcount_bits_,
                         std::min<uint64_t>((*refs)[block_start + i], refcount_max_));
    RETURN_IF_ERROR(file_->PWrite((*table)[index], buf, IoTag::kRefBlock));
    c = block_start + refblock_entries_ - 1;
  }
  return grown;
}

Status Qcow2Map::RebuildRefcountStructure(std::vector<uint32_t>* refs) {
  // `refs` counts every reference, the old structure's included, so the new blocks and
  // table go only where nothing lives; the old structure stays intact until the header
  // switches, and is a leak afterwards (the caller frees it).
  RETURN_IF_ERROR(FlushAll());
  std::vector<uint64_t> table;
  ASSIGN_OR_RETURN(bool grown, WriteRebuiltRefblocks(refs, 0, refs->size(), &table));
  uint64_t table_cluster = 0, table_clusters = 0;
  do {
    // The table's own clusters need counting, which may need a block, which may grow
    // the table: until it stops growing. Earlier tries stay allocated (leaks).
    table_clusters = DivRoundUp(table.size() * 8, cluster_size_);
    uint64_t first_free = 0;
    table_cluster = AllocInMemory(refs, table_clusters, &first_free);
    ASSIGN_OR_RETURN(grown,
                     WriteRebuiltRefblocks(refs, table_cluster, table_cluster + table_clusters, &table));
  } while (grown);

  std::vector<std::byte> raw(table.size() * 8);
  for (size_t i = 0; i < table.size(); i++) StoreBE64(raw.data() + i * 8, table[i]);
  RETURN_IF_ERROR(file_->PWrite(table_cluster << cluster_bits_, raw, IoTag::kRefTable));
  // The new structure is durable before the header names it.
  RETURN_IF_ERROR(file_->Sync(true));
  header_.refcount_table_offset = table_cluster << cluster_bits_;
  header_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  RETURN_IF_ERROR(WriteHeader());
  RETURN_IF_ERROR(file_->Sync(true));
  reftable_ = std::move(table);
  ref_cache_ = std::make_unique<TableCache>(file_.get(), static_cast<uint32_t>(cluster_size_),
                                            ref_cache_->max_tables(), IoTag::kRefBlock);
  host_end_ = std::max(host_end_, uint64_t{refs->size()} << cluster_bits_);
  free_hint_ = 0;
  return Status::Ok();
}

Status Qcow2Map::CheckCopiedFlags(RepairMode mode, CheckReport* r) {
  // -r leaks fixes the flags only when the refcounts they follow are now known good.
  const bool repair = mode == RepairMode::kAll ||
                      (mode == RepairMode::kLeaks && !r->check_errors && !r->corruptions && !r->leaks);
  const bool data_file = header_.has_data_file();
  std::map<uint64_t, uint64_t> l2_tables;  // offset -> active L1 entries naming it
  for (uint64_t i = 0; i < l1_.size(); i++) {
    uint64_t l2_off = L1EntryOffset(l1_[i]);
    if (!l2_off) continue;
    auto rc = GetRefcount(l2_off >> cluster_bits_);
    if (!rc.ok()) continue;  // already counted as a check error
    l2_tables[l2_off]++;
    if ((*rc == 1) == IsCopied(l1_[i])) continue;
    Report(r, fmt::format("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
                          repair ? "Repairing" : "ERROR", i, l1_[i], *rc));
    if (repair) {
      l1_[i] = *rc == 1 ? (l1_[i] | kFlagCopied) : (l1_[i] & ~kFlagCopied);
      l1_dirty_ = true;
      r->corruptions_fixed++;
    } else {
      r->corruptions++;
    }
  }
  ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  std::vector<std::byte> table(cluster_size_);
  for (const auto& [l2_off, times] : l2_tables) {
    if (l2_off >= file_size) continue;
    const bool cached = IsAligned(l2_off, cluster_size_);
    TableRef t;
    if (cached) {
      ASSIGN_OR_RETURN(t, l2_cache_->Get(l2_off));
    } else {
      RETURN_IF_ERROR(file_->PRead(l2_off, table));
    }
    for (uint64_t j = 0; j < l2_entries_; j++) {
      uint64_t bm = 0;
      uint64_t e;
      if (cached) {
        e = LoadL2(t, j, &bm);
      } else {
        const std::byte* p = table.data() + j * l2_entry_bytes();
        e = LoadBE64(p);
        if (extended_l2_) bm = LoadBE64(p + 8);
      }
      uint64_t host = L2EntryOffset(e);
      if (IsCompressed(e) || (host == 0 && !(data_file && IsCopied(e)))) continue;
      uint64_t drc = 1;  // clusters of an external data file are never shared
      if (!data_file) {
        auto got = GetRefcount(host >> cluster_bits_);
        if (!got.ok()) continue;
        drc = *got;
      }
      if ((drc == 1) == IsCopied(e)) continue;
      bool fix = repair && cached;  // qemu too refuses to write a table that is not aligned
      Report(r, fmt::format("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                            fix ? "Repairing" : "ERROR", e, drc));
      if (fix) {
        StoreL2(t, j, drc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied), bm);
        r->corruptions_fixed++;
      } else {
        r->corruptions += times;
      }
    }
  }
  return Status::Ok();
}

Result<CheckReport> Qcow2Map::Check(RepairMode mode) {
  CheckReport r;
  if (mode != RepairMode::kNone) RETURN_IF_ERROR(CheckWritable());
  r.total_clusters = DivRoundUp(size_, cluster_size_);
  // The snapshot table first, as qemu reads it: past its limits only -r all goes on, by
  // dropping what is past them.
  bool rewrite_snapshot_table = false;
  if (!snapshot_table_error_.ok()) {
    std::string why = snapshot_table_error_.message();
    if (why.starts_with("'" + path_ + "': ")) why = why.substr(path_.size() + 4);
    if (mode != RepairMode::kAll) {
      // qemu stops here: its error line, the hint, "Check failed: File too large".
      const bool too_many = header_.nb_snapshots > limits::kMaxSnapshots;
      const size_t nl = why.find('\n');
      r.error_reports.push_back(fmt::format(
          "ERROR {}{}", too_many ? "" : "failed to read the snapshot table: ", why.substr(0, nl)));
      if (nl != std::string::npos) Report(&r, why.substr(nl + 1));
      r.check_errors++;
      r.failure = std::strerror(EFBIG);
      return r;
    }
    SnapshotTableRepair fix;
    ASSIGN_OR_RETURN(snapshots_, ParseSnapshotTable(*file_, path_, header_, SnapshotRead::kRepair, &fix));
    for (std::string& m : fix.messages) Report(&r, std::move(m));
    if (fix.discarded) {
      // The header first: the refcount check below counts what it names (the dropped
      // snapshots' clusters become leaks it frees).
      header_.nb_snapshots = static_cast<uint32_t>(snapshots_.size());
      RETURN_IF_ERROR(WriteHeader());
      RETURN_IF_ERROR(file_->Sync(true));
      r.corruptions_fixed += static_cast<int64_t>(fix.discarded);
    }
    // Entries cut short are written anew once refcounts are right.
    r.corruptions_fixed += static_cast<int64_t>(fix.extra_dropped);
    rewrite_snapshot_table = fix.extra_dropped != 0;
    snapshot_table_error_ = Status::Ok();
  }
  // Version 3 entries carry at least the large VM state size and the disk size (qemu:
  // "incomplete" otherwise; version 2 needs neither); -r all rewrites the table once
  // refcounts are right.
  for (size_t i = 0; i < snapshots_.size() && v3_; i++) {
    if (snapshots_[i].extra.size() >= 16) continue;
    Report(&r, fmt::format("{} snapshot table entry {} is incomplete",
                           mode == RepairMode::kAll ? "Repairing" : "ERROR", i));
    (mode == RepairMode::kAll ? r.corruptions_fixed : r.corruptions)++;
    rewrite_snapshot_table |= mode == RepairMode::kAll;
  }
  std::vector<uint32_t> refs;
  bool rebuild = false;
  RETURN_IF_ERROR(CountReferences(&refs, &r, mode, &rebuild));
  // Nothing may be allocated below the counted area while a repair runs.
  if (mode != RepairMode::kNone) free_hint_ = std::max<uint64_t>(free_hint_, refs.size());

  // First without repairing: whether the refcount structure itself must be rebuilt.
  CheckReport before = r;
  RETURN_IF_ERROR(CompareRefcounts(refs, RepairMode::kNone, &r, &rebuild));
  if (rebuild && mode == RepairMode::kAll) {
    Report(&r, "Rebuilding refcount structure");
    Status rebuilt = RebuildRefcountStructure(&refs);
    if (!rebuilt.ok()) {
      free_hint_ = 0;
      return rebuilt;
    }
    // As qemu: count again against the new structure; the old one is now leaked and is
    // freed, and only what that could not free stays a finding.
    const CheckReport found = r;
    r.corruptions = 0;
    r.leaks = 0;
    bool still = false;
    RETURN_IF_ERROR(CountReferences(&refs, &r, RepairMode::kNone, &still));
    CheckReport leak_fix;
    RETURN_IF_ERROR(CompareRefcounts(refs, RepairMode::kLeaks, &leak_fix, &still));
    for (std::string& m : leak_fix.messages) Report(&r, std::move(m));
    if (still) Report(&r, "ERROR rebuilt refcount structure is still broken");
    if (r.corruptions < found.corruptions) r.corruptions_fixed += found.corruptions - r.corruptions;
    if (r.leaks < found.leaks) r.leaks_fixed += found.leaks - r.leaks;
    r.leaks += leak_fix.leaks;
    r.image_end_offset = leak_fix.image_end_offset;
  } else if (mode != RepairMode::kNone) {
    if (rebuild) {
      // Freeing leaks cannot be trusted while counts of referenced clusters are missing.
      free_hint_ = 0;
      return Status::Io("ERROR need to rebuild refcount structures\nInput/output error");
    }
    if (r.leaks || r.corruptions) {
      // Again, repairing this time; what the first pass said stays said (qemu prints it).
      uint64_t end = r.image_end_offset;
      std::vector<std::string> said = std::move(r.messages);
      r = before;
      r.messages = std::move(said);
      RETURN_IF_ERROR(CompareRefcounts(refs, mode, &r, &rebuild));
      r.image_end_offset = end;
    }
  }
  if (mode != RepairMode::kNone) free_hint_ = 0;

  if (!snapshot_view_) RETURN_IF_ERROR(CheckCopiedFlags(mode, &r));
  if (mode == RepairMode::kAll) {
    if (rewrite_snapshot_table) RETURN_IF_ERROR(WriteSnapshotTable(*this, snapshots_));
  }
  if (mode == RepairMode::kNone) return r;
  RETURN_IF_ERROR(FlushAll());
  // A repair that leaves nothing wrong makes the image clean and consistent again, as
  // qemu's does: the lazy-refcount dirty mark and the corrupt mark go.
  constexpr uint64_t kMarks = kIncompatDirty | kIncompatCorrupt;
  if (r.check_errors == 0 && r.corruptions == 0 && (header_.incompatible_features & kMarks)) {
    header_.incompatible_features &= ~kMarks;
    RETURN_IF_ERROR(WriteHeader());
    RETURN_IF_ERROR(file_->Sync(true));
    corrupt_ = false;
    clear_dirty_on_close_ = false;
  }
  return r;
}

}  // namespace vimgfs::qcow2

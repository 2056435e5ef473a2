// QcowMap: the qcow two-level table as a ClusterMap, and opening an image.
//
// Ordering (docs/ARCHITECTURE.md, "Crash ordering"): the engine writes data, then
// CommitWrite links it in a cached L2 table that depends on a host flush; WriteBack flushes
// the L2 cache (sync, tables, sync) and only then writes the changed L1 entries. Space is
// appended at the end of the file and never reused, so nothing durable ever points at
// space that something else may overwrite.
#include <algorithm>
#include <cstring>

#include "crypto/qcow_aes.h"
#include "formats/qcow/qcow_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::qcow {
namespace {

enum PlanKind : uint64_t { kPlanReuse = 1, kPlanNew = 2 };
// Largest run of new clusters one plan appends (the engine may stage it for copy-on-write).
constexpr uint64_t kMaxPlanBytes = 8ull << 20;

bool Overlaps(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len) {
  return a_len > 0 && b_len > 0 && a < b + b_len && b < a + a_len;
}

}  // namespace

Result<std::unique_ptr<ClusterMap>> OpenQcow(OpenContext ctx) {
  File* file = ctx.file.get();
  ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::array<std::byte, kHeaderSize> raw{};
  if (file_size >= kHeaderSize) {
    RETURN_IF_ERROR(file->PRead(0, raw).WithContext("'{}': reading the qcow header", ctx.path));
  }
  ASSIGN_OR_RETURN(Header h, ParseHeader(raw, file_size, ctx.path));
  RETURN_IF_ERROR(ReadBackingName(*file, file_size, ctx.path, &h));

  std::vector<std::byte> l1_raw(h.l1_bytes());
  if (!l1_raw.empty()) {
    RETURN_IF_ERROR(file->PRead(h.l1_offset, l1_raw)
                        .WithContext("'{}': reading the qcow L1 table at 0x{:x}", ctx.path, h.l1_offset));
  }
  std::vector<uint64_t> l1(h.l1_entries);
  for (uint64_t i = 0; i < h.l1_entries; ++i) {
    const uint64_t l2 = LoadBE64(&l1_raw[i * 8]);
    l1[i] = l2;
    if (l2 == 0) continue;
    // A table past the end of the file, or on top of the header, name or L1 table, is not
    // one qemu wrote; refuse it rather than read garbage or write over the header.
    const auto l2_end = CheckedAdd(l2, h.l2_bytes());
    if (!l2_end || *l2_end > file_size) {
      return Status::InvalidFormat(
          "'{}': qcow L2 table at 0x{:x} (L1 entry {}) extends past the end of the file ({} bytes)", ctx.path,
          l2, i, file_size);
    }
    if (Overlaps(l2, h.l2_bytes(), 0, kHeaderSize) || Overlaps(l2, h.l2_bytes(), h.l1_offset, h.l1_bytes()) ||
        (h.backing_offset != 0 && Overlaps(l2, h.l2_bytes(), h.backing_offset, h.backing_size))) {
      return Status::InvalidFormat(
          "'{}': qcow L2 table at 0x{:x} (L1 entry {}) overlaps the header or L1 table", ctx.path, l2, i);
    }
  }
  const bool read_only = ctx.options.read_only || !file->writable();
  const uint64_t cache = ctx.options.cache_bytes ? ctx.options.cache_bytes : limits::kDefaultCacheBytes;
  const bool aes = h.crypt_method == kCryptAes;
  File& host = *ctx.file;
  auto map = std::make_unique<QcowMap>(ctx.path, std::move(ctx.file), std::move(h), std::move(l1), file_size,
                                       read_only, cache);
  if (aes && !ctx.options.no_io) {  // info: not even the secret is read (qemu's NO_IO)
    auto cipher =
        crypto::OpenQcowAesCipher(ctx.options.secrets, ctx.options.key_secret, "encrypt.key-secret");
    if (!cipher.ok()) return cipher.error().WithContext("'{}'", ctx.path);
    map->crypt_ =
        std::make_unique<crypto::CryptFile>(host, 0, 0, std::move(cipher).value(), /*guest_iv=*/true);
  }
  return std::unique_ptr<ClusterMap>(std::move(map));
}

Status QcowMap::CheckUnlocked() const {
  if (h_.crypt_method == kCryptAes && !crypt_)
    return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
  return Status::Ok();
}

QcowMap::QcowMap(std::string path, std::unique_ptr<File> file, Header header, std::vector<uint64_t> l1,
                 uint64_t file_size, bool read_only, uint64_t cache_bytes)
    : path_(std::move(path)),
      file_(std::move(file)),
      h_(std::move(header)),
      l1_(std::move(l1)),
      read_only_(read_only),
      end_(file_size) {
  l2_cache_ = std::make_unique<TableCache>(file_.get(), static_cast<uint32_t>(h_.l2_bytes()),
                                           cache_bytes / h_.l2_bytes(), IoTag::kL2);
}

Status QcowMap::CheckWritable() const {
  if (closed_) return Status::InvalidArgument("'{}': image is closed", path_);
  RETURN_IF_ERROR(CheckUnlocked());
  if (read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  return Status::Ok();
}

bool QcowMap::PlainEntryValid(uint64_t e) const {
  // qemu fails reads of unaligned data clusters. A cluster must start inside the file; a
  // tail past the end reads as zeros, as in qemu.
  return (e & kCompressedFlag) == 0 && IsAligned(e, kSectorSize) && e < end_;
}

bool QcowMap::PlainEntryWritable(uint64_t e) const {
  // Written in place only when whole inside the file (a write past the end would land on
  // space AppendSpace hands out) and clear of the header, name and L1 table.
  return e != 0 && PlainEntryValid(e) && h_.cluster_size() <= end_ - e && e >= h_.fixed_metadata_end();
}

Result<TableRef> QcowMap::GetL2(uint64_t l1i, bool allocate) {
  if (l1i >= l1_.size()) {
    return Status::OutOfRange("'{}': L1 index {} is past the table of {} entries", path_, l1i, l1_.size());
  }
  if (l1_[l1i] != 0) {
    auto l2 = l2_cache_->Get(l1_[l1i]);
    if (!l2.ok()) return l2.error().WithContext("'{}': reading the qcow L2 table at 0x{:x}", path_, l1_[l1i]);
    return l2;
  }
  if (!allocate) return TableRef{};
  // As qemu: the new table goes at the end of the file, cluster aligned. It is written
  // (zeros and all) before the L1 entry that links it (WriteBack).
  ASSIGN_OR_RETURN(uint64_t off, AppendSpace(h_.l2_bytes(), h_.cluster_size()));
  ASSIGN_OR_RETURN(TableRef l2, l2_cache_->GetEmpty(off));
  l1_[l1i] = off;
  dirty_l1_.insert(l1i);
  return l2;
}

Result<uint64_t> QcowMap::AppendSpace(uint64_t bytes, uint64_t align) {
  const auto start = AlignUpChecked(end_, align);
  const auto end = start ? CheckedAdd(*start, bytes) : std::nullopt;
  if (!end || *end > limits::kMaxHostOffset) {
    return Status::NoSpace("'{}': qcow image file would grow past {} bytes", path_, limits::kMaxHostOffset);
  }
  end_ = *end;
  return *start;
}

Status QcowMap::Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) {
  RETURN_IF_ERROR(CheckUnlocked());
  if (guest_off > h_.virtual_size || len > h_.virtual_size - guest_off) {
    return Status::OutOfRange("'{}': lookup of {} bytes at {} is past the disk size {}", path_, len,
                              guest_off, h_.virtual_size);
  }
  const uint64_t cs = h_.cluster_size();
  const uint64_t table_span = cs << h_.l2_bits;  // guest bytes one L2 table maps
  const size_t first = out->size();
  auto append = [&](const Mapping& m) {
    Mapping* prev = out->size() > first ? &out->back() : nullptr;
    if (prev && prev->kind == m.kind &&
        (m.kind == Mapping::Kind::kUnallocated ||
         (m.kind == Mapping::Kind::kData && prev->host_offset + prev->length == m.host_offset &&
          prev->writable == m.writable))) {
      prev->length += m.length;
    } else {
      out->push_back(m);
    }
  };
  while (len > 0) {
    const uint64_t l1i = guest_off / table_span;
    const uint64_t table_left = table_span - guest_off % table_span;
    ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, false));
    if (!l2) {
      Mapping m;
      m.length = std::min(len, table_left);
      append(m);
      guest_off += m.length;
      len -= m.length;
      continue;
    }
    const uint64_t stop = guest_off + std::min(len, table_left);
    while (guest_off < stop) {
      const uint64_t in_cluster = guest_off % cs;
      const uint64_t n = std::min(stop - guest_off, cs - in_cluster);
      const uint64_t index = (guest_off / cs) & (h_.l2_entries() - 1);
      const uint64_t e = LoadBE64(l2.data() + index * 8);
      Mapping m;
      m.length = n;
      if (e == 0) {
        m.kind = Mapping::Kind::kUnallocated;
      } else if (e & kCompressedFlag) {
        const uint64_t host = e & ((uint64_t{1} << (63 - h_.cluster_bits)) - 1);
        const uint64_t csize = (e >> (63 - h_.cluster_bits)) & (cs - 1);
        if (csize == 0 || host > end_ || csize > end_ - host) {
          return Status::Corrupt(
              "'{}': compressed cluster at guest offset 0x{:x} (host 0x{:x}, {} bytes) is not inside the "
              "file",
              path_, guest_off - in_cluster, host, csize);
        }
        m.kind = Mapping::Kind::kCompressed;
        m.file = file_.get();
        m.host_offset = host;
        m.compressed_length = csize;
        m.unit_guest_offset = guest_off - in_cluster;
        m.unit_size = static_cast<uint32_t>(cs);
        m.codec = Codec::kDeflateRaw;
      } else {
        if (!PlainEntryValid(e)) {
          return Status::Corrupt(
              "'{}': data cluster at guest offset 0x{:x} has a bad host offset 0x{:x} (unaligned or past the "
              "end of the file)",
              path_, guest_off - in_cluster, e);
        }
        m.kind = Mapping::Kind::kData;
        m.file = data();
        m.host_offset = e + in_cluster;
        // A cluster on top of the header, name or L1 table, or reaching past the end of
        // the file, is read but never written in place: PrepareWrite moves it.
        m.writable = !read_only_ && PlainEntryWritable(e);
      }
      append(m);
      guest_off += n;
      len -= n;
    }
  }
  return Status::Ok();
}

Result<WritePlan> QcowMap::PrepareWrite(uint64_t guest_off, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (guest_off >= h_.virtual_size) {
    return Status::OutOfRange("'{}': write at {} is past the disk size {}", path_, guest_off,
                              h_.virtual_size);
  }
  const uint64_t cs = h_.cluster_size();
  const uint64_t cluster = guest_off / cs;
  const uint64_t l1i = cluster >> h_.l2_bits;
  auto reusable = [&](uint64_t e) { return PlainEntryWritable(e); };

  WritePlan plan;
  plan.file = data();
  plan.cookie[1] = cluster;
  uint64_t n = 1;
  {
    ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, false));
    auto entry = [&](uint64_t c) { return l2 ? LoadBE64(l2.data() + (c & (h_.l2_entries() - 1)) * 8) : 0; };
    const uint64_t e = entry(cluster);
    if (reusable(e)) {  // already there (allocated while the engine waited)
      plan.guest_offset = cluster * cs;
      plan.length = cs;
      plan.host_offset = e;
      plan.cookie[0] = kPlanReuse;
      return plan;
    }
    // A run of clusters without their own data, inside this L2 table and the request.
    const uint64_t request_end =
        DivRoundUp(std::min(guest_off + std::max<uint64_t>(len, 1), h_.virtual_size), cs);
    uint64_t last = std::min(request_end, ((l1i + 1) << h_.l2_bits)) - 1;
    last = std::min(last, cluster + std::max<uint64_t>(1, kMaxPlanBytes / cs) - 1);
    while (cluster + n <= last && !reusable(entry(cluster + n))) ++n;
  }
  // The L2 table first, then the data after it, as qemu lays them out.
  RETURN_IF_ERROR(GetL2(l1i, true).status());
  ASSIGN_OR_RETURN(uint64_t host, AppendSpace(n * cs, cs));
  // Grow the file over the new space (qemu does the same) so that it reads as zeros and
  // every linked cluster lies inside the file even when the engine skips writing zeros.
  // All space handed out lies below end_, so this never cuts anything off.
  RETURN_IF_ERROR(file_->Truncate(end_).WithContext("'{}': growing the file", path_));
  plan.guest_offset = cluster * cs;
  plan.length = n * cs;
  plan.host_offset = host;
  plan.fresh = true;
  plan.cookie[0] = kPlanNew;
  plan.cookie[2] = n;
  plan.cookie[3] = host;
  return plan;
}

Status QcowMap::CommitWrite(const WritePlan& plan) {
  RETURN_IF_ERROR(CheckWritable());
  if (plan.cookie[0] == kPlanReuse) return Status::Ok();
  if (plan.cookie[0] != kPlanNew) return Status::Corrupt("'{}': unknown write plan", path_);
  const uint64_t cluster = plan.cookie[1];
  ASSIGN_OR_RETURN(TableRef l2, GetL2(cluster >> h_.l2_bits, true));
  // The data must be durable before the table points at it.
  l2_cache_->DependsOnFlush();
  for (uint64_t i = 0; i < plan.cookie[2]; ++i) {
    const uint64_t index = (cluster + i) & (h_.l2_entries() - 1);
    StoreBE64(l2.data() + index * 8, plan.cookie[3] + i * h_.cluster_size());
  }
  l2.MarkDirty();
  return Status::Ok();
}

Status QcowMap::WriteCompressed(uint64_t guest_off, std::span<const std::byte> stream) {
  RETURN_IF_ERROR(CheckWritable());
  const uint64_t cs = h_.cluster_size();
  if (!IsAligned(guest_off, cs) || guest_off >= h_.virtual_size) {
    return Status::InvalidArgument("'{}': compressed write at 0x{:x} is not a whole cluster", path_,
                                   guest_off);
  }
  // The entry holds the length in cluster_bits bits.
  if (stream.empty() || stream.size() >= cs) {
    return Status::InvalidArgument("'{}': compressed stream of {} bytes does not fit a cluster", path_,
                                   stream.size());
  }
  const uint64_t l1i = guest_off / cs >> h_.l2_bits;
  RETURN_IF_ERROR(GetL2(l1i, true).status());
  // Streams are packed back to back at the end of the file, unaligned, as qemu packs them.
  ASSIGN_OR_RETURN(uint64_t host, AppendSpace(stream.size(), 1));
  if (host >= (uint64_t{1} << (63 - h_.cluster_bits))) {
    return Status::NoSpace("'{}': compressed cluster offset 0x{:x} does not fit a qcow table entry", path_,
                           host);
  }
  RETURN_IF_ERROR(file_->PWrite(host, stream, IoTag::kData)
                      .WithContext("'{}': writing a compressed cluster at 0x{:x}", path_, host));
  ASSIGN_OR_RETURN(TableRef l2, GetL2(l1i, true));
  l2_cache_->DependsOnFlush();
  const uint64_t index = (guest_off / cs) & (h_.l2_entries() - 1);
  StoreBE64(l2.data() + index * 8,
            kCompressedFlag | (uint64_t{stream.size()} << (63 - h_.cluster_bits)) | host);
  l2.MarkDirty();
  return Status::Ok();
}

Status QcowMap::MakeEmpty() {
  RETURN_IF_ERROR(CheckWritable());
  // Drop every L2 table, write the zeroed L1 table durably, then cut the file back to its
  // fixed metadata (qemu cuts it after the L1 table). A crash in between leaves unlinked
  // space at the end, nothing worse.
  for (uint64_t off : l1_) {
    if (off != 0) l2_cache_->Forget(off);
  }
  std::fill(l1_.begin(), l1_.end(), 0);
  dirty_l1_.clear();
  std::vector<std::byte> zeros(h_.l1_bytes());
  if (!zeros.empty()) {
    RETURN_IF_ERROR(
        file_->PWrite(h_.l1_offset, zeros, IoTag::kL1).WithContext("'{}': writing the qcow L1 table", path_));
  }
  RETURN_IF_ERROR(file_->Sync(true).WithContext("'{}': syncing", path_));
  const uint64_t keep = h_.fixed_metadata_end();
  RETURN_IF_ERROR(file_->Truncate(keep).WithContext("'{}': truncating", path_));
  end_ = keep;
  return Status::Ok();
}

Status QcowMap::WriteL1Entries() {
  // Runs of consecutive changed entries, each in one write; only the entries themselves,
  // since whatever follows the table is not ours to rewrite.
  while (!dirty_l1_.empty()) {
    const uint64_t first = *dirty_l1_.begin();
    uint64_t end = first + 1;
    while (dirty_l1_.contains(end)) ++end;
    std::vector<std::byte> raw((end - first) * 8);
    for (uint64_t i = first; i < end; ++i) StoreBE64(&raw[(i - first) * 8], l1_[i]);
    RETURN_IF_ERROR(file_->PWrite(h_.l1_offset + first * 8, raw, IoTag::kL1)
                        .WithContext("'{}': writing the qcow L1 table", path_));
    dirty_l1_.erase(dirty_l1_.begin(), dirty_l1_.lower_bound(end));
  }
  return Status::Ok();
}

Status QcowMap::WriteBack() {
  if (read_only_ || closed_) return Status::Ok();
  // Data (synced first: the L2 cache depends on a flush) -> L2 tables -> sync -> L1.
  RETURN_IF_ERROR(l2_cache_->Flush().WithContext("'{}': writing qcow L2 tables", path_));
  return WriteL1Entries();
}

Status QcowMap::SyncFiles() {
  if (read_only_ || closed_) return Status::Ok();
  return file_->Sync(true).WithContext("'{}': syncing", path_);
}

Status QcowMap::Close() {
  if (closed_) return Status::Ok();
  Status st = Flush();
  closed_ = true;
  return st;
}

std::optional<BackingRef> QcowMap::backing() const {
  if (h_.backing_name.empty()) return std::nullopt;
  // qcow stores no backing format: the backing image is probed.
  return BackingRef{h_.backing_name, ""};
}

FormatInfo QcowMap::Info() {
  FormatInfo info;
  info.format = "qcow";
  info.virtual_size = h_.virtual_size;
  info.cluster_size = h_.cluster_size();
  info.compression = Codec::kDeflateRaw;
  info.encrypted = h_.crypt_method == kCryptAes;
  return info;
}

}  // namespace vimgfs::qcow

// The engine: one format-independent implementation of read, write, zero, discard and
// flush over a ClusterMap and its backing chain.
//
// Locking (in this order, never the reverse):
//   1. range_lock_: cluster-granular. Reads and in-place writes hold their clusters
//      shared; allocating writes, zeroing and discards hold them exclusive, so nobody
//      reads a mapping that is being replaced or frees a cluster under a reader.
//   2. meta_mu_: held for every call into the format, never across data I/O, nor across
//      the final fsync of a flush (ClusterMap::SyncFiles). Exclusive, but shared for
//      lookups answered from cached tables (ClusterMap::LookupCached), so reads that hit
//      the cache run side by side.
//
// Write ordering: data (with the copy-on-write head and tail) is written before
// CommitWrite links it; the format's caches then order metadata write-back.
#include "vimgfs/image.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <list>
#include <set>

#include "engine/codec.h"
#include "util/range_lock.h"
#include "util/checked.h"
#include "util/limits.h"

namespace vimgfs {
namespace {

constexpr size_t kProbeBytes = 4096;
constexpr uint64_t kZeroChunk = 1 << 20;

const std::byte* ZeroBuffer() {
  static const std::byte* zeros = [] {
    auto* z = new std::byte[kZeroChunk];
    std::memset(z, 0, kZeroChunk);
    return z;
  }();
  return zeros;
}

// The last decompressed unit of each thread: sequential reads of a compressed image touch
// one unit with several requests. It is valid while its image's mapping generation is
// the one it was read under (Image::mapping_generation_).
struct DecompressedUnit {
  const File* file = nullptr;
  uint64_t host_offset = UINT64_MAX;
  uint64_t compressed_length = 0;  // cloop: an empty block may start where the next one does
  uint64_t generation = 0;
  std::vector<std::byte> data;
};
thread_local DecompressedUnit tls_unit;

// Generations are unique across images, so a unit cached for a closed image never
// matches a new image that reuses its addresses.
uint64_t NextMappingGeneration() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

// Counts a mutating call as finished when it returns (declared first in it, so it goes
// last), for Flush's group commit.
class WriteDone {
 public:
  explicit WriteDone(Image* img) : img_(img) {}
  ~WriteDone() { img_->writes_done_.fetch_add(1, std::memory_order_release); }
  WriteDone(const WriteDone&) = delete;
  WriteDone& operator=(const WriteDone&) = delete;

 private:
  Image* img_;
};

bool BlockStatus::Continues(const BlockStatus& prev) const {
  if (prev.offset + prev.length != offset) return false;
  if (depth != prev.depth || present != prev.present || zero != prev.zero || data != prev.data ||
      compressed != prev.compressed || has_offset != prev.has_offset)
    return false;
  if (has_offset) return filename == prev.filename && prev.host_offset + prev.length == host_offset;
  return true;
}

namespace {

// The name of the format whose magic `file` carries, or "raw".
Result<std::string> ProbeFile(File& file, const std::string& path) {
  std::vector<std::byte> head(kProbeBytes);
  RETURN_IF_ERROR(file.PRead(0, head));
  ASSIGN_OR_RETURN(uint64_t size, file.Size());
  std::span<const std::byte> h(head.data(), std::min<uint64_t>(size, kProbeBytes));
  const FormatDriver* best = nullptr;
  int best_score = 0;
  for (const FormatDriver* d : AllFormats()) {
    int score = d->Probe(h, path);
    if (score > best_score) {
      best = d;
      best_score = score;
    }
  }
  if (!best || best == FindFormat("raw")) {
    if (auto container = UndrivenContainer(h, path))
      return Status::Unsupported("'{}': image format '{}' is not supported", path, *container);
  }
  return std::string(best ? best->name() : "raw");
}

// The folder of a file's path: "." for none.
std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

Result<std::string> Image::Probe(Env& env, const std::string& path) {
  ASSIGN_OR_RETURN(auto file, env.Open(path, OpenMode::kReadOnly));
  return ProbeFile(*file, path);
}

// A backing chain that comes back to an image, worded as qemu-img words it; not nested in
// "Could not open backing file of" context, so it names the image that repeats.
namespace {
Status LoopError(const std::string& path) {
  return Status::Error(ErrorKind::kInvalidFormat, ELOOP,
                       fmt::format("Backing file '{}' creates an infinite loop.", path));
}
}  // namespace

bool IsBackingLoop(const Status& s) { return s.kind() == ErrorKind::kInvalidFormat && s.err() == ELOOP; }

// A read-write open of a format that is only read, worded as qemu-img words it.
namespace {
Status ReadOnlyFormatError(const std::string& path) {
  return Status::Error(ErrorKind::kReadOnly, EACCES, fmt::format("'{}': Image is read-only", path));
}
}  // namespace

bool IsReadOnlyFormat(const Status& s) { return s.kind() == ErrorKind::kReadOnly && s.err() == EACCES; }

// Opening is a static member so it can fill private state; the chain walk recurses.
struct ImageOpener {
  // `opened`: the file at `path` when the caller opened it already (a backing file, opened
  // race-free by OpenReference, read-only); null to open `path` here.
  static Result<std::unique_ptr<Image>> Open(const std::string& path, const OpenOptions& options, int depth,
                                             std::set<std::string>* seen,
                                             std::unique_ptr<File> opened = nullptr) {
    Env* env = options.env ? options.env : Env::Default();
    if (!opened) {
      ASSIGN_OR_RETURN(FileStat st, env->Stat(path));
      if (!st.exists) return Status::NotFound("Could not open '{}': No such file or directory", path);
      if (st.directory)
        return Status::InvalidArgument("'file' driver requires '{}' to be a regular file", path);
    }

    char real[PATH_MAX];
    std::string key = realpath(path.c_str(), real) ? std::string(real) : path;
    if (!seen->insert(key).second) return LoopError(path);
    if (depth > std::min(options.max_chain_depth, limits::kMaxChainDepth))
      return Status::InvalidFormat("Could not open '{}': backing chain deeper than {} images", path,
                                   limits::kMaxChainDepth);

    std::string format = options.driver ? options.driver->name() : options.format;
    bool probed = format.empty();
    bool read_only = options.read_only || !options.snapshot.empty();
    std::unique_ptr<File> file = std::move(opened);
    if (!file) {
      ASSIGN_OR_RETURN(file, env->Open(path, read_only ? OpenMode::kReadOnly : OpenMode::kReadWrite));
    }
    if (probed) {
      ASSIGN_OR_RETURN(format, ProbeFile(*file, path));
    }
    const FormatDriver* driver = options.driver ? options.driver : FindFormat(format);
    if (!driver && IsUndrivenQemuFormat(format))
      return Status::Unsupported("'{}': image format '{}' is not supported", path, format);
    if (!driver) return Status::InvalidArgument("Unknown driver '{}'", format);
    // qemu's read-only drivers refuse a read-write open first (bdrv_apply_auto_read_only).
    if (!read_only && driver->traits().read_only) return ReadOnlyFormatError(path);
    std::unique_ptr<Image> img(new Image());
    img->MappingChanged();
    img->env_ = env;
    img->path_ = path;
    img->format_ = format;
    img->driver_ = driver;
    img->cached_lookups_ = driver->traits().cached_lookups;
    img->file_ = file.get();
    img->probed_raw_ = probed && format == "raw";

    OpenContext ctx;
    ctx.env = env;
    ctx.path = path;
    ctx.file = std::move(file);
    ctx.options = options;
    ctx.options.env = env;
    ctx.options.read_only = read_only;
    ASSIGN_OR_RETURN(img->map_, driver->Open(std::move(ctx)));
    img->read_only_ = read_only || img->map_->read_only();
    img->size_ = img->map_->virtual_size();
    img->cluster_size_ = img->map_->cluster_size();
    if (img->cluster_size_ == 0 || !IsPowerOfTwo(img->cluster_size_))
      return Status::InvalidFormat("'{}': cluster size {} is not a power of two", path, img->cluster_size_);
    img->range_lock_ = std::make_unique<RangeLock>();
    img->key_secret_ = options.key_secret;
    img->backing_ref_ = img->map_->backing();

    if (img->backing_ref_ && options.open_backing) {
      const BackingSpec spec = options.backing_specs.empty() ? BackingSpec{} : options.backing_specs.front();
      OpenedReference ref;
      if (!spec.filename.empty()) {
        // Named on the user's own command line (backing.file.filename): any host file.
        auto f = env->Open(spec.filename, OpenMode::kReadOnly);
        if (!f.ok())
          return f.error().WithContext("Could not open backing file: Could not open '{}'", spec.filename);
        ref.path = spec.filename;
        ref.file = std::move(f).value();
      } else {
        auto opened =
            OpenReference(*env, path, img->backing_ref_->name, OpenMode::kReadOnly, options.untrusted);
        if (!opened.ok() && opened.error().kind() == ErrorKind::kNotFound)  // in qemu's words
          return Status::NotFound(
              "Could not open backing file: Could not open '{}': No such file or directory",
              JoinPath(DirOf(path), img->backing_ref_->name));
        if (!opened.ok()) return opened.error();
        ref = std::move(opened).value();
      }
      img->backing_path_ = ref.path;
      OpenOptions bo = options;
      bo.env = env;
      bo.read_only = true;
      bo.snapshot.clear();
      bo.data_file.clear();
      bo.format = spec.format.empty() ? img->backing_ref_->format : spec.format;
      if (!spec.key_secret.empty()) bo.key_secret = spec.key_secret;
      if (!bo.backing_specs.empty()) bo.backing_specs.erase(bo.backing_specs.begin());
      bo.driver = nullptr;
      if (!bo.format.empty() && !FindFormat(bo.format))
        return Status::Unsupported("'{}': unknown backing format '{}'", path, bo.format);
      auto backing = Open(img->backing_path_, bo, depth + 1, seen, std::move(ref.file));
      if (!backing.ok()) {
        if (IsBackingLoop(backing.error())) return backing.error();  // names the image, as qemu-img
        return backing.error().WithContext("Could not open backing file");
      }
      img->backing_ = std::move(backing).value();
    }
    return img;
  }
};

bool Image::ZeroInit() {
  std::lock_guard lk(meta_mu_);
  return map_->ZeroInit();
}

Result<std::unique_ptr<Image>> Image::Open(const std::string& path, const OpenOptions& options) {
  std::set<std::string> seen;
  return ImageOpener::Open(path, options, 0, &seen);
}

Result<std::unique_ptr<Image>> Image::OpenReferenced(const std::string& referrer_path,
                                                     const std::string& name, const OpenOptions& options) {
  OpenOptions o = options;
  o.read_only = true;
  if (!o.env) o.env = Env::Default();
  ASSIGN_OR_RETURN(OpenedReference ref,
                   OpenReference(*o.env, referrer_path, name, OpenMode::kReadOnly, o.untrusted));
  std::set<std::string> seen;
  return ImageOpener::Open(ref.path, o, 0, &seen, std::move(ref.file));
}

Status Image::Create(const std::string& format, CreateContext ctx, bool unsafe) {
  const FormatDriver* driver = FindFormat(format);
  if (!driver) return Status::InvalidArgument("Unknown file format '{}'", format);
  if (!ctx.env) ctx.env = Env::Default();
  if (ctx.backing && !ctx.backing->name.empty() && !unsafe) {
    // qemu-img opens the backing file to check it (and to take its size when none given).
    OpenOptions bo;
    bo.env = ctx.env;
    bo.format = ctx.backing->format;
    bo.no_io = true;  // its size is all that is read: an encrypted backing file needs no key
    auto b = OpenReferenced(ctx.path, ctx.backing->name, bo);
    if (!b.ok()) return b.error().WithContext("Could not open backing image");
    if (ctx.size == 0) ctx.size = (*b)->size();
    if (ctx.backing->format.empty()) ctx.backing->format = (*b)->format();
  }
  return driver->Create(ctx);
}

void Image::MappingChanged() {
  mapping_generation_.store(NextMappingGeneration(), std::memory_order_release);
}

Image::~Image() {
  if (!closed_) (void)Close();
}

Status Image::Close() {
  if (closed_) return Status::Ok();
  closed_ = true;
  // Invalidates the decompressed units of this image: the File they name goes away.
  MappingChanged();
  Status s;
  {
    std::lock_guard lk(meta_mu_);
    if (map_) s = map_->Close();  // null when the format's Open failed
  }
  if (backing_) {
    Status b = backing_->Close();
    if (s.ok()) s = b;
  }
  return s;
}

Status Image::CheckRange(const char* what, uint64_t off, uint64_t len, bool writes) const {
  if (writes && read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  if (off > size_ || len > size_ - off)
    return Status::OutOfRange("'{}': {} {:#x}+{:#x} is past the end of the disk ({} bytes)", path_, what, off,
                              len, size_);
  return Status::Ok();
}

Status Image::Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) {
  RETURN_IF_ERROR(CheckRange("range", off, len, false));
  size_t first = out->size();
  bool cached = false;
  if (cached_lookups_) {
    std::shared_lock lk(meta_mu_);
    cached = map_->LookupCached(off, len, out);
  }
  if (!cached) {
    out->resize(first);
    std::lock_guard lk(meta_mu_);
    RETURN_IF_ERROR(map_->Lookup(off, len, out));
  }
  // A format bug or a hostile table must not make us read or write outside the buffer.
  uint64_t covered = 0;
  for (size_t i = first; i < out->size(); i++) covered += (*out)[i].length;
  if (covered != len)
    return Status::Corrupt("'{}': mapping of {:#x}+{:#x} covers {:#x} bytes", path_, off, len, covered);
  return Status::Ok();
}

Status Image::ReadMapping(const Mapping& m, uint64_t off, std::span<std::byte> buf) {
  switch (m.kind) {
    case Mapping::Kind::kData:
      return m.file->PReadFor(m.host_offset, buf, off);
    case Mapping::Kind::kZero:
      std::memset(buf.data(), 0, buf.size());
      return Status::Ok();
    case Mapping::Kind::kUnallocated: {
      uint64_t from_backing = 0;
      if (backing_ && off < backing_->size()) {
        from_backing = std::min<uint64_t>(buf.size(), backing_->size() - off);
        RETURN_IF_ERROR(backing_->ReadUnlocked(off, buf.first(from_backing)));
      }
      std::memset(buf.data() + from_backing, 0, buf.size() - from_backing);
      return Status::Ok();
    }
    case Mapping::Kind::kCompressed: {
      if (m.unit_size == 0 || m.unit_size > limits::kMaxInflatedUnit ||
          m.compressed_length > limits::kMaxInflatedInput || off < m.unit_guest_offset ||
          off - m.unit_guest_offset + buf.size() > m.unit_size)
        return Status::Corrupt("'{}': compressed unit at {:#x} has an impossible size", path_, m.host_offset);
      DecompressedUnit& u = tls_unit;
      uint64_t gen = mapping_generation_.load(std::memory_order_acquire);
      if (u.file != m.file || u.host_offset != m.host_offset || u.compressed_length != m.compressed_length ||
          u.generation != gen || u.data.size() != m.unit_size) {
        std::vector<std::byte> in(m.compressed_length);
        RETURN_IF_ERROR(m.file->PRead(m.host_offset, in));
        u.file = nullptr;
        // A large unit (a cloop block of up to 64 MiB) is not kept for the thread's
        // smaller units after it.
        if (u.data.capacity() > limits::kMaxCompressedUnit && u.data.capacity() > 2 * uint64_t{m.unit_size})
          std::vector<std::byte>().swap(u.data);
        u.data.resize(m.unit_size);
        RETURN_IF_ERROR(Decompress(m.codec, in, u.data, m.stream_ends_unit)
                            .WithContext("'{}': compressed cluster at {:#x}", path_, m.host_offset));
        u.file = m.file;
        u.host_offset = m.host_offset;
        u.compressed_length = m.compressed_length;
        u.generation = gen;
      }
      std::memcpy(buf.data(), u.data.data() + (off - m.unit_guest_offset), buf.size());
      return Status::Ok();
    }
  }
  return Status::Corrupt("'{}': unknown mapping kind", path_);
}

Status Image::ReadUnlocked(uint64_t off, std::span<std::byte> buf) {
  std::vector<Mapping> maps;
  RETURN_IF_ERROR(Lookup(off, buf.size(), &maps));
  uint64_t pos = 0;
  for (const Mapping& m : maps) {
    RETURN_IF_ERROR(ReadMapping(m, off + pos, buf.subspan(pos, m.length)));
    pos += m.length;
  }
  return Status::Ok();
}

Status Image::Read(uint64_t off, std::span<std::byte> buf) {
  RETURN_IF_ERROR(CheckRange("read of", off, buf.size(), false));
  if (buf.empty()) return Status::Ok();
  RangeLock::Guard g(*range_lock_, AlignDown(off, cluster_size_), off + buf.size(), false);
  return ReadUnlocked(off, buf);
}

Status Image::CheckProbedRawHead(uint64_t off, std::span<const std::byte> buf) {
  // qemu refuses writes that would make a probed raw image look like another format:
  // the next open would then parse guest-controlled data as image metadata.
  if (!probed_raw_ || off >= 512) return Status::Ok();
  std::vector<std::byte> head(512);
  RETURN_IF_ERROR(ReadUnlocked(0, std::span(head).first(std::min<uint64_t>(512, size_))));
  std::memcpy(head.data() + off, buf.data(), std::min<uint64_t>(buf.size(), 512 - off));
  for (const FormatDriver* d : AllFormats()) {
    if (std::string_view(d->name()) != "raw" && d->Probe(head, path_) > 0)
      return Status::Error(ErrorKind::kReadOnly, EPERM,
                           fmt::format("'{}': refusing to write a {} header into an image probed as "
                                       "raw (open it with -f raw)",
                                       path_, d->name()));
  }
  return Status::Ok();
}

Status Image::Write(uint64_t off, std::span<const std::byte> buf) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("write of", off, buf.size(), true));
  if (buf.empty()) return Status::Ok();
  uint64_t lock_start = AlignDown(off, cluster_size_);
  uint64_t lock_end = off + buf.size();
  {
    // Fast path: every byte already has a writable home.
    RangeLock::Guard g(*range_lock_, lock_start, lock_end, false);
    RETURN_IF_ERROR(CheckProbedRawHead(off, buf));
    // Dirty bitmaps, before the bytes change (under the range lock: a whole-image change
    // such as a snapshot apply is not racing it).
    map_->NoteGuestWrite(off, buf.size());
    std::vector<Mapping> maps;
    RETURN_IF_ERROR(Lookup(off, buf.size(), &maps));
    bool in_place = std::all_of(maps.begin(), maps.end(), [](const Mapping& m) {
      return m.kind == Mapping::Kind::kData && m.writable;
    });
    if (in_place) {
      uint64_t pos = 0;
      for (const Mapping& m : maps) {
        RETURN_IF_ERROR(
            m.file->PWriteFor(m.host_offset, buf.subspan(pos, m.length), off + pos, IoTag::kData));
        pos += m.length;
      }
      return Status::Ok();
    }
  }
  RangeLock::Guard g(*range_lock_, lock_start, AlignUp(lock_end, cluster_size_), true);
  return WriteAllocating(off, buf);
}

Result<WritePlan> Image::PlanWrite(uint64_t pos, uint64_t len, uint64_t max_end) {
  std::lock_guard lk(meta_mu_);
  ASSIGN_OR_RETURN(WritePlan plan, map_->PrepareWrite(pos, len));
  const uint64_t plan_end = plan.guest_offset + plan.length;
  if (plan.guest_offset > pos || plan_end <= pos || plan_end > max_end || plan.file == nullptr) {
    map_->AbortWrite(plan);
    return Status::Corrupt("'{}': format planned {:#x}+{:#x} for a write at {:#x}", path_, plan.guest_offset,
                           plan.length, pos);
  }
  return plan;
}

Status Image::FinishPlan(const WritePlan& plan, const Status& data_written) {
  std::lock_guard lk(meta_mu_);
  if (!data_written.ok()) {
    map_->AbortWrite(plan);
    return data_written;
  }
  RETURN_IF_ERROR(map_->CommitWrite(plan));
  MappingChanged();
  return Status::Ok();
}

Status Image::WriteAllocating(uint64_t off, std::span<const std::byte> buf) {
  // REQUIRES: the clusters of [off, off+len) locked exclusive.
  const uint64_t end = off + buf.size();
  uint64_t pos = off;
  std::vector<Mapping> maps;
  std::vector<std::byte> staging;
  while (pos < end) {
    maps.clear();
    RETURN_IF_ERROR(Lookup(pos, end - pos, &maps));
    const Mapping& m = maps.front();
    if (m.kind == Mapping::Kind::kData && m.writable) {
      RETURN_IF_ERROR(m.file->PWriteFor(m.host_offset, buf.subspan(pos - off, m.length), pos, IoTag::kData));
      pos += m.length;
      continue;
    }
    ASSIGN_OR_RETURN(const WritePlan plan, PlanWrite(pos, end - pos, AlignUp(size_, cluster_size_)));
    const uint64_t plan_end = plan.guest_offset + plan.length;
    const uint64_t data_end = std::min(end, plan_end);
    Status s;
    if (plan.guest_offset == pos && data_end == plan_end) {
      // The request covers the plan: write straight from the caller's buffer.
      s = WritePlanData(plan, 0, buf.subspan(pos - off, plan.length), IoTag::kData);
    } else {
      // Copy-on-write: head and tail keep the current content (backing, compressed, zero).
      staging.resize(plan.length);
      std::span<std::byte> st(staging);
      uint64_t head = pos - plan.guest_offset;
      uint64_t readable_end = std::min(plan_end, size_);
      if (head) s = ReadUnlocked(plan.guest_offset, st.first(head));
      std::memcpy(staging.data() + head, buf.data() + (pos - off), data_end - pos);
      if (s.ok() && data_end < readable_end)
        s = ReadUnlocked(data_end, st.subspan(data_end - plan.guest_offset, readable_end - data_end));
      if (readable_end < plan_end)  // past the disk end inside the last cluster
        std::memset(staging.data() + (readable_end - plan.guest_offset), 0, plan_end - readable_end);
      if (s.ok()) s = plan.fresh ? WriteSkippingZeros(plan, st) : WritePlanData(plan, 0, st, IoTag::kCowData);
    }
    RETURN_IF_ERROR(FinishPlan(plan, s));
    pos = data_end;
  }
  return Status::Ok();
}

Status Image::WriteSkippingZeros(const WritePlan& plan, std::span<const std::byte> data) {
  // 4 KiB pieces: the host file's block, and small enough that a sparse fill stays sparse.
  constexpr uint64_t kPiece = 4096;
  auto is_zero = [&](uint64_t at, uint64_t n) { return std::memcmp(data.data() + at, ZeroBuffer(), n) == 0; };
  for (uint64_t at = 0; at < data.size();) {
    uint64_t n = std::min(kPiece, data.size() - at);
    if (is_zero(at, n)) {
      at += n;
      continue;
    }
    uint64_t run_end = at + n;
    while (run_end < data.size() && !is_zero(run_end, std::min(kPiece, data.size() - run_end)))
      run_end += std::min(kPiece, data.size() - run_end);
    RETURN_IF_ERROR(WritePlanData(plan, at, data.subspan(at, run_end - at), IoTag::kCowData));
    at = run_end;
  }
  // The whole range inside the file, as a written one would be.
  return GrowFileTo(*plan.file, plan.host_offset + plan.length);
}

Status Image::WritePlanData(const WritePlan& plan, uint64_t at, std::span<const std::byte> data, IoTag tag) {
  std::shared_lock g(grow_mu_);
  return plan.file->PWriteFor(plan.host_offset + at, data, plan.guest_offset + at, tag);
}

Status Image::GrowFileTo(File& file, uint64_t end) {
  std::unique_lock g(grow_mu_);
  std::lock_guard lk(meta_mu_);
  ASSIGN_OR_RETURN(uint64_t size, file.Size());
  return end > size ? file.Truncate(end) : Status::Ok();
}

Status Image::FillHost(const WritePlan& plan, Fill fill) {
  if (fill != Fill::kZeros) {
    // Reused free clusters may hold old bytes: a hole reads as zeros. Space past the end
    // of the file is zeros already; the file grows over it (qemu-img check wants every
    // cluster inside the file).
    const uint64_t end = plan.host_offset + plan.length;
    ASSIGN_OR_RETURN(uint64_t file_size, plan.file->Size());
    Status s;
    if (plan.host_offset < file_size)
      s = plan.file->PunchHole(plan.host_offset, std::min(end, file_size) - plan.host_offset);
    if (s.ok() && fill == Fill::kReserved) return plan.file->Allocate(plan.host_offset, plan.length);
    if (s.ok()) return end > file_size ? GrowFileTo(*plan.file, end) : s;
    if (s.kind() != ErrorKind::kUnsupported) return s;
  }
  for (uint64_t done = 0; done < plan.length;) {
    uint64_t n = std::min(kZeroChunk, plan.length - done);
    RETURN_IF_ERROR(WritePlanData(plan, done, {ZeroBuffer(), n}, IoTag::kData));
    done += n;
  }
  return Status::Ok();
}

Status Image::Preallocate(uint64_t off, uint64_t len, Fill fill) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("preallocation of", off, len, true));
  const uint64_t end = off + len;
  RangeLock::Guard g(*range_lock_, AlignDown(off, cluster_size_), AlignUp(end, cluster_size_), true);
  std::vector<Mapping> maps;
  for (uint64_t pos = off; pos < end;) {
    maps.clear();
    RETURN_IF_ERROR(Lookup(pos, end - pos, &maps));
    const Mapping m = maps.front();
    // Zeros with no host cluster (what a grow over a longer backing image leaves) get one
    // too, as qemu's preallocating truncate gives them.
    const bool homeless_zero = m.kind == Mapping::Kind::kZero && m.file == nullptr;
    if (m.kind == Mapping::Kind::kData && m.writable && fill != Fill::kHole) {
      // The old last cluster, partly past the old end: qemu's falloc and full give the
      // cluster a new home that is zero past the old end. Zeros written in place there
      // allocate the same host space and read the same.
      RETURN_IF_ERROR(m.file->PWriteFor(m.host_offset,
                                        {ZeroBuffer(), static_cast<size_t>(std::min(m.length, kZeroChunk))},
                                        pos, IoTag::kData));
      pos += std::min(m.length, kZeroChunk);
      continue;
    }
    if ((m.kind != Mapping::Kind::kUnallocated && !homeless_zero) || backing_) {
      pos += m.length;  // has a home already, or shows backing data: not ours to replace
      continue;
    }
    // A cluster the disk ends in counts as whole: nothing past the end is kept.
    const uint64_t whole_end = end == size_ ? AlignUp(end, cluster_size_) : AlignDown(end, cluster_size_);
    if (pos % cluster_size_ != 0 || pos + cluster_size_ > whole_end) {
      // Part of a cluster: written like any write (the rest of it keeps its bytes).
      uint64_t n = std::min(end, AlignDown(pos, cluster_size_) + cluster_size_) - pos;
      RETURN_IF_ERROR(WriteAllocating(pos, {ZeroBuffer(), n}));
      pos += n;
      continue;
    }
    const uint64_t run = std::min(pos + m.length, whole_end) - pos;
    // Whole clusters from pos: the plan starts there (no copy-on-write head).
    ASSIGN_OR_RETURN(const WritePlan plan, PlanWrite(pos, run, AlignUp(pos + run, cluster_size_)));
    if (plan.guest_offset != pos) {
      RETURN_IF_ERROR(FinishPlan(
          plan, Status::Corrupt("'{}': format planned {:#x} for {:#x}", path_, plan.guest_offset, pos)));
    }
    RETURN_IF_ERROR(FinishPlan(plan, FillHost(plan, fill)));
    // qemu's metadata preallocation zeroes such a run after allocating it: the clusters
    // keep their zero flag over the new home (with falloc and full they are data).
    if (homeless_zero && fill == Fill::kHole)
      RETURN_IF_ERROR(ZeroUnlocked(plan.guest_offset, std::min(plan.length, size_ - plan.guest_offset),
                                   /*unmap=*/false, ZeroMode::kZero));
    pos += plan.length;
  }
  return Status::Ok();
}

// Before a grow that must hide the backing image, qemu writes zeros over the rest of the
// last (sub)cluster (the bytes past the old end become guest bytes, and may hold stale data
// from before a shrink, or show the backing image): a plain write, which allocates where
// the (sub)cluster is not writable data of its own. Here its in-disk part is rewritten with
// its own content first (what the guest reads does not change; copy-on-write gives it a home
// of its own with zeros past the disk end), and the format then zeroes past the end in place.
Status Image::SettleLastCluster() {
  const uint64_t unit = map_->subcluster_size();
  if (size_ % unit == 0) return Status::Ok();
  const uint64_t from = AlignDown(size_, unit);
  RangeLock::Guard g(*range_lock_, AlignDown(size_, cluster_size_), AlignUp(size_, cluster_size_), true);
  std::vector<Mapping> maps;
  RETURN_IF_ERROR(Lookup(from, size_ - from, &maps));
  if (std::all_of(maps.begin(), maps.end(),
                  [](const Mapping& m) { return m.kind == Mapping::Kind::kData && m.writable; }))
    return Status::Ok();
  std::vector<std::byte> buf(size_ - from);
  RETURN_IF_ERROR(ReadUnlocked(from, buf));
  return WriteAllocating(from, buf);
}

Status Image::Resize(uint64_t new_size, bool allow_shrink, bool metadata_prealloc) {
  WriteDone done(this);
  if (read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  // qemu's bdrv_co_truncate asks for zeros (BDRV_REQ_ZERO_WRITE) exactly then.
  const bool zero_grown = new_size > size_ && backing_ && backing_->size() > size_;
  if (zero_grown) RETURN_IF_ERROR(SettleLastCluster());
  {
    std::lock_guard lk(meta_mu_);
    using GrowZeros = ClusterMap::GrowZeros;
    RETURN_IF_ERROR(map_->Resize(new_size, allow_shrink,
                                 !zero_grown         ? GrowZeros::kNone
                                 : metadata_prealloc ? GrowZeros::kWithHomes
                                                     : GrowZeros::kZeros));
    MappingChanged();
    size_ = map_->virtual_size();
  }
  return Status::Ok();
}

Status Image::ChangeWhole(bool writes, const std::function<Status(ClusterMap&)>& change) {
  WriteDone done(this);
  if (writes && read_only_) return Status::ReadOnly("'{}' is opened read-only", path_);
  RangeLock::Guard g(*range_lock_, 0, UINT64_MAX, true);
  std::lock_guard lk(meta_mu_);
  Status s = change(*map_);
  MappingChanged();
  size_ = map_->virtual_size();
  return s;
}

std::vector<File*> Image::host_files() {
  std::lock_guard lk(meta_mu_);
  return map_->host_files();
}

Result<CheckReport> Image::Check(RepairMode mode) {
  std::optional<Result<CheckReport>> report;
  Status s = ChangeWhole(mode != RepairMode::kNone, [&](ClusterMap& m) {
    report.emplace(m.Check(mode));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return std::move(*report);
}

Status Image::SnapshotCreate(const std::string& name) {
  return ChangeWhole(true, [&](ClusterMap& m) { return m.SnapshotCreate(name); });
}

Status Image::SnapshotApply(const std::string& name) {
  return ChangeWhole(true, [&](ClusterMap& m) { return m.SnapshotApply(name); });
}

Status Image::SnapshotDelete(const std::string& name) {
  return ChangeWhole(true, [&](ClusterMap& m) { return m.SnapshotDelete(name); });
}

Status Image::MakeEmpty() {
  return ChangeWhole(true, [](ClusterMap& m) { return m.MakeEmpty(); });
}

Status Image::SetBacking(const std::optional<BackingRef>& ref) {
  RETURN_IF_ERROR(ChangeWhole(true, [&](ClusterMap& m) { return m.SetBacking(ref); }));
  backing_ref_ = ref;
  return Status::Ok();
}

Status Image::Amend(const AmendRequest& req) {
  using Stage = ClusterMap::AmendStage;
  RETURN_IF_ERROR(ChangeWhole(true, [&](ClusterMap& m) { return m.Amend(req, Stage::kMain); }));
  // qemu takes size=0 as "not given"; a new size is exact, shrinking included.
  auto size = req.options.find("size");
  uint64_t new_size = size == req.options.end() ? 0 : std::strtoull(size->second.c_str(), nullptr, 10);
  if (new_size != 0) RETURN_IF_ERROR(Resize(new_size, /*allow_shrink=*/true));
  return ChangeWhole(true, [&](ClusterMap& m) { return m.Amend(req, Stage::kAfterResize); });
}

Status Image::WriteCompressed(uint64_t off, std::span<const std::byte> stream) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("compressed write of", off, 0, true));

  if (off % cluster_size_ != 0 || off == size_)
    return Status::InvalidArgument("'{}': compressed write at {:#x} is not a whole cluster", path_, off);
  RangeLock::Guard g(*range_lock_, off, off + cluster_size_, true);
  map_->NoteGuestWrite(off, std::min(cluster_size_, size_ - off));
  // The format writes the stream under the metadata lock: convert is its one writer.
  std::lock_guard lk(meta_mu_);
  Status s = map_->WriteCompressed(off, stream);
  MappingChanged();
  return s;
}

// Whether [off, off+len) already reads as zeros without any I/O (zero or unallocated
// with nothing behind it).
bool Image::KnownZero(uint64_t off, uint64_t len) {
  std::vector<Mapping> maps;
  if (!Lookup(off, len, &maps).ok()) return false;
  for (const Mapping& m : maps) {
    if (m.kind == Mapping::Kind::kZero) continue;
    if (m.kind == Mapping::Kind::kUnallocated && !backing_) continue;
    return false;
  }
  return true;
}

Status Image::WriteZeroChunks(uint64_t off, uint64_t len) {
  while (len > 0) {
    uint64_t n = std::min(len, kZeroChunk);
    if (!KnownZero(off, n)) RETURN_IF_ERROR(WriteAllocating(off, {ZeroBuffer(), n}));
    off += n;
    len -= n;
  }
  return Status::Ok();
}

Status Image::ZeroUnlocked(uint64_t off, uint64_t len, bool unmap, ZeroMode mode) {
  // REQUIRES: clusters of the range locked exclusive.
  const bool discard = mode == ZeroMode::kDiscard, fast_only = mode == ZeroMode::kFastOnly;
  const uint64_t end = off + len;
  uint64_t a = AlignUp(off, cluster_size_);
  uint64_t b = end == size_ ? end : AlignDown(end, cluster_size_);
  if (a >= b || a > end) {  // no whole cluster inside
    return discard ? Status::Ok() : WriteZeroChunks(off, len);
  }
  // Fast-only: the whole clusters first, so a format that would have to write them fails
  // before anything changed.
  if (!discard && !fast_only && off < a) RETURN_IF_ERROR(WriteZeroChunks(off, a - off));
  Status s;
  {
    std::lock_guard lk(meta_mu_);
    s = discard ? map_->Discard(a, b - a) : map_->ZeroRange(a, b - a, unmap);
    MappingChanged();
  }
  if (fast_only && s.kind() == ErrorKind::kUnsupported)
    return Status::Error(ErrorKind::kUnsupported, ENOTSUP, "the format cannot zero without writing");
  if (!discard && s.kind() == ErrorKind::kUnsupported) s = WriteZeroChunks(a, b - a);
  if (discard && s.kind() == ErrorKind::kUnsupported) s = Status::Ok();  // discard is advisory
  RETURN_IF_ERROR(s);
  if (fast_only && off < a) RETURN_IF_ERROR(WriteZeroChunks(off, a - off));
  if (!discard && b < end) RETURN_IF_ERROR(WriteZeroChunks(b, end - b));
  return Status::Ok();
}

Status Image::WriteZeroes(uint64_t off, uint64_t len, bool unmap) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("zeroing", off, len, true));
  if (len == 0) return Status::Ok();
  RangeLock::Guard g(*range_lock_, AlignDown(off, cluster_size_), AlignUp(off + len, cluster_size_), true);
  map_->NoteGuestWrite(off, len);
  return ZeroUnlocked(off, len, unmap, ZeroMode::kZero);
}

Status Image::WriteZeroesFast(uint64_t off, uint64_t len, bool unmap) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("zeroing", off, len, true));
  if (len == 0) return Status::Ok();
  RangeLock::Guard g(*range_lock_, AlignDown(off, cluster_size_), AlignUp(off + len, cluster_size_), true);
  map_->NoteGuestWrite(off, len);
  return ZeroUnlocked(off, len, unmap, ZeroMode::kFastOnly);
}

Status Image::Discard(uint64_t off, uint64_t len) {
  WriteDone done(this);
  RETURN_IF_ERROR(CheckRange("discard of", off, len, true));
  if (len == 0) return Status::Ok();
  RangeLock::Guard g(*range_lock_, AlignDown(off, cluster_size_), AlignUp(off + len, cluster_size_), true);
  map_->NoteGuestWrite(off, len);
  return ZeroUnlocked(off, len, false, ZeroMode::kDiscard);
}

Status Image::FlushNow() {
  {
    std::lock_guard lk(meta_mu_);
    RETURN_IF_ERROR(map_->WriteBack());
  }
  return map_->SyncFiles();
}

int Image::flushes_waiting() {
  std::lock_guard lk(flush_mu_);
  return flush_waiters_;
}

Status Image::Flush() {
  if (read_only_) return Status::Ok();
  const uint64_t need = writes_done_.load(std::memory_order_acquire);
  std::unique_lock lk(flush_mu_);
  if (flushing_) {
    // One is under way, maybe begun before some of our writes finished: wait for it.
    // Either it covered them, or the next one does (run by one of those waiting).
    flush_waiters_++;
    while (flushing_ && flushed_through_ < need) flush_cv_.wait(lk);
    flush_waiters_--;
    if (flushed_through_ >= need) return Status::Ok();
  }
  flushing_ = true;
  const uint64_t covers = writes_done_.load(std::memory_order_acquire);
  lk.unlock();
  Status s = FlushNow();
  lk.lock();
  flushing_ = false;
  if (s.ok()) flushed_through_ = std::max(flushed_through_, covers);
  flush_cv_.notify_all();
  return s;
}

FormatInfo Image::Info() {
  std::lock_guard lk(meta_mu_);
  return map_->Info();
}

Result<std::vector<BlockStatus>> Image::Map(uint64_t off, uint64_t len, bool this_image_only) {
  return MapImpl(off, len, this_image_only, false);
}

Result<std::vector<BlockStatus>> Image::MapAsQemu(uint64_t off, uint64_t len) {
  return MapImpl(off, len, false, true);
}

Result<std::vector<BlockStatus>> Image::MapImpl(uint64_t off, uint64_t len, bool this_image_only,
                                                bool as_qemu) {
  RETURN_IF_ERROR(CheckRange("map of", off, len, false));
  if (as_qemu && !traits().block_status) {
    // qemu's generic answer for such a driver: allocated data, its place unknown.
    BlockStatus all;
    all.offset = off;
    all.length = len;
    all.present = all.data = true;
    if (len == 0) return std::vector<BlockStatus>{};
    return std::vector<BlockStatus>{all};
  }
  std::vector<BlockStatus> out;
  auto push = [&out](const BlockStatus& bs) {
    if (bs.length == 0) return;
    if (!out.empty() && bs.Continues(out.back())) {
      out.back().length += bs.length;
    } else {
      out.push_back(bs);
    }
  };
  // The copying tools always want the host file's holes (they read as zeros); qemu-img
  // map shows them only where the format's block status looks at the host file.
  bool probe_holes = true;
  if (as_qemu) {
    std::lock_guard lk(meta_mu_);
    ASSIGN_OR_RETURN(probe_holes, map_->MapShowsHostHoles());
  }
  // Walk in bounded steps so a huge sparse disk needs no huge mapping vector.
  constexpr uint64_t kStep = 1ull << 30;
  std::vector<Mapping> maps;
  for (uint64_t pos = off; pos < off + len;) {
    uint64_t n = std::min(kStep, off + len - pos);
    maps.clear();
    RETURN_IF_ERROR(Lookup(pos, n, &maps));
    for (const Mapping& m : maps) {
      BlockStatus bs;
      bs.offset = pos;
      bs.length = m.length;
      switch (m.kind) {
        case Mapping::Kind::kData: {
          // Holes in the host file read as zeros: report them as qemu does (data, zero).
          bs.present = bs.data = true;
          if (m.encrypted) {  // qemu reports no offset for encrypted clusters
            push(bs);
            break;
          }
          bs.has_offset = true;
          bs.filename = m.file->path();
          if (m.opaque_data || !probe_holes) {
            bs.host_offset = m.host_offset;
            push(bs);
            break;
          }
          for (uint64_t done = 0; done < m.length;) {
            ASSIGN_OR_RETURN(HostExtent ext, m.file->ProbeExtent(m.host_offset + done));
            uint64_t n = ext.length == 0 ? m.length - done : std::min(ext.length, m.length - done);
            bs.offset = pos + done;
            bs.length = n;
            bs.host_offset = m.host_offset + done;
            bs.zero = ext.length == 0 || !ext.data;  // past EOF reads zeros too
            // qemu-img map shows x-dirty-bitmap's flags; to copy, the bytes are data.
            if (as_qemu && ext.context_flags && ext.length != 0) {
              bs.data = (*ext.context_flags & 1) == 0;
              bs.zero = (*ext.context_flags & 2) != 0;
              bs.present = bs.has_offset = bs.data || bs.zero;
            }
            push(bs);
            done += n;
          }
          break;
        }
        case Mapping::Kind::kCompressed:
          bs.present = bs.data = bs.compressed = true;
          push(bs);
          break;
        case Mapping::Kind::kZero:
          bs.present = bs.zero = true;
          if (m.file && !m.encrypted) {
            bs.has_offset = true;
            bs.host_offset = m.host_offset;
            bs.filename = m.file->path();
          }
          push(bs);
          break;
        case Mapping::Kind::kUnallocated: {
          if (this_image_only || !backing_) {
            bs.depth = this_image_only ? 1 : 0;
            bs.zero = !backing_;
            push(bs);
            break;
          }
          uint64_t in_backing = pos < backing_->size() ? std::min(m.length, backing_->size() - pos) : 0;
          if (in_backing) {
            ASSIGN_OR_RETURN(auto sub, backing_->MapImpl(pos, in_backing, false, as_qemu));
            for (BlockStatus& b : sub) {
              b.depth += 1;
              push(b);
            }
          }
          if (in_backing < m.length) {
            BlockStatus tail;
            tail.offset = pos + in_backing;
            tail.length = m.length - in_backing;
            // qemu-img map: the image over a shorter backing file reports the part past
            // that file's end as its own zeros (depth 0); the copying tools read it as
            // belonging to the backing chain.
            tail.depth = as_qemu ? 0 : 1;
            tail.zero = true;
            push(tail);
          }
          break;
        }
      }
      pos += m.length;
    }
  }
  return out;
}

namespace {

// The multiplier of a size suffix (binary units), 0 for none.
uint64_t SuffixMultiplier(char c) {
  switch (c) {
    case 'b':
    case 'B':
      return 1;
    case 'k':
    case 'K':
      return 1ull << 10;
    case 'm':
    case 'M':
      return 1ull << 20;
    case 'g':
    case 'G':
      return 1ull << 30;
    case 't':
    case 'T':
      return 1ull << 40;
    case 'p':
    case 'P':
      return 1ull << 50;
    case 'e':
    case 'E':
      return 1ull << 60;
    default:
      return 0;
  }
}

}  // namespace

// As qemu_strtosz: a decimal integer (or 0x hex), an optional fraction, an optional
// suffix; a fraction needs a suffix other than B; the result is exact (64.64 fixed
// point), a half byte rounds up.
Result<uint64_t> ParseSize(std::string_view text) {
  const std::string s(text);
  auto invalid = [&] { return Status::InvalidArgument("'{}' is not a size", s); };
  auto too_large = [&] { return Status::OutOfRange("size '{}' is too large", s); };
  const char* p = s.c_str();
  char* end = nullptr;
  errno = 0;
  uint64_t whole = std::strtoull(p, &end, 10);
  if (end == p) return invalid();
  if (std::memchr(p, '-', static_cast<size_t>(end - p))) return invalid();
  bool overflow = errno == ERANGE;
  unsigned __int128 fraction = 0;                                 // of 2^64
  if (!overflow && whole == 0 && (*end == 'x' || *end == 'X')) {  // hex, no fraction
    errno = 0;
    whole = std::strtoull(p, &end, 16);
    if (end == p || *end == '.') return invalid();
    overflow = errno == ERANGE;
  }
  if (overflow) return *end ? invalid() : too_large();
  if (*end == '.') {
    char* fend = nullptr;
    errno = 0;
    double f = std::strtod(end, &fend);
    if (fend == end || !std::isfinite(f)) {
      end++;  // "1.k": no digits after the point
    } else {
      if (std::memchr(end, 'e', static_cast<size_t>(fend - end)) ||
          std::memchr(end, 'E', static_cast<size_t>(fend - end)))
        return invalid();
      fraction = f < 1.0 ? static_cast<uint64_t>(f * 0x1p64) : ~0ull;
      end = fend;
    }
  }
  uint64_t mult = SuffixMultiplier(*end);
  if (mult) end++;
  if (*end) return invalid();
  if (mult <= 1) {
    if (fraction != 0) return invalid();
    return whole;
  }
  unsigned __int128 value = static_cast<unsigned __int128>(whole) * mult;
  unsigned __int128 frac = fraction * mult;  // 64.64: integer part above bit 64
  value += frac >> 64;
  value += (frac >> 63) & 1;  // a half byte or more rounds up
  if (value >> 64) return too_large();
  return static_cast<uint64_t>(value);
}

}  // namespace vimgfs

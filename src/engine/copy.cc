// The copy pipeline (include/vimgfs/copy.h): a reading thread ahead of the writer for plain
// copies; batches of clusters compressed on every core, stored strictly in order.
#include "vimgfs/copy.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <cerrno>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/codec.h"
#include "util/checked.h"

namespace vimgfs {
namespace {

constexpr uint64_t kMapWindow = 1ull << 30;
constexpr uint64_t kCopyChunk = 2ull << 20;

bool AllZero(const std::byte* p, size_t n) {
  // Word at a time; the buffers come from std::vector (suitably aligned).
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w) return false;
  }
  for (; i < n; i++)
    if (p[i] != std::byte{0}) return false;
  return true;
}

Status WithOffset(const Status& s, const char* what, uint64_t off) {
  return Status::Error(s.kind(), s.err(),
                       fmt::format("error while {} at byte {}: {}", what, off, s.message()));
}

// What qemu-img's progress figure counts of a run: the data copied, and with -S 0 the zeros
// written too; not what the target's backing file provides.
uint64_t CountedBytes(const BlockStatus& r, const CopyOptions& s) {
  if (s.target_has_backing && r.depth > 0) return 0;
  if (r.zero && s.zero_runs) return 0;
  return r.length;
}

// qemu-img's progress figure for a conversion: 100 * done / total of the counted bytes,
// moved on as each piece is copied (a run of at most 2 MiB, or a cluster when compressing).
class ProgressCount {
 public:
  ProgressCount(const std::function<void(double)>& report, uint64_t total) : report_(report), total_(total) {}
  void Add(uint64_t n) {
    if (!report_ || total_ == 0) return;
    done_ += n;
    report_(100.0 * static_cast<double>(done_) / static_cast<double>(total_));
  }

 private:
  const std::function<void(double)>& report_;
  uint64_t total_, done_ = 0;
};

// A raw image without a backing file: its file is the disk, byte for byte.
Image* RawAlone(Image* image) {
  if (!image || image->format() != "raw" || image->backing()) return nullptr;
  return image->file().fd() >= 0 ? image : nullptr;
}

}  // namespace

// The descriptor of `filename` among the image files of a chain (not the data files,
// which the engine keeps to itself: their runs are copied through the pipeline).
int ChainFd(Image* image, const std::string& filename) {
  for (Image* i = image; i != nullptr; i = i->backing())
    if (i->file().path() == filename) return i->file().fd();
  return -1;
}

int ImageSource::HostFd(const std::string& filename) { return ChainFd(image_, filename); }

int ConcatSource::HostFd(const std::string& filename) {
  for (const auto& image : images_)
    if (int fd = ChainFd(image.get(), filename); fd >= 0) return fd;
  return -1;
}

Status ImageSource::Read(uint64_t off, std::span<std::byte> buf) {
  if (!image_) return buf.empty() ? Status::Ok() : Status::OutOfRange("read past the end of an empty disk");
  return image_->Read(off, buf);
}

Result<std::vector<BlockStatus>> ImageSource::Map(uint64_t off, uint64_t len, bool top_only) {
  if (!image_) return std::vector<BlockStatus>{};
  return image_->Map(off, len, top_only);
}

ConcatSource::ConcatSource(std::vector<std::unique_ptr<Image>> images) : images_(std::move(images)) {
  for (const auto& img : images_) {
    starts_.push_back(size_);
    size_ += img->size();
  }
}

const std::string& ConcatSource::NameAt(uint64_t off) const {
  size_t i = std::upper_bound(starts_.begin(), starts_.end(), off) - starts_.begin();
  return images_[i ? i - 1 : 0]->path();
}

Status ConcatSource::Read(uint64_t off, std::span<std::byte> buf) {
  uint64_t done = 0;
  for (size_t i = 0; i < images_.size() && done < buf.size(); i++) {
    uint64_t start = starts_[i], end = start + images_[i]->size();
    uint64_t pos = off + done;
    if (pos >= end) continue;
    uint64_t n = std::min<uint64_t>(buf.size() - done, end - pos);
    RETURN_IF_ERROR(images_[i]->Read(pos - start, buf.subspan(done, n)));
    done += n;
  }
  if (done != buf.size()) return Status::OutOfRange("read past the end of the sources");
  return Status::Ok();
}

Result<std::vector<BlockStatus>> ConcatSource::Map(uint64_t off, uint64_t len, bool top_only) {
  std::vector<BlockStatus> out;
  uint64_t stop = off + len;
  for (size_t i = 0; i < images_.size(); i++) {
    uint64_t start = starts_[i], end = start + images_[i]->size();
    if (end <= off || start >= stop) continue;
    uint64_t a = std::max(off, start), b = std::min(stop, end);
    ASSIGN_OR_RETURN(auto runs, images_[i]->Map(a - start, b - a, top_only));
    for (BlockStatus& r : runs) {
      r.offset += start;
      out.push_back(std::move(r));
    }
  }
  return out;
}

namespace {

// Holds the writer back to `rate` bytes per second on average (qemu's throttle on the
// target of convert -r and commit -r).
class RateLimiter {
 public:
  explicit RateLimiter(uint64_t rate) : rate_(rate), start_(std::chrono::steady_clock::now()) {}
  void Spend(uint64_t bytes) {
    if (rate_ == 0) return;
    spent_ += bytes;
    const auto due = start_ + std::chrono::microseconds(static_cast<int64_t>(
                                  static_cast<double>(spent_) * 1e6 / static_cast<double>(rate_)));
    std::this_thread::sleep_until(due);
  }

 private:
  uint64_t rate_;
  uint64_t spent_ = 0;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

Status SalvagingSource::Read(uint64_t off, std::span<std::byte> buf) {
  if (inner_.Read(off, buf).ok()) return Status::Ok();
  constexpr uint64_t kSector = 512;
  for (uint64_t pos = 0; pos < buf.size(); pos += kSector) {
    std::span<std::byte> sector = buf.subspan(pos, std::min<uint64_t>(kSector, buf.size() - pos));
    Status st = inner_.Read(off + pos, sector);
    if (st.ok()) continue;
    warn_(fmt::format("error while reading offset {}: {}", off + pos,
                      std::strerror(st.err() ? st.err() : EIO)));
    std::fill(sector.begin(), sector.end(), std::byte{0});
  }
  return Status::Ok();
}

Result<std::vector<BlockStatus>> SalvagingSource::Map(uint64_t off, uint64_t len, bool top_only) {
  constexpr uint64_t kSector = 512;
  std::vector<BlockStatus> out;
  uint64_t n = len;
  for (uint64_t pos = off, end = off + len; pos < end;) {
    n = std::min(n, end - pos);
    auto runs = inner_.Map(pos, n, top_only);
    if (runs.ok()) {
      out.insert(out.end(), runs->begin(), runs->end());
      pos += n;
      n = end - pos;
      continue;
    }
    if (n > kSector) {  // a quarter of the range, as qemu retries
      n = AlignUp((n + 3) / 4, kSector);
      continue;
    }
    const Status& st = runs.error();
    warn_(fmt::format("error while reading block status at offset {}: {}", pos,
                      std::strerror(st.err() ? st.err() : EIO)));
    BlockStatus b;  // then just read it
    b.offset = pos;
    b.length = n;
    b.present = b.data = true;
    out.push_back(b);
    pos += n;
    n = end - pos;
  }
  return out;
}

namespace {

// Writes [off, off+len) of data already in buf: blocks of min_sparse bytes that are all
// zeros are skipped (fresh target) or zeroed, the rest is written.
Status WriteSparse(Image& target, uint64_t off, std::span<const std::byte> buf, const CopyOptions& s) {
  const bool skip_zeros = s.target_fresh && !s.target_has_backing;
  if (s.min_sparse == 0) {
    return target.Write(off, buf);
  }
  uint64_t pos = 0;
  const uint64_t n = buf.size();
  while (pos < n) {
    // Block boundaries are aligned to absolute offsets, as qemu does.
    uint64_t blk_end = std::min(n, (off + pos) / s.min_sparse * s.min_sparse + s.min_sparse - off);
    bool zero = AllZero(buf.data() + pos, blk_end - pos);
    uint64_t run_end = blk_end;
    while (run_end < n) {
      uint64_t next = std::min(n, run_end + s.min_sparse);
      if (AllZero(buf.data() + run_end, next - run_end) != zero) break;
      run_end = next;
    }
    if (!zero) {
      RETURN_IF_ERROR(target.Write(off + pos, buf.subspan(pos, run_end - pos)));
    } else if (!skip_zeros) {
      RETURN_IF_ERROR(target.WriteZeroes(off + pos, run_end - pos, !s.target_has_backing));
    }
    pos = run_end;
  }
  return Status::Ok();
}

// One step of a plain copy, in target order: a zero run to record, or data read into a
// buffer (or a read error, reported when the writer reaches it).
struct CopyStep {
  uint64_t off = 0, len = 0;
  bool zero_run = false;
  int buf = -1;
  Status status;
};

// A bounded in-order queue between the reading thread and the writing one, plus the
// free list of the buffers the steps carry.
class CopyQueue {
 public:
  explicit CopyQueue(int buffers) {
    bufs_.resize(static_cast<size_t>(buffers));
    for (int i = 0; i < buffers; i++) free_.push_back(i);
  }
  std::span<std::byte> Buffer(int i, uint64_t n) {
    auto& b = bufs_[static_cast<size_t>(i)];
    if (b.size() < kCopyChunk) b.resize(kCopyChunk);  // allocated on first use
    return {b.data(), static_cast<size_t>(n)};
  }
  // Producer side. Returns -1 once the consumer has quit.
  int TakeFree() {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return quit_ || !free_.empty(); });
    if (quit_) return -1;
    int i = free_.front();
    free_.pop_front();
    return i;
  }
  bool Push(CopyStep step) {
    std::lock_guard lk(mu_);
    if (quit_) return false;
    steps_.push_back(std::move(step));
    cv_.notify_all();
    return true;
  }
  void Finish() {
    std::lock_guard lk(mu_);
    finished_ = true;
    cv_.notify_all();
  }
  // Consumer side. False when the producer is done and nothing is left.
  bool Pop(CopyStep* out) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return finished_ || !steps_.empty(); });
    if (steps_.empty()) return false;
    *out = std::move(steps_.front());
    steps_.pop_front();
    return true;
  }
  void Release(int i) {
    if (i < 0) return;
    std::lock_guard lk(mu_);
    free_.push_back(i);
    cv_.notify_all();
  }
  void Quit() {
    std::lock_guard lk(mu_);
    quit_ = true;
    cv_.notify_all();
  }
  bool quitting() {
    std::lock_guard lk(mu_);
    return quit_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<std::byte>> bufs_;
  std::deque<int> free_;
  std::deque<CopyStep> steps_;
  bool finished_ = false, quit_ = false;
};

// Walks the source's block status and reads its data, `queue`'s buffers ahead of the
// writer (qemu-img's -m requests in flight).
void ProduceCopySteps(CopySource& src, const CopyOptions& s, CopyQueue& queue) {
  const uint64_t size = src.size();
  for (uint64_t win = 0; win < size && !queue.quitting(); win += kMapWindow) {
    uint64_t wlen = std::min(kMapWindow, size - win);
    auto runs = src.Map(win, wlen, s.target_has_backing);
    if (!runs.ok()) {
      queue.Push({win, wlen, false, -1, WithOffset(runs.error(), "reading", win)});
      break;
    }
    for (const BlockStatus& r : *runs) {
      if (s.target_has_backing && r.depth > 0) continue;  // the target's backing has it
      if (r.zero && s.zero_runs) {
        if (!queue.Push({r.offset, r.length, true, -1, Status::Ok()})) return;
        continue;
      }
      for (uint64_t pos = r.offset; pos < r.offset + r.length;) {
        uint64_t n =
            std::min<uint64_t>(kCopyChunk, r.offset + r.length - pos);  // from the run's start, as qemu
        int buf = queue.TakeFree();
        if (buf < 0) return;
        std::span<std::byte> b = queue.Buffer(buf, n);
        Status st;
        if (r.zero) {
          std::memset(b.data(), 0, n);
        } else {
          st = src.Read(pos, b);
          if (!st.ok()) st = WithOffset(st, "reading", pos);
        }
        bool failed = !st.ok();
        if (!queue.Push({pos, n, false, buf, std::move(st)}) || failed) {
          queue.Finish();
          return;
        }
        pos += n;
      }
    }
  }
  queue.Finish();
}

// Rebase's rule: writes, in ascending order, only the target clusters of [off, off+len)
// whose content differs from `reference` (data: `buf`; a zero run: nullptr), neighbours in
// one write.
Status WriteWhereDifferent(Image& target, CopySource& reference, uint64_t off, uint64_t len,
                           const std::byte* buf, std::vector<std::byte>& scratch, const CopyOptions& s) {
  const uint64_t cluster = target.cluster_size();
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(len - done, kCopyChunk);
    const uint64_t at = off + done;
    scratch.resize(kCopyChunk);
    std::span<std::byte> ref(scratch.data(), n);
    // The reference may end before the source does: it reads zeros past its end.
    const uint64_t have = at < reference.size() ? std::min<uint64_t>(n, reference.size() - at) : 0;
    if (have) RETURN_IF_ERROR(reference.Read(at, ref.first(have)));
    std::memset(ref.data() + have, 0, n - have);
    auto differs = [&](uint64_t i, uint64_t end) {
      return buf ? std::memcmp(buf + done + i, ref.data() + i, end - i) != 0
                 : !AllZero(ref.data() + i, end - i);
    };
    for (uint64_t i = 0; i < n;) {
      uint64_t end = std::min(n, (at + i) / cluster * cluster + cluster - at);
      if (!differs(i, end)) {
        i = end;
        continue;
      }
      uint64_t run_end = end;
      while (run_end < n) {
        uint64_t next = std::min(n, run_end + cluster);
        if (!differs(run_end, next)) break;
        run_end = next;
      }
      RETURN_IF_ERROR(buf ? target.Write(at + i, std::span<const std::byte>(buf + done + i, run_end - i))
                          : target.WriteZeroes(at + i, run_end - i, !s.target_has_backing));
      i = run_end;
    }
    done += n;
  }
  return Status::Ok();
}

// Reads on one thread and writes, in order, on this one, so reading the source and
// writing the target overlap as they do in qemu-img.
Status CopyPlain(CopySource& src, Image& target, const CopyOptions& s, ProgressCount& count) {
  CopyQueue queue(std::clamp(s.requests_in_flight, 1, 16));
  RateLimiter limit(s.rate_limit);
  std::thread reader([&] { ProduceCopySteps(src, s, queue); });
  Status result;
  CopyStep step;
  std::vector<std::byte> scratch;
  while (queue.Pop(&step)) {
    if (!step.status.ok()) {
      result = step.status;
      break;
    }
    if (s.unless_same_as) {
      const std::byte* data = step.zero_run ? nullptr : queue.Buffer(step.buf, step.len).data();
      Status st = WriteWhereDifferent(target, *s.unless_same_as, step.off, step.len, data, scratch, s);
      queue.Release(step.buf);
      if (!st.ok()) {
        result = WithOffset(st, "writing", step.off);
        break;
      }
    } else if (step.zero_run) {
      if (!s.target_fresh || s.target_has_backing) {
        Status st = target.WriteZeroes(step.off, step.len, !s.target_has_backing);
        if (!st.ok()) {
          result = WithOffset(st, "writing", step.off);
          break;
        }
      }
    } else {
      Status st = WriteSparse(target, step.off, queue.Buffer(step.buf, step.len), s);
      queue.Release(step.buf);
      if (!st.ok()) {
        result = WithOffset(st, "writing", step.off);
        break;
      }
    }
    if (!step.zero_run) {
      count.Add(step.len);  // the producer skips what is not counted
      limit.Spend(step.len);
    }
  }
  queue.Quit();
  reader.join();
  return result;
}

// One cluster of a compressed conversion.
struct Unit {
  uint64_t off = 0;
  bool zero = true;               // all zeros
  bool keep = false;              // stored even when all zeros (-S 0: fully allocated)
  bool counted = false;           // in the progress figure (CountedBytes)
  std::span<std::byte> data;      // cluster_size bytes of its batch's region (tail zero-padded)
  std::vector<std::byte> stream;  // compressed; empty: store data as is
  Status status;
};

// Long-lived compressing threads: threads created per batch start behind every runnable
// task on a busy host (the scheduler's start debit) and leave the cores idle meanwhile.
class CompressPool {
 public:
  struct Batch {
    std::vector<Unit>* units = nullptr;
    size_t next = 0;
    size_t done = 0;
  };

  // Streams of max_out bytes or more are dropped (the unit is then stored as is).
  CompressPool(int threads, Codec codec, uint64_t max_out) : codec_(codec), max_out_(max_out) {
    for (int i = 0; i < std::max(1, threads); i++) threads_.emplace_back([this] { Run(); });
  }
  ~CompressPool() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Submit(Batch* b) {
    {
      std::lock_guard lk(mu_);
      b->next = b->done = 0;
      if (b->units->empty()) return;
      queue_.push_back(b);
    }
    cv_.notify_all();
  }
  void Wait(Batch* b) {
    std::unique_lock lk(mu_);
    done_cv_.wait(lk, [&] { return b->done == b->units->size(); });
  }

 private:
  void Run() {
    for (;;) {
      Batch* b;
      size_t i;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        b = queue_.front();
        i = b->next++;
        if (b->next >= b->units->size()) queue_.pop_front();
      }
      Unit& u = (*b->units)[i];
      if (!u.zero || u.keep) {
        auto r = Compress(codec_, u.data, max_out_);
        if (r.ok()) {
          u.stream = std::move(r).value();
        } else {
          u.status = r.error();
        }
      }
      std::lock_guard lk(mu_);
      if (++b->done == b->units->size()) done_cv_.notify_all();
    }
  }

  Codec codec_;
  uint64_t max_out_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Batch*> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// Fills units (cluster-aligned, starting at `start`) with source content, each a slice of
// `region`; runs of units that need reading are read with one call. Zero clusters are
// found from the map without reading.
Status ReadUnits(CopySource& src, uint64_t start, uint64_t cluster, std::vector<Unit>& units,
                 std::vector<std::byte>& region, const CopyOptions& s) {
  const uint64_t size = src.size();
  const size_t n = units.size();
  region.resize(cluster * n);
  uint64_t end = std::min(size, start + cluster * n);
  ASSIGN_OR_RETURN(auto runs, src.Map(start, end - start, s.target_has_backing));
  std::vector<bool> need(n, false);
  for (size_t i = 0; i < n; i++) {
    Unit& u = units[i];
    u.off = start + i * cluster;
    u.zero = true;
    u.keep = false;
    u.data = {region.data() + i * cluster, static_cast<size_t>(cluster)};
    u.stream.clear();
    u.status = Status::Ok();
    u.counted = false;
    if (u.off >= size) continue;
    uint64_t uend = std::min(size, u.off + cluster);
    // Needs reading if any run overlapping it has data (or top-layer zeros over a backing).
    for (const BlockStatus& r : runs) {
      if (r.offset + r.length <= u.off || r.offset >= uend) continue;
      if (CountedBytes(r, s) > 0) u.counted = true;
      if (s.target_has_backing && r.depth > 0) continue;
      if (!r.zero || s.target_has_backing) need[i] = true;
      if (!s.zero_runs) u.keep = true;
    }
    if (u.keep && !need[i]) std::memset(u.data.data(), 0, cluster);  // stored, not read
  }
  for (size_t i = 0; i < n;) {
    if (!need[i]) {
      i++;
      continue;
    }
    size_t j = i + 1;
    while (j < n && need[j]) j++;
    uint64_t from = units[i].off, to = std::min(size, units[j - 1].off + cluster);
    Status st = src.Read(from, {units[i].data.data(), static_cast<size_t>(to - from)});
    if (!st.ok()) return WithOffset(st, "reading", from);
    uint64_t last_end = units[j - 1].off + cluster;
    if (to < last_end) std::memset(units[i].data.data() + (to - from), 0, last_end - to);
    for (size_t k = i; k < j; k++) units[k].zero = AllZero(units[k].data.data(), cluster);
    i = j;
  }
  return Status::Ok();
}

// Stores finished units in order; neighbours stored as they are (no stream) go out as one
// write, their data being contiguous in the batch's region.
Status WriteUnits(std::vector<Unit>& units, uint64_t size, uint64_t cluster, Image& target,
                  const CopyOptions& s, RateLimiter& limit) {
  auto plain = [&](const Unit& u) {
    return u.off < size && u.status.ok() && (!u.zero || u.keep) && u.stream.empty();
  };
  for (size_t i = 0; i < units.size();) {
    Unit& u = units[i];
    if (u.off >= size) break;
    uint64_t len = std::min(cluster, size - u.off);
    if (!u.status.ok()) return WithOffset(u.status, "compressing", u.off);
    Status st;
    size_t next = i + 1;
    if (u.zero && !u.keep) {
      if (!s.target_fresh || s.target_has_backing) st = target.WriteZeroes(u.off, len, !s.target_has_backing);
    } else if (u.stream.empty()) {
      while (next < units.size() && plain(units[next])) next++;
      uint64_t to = std::min(size, units[next - 1].off + cluster);
      st = target.Write(u.off, std::span<const std::byte>(u.data.data(), to - u.off));
    } else {
      st = target.WriteCompressed(u.off, u.stream);
    }
    if (!st.ok()) return WithOffset(st, "writing", u.off);
    if (!u.zero || u.keep) limit.Spend(std::min(size, units[next - 1].off + cluster) - u.off);
    i = next;
  }
  return Status::Ok();
}

// Units per batch: 32 per compressing thread keeps every core fed between the writer's
// turns (16 left the cores idle a fifth of the time), capped at 8 MiB of source per batch
// so that many cores or 2 MiB clusters do not make the pipeline's memory balloon.
size_t BatchUnits(int threads, uint64_t unit) {
  constexpr uint64_t kBatchBytes = 8ull << 20;
  uint64_t by_threads = static_cast<uint64_t>(std::max(1, threads)) * 32;
  return static_cast<size_t>(std::max<uint64_t>(1, std::min(by_threads, kBatchBytes / unit)));
}

// Pipelined: the pool compresses up to three batches of `unit`-sized pieces while this
// thread reads the next one and hands finished ones to `store` strictly in order, so the
// output does not depend on timing.
template <typename StoreBatch>
Status CompressAndStore(CopySource& src, uint64_t unit, Codec codec, uint64_t max_out, const CopyOptions& s,
                        ProgressCount& count, StoreBatch store) {
  const uint64_t size = src.size();
  const size_t batch = BatchUnits(s.threads, unit);
  const uint64_t step = unit * batch;
  constexpr int kSlots = 4;
  std::vector<Unit> bufs[kSlots];
  std::vector<std::byte> regions[kSlots];
  CompressPool::Batch batches[kSlots];
  for (int i = 0; i < kSlots; i++) {
    bufs[i].resize(batch);
    batches[i].units = &bufs[i];
  }
  CompressPool pool(s.threads, codec, max_out);
  std::deque<int> inflight;
  Status result;
  auto retire = [&]() {
    int sl = inflight.front();
    inflight.pop_front();
    pool.Wait(&batches[sl]);
    if (result.ok()) {
      result = store(bufs[sl]);
      for (const Unit& u : bufs[sl])
        if (result.ok() && u.off < size && u.counted) count.Add(std::min(unit, size - u.off));
    }
  };
  int slot = 0;
  for (uint64_t next = 0; next < size && result.ok(); next += step) {
    if (inflight.size() >= kSlots - 1) retire();
    if (!result.ok()) break;
    result = ReadUnits(src, next, unit, bufs[slot], regions[slot], s);
    if (!result.ok()) break;
    pool.Submit(&batches[slot]);
    inflight.push_back(slot);
    slot = (slot + 1) % kSlots;
  }
  while (!inflight.empty()) retire();
  return result;
}

// The total of qemu-img's progress figure: the counted bytes of the source, or with `unit`
// (compressing) the bytes of each unit that holds some. Only worked out for -p.
Result<uint64_t> CountedTotal(CopySource& src, const CopyOptions& s, uint64_t unit) {
  uint64_t total = 0;
  if (!s.progress) return total;
  const uint64_t size = src.size();
  uint64_t next_unit = 0;  // the first unit not yet counted
  for (uint64_t win = 0; win < size; win += kMapWindow) {
    ASSIGN_OR_RETURN(auto runs, src.Map(win, std::min(kMapWindow, size - win), s.target_has_backing));
    for (const BlockStatus& r : runs) {
      if (CountedBytes(r, s) == 0) continue;
      if (unit == 0) {
        total += r.length;
        continue;
      }
      for (uint64_t u = std::max(next_unit, r.offset / unit); u * unit < r.offset + r.length; u++) {
        total += std::min(unit, size - u * unit);
        next_unit = u + 1;
      }
    }
  }
  return total;
}

Status CopyCompressed(CopySource& src, Image& target, const CopyOptions& s, ProgressCount& count) {
  const uint64_t cluster = target.cluster_size();
  // A stream must be shorter than the cluster to be worth it (qemu's rule).
  RateLimiter limit(s.rate_limit);
  return CompressAndStore(src, cluster, s.codec, cluster - 1, s, count, [&](std::vector<Unit>& units) {
    return WriteUnits(units, src.size(), cluster, target, s, limit);
  });
}

// convert -C (CopyOptions::copy_offload) into a plain raw image: each run the source holds
// as plain data in a local image file (a raw image, a qcow2 data cluster, in any image of
// the chain) is copied by the kernel from there into the target's file, as qemu offloads
// them; zeros stay holes; runs without plain host bytes (compressed, encrypted, in a data
// file, on a server) are read and written as usual. nullopt: the target is not a plain
// raw file, or the kernel cannot copy between the files before anything was copied (another
// file system, say): the pipeline copies instead.
std::optional<Status> CopyByRange(CopySource& src, Image& target, const CopyOptions& s,
                                  ProgressCount& count) {
  if (!s.copy_offload || s.compress || s.unless_same_as || s.rate_limit || s.target_has_backing)
    return std::nullopt;
  if (!RawAlone(&target)) return std::nullopt;
  const int out_fd = target.file().fd();
  bool copied = false;
  std::vector<std::byte> buf;
  const uint64_t size = src.size();
  for (uint64_t win = 0; win < size; win += kMapWindow) {
    auto runs = src.Map(win, std::min(kMapWindow, size - win), false);
    if (!runs.ok()) return WithOffset(runs.error(), "reading", win);
    for (const BlockStatus& r : *runs) {
      if (r.zero) {
        if (s.target_fresh) continue;
        Status st = target.WriteZeroes(r.offset, r.length, true);
        if (!st.ok()) return WithOffset(st, "writing", r.offset);
        continue;
      }
      const int in_fd = r.has_offset && r.data && !r.compressed ? src.HostFd(r.filename) : -1;
      for (uint64_t pos = r.offset; pos < r.offset + r.length;) {
        const uint64_t left = r.offset + r.length - pos;
        if (in_fd < 0) {  // no plain host bytes to hand to the kernel
          buf.resize(std::min<uint64_t>(left, 1 << 20));
          Status st = src.Read(pos, buf);
          if (!st.ok()) return WithOffset(st, "reading", pos);
          st = target.Write(pos, buf);
          if (!st.ok()) return WithOffset(st, "writing", pos);
          pos += buf.size();
          count.Add(buf.size());
          continue;
        }
        loff_t in_off = static_cast<loff_t>(r.host_offset + (pos - r.offset)),
               out_off = static_cast<loff_t>(pos);
        const ssize_t n = ::copy_file_range(in_fd, &in_off, out_fd, &out_off, left, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && !copied && (errno == EXDEV || errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL))
          return std::nullopt;
        if (n <= 0) {
          const int err = n < 0 ? errno : EIO;
          return WithOffset(Status::FromErrno(err, "copy offloading failed: {}", std::strerror(err)),
                            "writing", pos);
        }
        copied = true;
        pos += static_cast<uint64_t>(n);
        count.Add(static_cast<uint64_t>(n));
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status CopyToImage(CopySource& src, Image& target, const CopyOptions& s) {
  // Compressed clusters are written whole; rebase's comparison works on plain copies.
  if (s.compress && s.unless_same_as)
    return Status::InvalidArgument("a compressed copy cannot skip equal clusters");
  const uint64_t unit = s.compress ? target.cluster_size() : 0;
  ASSIGN_OR_RETURN(uint64_t total, CountedTotal(src, s, unit));
  ProgressCount count(s.progress, total);
  if (std::optional<Status> offloaded = CopyByRange(src, target, s, count)) return *offloaded;
  return s.compress ? CopyCompressed(src, target, s, count) : CopyPlain(src, target, s, count);
}

Status CopyToStream(CopySource& src, StreamWriter& w, const CopyOptions& s) {
  const uint64_t unit = w.unit_size();
  CopyOptions rs = s;
  rs.target_has_backing = false;
  rs.unless_same_as = nullptr;
  ASSIGN_OR_RETURN(uint64_t total, CountedTotal(src, rs, unit));
  ProgressCount count(s.progress, total);
  // Every unit is stored compressed, so the stream may be as long as the codec makes it.
  RateLimiter limit(s.rate_limit);
  Status st = CompressAndStore(
      src, unit, w.codec(), w.max_stream_bytes() + 1, rs, count, [&](std::vector<Unit>& units) {
        for (Unit& u : units) {
          if (u.off >= src.size()) break;
          if (u.zero && !u.keep) continue;
          if (!u.status.ok()) return WithOffset(u.status, "compressing", u.off);
          if (u.stream.empty())
            return WithOffset(Status::Io("could not compress the unit"), "compressing", u.off);
          Status ws = w.WriteCompressedUnit(u.off / unit, u.stream);
          if (!ws.ok()) return WithOffset(ws, "writing", u.off);
          limit.Spend(unit);
        }
        return Status::Ok();
      });
  RETURN_IF_ERROR(st);
  return w.Finish();
}

}  // namespace vimgfs

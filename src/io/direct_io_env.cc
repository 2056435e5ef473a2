// NewDirectIoEnv: host files read and written around the host's page cache (O_DIRECT), as
// qemu's cache.direct=on ("-t none") does; see docs/ARCHITECTURE.md, "Cache modes".
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "io/forwarding_file.h"
#include "vimgfs/env.h"

namespace vimgfs {
namespace {

// Alignment O_DIRECT wants when the file system does not say (statx STATX_DIOALIGN): the
// largest logical block size in common use, so that it is never too small.
constexpr uint32_t kDefaultDirectAlign = 4096;
// Larger requests whose buffer is not aligned go through an aligned copy in pieces of this.
constexpr size_t kBounceBytes = 1 << 20;

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};

// One aligned buffer per thread, grown on demand up to kBounceBytes; empty when memory
// ran out (the caller then goes through the cache).
std::span<std::byte> BounceBuffer(size_t n, size_t align) {
  thread_local std::unique_ptr<std::byte, FreeDeleter> buf;
  thread_local size_t size = 0, alignment = 0;
  if (n > size || align > alignment) {
    const size_t want = std::max(n, size);
    const size_t a = std::max({align, alignment, sizeof(void*)});
    buf.reset(static_cast<std::byte*>(std::aligned_alloc(a, (want + a - 1) / a * a)));
    size = buf ? want : 0;
    alignment = buf ? a : 0;
    if (!buf) return {};
  }
  return {buf.get(), n};
}

// Keeps a write through the cache and a direct write of the same page from running at
// once. The cached one may read the page before the direct one lands and write it back
// after, old bytes and all, over what the direct one wrote (the kernel cannot drop a page
// that is dirty); one after the other, each sees the other's bytes. ext4 and XFS already
// serialize the two with the inode lock; other file systems need not.
class BlockGate {
 public:
  class Hold {
   public:
    Hold(BlockGate& gate, uint64_t first, uint64_t end, bool direct)
        : gate_(gate), id_(gate.Enter(first, end, direct)) {}
    ~Hold() { gate_.Leave(id_); }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    BlockGate& gate_;
    uint64_t id_;
  };

 private:
  struct Range {
    uint64_t first, end;  // blocks [first, end)
    bool direct;
    uint64_t id;
  };
  uint64_t Enter(uint64_t first, uint64_t end, bool direct) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] {
      return std::none_of(active_.begin(), active_.end(), [&](const Range& r) {
        return r.direct != direct && r.first < end && first < r.end;
      });
    });
    active_.push_back({first, end, direct, next_id_});
    return next_id_++;
  }
  void Leave(uint64_t id) {
    std::lock_guard lk(mu_);
    std::erase_if(active_, [&](const Range& r) { return r.id == id; });
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Range> active_;  // the writes in flight: a few dozen at most
  uint64_t next_id_ = 0;
};

// Sends the whole blocks of each request through a second, O_DIRECT descriptor of the
// same inode, and partial blocks (headers, table entries, a file's unaligned tail) through
// the buffered one it wraps. The kernel keeps the two coherent: a direct write writes back
// and drops the cached pages of its range, a direct read writes dirty ones back first;
// BlockGate covers the one race it leaves. Syncs go to the wrapped file: one fdatasync
// covers the inode whichever descriptor wrote.
class DirectIoFile final : public ForwardingFile {
 public:
  DirectIoFile(std::unique_ptr<File> f, int direct_fd, uint32_t mem_align, uint32_t offset_align)
      : ForwardingFile(std::move(f)), dfd_(direct_fd), mem_align_(mem_align), off_align_(offset_align) {}
  ~DirectIoFile() override { ::close(dfd_); }

  // A request's partial blocks at either end go through the cache, the whole blocks
  // between them direct.
  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    const auto [head, body] = Split(off, buf.size());
    if (body == 0) return ForwardingFile::PRead(off, buf);
    if (head) RETURN_IF_ERROR(ForwardingFile::PRead(off, buf.first(head)));
    bool past_end = false;
    RETURN_IF_ERROR(ReadDirect(off + head, buf.subspan(head, body), &past_end));
    std::span<std::byte> tail = buf.subspan(head + body);
    if (tail.empty()) return Status::Ok();
    if (past_end) {
      std::memset(tail.data(), 0, tail.size());
      return Status::Ok();
    }
    return ForwardingFile::PRead(off + head + body, tail);
  }

  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) override {
    if (buf.empty()) return Status::Ok();
    const auto [head, body] = Split(off, buf.size());
    if (body == 0) return CachedWrite(off, buf, tag);
    if (head) RETURN_IF_ERROR(CachedWrite(off, buf.first(head), tag));
    {
      BlockGate::Hold hold(gate_, (off + head) / gate_unit_, (off + head + body - 1) / gate_unit_ + 1, true);
      RETURN_IF_ERROR(WriteDirect(off + head, buf.subspan(head, body), tag));
    }
    std::span<const std::byte> tail = buf.subspan(head + body);
    return tail.empty() ? Status::Ok() : CachedWrite(off + head + body, tail, tag);
  }

 private:
  // The bytes before the first block boundary of [off, off+len) and the whole blocks after
  // them; body 0 when the request holds no whole block.
  std::pair<size_t, size_t> Split(uint64_t off, size_t len) const {
    const uint64_t first = (off + off_align_ - 1) / off_align_ * off_align_;
    const uint64_t last = (off + len) / off_align_ * off_align_;
    if (last <= first) return {len, 0};
    return {static_cast<size_t>(first - off), static_cast<size_t>(last - first)};
  }
  Status CachedWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) {
    BlockGate::Hold hold(gate_, off / gate_unit_, (off + buf.size() - 1) / gate_unit_ + 1, false);
    return ForwardingFile::PWrite(off, buf, tag);
  }
  bool MemAligned(const void* p) const { return reinterpret_cast<uintptr_t>(p) % mem_align_ == 0; }

  // Whole blocks, into buf directly when its memory is aligned, else through an aligned
  // copy. Sets *past_end when the file ended inside them (the rest is zeroed).
  Status ReadDirect(uint64_t off, std::span<std::byte> buf, bool* past_end) {
    const bool aligned = MemAligned(buf.data());
    for (size_t done = 0; done < buf.size();) {
      const size_t n = aligned ? buf.size() - done : std::min(buf.size() - done, kBounceBytes);
      std::span<std::byte> part = buf.subspan(done, n);
      std::span<std::byte> io = aligned ? part : BounceBuffer(n, mem_align_);
      if (io.empty()) return ForwardingFile::PRead(off + done, buf.subspan(done));
      size_t got = 0;
      while (got < n) {
        ssize_t r = ::pread(dfd_, io.data() + got, n - got, static_cast<off_t>(off + done + got));
        if (r < 0 && errno == EINTR) continue;
        // Refused after all (a file system stricter than it said): the cached way.
        if (r < 0 && errno == EINVAL && got == 0) {
          RETURN_IF_ERROR(ForwardingFile::PRead(off + done, buf.subspan(done)));
          return Status::Ok();
        }
        if (r < 0)
          return Status::FromErrno(errno, "'{}': read of {} bytes at {:#x} failed: {}", path(), buf.size(),
                                   off, std::strerror(errno));
        got += static_cast<size_t>(r);
        if (r == 0 || got % off_align_ != 0) break;  // the end of the file
      }
      if (io.data() != part.data()) std::memcpy(part.data(), io.data(), got);
      if (got < n) {
        std::memset(part.data() + got, 0, buf.size() - done - got);
        *past_end = true;
        return Status::Ok();
      }
      done += n;
    }
    return Status::Ok();
  }

  Status WriteDirect(uint64_t off, std::span<const std::byte> buf, IoTag tag) {
    const bool aligned = MemAligned(buf.data());
    for (size_t done = 0; done < buf.size();) {
      const size_t n = aligned ? buf.size() - done : std::min(buf.size() - done, kBounceBytes);
      std::span<const std::byte> part = buf.subspan(done, n);
      if (!aligned) {
        std::span<std::byte> copy = BounceBuffer(n, mem_align_);
        if (copy.empty()) return ForwardingFile::PWrite(off + done, buf.subspan(done), tag);
        std::memcpy(copy.data(), part.data(), n);
        part = copy;
      }
      ssize_t put = ::pwrite(dfd_, part.data(), n, static_cast<off_t>(off + done));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0 && errno != EINVAL)
        return Status::FromErrno(errno, "'{}': write of {} bytes at {:#x} failed: {}", path(), buf.size(),
                                 off, std::strerror(errno));
      // Refused as unaligned after all, or cut short at an unaligned count: the rest goes
      // the cached way.
      if (put <= 0 || static_cast<size_t>(put) % off_align_ != 0) {
        const size_t wrote = put < 0 ? 0 : static_cast<size_t>(put);
        return ForwardingFile::PWrite(off + done + wrote, buf.subspan(done + wrote), tag);
      }
      done += static_cast<size_t>(put);
    }
    return Status::Ok();
  }

  int dfd_;
  BlockGate gate_;
  uint32_t mem_align_;
  uint32_t off_align_;
  // What BlockGate keeps apart: pages, or blocks where they are larger.
  uint64_t gate_unit_ = std::max<uint64_t>(off_align_, static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)));
};

class DirectIoEnv final : public Env {
 public:
  explicit DirectIoEnv(Env* base) : base_(base) {}
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override {
    ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->Open(path, mode));
    return Direct(std::move(f));
  }
  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override {
    ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->Create(path, exclusive));
    return Direct(std::move(f));
  }
  Status Remove(const std::string& path) override { return base_->Remove(path); }
  Result<FileStat> Stat(const std::string& path) override { return base_->Stat(path); }
  Result<std::unique_ptr<File>> OpenReference(const std::string& dir, const std::string& name, OpenMode mode,
                                              bool beneath) override {
    ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->OpenReference(dir, name, mode, beneath));
    return Direct(std::move(f));
  }

 private:
  // The same inode again with O_DIRECT (through its /proc link, so it cannot be another
  // file); files without a descriptor (NBD exports, memory) stay as they are.
  static Result<std::unique_ptr<File>> Direct(std::unique_ptr<File> f) {
    const int fd = f->fd();
    struct stat st;
    if (fd < 0 || ::fstat(fd, &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) return f;
    const std::string self = "/proc/self/fd/" + std::to_string(fd);
    const int flags = (f->writable() ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC;
    const int dfd = ::open(self.c_str(), flags);
    if (dfd < 0) {
      if (errno == EINVAL)  // qemu's words
        return Status::InvalidArgument("Could not open '{}': filesystem does not support O_DIRECT",
                                       f->path());
      return Status::FromErrno(errno, "Could not open '{}': {}", f->path(), std::strerror(errno));
    }
    uint32_t mem_align = kDefaultDirectAlign, offset_align = kDefaultDirectAlign;
    struct statx sx {};
    if (::statx(dfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
      if (sx.stx_dio_offset_align == 0) {
        ::close(dfd);
        return Status::InvalidArgument("Could not open '{}': filesystem does not support O_DIRECT",
                                       f->path());
      }
      mem_align = std::max<uint32_t>(sx.stx_dio_mem_align, 1);
      offset_align = sx.stx_dio_offset_align;
    }
    // Powers of two no larger than a bounce piece, or the file stays buffered.
    auto usable = [](uint32_t a) { return (a & (a - 1)) == 0 && a <= kBounceBytes; };
    if (!usable(mem_align) || !usable(offset_align)) {
      ::close(dfd);
      return f;
    }
    return std::unique_ptr<File>(new DirectIoFile(std::move(f), dfd, mem_align, offset_align));
  }

  Env* base_;
};

}  // namespace

std::unique_ptr<Env> NewDirectIoEnv(Env* base) { return std::make_unique<DirectIoEnv>(base); }

Env* Env::DefaultDirect() {
  static Env* env = new DirectIoEnv(Env::Default());
  return env;
}

}  // namespace vimgfs

// FUSE low-level operations over one Image (see server.h).
//
// Each libfuse callback is a thin lambda inside Dispatch(): the lambda returns a Status
// and replies through a Reply object on success; Dispatch replies with the error when
// the lambda did not, and maps exceptions (bad_alloc -> ENOMEM, anything else -> EIO).
// Exactly one reply per request, always.
#include "fuse/server.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/uio.h>
#include <linux/falloc.h>
#include <sys/statvfs.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

namespace vimgfs::mount {
namespace {

constexpr double kAttrTimeout = 1.0;
constexpr uint64_t kSeekWindow = 1ull << 30;  // Map() at most this much per call
// fuse_file_info::fh bits of an open file.
constexpr uint64_t kFhMayWrite = 1;  // opened for writing: close(2) flushes the image
constexpr uint64_t kFhUncached = 2;  // served with FUSE direct I/O (Server::Open)

// Replies to one request, at most once.
class Reply {
 public:
  explicit Reply(fuse_req_t req) : req_(req) {}
  bool done() const { return done_; }

  void Err(int err) {
    if (Take()) fuse_reply_err(req_, err);
  }
  void Ok() { Err(0); }
  void Entry(const fuse_entry_param& e) {
    if (Take()) fuse_reply_entry(req_, &e);
  }
  void Attr(const struct stat& st) {
    if (Take()) fuse_reply_attr(req_, &st, kAttrTimeout);
  }
  void Open(const fuse_file_info* fi) {
    if (Take()) fuse_reply_open(req_, fi);
  }
  // An open reply carrying kernel FOPEN_* flags that libfuse 3.14's fuse_file_info
  // cannot express (FOPEN_PARALLEL_DIRECT_WRITES arrived in libfuse 3.15).
  void OpenWithFlags(const fuse_file_info* fi, uint32_t open_flags) {
    if (!Take()) return;
    fuse_open_out out{};
    out.fh = fi->fh;
    out.open_flags = open_flags;
    if (fi->direct_io) out.open_flags |= FOPEN_DIRECT_IO;
    if (fi->keep_cache) out.open_flags |= FOPEN_KEEP_CACHE;
    iovec iov{&out, sizeof(out)};
    fuse_reply_iov(req_, &iov, 1);
  }
  void Buf(const void* data, size_t n) {
    if (Take()) fuse_reply_buf(req_, static_cast<const char*>(data), n);
  }
  void Write(size_t n) {
    if (Take()) fuse_reply_write(req_, n);
  }
  void Statfs(const struct statvfs& s) {
    if (Take()) fuse_reply_statfs(req_, &s);
  }
  void Lseek(off_t off) {
    if (Take()) fuse_reply_lseek(req_, off);
  }
  void None() {
    if (Take()) fuse_reply_none(req_);
  }

 private:
  bool Take() {
    if (done_) return false;  // a handler bug; the first reply stands
    done_ = true;
    return true;
  }
  fuse_req_t req_;
  bool done_ = false;
};

Server* Srv(fuse_req_t req) { return static_cast<Server*>(fuse_req_userdata(req)); }

// Errors worth a log line: the host or the image misbehaved (not ENOENT, EROFS, ...).
bool Loggable(const Status& st) {
  switch (st.kind()) {
    case ErrorKind::kIo:
    case ErrorKind::kCorrupt:
    case ErrorKind::kNoSpace:
    case ErrorKind::kInvalidFormat:
    case ErrorKind::kUnsupported:
      return true;
    default:
      return false;
  }
}

// The errno a client of disk.raw gets. A host error that means nothing for a disk (the
// image lives on a network or FUSE file system that went away: ENOTCONN, ESTALE, ...)
// becomes EIO, as a block device reports it; running out of room or memory stays.
int ClientErrno(const Status& st) {
  int err = st.err() > 0 ? st.err() : EIO;
  if (st.kind() != ErrorKind::kIo) return err;
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
    case ENOMEM:
    case EROFS:
    case EINTR:
      return err;
    default:
      return EIO;
  }
}

// The one way into a handler. fn: Status(Reply&). noexcept: nothing escapes to libfuse.
template <typename Fn>
void Dispatch(fuse_req_t req, const char* op, Fn&& fn) noexcept {
  Reply reply(req);
  Status st;
  try {
    st = fn(reply);
  } catch (const std::bad_alloc&) {
    st = Status::Error(ErrorKind::kIo, ENOMEM, "out of memory");
  } catch (...) {
    st = Status::Error(ErrorKind::kIo, EIO, "internal error (exception)");
  }
  if (reply.done()) return;
  int err = st.ok() ? EIO : ClientErrno(st);
  // Expected answers (ENOENT, ENXIO from SEEK_DATA, EOPNOTSUPP, ...) carry no message or
  // a harmless kind and are not logged; failures of the host or the image are.
  try {
    if (st.ok())
      Srv(req)->Log(fmt::format("{}: internal error: no reply", op));
    else if (Loggable(st) && !st.message().empty())
      Srv(req)->Log(fmt::format("{}: {}", op, st.message()));
  } catch (...) {
  }
  reply.Err(err);
}

// A per-thread buffer for reads and non-contiguous writes: grown, never shrunk, so the
// steady state allocates nothing.
std::span<std::byte> ThreadBuffer(size_t n) {
  thread_local std::vector<std::byte> buf;
  if (buf.size() < n) buf.resize(n);
  return {buf.data(), n};
}

bool AllZero(const std::byte* p, size_t n) {
  if (n == 0) return true;
  // Cheap reject on the first word, then memcmp against the shifted self.
  size_t head = std::min<size_t>(n, 16);
  for (size_t i = 0; i < head; ++i)
    if (p[i] != std::byte{0}) return false;
  return n <= 16 || std::memcmp(p, p + 16, n - 16) == 0;
}

int64_t ToNs(const struct timespec& ts) { return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec; }
struct timespec FromNs(int64_t ns) {
  struct timespec ts {};
  ts.tv_sec = ns / 1000000000;
  ts.tv_nsec = ns % 1000000000;
  return ts;
}
int64_t NowNs() {
  struct timespec ts {};
  clock_gettime(CLOCK_REALTIME, &ts);
  return ToNs(ts);
}

bool IsDir(Server* s, fuse_ino_t ino) { return s->has_dir() && ino == Server::kRootIno; }

// The file behind ino; ESTALE for an inode that is gone (a partition long since changed),
// EISDIR for the directory.
Result<FileView> FileOf(Server* s, fuse_ino_t ino) {
  if (auto view = s->View(ino)) return *view;
  if (IsDir(s, ino)) return Status::Error(ErrorKind::kInvalidArgument, EISDIR, "is a directory");
  return Status::Error(ErrorKind::kNotFound, ESTALE, std::string());
}

// The attributes of any inode.
Result<struct stat> AttrOf(Server* s, fuse_ino_t ino) {
  if (IsDir(s, ino)) return s->DirAttr();
  ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
  return s->FileAttr(view);
}

// [off, off + size) of a view clipped to its end, as a disk range; length 0 at or past it.
struct DiskRange {
  uint64_t offset;
  uint64_t length;
};
DiskRange Clip(const FileView& view, uint64_t off, uint64_t size) {
  if (off >= view.length) return {view.offset + view.length, 0};
  return {view.offset + off, std::min(size, view.length - off)};
}

// ---- operations ----

void OpInit(void* userdata, fuse_conn_info* conn) {
  auto* s = static_cast<Server*>(userdata);
  // 1 MiB requests (libfuse's buffer holds FUSE_MAX_MAX_PAGES pages; it sets max_pages).
  conn->max_write = 1u << 20;
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, 1u << 20);
  // Memory buffers, no splice: the engine wants the bytes in hand.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  const bool writeback = s->wants_writeback() && (conn->capable & FUSE_CAP_WRITEBACK_CACHE);
  if (!writeback) {
    // Every write is handed to us at once; an fsync acknowledges exactly the writes the
    // kernel has already sent.
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  } else {
    // Buffered writes land in the kernel's page cache and come to us as it writes them
    // back, many at once; fsync and close write them back before they reach us. The
    // kernel then trusts its own idea of the size: O_TRUNC must come as a size change we
    // can ignore (OpSetattr), not as an open that sets it to 0.
    conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
    // 32 write-backs in flight: as fast as 64 here, and half the threads (memory).
    conn->max_background = 32;
    conn->congestion_threshold = 24;
  }
  s->set_writeback(writeback);
}

void OpLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Dispatch(req, "lookup", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    if (!IsDir(s, parent)) return Status::Error(ErrorKind::kNotFound, ENOTDIR, "not a directory");
    fuse_entry_param e{};
    e.generation = 1;
    e.attr_timeout = kAttrTimeout;
    if (std::strcmp(name, Server::kDiskName) == 0) {
      e.ino = Server::kDiskIno;
      e.entry_timeout = kAttrTimeout;
    } else {
      // Partition names are looked up every time (entry timeout 0): a table rewritten
      // through disk.raw shows at the next path walk.
      for (const PartitionFile& f : s->Partitions())
        if (f.name == name) e.ino = f.view.ino;
      if (e.ino == 0) return Status::NotFound("no such file");
    }
    ASSIGN_OR_RETURN(e.attr, AttrOf(s, e.ino));
    r.Entry(e);
    return Status::Ok();
  });
}

void OpGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  Dispatch(req, "getattr", [&](Reply& r) -> Status {
    Srv(req)->TellKernelTheSize();
    ASSIGN_OR_RETURN(struct stat attr, AttrOf(Srv(req), ino));
    r.Attr(attr);
    return Status::Ok();
  });
}

void OpSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  Dispatch(req, "setattr", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    s->TellKernelTheSize();
    RETURN_IF_ERROR(AttrOf(s, ino).status());
    if (to_set & FUSE_SET_ATTR_SIZE) {
      ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
      if (s->options().read_only) return Status::ReadOnly("read-only mount");
      // With the writeback cache an O_TRUNC open arrives as a size change to 0 (OpInit):
      // ignored, as a block device ignores O_TRUNC, and the reply keeps the size.
      const bool o_trunc = attr->st_size == 0 && s->writeback();
      if (static_cast<uint64_t>(attr->st_size) != view.length && !o_trunc) {
        s->Log(
            fmt::format("refusing to change the size of a file of the mount to {} (it is {}): "
                        "use 'vimgfs resize' on the unmounted image",
                        attr->st_size, view.length));
        return Status::Error(ErrorKind::kInvalidArgument, EPERM, "size is fixed");
      }
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))
      return Status::Error(ErrorKind::kInvalidArgument, EPERM, "mode and owner are fixed");
    s->SetTimes(*attr, to_set);
    ASSIGN_OR_RETURN(struct stat updated, AttrOf(s, ino));
    r.Attr(updated);
    return Status::Ok();
  });
}

void OpOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Dispatch(req, "open", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    s->TellKernelTheSize();
    ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
    const bool writable = (fi->flags & O_ACCMODE) != O_RDONLY;
    if (writable && s->options().read_only) return Status::ReadOnly("read-only mount");
    const bool uncached = s->Open(view, fi->flags & O_DIRECT, writable);
    // O_TRUNC is ignored, as a block device ignores it, so `cp disk.img disk.raw` works.
    // With atomic O_TRUNC (libfuse's default without the writeback cache) it arrives here
    // rather than as a setattr, which keeps a real truncate() refused; the kernel then
    // drops its cached size and asks getattr again.
    // We are the only writer, and we drop the pages a write through another file of the
    // mount makes stale (Server::WriteThrough): cached pages stay valid across opens. A
    // single-threaded server cannot (see server.h), so it keeps close-to-open coherence.
    fi->keep_cache = s->can_invalidate() ? 1 : 0;
    fi->fh = (writable ? kFhMayWrite : 0) | (uncached ? kFhUncached : 0);
    if (uncached) {
      // O_DIRECT callers (fio, qemu cache=none, losetup --direct-io) bypass the page
      // cache anyway: answer with direct I/O so the kernel hands us their writes in
      // parallel instead of one at a time under the inode lock. The kernel keeps them
      // coherent with cached descriptors of the same file (it writes dirty pages back
      // and drops cached pages of the range around each direct request); across files we
      // do (Server::Open).
      fi->direct_io = 1;
      r.OpenWithFlags(fi, FOPEN_PARALLEL_DIRECT_WRITES);
      return Status::Ok();
    }
    r.Open(fi);
    return Status::Ok();
  });
}

void OpRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Dispatch(req, "release", [&](Reply& r) -> Status {
    Srv(req)->Release(ino, fi->fh & kFhUncached);
    r.Ok();
    return Status::Ok();
  });
}

void OpOpendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Dispatch(req, "opendir", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    if (!IsDir(s, ino)) return Status::Error(ErrorKind::kInvalidArgument, ENOTDIR, "not a directory");
    r.Open(fi);
    return Status::Ok();
  });
}

void OpReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  Dispatch(req, "readdir", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    if (!IsDir(s, ino)) return Status::Error(ErrorKind::kInvalidArgument, ENOTDIR, "not a directory");
    struct Ent {
      std::string name;
      struct stat st;
    };
    std::vector<Ent> ents = {{".", s->DirAttr()}, {"..", s->DirAttr()}};
    ents.push_back({Server::kDiskName, s->FileAttr(*s->View(Server::kDiskIno))});
    for (const PartitionFile& f : s->Partitions()) ents.push_back({f.name, s->FileAttr(f.view)});
    std::vector<char> buf(size);
    size_t used = 0;
    for (size_t i = static_cast<size_t>(std::max<off_t>(off, 0)); i < ents.size(); ++i) {
      size_t need = fuse_add_direntry(req, nullptr, 0, ents[i].name.c_str(), nullptr, 0);
      if (used + need > size) break;
      fuse_add_direntry(req, buf.data() + used, size - used, ents[i].name.c_str(), &ents[i].st,
                        static_cast<off_t>(i + 1));
      used += need;
    }
    r.Buf(buf.data(), used);
    return Status::Ok();
  });
}

void OpRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  Dispatch(req, "read", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
    if (off < 0) return Status::InvalidArgument("negative offset");
    DiskRange range = Clip(view, static_cast<uint64_t>(off), size);
    if (range.length == 0) {
      r.Buf(nullptr, 0);
      return Status::Ok();
    }
    size_t n = static_cast<size_t>(range.length);
    if (fi->fh & kFhUncached) s->Launder(range.offset, n);
    std::span<std::byte> buf = ThreadBuffer(n);
    RETURN_IF_ERROR(s->image().Read(range.offset, buf));
    r.Buf(buf.data(), n);
    return Status::Ok();
  });
}

// The bytes of one write request, without a copy when they are in one memory buffer.
Result<std::span<const std::byte>> WriteBytes(fuse_bufvec* in, size_t n) {
  const fuse_buf& first = in->buf[in->idx];
  if (in->count - in->idx == 1 && !(first.flags & FUSE_BUF_IS_FD) && first.size - in->off >= n)
    return std::span<const std::byte>(static_cast<const std::byte*>(first.mem) + in->off, n);
  std::span<std::byte> tmp = ThreadBuffer(n);
  fuse_bufvec dst = FUSE_BUFVEC_INIT(n);
  dst.buf[0].mem = tmp.data();
  ssize_t got = fuse_buf_copy(&dst, in, static_cast<fuse_buf_copy_flags>(0));
  if (got < 0) return Status::FromErrno(static_cast<int>(-got), "reading the write request");
  return std::span<const std::byte>(tmp.data(), static_cast<size_t>(got));
}

void OpWriteBuf(fuse_req_t req, fuse_ino_t ino, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
  Dispatch(req, "write", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
    if (s->options().read_only) return Status::ReadOnly("read-only mount");
    size_t total = fuse_buf_size(in);
    if (off < 0) return Status::InvalidArgument("negative offset");
    if (total == 0) {
      r.Write(0);
      return Status::Ok();
    }
    const DiskRange range = Clip(view, static_cast<uint64_t>(off), total);
    auto write = [&]() -> Status {
      if (range.length == 0)  // a disk does not grow: as a block device
        return Status::NoSpace("write at {} past the end of the file ({})", off, view.length);
      ASSIGN_OR_RETURN(std::span<const std::byte> data, WriteBytes(in, static_cast<size_t>(range.length)));
      // Not written back from the page cache: a direct write, which dirty pages of the
      // range written before it must not land over (see Server::Open).
      const bool uncached = s->writeback() && !fi->writepage;
      return s->WriteThrough(
          view.ino, range.offset, data.size(), uncached, [&] { return s->WriteData(range.offset, data); },
          [&] {
            s->Touch();
            // Pages written back from the cache past the end (the kernel took the write,
            // trusting its own size): what fits is written, and fsync and close must
            // report the rest, which a short count would not.
            if (fi->writepage && data.size() < total)
              r.Err(ENOSPC);
            else
              r.Write(data.size());
          });
    };
    Status st = write();
    if (fi->writepage && (!st.ok() || range.length < total)) {
      // A failed write-back leaves the kernel's pages clean but holding bytes the image
      // does not have: once the error is replied (their write-back ends with it), drop
      // them, so that reads show what the image holds.
      if (!r.done()) {
        if (Loggable(st)) s->Log(fmt::format("write: {}", st.message()));
        r.Err(ClientErrno(st));
      }
      s->DropCache(view.ino, static_cast<uint64_t>(off), total);
    }
    return st;
  });
}

Status FlushImage(Server* s) {
  if (s->options().read_only) return Status::Ok();
  return s->image().Flush();
}

// close(2) of a descriptor: make what it wrote durable (as NFS's close-to-open would),
// so `dd of=disk.raw; qemu-img ...` sees it; read-only descriptors cost nothing.
void OpFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Dispatch(req, "flush", [&](Reply& r) -> Status {
    if (fi == nullptr || (fi->fh & kFhMayWrite)) RETURN_IF_ERROR(FlushImage(Srv(req)));
    r.Ok();
    return Status::Ok();
  });
}

void OpFsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  Dispatch(req, "fsync", [&](Reply& r) -> Status {
    RETURN_IF_ERROR(FlushImage(Srv(req)));
    r.Ok();
    return Status::Ok();
  });
}

void OpFsyncdir(fuse_req_t req, fuse_ino_t, int, fuse_file_info*) {
  Dispatch(req, "fsyncdir", [&](Reply& r) -> Status {
    r.Ok();
    return Status::Ok();
  });
}

void OpFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, fuse_file_info*) {
  Dispatch(req, "fallocate", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
    if (s->options().read_only) return Status::ReadOnly("read-only mount");
    if (off < 0 || len <= 0) return Status::InvalidArgument("bad range");
    uint64_t end = view.length;
    uint64_t start = static_cast<uint64_t>(off);
    uint64_t stop = start + static_cast<uint64_t>(len);
    if (stop < start) return Status::Error(ErrorKind::kInvalidArgument, EFBIG, "range overflows");
    bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
    int kind = mode & ~FALLOC_FL_KEEP_SIZE;
    if (kind == FALLOC_FL_PUNCH_HOLE) {
      if (!keep_size)  // as Linux
        return Status::Error(ErrorKind::kInvalidArgument, EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE");
    } else if (kind == FALLOC_FL_ZERO_RANGE) {
      if (stop > end && !keep_size)
        return Status::Error(ErrorKind::kNoSpace, EFBIG, "the disk size is fixed");
    } else if (kind == 0) {
      // Preallocation inside the disk: nothing to grow; the formats allocate on write.
      if (stop > end && !keep_size)
        return Status::Error(ErrorKind::kNoSpace, EFBIG, "the disk size is fixed");
    } else {
      return Status::Error(ErrorKind::kUnsupported, EOPNOTSUPP, std::string());
    }
    auto done = [&] {
      s->Touch();
      r.Ok();
    };
    if (kind == 0 || start >= end) {
      done();
      return Status::Ok();
    }
    const uint64_t disk_off = view.offset + start, n = std::min(stop, end) - start;
    const bool unmap = kind == FALLOC_FL_PUNCH_HOLE;
    return s->WriteThrough(
        view.ino, disk_off, n, s->writeback(), [&] { return s->image().WriteZeroes(disk_off, n, unmap); },
        done);
  });
}

void OpLseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info*) {
  Dispatch(req, "lseek", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    ASSIGN_OR_RETURN(FileView view, FileOf(s, ino));
    if (whence != SEEK_DATA && whence != SEEK_HOLE) return Status::InvalidArgument("whence");
    if (off < 0) return Status::Error(ErrorKind::kOutOfRange, ENXIO, std::string());
    ASSIGN_OR_RETURN(uint64_t pos, s->Seek(view, static_cast<uint64_t>(off), whence));
    r.Lseek(static_cast<off_t>(pos));
    return Status::Ok();
  });
}

void OpStatfs(fuse_req_t req, fuse_ino_t) {
  Dispatch(req, "statfs", [&](Reply& r) -> Status {
    Server* s = Srv(req);
    struct statvfs st {};
    int fd = s->image().file().fd();
    if (fd < 0 || fstatvfs(fd, &st) != 0) {
      st = {};
      st.f_bsize = st.f_frsize = 4096;
      st.f_blocks = s->image().size() / 4096;
    }
    st.f_files = s->has_dir() ? 2 + s->Partitions().size() : 1;
    st.f_ffree = 0;
    st.f_favail = 0;
    st.f_namemax = 255;
    r.Statfs(st);
    return Status::Ok();
  });
}

}  // namespace

Server::Server(Image* image, ServerOptions options)
    : cached_(std::make_shared<const std::vector<CachedFile>>()),
      image_(image),
      opt_(options),
      size_(image->size()),
      partitions_(image, options.partitions && !options.root_is_file,
                  [this](const std::string& line) { Log(line); }) {
  // Whole clusters, but never below a page: raw reports 512-byte "clusters", and a write
  // alternating zero and data sectors is not worth splitting into many engine calls.
  uint64_t cs = image->cluster_size();
  zero_unit_ = (cs >= 512 && cs <= (64ull << 20)) ? std::max<uint64_t>(cs, 4096) : (64ull << 10);
  int64_t t = ToNs(opt_.time);
  atime_ns_ = t;
  mtime_ns_ = t;
  ctime_ns_ = t;
}

const fuse_lowlevel_ops& Server::Ops() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o{};
    o.init = OpInit;
    o.lookup = OpLookup;
    o.getattr = OpGetattr;
    o.setattr = OpSetattr;
    o.open = OpOpen;
    o.read = OpRead;
    o.write_buf = OpWriteBuf;
    o.flush = OpFlush;
    o.release = OpRelease;
    o.fsync = OpFsync;
    o.opendir = OpOpendir;
    o.readdir = OpReaddir;
    o.fsyncdir = OpFsyncdir;
    o.statfs = OpStatfs;
    o.fallocate = OpFallocate;
    o.lseek = OpLseek;
    return o;
  }();
  return ops;
}

std::optional<FileView> Server::View(fuse_ino_t ino) const {
  if (ino == (opt_.root_is_file ? kRootIno : kDiskIno)) return FileView{ino, 0, size_};
  if (opt_.root_is_file) return std::nullopt;
  return partitions_.Find(ino);
}

template <typename Write, typename Reply>
Status Server::WriteThrough(fuse_ino_t writer, uint64_t off, uint64_t len, bool uncached, Write&& write,
                            Reply&& reply) {
  if (!several_opened_.load(std::memory_order_acquire)) {
    // One file opened so far (disk.raw alone, the usual case): nobody to register with.
    // A file first opened meanwhile has its pages dropped after the reply, which never
    // waits on another writer.
    if (uncached) Launder(off, len);
    Status st = write();
    partitions_.NoteWrite(off, len);
    if (uncached) DropOwnCache(writer, off, len);
    RETURN_IF_ERROR(st);
    reply();
    if (several_opened_.load(std::memory_order_acquire)) DropOthersCache(writer, off, len);
    return Status::Ok();
  }
  InFlight::iterator self;
  bool defer = false;
  {
    std::lock_guard lock(in_flight_mu_);
    for (const InFlightWrite& w : in_flight_)
      defer |= w.writer != writer && off < w.off + w.len && w.off < off + len;
    self = in_flight_.insert(in_flight_.end(), {writer, off, len});
  }
  struct Done {
    Server* s;
    InFlight::iterator self;
    ~Done() {
      std::lock_guard lock(s->in_flight_mu_);
      s->in_flight_.erase(self);
    }
  } done{this, self};
  if (uncached) Launder(off, len);
  Status st = write();
  partitions_.NoteWrite(off, len);  // even after a failure: part of it may have landed
  if (uncached) DropOwnCache(writer, off, len);
  if (!defer) DropOthersCache(writer, off, len);
  if (!st.ok()) return st;  // a deferred drop is skipped: the write failed anyway
  reply();
  if (defer) DropOthersCache(writer, off, len);
  return Status::Ok();
}

template <typename Which>
void Server::Invalidate(uint64_t off, uint64_t len, Which&& which) {
  if (session_ == nullptr) return;
  std::shared_ptr<const std::vector<CachedFile>> cached = cached_.load(std::memory_order_acquire);
  for (const CachedFile& f : *cached) {
    const FileView& v = f.view;
    if (!which(f)) continue;
    uint64_t from = std::max(off, v.offset), to = std::min(off + len, v.offset + v.length);
    if (from >= to) continue;
    // Dirty pages are written back (to us, on other threads) before they are dropped.
    // ENOENT: the kernel holds no such inode any more.
    fuse_lowlevel_notify_inval_inode(session_, v.ino, static_cast<off_t>(from - v.offset),
                                     static_cast<off_t>(to - from));
  }
}

void Server::DropOthersCache(fuse_ino_t writer, uint64_t off, uint64_t len) {
  Invalidate(off, len, [&](const CachedFile& f) { return f.view.ino != writer; });
}

void Server::Launder(uint64_t off, uint64_t len) {
  Invalidate(off, len, [&](const CachedFile& f) { return f.may_dirty; });
}

void Server::DropOwnCache(fuse_ino_t ino, uint64_t off, uint64_t len) {
  Invalidate(off, len, [&](const CachedFile& f) { return f.view.ino == ino && f.cached; });
}

void Server::DropCache(fuse_ino_t ino, uint64_t off, uint64_t len) {
  if (session_ != nullptr)
    fuse_lowlevel_notify_inval_inode(session_, ino, static_cast<off_t>(off), static_cast<off_t>(len));
}

bool Server::Open(const FileView& view, bool o_direct, bool writable) {
  std::lock_guard lock(cached_mu_);
  bool uncached = o_direct;
  if (writeback() && !uncached) {
    for (const auto& [ino, open] : cached_open_)
      uncached |= ino != view.ino && open.view.offset < view.offset + view.length &&
                  view.offset < open.view.offset + open.view.length;
  }
  // Only cached opens count: an uncached file holds no dirty pages, and its own reads and
  // writes launder the others.
  if (!uncached) ++cached_open_.try_emplace(view.ino, OpenFile{view, 0}).first->second.count;
  Opened(view, !uncached, writeback() && writable && !uncached);
  return uncached;
}

void Server::Release(fuse_ino_t ino, bool uncached) {
  if (uncached) return;
  std::lock_guard lock(cached_mu_);
  auto it = cached_open_.find(ino);
  if (it != cached_open_.end() && --it->second.count <= 0) cached_open_.erase(it);
}

void Server::Opened(const FileView& view, bool cached, bool may_dirty) {
  std::shared_ptr<const std::vector<CachedFile>> old = cached_.load(std::memory_order_acquire);
  CachedFile entry{view, cached, may_dirty};
  for (const CachedFile& f : *old) {
    if (f.view.ino != view.ino) continue;
    if ((f.cached || !cached) && (f.may_dirty || !may_dirty)) return;
    entry.cached |= f.cached;
    entry.may_dirty |= f.may_dirty;
  }
  auto grown = std::make_shared<std::vector<CachedFile>>();
  for (const CachedFile& f : *old)
    if (f.view.ino != view.ino) grown->push_back(f);
  grown->push_back(entry);
  const bool several = grown->size() > 1;
  cached_.store(std::move(grown), std::memory_order_release);
  if (several && session_ != nullptr) several_opened_.store(true, std::memory_order_release);
}

void Server::TellKernelTheSize() {
  if (!opt_.root_is_file || session_ == nullptr || !writeback()) return;
  std::call_once(size_told_, [&] {
    if (size_ == 0) return;
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    const uint64_t off = (size_ - 1) / page * page;
    std::vector<std::byte> last(size_ - off);
    Status st = image_->Read(off, last);
    int err = 0;
    if (st.ok()) {
      fuse_bufvec bufv = FUSE_BUFVEC_INIT(last.size());
      bufv.buf[0].mem = last.data();
      err = fuse_lowlevel_notify_store(session_, kRootIno, static_cast<off_t>(off), &bufv,
                                       static_cast<fuse_buf_copy_flags>(0));
    }
    if (!st.ok() || err != 0)
      Log(fmt::format("cannot tell the kernel the size of the file ({}): it may show as empty",
                      st.ok() ? std::strerror(-err) : st.ToString()));
  });
}

Status Server::WriteData(uint64_t off, std::span<const std::byte> data) {
  if (!opt_.detect_zeroes) return image_->Write(off, data);
  // Walk the request in zero_unit_-aligned pieces; only whole units may become zero
  // writes. Runs of the same kind are issued as one call.
  const uint64_t end = off + data.size();
  uint64_t run_start = off;
  bool run_zero = false;
  uint64_t pos = off;
  auto issue = [&](uint64_t from, uint64_t to, bool zero) -> Status {
    if (to <= from) return Status::Ok();
    if (zero) return image_->WriteZeroes(from, to - from, false);
    return image_->Write(from, data.subspan(from - off, to - from));
  };
  while (pos < end) {
    uint64_t unit_end = std::min((pos / zero_unit_ + 1) * zero_unit_, end);
    bool whole = pos % zero_unit_ == 0 && (unit_end - pos == zero_unit_ || unit_end == size_);
    bool zero = whole && AllZero(data.data() + (pos - off), unit_end - pos);
    if (zero != run_zero) {
      RETURN_IF_ERROR(issue(run_start, pos, run_zero));
      run_start = pos;
      run_zero = zero;
    }
    pos = unit_end;
  }
  return issue(run_start, end, run_zero);
}

Result<uint64_t> Server::Seek(const FileView& view, uint64_t off, int whence) {
  if (off >= view.length) return Status::Error(ErrorKind::kOutOfRange, ENXIO, std::string());
  const uint64_t start = view.offset + off, end = view.offset + view.length;
  uint64_t pos = start;
  while (pos < end) {
    uint64_t len = std::min(end - pos, kSeekWindow);
    ASSIGN_OR_RETURN(std::vector<BlockStatus> runs, image_->Map(pos, len));
    for (const BlockStatus& b : runs) {
      if (b.length == 0) continue;
      bool data = !b.zero;
      if ((whence == SEEK_DATA) == data) return std::max(b.offset, start) - view.offset;
    }
    pos += len;
  }
  if (whence == SEEK_DATA) return Status::Error(ErrorKind::kOutOfRange, ENXIO, std::string());
  return view.length;  // the implicit hole at the end of the file
}

void Server::Log(const std::string& line) const {
  if (opt_.foreground)
    std::fprintf(stderr, "vimgfs: %s\n", line.c_str());
  else
    syslog(LOG_ERR, "%s", line.c_str());
}

struct stat Server::FileAttr(const FileView& view) const {
  struct stat st {};
  st.st_ino = view.ino;
  st.st_mode = S_IFREG | opt_.file_mode;
  st.st_nlink = 1;
  st.st_uid = opt_.uid;
  st.st_gid = opt_.gid;
  st.st_size = static_cast<off_t>(view.length);
  st.st_blksize = 4096;
  // The image file's allocation, as du would show it; a partition gets at most its size.
  auto alloc = image_->file().AllocatedSize();
  uint64_t used = alloc.ok() ? *alloc : view.length;
  if (view.ino >= PartitionFiles::kFirstIno) used = std::min(used, view.length);
  st.st_blocks = static_cast<blkcnt_t>(used / 512);
  st.st_atim = FromNs(atime_ns_.load(std::memory_order_relaxed));
  st.st_mtim = FromNs(mtime_ns_.load(std::memory_order_relaxed));
  st.st_ctim = FromNs(ctime_ns_.load(std::memory_order_relaxed));
  return st;
}

struct stat Server::DirAttr() const {
  struct stat st {};
  st.st_ino = kRootIno;
  st.st_mode = S_IFDIR | 0755;
  st.st_nlink = 2;
  st.st_uid = opt_.uid;
  st.st_gid = opt_.gid;
  st.st_blksize = 4096;
  st.st_atim = FromNs(atime_ns_.load(std::memory_order_relaxed));
  st.st_mtim = FromNs(mtime_ns_.load(std::memory_order_relaxed));
  st.st_ctim = FromNs(ctime_ns_.load(std::memory_order_relaxed));
  return st;
}

void Server::Touch() {
  int64_t now = NowNs();
  mtime_ns_.store(now, std::memory_order_relaxed);
  ctime_ns_.store(now, std::memory_order_relaxed);
}

void Server::SetTimes(const struct stat& attr, int to_set) {
  int64_t now = NowNs();
  if (to_set & FUSE_SET_ATTR_ATIME_NOW)
    atime_ns_ = now;
  else if (to_set & FUSE_SET_ATTR_ATIME)
    atime_ns_ = ToNs(attr.st_atim);
  if (to_set & FUSE_SET_ATTR_MTIME_NOW)
    mtime_ns_ = now;
  else if (to_set & FUSE_SET_ATTR_MTIME)
    mtime_ns_ = ToNs(attr.st_mtim);
  if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME))
    ctime_ns_ = now;
}

}  // namespace vimgfs::mount

// The FUSE low-level front end: one image shown as one regular file.
//
// With a directory mount point, inode 1 is the root directory holding "disk.raw" (inode
// 2) and the partition files p1, p2, ... (inodes from 3, see partition_files.h); with a
// regular-file mount point, inode 1 is the raw view itself. Every file is a FileView: a
// byte range of the disk, disk.raw being the whole of it.
// Every request goes through one noexcept dispatcher (Dispatch in server.cc) that turns a
// Status or an exception into exactly one reply; handlers never throw across libfuse.
//
// Thread-safety: the handlers run on libfuse's worker threads at once; the Image is
// thread-safe and the server's own state is immutable after construction except the
// atomics (times) and the partition files (thread-safe themselves).
#pragma once

#include <fuse_lowlevel.h>  // FUSE_USE_VERSION=314 comes from CMake

#include <sys/stat.h>

#include <atomic>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "fuse/partition_files.h"
#include "vimgfs/image.h"
#include "vimgfs/status.h"

namespace vimgfs::mount {

struct ServerOptions {
  bool read_only = false;
  bool detect_zeroes = true;
  bool root_is_file = false;     // the mount point is a regular file
  bool partitions = true;        // show p1, p2, ... beside disk.raw (directory mounts)
  bool single_threaded = false;  // served by one thread (-s)
  // The kernel's writeback cache for buffered writers (asked for at init; a read-only or
  // single-threaded mount never uses it). See "Buffered I/O" in docs/ARCHITECTURE.md.
  bool writeback_cache = true;
  bool foreground = false;    // log to stderr (else syslog)
  unsigned file_mode = 0644;  // permission bits of the raw view
  uid_t uid = 0;
  gid_t gid = 0;
  struct timespec time {};  // initial atime/mtime/ctime (the image file's mtime)
};

class Server {
 public:
  // image must outlive the server.
  Server(Image* image, ServerOptions options);

  // The operation table to hand to fuse_session_new (userdata: this Server).
  static const fuse_lowlevel_ops& Ops();

  static constexpr fuse_ino_t kRootIno = FUSE_ROOT_ID;
  static constexpr fuse_ino_t kDiskIno = 2;
  static constexpr const char* kDiskName = "disk.raw";

  // Writes data at disk offset off, turning whole zero clusters into WriteZeroes when
  // detect_zeroes.
  Status WriteData(uint64_t off, std::span<const std::byte> data);

  // Every change of the disk through a file of the mount goes through here: write()
  // changes [off, off + len) of the disk, reply() acknowledges it to the kernel.
  //
  // Page-cache coherence: disk.raw and the partition files are separate inodes with
  // separate page caches over the same bytes, so after a change through one, the other
  // files' cached pages of that range are dropped (every file opened since the mount
  // began), before the reply: once the writer returns, no reader of another file sees the
  // old bytes. Dropping waits for the kernel to lock those pages. A write through another
  // file to an overlapping range may hold them while it waits for its own reply, and it
  // would wait for ours in turn: when such a write is in flight, the drop comes right
  // after the reply instead, which breaks the cycle (two writers racing on the same bytes
  // through two files get no order anyway). A single-threaded server cannot serve the
  // reads a drop may wait for: it does not drop, and opens files without keeping their
  // cache (coherence from one open to the next).
  // write: Status(); reply: void(). Defined (and only used) in server.cc.
  // uncached: the change does not come from the page cache (a direct write, fallocate):
  // dirty pages of the range are written back first (Launder), so that they land before
  // it, not over it, and the writer's own cached pages of the range are dropped after it.
  template <typename Write, typename Reply>
  Status WriteThrough(fuse_ino_t writer, uint64_t off, uint64_t len, bool uncached, Write&& write,
                      Reply&& reply);
  void set_session(fuse_session* session) { session_ = opt_.single_threaded ? nullptr : session; }
  bool can_invalidate() const { return !opt_.single_threaded; }
  // Whether to ask the kernel for its writeback cache, and what it answered at init.
  bool wants_writeback() const { return opt_.writeback_cache && !opt_.read_only && can_invalidate(); }
  void set_writeback(bool on) { writeback_.store(on, std::memory_order_release); }
  bool writeback() const { return writeback_.load(std::memory_order_acquire); }

  // An open of view (o_direct: the caller asked for O_DIRECT). Returns whether the file
  // is to be served uncached (FUSE direct I/O). With the writeback cache on, dirty pages
  // of one file are invisible to the other files over the same bytes until written back,
  // so only one of the files over a byte range is served through the page cache at a time:
  // a file opened while another file overlapping it is open cached goes uncached, and the
  // reads and writes of uncached files (O_DIRECT ones too) first write back the cached
  // files' dirty pages of the range (Launder).
  bool Open(const FileView& view, bool o_direct, bool writable);
  void Release(fuse_ino_t ino, bool uncached);
  // Writes back (and drops) the pages of [off, off + len) of the disk that any file may
  // hold dirty in the kernel's cache, so that an uncached read or write comes after them.
  // The file of that read or write too: Linux 6.18 writes a file's own dirty pages back
  // before its direct I/O, older kernels do not.
  void Launder(uint64_t off, uint64_t len);
  // Drops [off, off + len) of ino (offsets in the file) from the kernel's cache.
  void DropCache(fuse_ino_t ino, uint64_t off, uint64_t len);
  // A regular-file mount point's inode is made by the kernel with size 0, and with the
  // writeback cache the kernel trusts its own size: store the disk's last page into the
  // kernel's cache once, which sets the size, before the first answer about the file.
  void TellKernelTheSize();
  // SEEK_DATA / SEEK_HOLE inside view: zero runs are holes, as qemu's export. off and the
  // result are offsets in the view.
  Result<uint64_t> Seek(const FileView& view, uint64_t off, int whence);

  // Logs one line (stderr in the foreground, syslog once backgrounded).
  void Log(const std::string& line) const;

  Image& image() { return *image_; }
  const ServerOptions& options() const { return opt_; }
  bool has_dir() const { return !opt_.root_is_file; }
  // The file behind ino (disk.raw, the root-is-file view or a partition), if any.
  std::optional<FileView> View(fuse_ino_t ino) const;
  // Lists the partition files (re-reading the table after a write touched it).
  std::vector<PartitionFile> Partitions() { return partitions_.List(); }
  struct stat FileAttr(const FileView& view) const;
  struct stat DirAttr() const;
  void Touch();  // mtime/ctime = now (after a write)
  void SetTimes(const struct stat& attr, int to_set);

 private:
  struct CachedFile {
    FileView view;
    bool cached = false;     // opened through the page cache
    bool may_dirty = false;  // opened through the page cache for writing, writeback on
  };
  // Drops [off, off + len) of the disk from the kernel's cache of every opened file for
  // which which(CachedFile) holds.
  template <typename Which>
  void Invalidate(uint64_t off, uint64_t len, Which&& which);
  void DropOthersCache(fuse_ino_t writer, uint64_t off, uint64_t len);
  void DropOwnCache(fuse_ino_t ino, uint64_t off, uint64_t len);
  void Opened(const FileView& view, bool cached, bool may_dirty);  // with cached_mu_ held

  struct InFlightWrite {
    fuse_ino_t writer;
    uint64_t off, len;
  };
  using InFlight = std::list<InFlightWrite>;
  std::mutex in_flight_mu_;
  InFlight in_flight_;  // writes between WriteThrough's start and its drop

  fuse_session* session_ = nullptr;
  std::mutex cached_mu_;  // serializes Opened; guards cached_open_
  std::atomic<std::shared_ptr<const std::vector<CachedFile>>> cached_;  // files opened so far
  struct OpenFile {
    FileView view;
    int count = 0;
  };
  std::map<fuse_ino_t, OpenFile> cached_open_;  // files open now through the page cache
  std::atomic<bool> writeback_{false};
  std::once_flag size_told_;
  std::atomic<bool> several_opened_{false};  // more than one, and pages can be dropped
  Image* image_;
  ServerOptions opt_;
  uint64_t size_;
  uint64_t zero_unit_;  // granularity of zero detection (the image's cluster size)
  PartitionFiles partitions_;
  std::atomic<int64_t> atime_ns_;
  std::atomic<int64_t> mtime_ns_;
  std::atomic<int64_t> ctime_ns_;
};

}  // namespace vimgfs::mount

// Env::Default(): host files through pread/pwrite/fallocate/fdatasync.
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "io/nbd_file.h"
#include "io/reference_path.h"
#include "vimgfs/env.h"

namespace vimgfs {
namespace {

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string path, bool writable) : fd_(fd), path_(std::move(path)), writable_(writable) {}
  ~PosixFile() override { ::close(fd_); }

  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "'{}': read of {} bytes at {:#x} failed: {}", path_, buf.size(), off,
                                 std::strerror(errno));
      }
      if (n == 0) {  // past EOF: zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pwrite(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "'{}': write of {} bytes at {:#x} failed: {}", path_, buf.size(), off,
                                 std::strerror(errno));
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status Sync(bool data_only) override {
    int r = data_only ? ::fdatasync(fd_) : ::fsync(fd_);
    if (r != 0) return Status::FromErrno(errno, "'{}': sync failed: {}", path_, std::strerror(errno));
    return Status::Ok();
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0)
      return Status::FromErrno(errno, "'{}': stat failed: {}", path_, std::strerror(errno));
    if (S_ISBLK(st.st_mode)) {
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return Status::FromErrno(errno, "'{}': lseek failed", path_);
      return static_cast<uint64_t>(end);
    }
    return static_cast<uint64_t>(st.st_size);
  }

  Result<uint64_t> AllocatedSize() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0)
      return Status::FromErrno(errno, "'{}': stat failed: {}", path_, std::strerror(errno));
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0)
      return Status::FromErrno(errno, "'{}': truncate to {} failed: {}", path_, size, std::strerror(errno));
    return Status::Ok();
  }

  Status PunchHole(uint64_t off, uint64_t len) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) != 0) {
      if (errno == EOPNOTSUPP || errno == ENOSYS)
        return Status::Unsupported("'{}': the host file system cannot punch holes", path_);
      return Status::FromErrno(errno, "'{}': punching a hole at {:#x} failed: {}", path_, off,
                               std::strerror(errno));
    }
    return Status::Ok();
  }

  Status Allocate(uint64_t off, uint64_t len) override {
    int r = ::posix_fallocate(fd_, static_cast<off_t>(off), static_cast<off_t>(len));
    if (r != 0)
      return Status::FromErrno(r, "'{}': allocating {} bytes at {:#x} failed: {}", path_, len, off,
                               std::strerror(r));
    return Status::Ok();
  }

  Result<HostExtent> ProbeExtent(uint64_t off) override {
    ASSIGN_OR_RETURN(uint64_t size, Size());
    if (off >= size) return HostExtent{false, 0};
    off_t data = ::lseek(fd_, static_cast<off_t>(off), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return HostExtent{false, size - off};  // a hole to EOF
      return HostExtent{true, size - off};                       // no sparse support: all data
    }
    if (static_cast<uint64_t>(data) > off) return HostExtent{false, static_cast<uint64_t>(data) - off};
    off_t hole = ::lseek(fd_, static_cast<off_t>(off), SEEK_HOLE);
    if (hole < 0 || static_cast<uint64_t>(hole) > size) hole = static_cast<off_t>(size);
    return HostExtent{true, static_cast<uint64_t>(hole) - off};
  }

  const std::string& path() const override { return path_; }
  bool writable() const override { return writable_; }
  int fd() const override { return fd_; }

 private:
  int fd_;
  std::string path_;
  bool writable_;
};

// Closes a descriptor when it goes out of scope.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

// Opens `parts` below the folder `dirfd` without following any symlink or leaving the
// folder: openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) where the kernel has it, else one
// O_NOFOLLOW openat per component (ComponentsBeneath already refused "..").
int OpenBeneath(int dirfd, const std::vector<std::string>& parts, int flags) {
  std::string rel;
  for (const std::string& p : parts) rel += (rel.empty() ? "" : "/") + p;
  struct open_how how = {};
  how.flags = static_cast<uint64_t>(flags | O_NOFOLLOW | O_CLOEXEC);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  long fd = ::syscall(SYS_openat2, dirfd, rel.c_str(), &how, sizeof(how));
  if (fd >= 0 || (errno != ENOSYS && errno != EPERM)) return static_cast<int>(fd);
  // No openat2 (old kernel, or a seccomp filter that refuses it): walk by hand.
  Fd cur(::dup(dirfd));
  if (cur.fd < 0) return -1;
  for (size_t i = 0; i + 1 < parts.size(); i++) {
    int next = ::openat(cur.fd, parts[i].c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0) return -1;  // a symlinked folder fails here too (ENOTDIR)
    ::close(std::exchange(cur.fd, next));
  }
  return ::openat(cur.fd, parts.back().c_str(), flags | O_NOFOLLOW | O_CLOEXEC);
}

Status ReferenceError(int err, const std::string& path) {
  if (err == ENOENT || err == ENOTDIR) return Status::NotFound("'{}': No such file or directory", path);
  if (err == ELOOP || err == EXDEV)
    return Status::Error(ErrorKind::kUnsupported, EXDEV, "a symlink or a name outside the folder");
  return Status::FromErrno(err, "Could not open '{}': {}", path, std::strerror(err));
}

class PosixEnv final : public Env {
 public:
  Result<std::unique_ptr<File>> OpenReference(const std::string& dir, const std::string& name, OpenMode mode,
                                              bool beneath) override {
    std::string path = JoinPath(dir, name);
    std::vector<std::string> parts;
    Fd dirfd(-1);
    // First an O_PATH descriptor: resolving it has no side effects even on a device or a
    // FIFO, and what it names can no longer be swapped.
    Fd pfd(-1);
    if (beneath) {
      char real[PATH_MAX];
      std::string folder = dir.empty() ? "." : dir;
      std::string real_dir = ::realpath(folder.c_str(), real) ? std::string(real) : std::string();
      ASSIGN_OR_RETURN(parts, ComponentsBeneath(folder, real_dir, name));
      path = folder;
      for (const std::string& p : parts) path = JoinPath(path, p);
      dirfd.fd = ::open(folder.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
      if (dirfd.fd < 0) return ReferenceError(errno, folder);
      pfd.fd = OpenBeneath(dirfd.fd, parts, O_PATH);
    } else {
      pfd.fd = ::open(path.c_str(), O_PATH | O_CLOEXEC);  // the user's own chains may use symlinks
    }
    if (pfd.fd < 0) return ReferenceError(errno, path);
    struct stat want;
    if (::fstat(pfd.fd, &want) != 0) return ReferenceError(errno, path);
    if (S_ISLNK(want.st_mode)) return ReferenceError(ELOOP, path);
    if (!S_ISREG(want.st_mode)) return Status::Error(ErrorKind::kUnsupported, EPERM, "not a regular file");

    // Then the very same inode, opened for I/O through its /proc link. Without /proc, open
    // the name again without blocking and make sure it is still the same file.
    int flags = (mode == OpenMode::kReadWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    std::string self = "/proc/self/fd/" + std::to_string(pfd.fd);
    Fd fd(::open(self.c_str(), flags));
    if (fd.fd < 0 && errno == ENOENT) {
      int again = flags | O_NONBLOCK | O_NOCTTY;
      fd.fd = beneath ? OpenBeneath(dirfd.fd, parts, again) : ::open(path.c_str(), again);
      if (fd.fd >= 0) (void)::fcntl(fd.fd, F_SETFL, ::fcntl(fd.fd, F_GETFL) & ~O_NONBLOCK);
    }
    if (fd.fd < 0) return ReferenceError(errno, path);
    struct stat got;
    if (::fstat(fd.fd, &got) != 0) return ReferenceError(errno, path);
    if (got.st_dev != want.st_dev || got.st_ino != want.st_ino)
      return Status::Error(ErrorKind::kUnsupported, EXDEV, "replaced while being opened");
    return std::unique_ptr<File>(new PosixFile(fd.release(), path, mode == OpenMode::kReadWrite));
  }

  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override {
    if (IsNbdUri(path)) return OpenNbd(path, mode);
    int flags = (mode == OpenMode::kReadWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    int fd = ::open(path.c_str(), flags);
    if (fd < 0) return Status::FromErrno(errno, "Could not open '{}': {}", path, std::strerror(errno));
    return std::unique_ptr<File>(new PosixFile(fd, path, mode == OpenMode::kReadWrite));
  }

  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override {
    if (IsNbdUri(path)) return CreateOnNbd(path);
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : O_TRUNC);
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) return Status::FromErrno(errno, "Could not create '{}': {}", path, std::strerror(errno));
    return std::unique_ptr<File>(new PosixFile(fd, path, true));
  }

  Status Remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0)
      return Status::FromErrno(errno, "Could not remove '{}': {}", path, std::strerror(errno));
    return Status::Ok();
  }

  Result<FileStat> Stat(const std::string& path) override {
    if (IsNbdUri(path)) return StatNbd(path);
    struct stat st;
    FileStat fs;
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) return fs;
      return Status::FromErrno(errno, "Could not stat '{}': {}", path, std::strerror(errno));
    }
    fs.exists = true;
    fs.regular = S_ISREG(st.st_mode);
    fs.directory = S_ISDIR(st.st_mode);
    fs.size = static_cast<uint64_t>(st.st_size);
    return fs;
  }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv();
  return env;
}

Status SetFileCreateHints(File& file, bool nocow, uint32_t extent_size_hint) {
  const int fd = file.fd();
  if (fd < 0) return Status::Ok();
  if (nocow) {
    int flags = 0;
    if (::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
      flags |= FS_NOCOW_FL;
      (void)::ioctl(fd, FS_IOC_SETFLAGS, &flags);  // an optimization only
    }
  }
  // qemu asks for the hint even when it is 0 (which clears it).
  struct fsxattr attr {};
  int r = ::ioctl(fd, FS_IOC_FSGETXATTR, &attr);
  if (r == 0) {
    attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
    attr.fsx_extsize = extent_size_hint;
    r = ::ioctl(fd, FS_IOC_FSSETXATTR, &attr);
  }
  if (r < 0 && extent_size_hint != 0) {
    int err = errno;
    return Status::FromErrno(err, "Failed to set extent size hint: {}", std::strerror(err));
  }
  return Status::Ok();
}

}  // namespace vimgfs

// Env::Default(): host files through pread/pwrite/fallocate/fdatasync.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "vimgfs/env.h"

namespace vimgfs {
namespace {

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string path, bool writable)
      : fd_(fd), path_(std::move(path)), writable_(writable) {}
  ~PosixFile() override { ::close(fd_); }

  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "'{}': read of {} bytes at {:#x} failed: {}", path_,
                                 buf.size(), off, std::strerror(errno));
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
        return Status::FromErrno(errno, "'{}': write of {} bytes at {:#x} failed: {}", path_,
                                 buf.size(), off, std::strerror(errno));
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
      return HostExtent{true, size - off};                        // no sparse support: all data
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

class PosixEnv final : public Env {
 public:
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override {
    int flags = (mode == OpenMode::kReadWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    int fd = ::open(path.c_str(), flags);
    if (fd < 0)
      return Status::FromErrno(errno, "Could not open '{}': {}", path, std::strerror(errno));
    return std::unique_ptr<File>(new PosixFile(fd, path, mode == OpenMode::kReadWrite));
  }

  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override {
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : O_TRUNC);
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0)
      return Status::FromErrno(errno, "Could not create '{}': {}", path, std::strerror(errno));
    return std::unique_ptr<File>(new PosixFile(fd, path, true));
  }

  Status Remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0)
      return Status::FromErrno(errno, "Could not remove '{}': {}", path, std::strerror(errno));
    return Status::Ok();
  }

  Result<FileStat> Stat(const std::string& path) override {
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

}  // namespace vimgfs

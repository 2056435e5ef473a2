// qemu-compatible image locks; the scheme is described in lock.h.
#include "io/lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace vimgfs {
namespace {

constexpr int kPermBase = 100;    // qemu RAW_LOCK_PERM_BASE
constexpr int kSharedBase = 200;  // qemu RAW_LOCK_SHARED_BASE
constexpr int kPermCount = 4;     // bits 0..3 (BLK_PERM_ALL = 0x0f in qemu 7.2)

constexpr unsigned Bit(LockPerm p) { return 1u << static_cast<int>(p); }

// qemu's names for the permissions, as its messages use them (bdrv_perm_names).
const char* PermName(int bit) {
  switch (bit) {
    case 0:
      return "consistent read";
    case 1:
      return "write";
    case 2:
      return "write unchanged";
    case 3:
      return "resize";
  }
  return "?";
}

struct PermSet {
  unsigned held = 0;      // permissions this user takes
  unsigned unshared = 0;  // permissions it refuses to others
};

PermSet PermsFor(bool write) {
  PermSet s;
  s.held = Bit(LockPerm::kConsistentRead);
  if (write) s.held |= Bit(LockPerm::kWrite) | Bit(LockPerm::kResize);
  s.unshared = Bit(LockPerm::kWrite) | Bit(LockPerm::kResize);
  return s;
}

// A writer that shares no reading either (qemu's crypto driver rewriting key slots).
PermSet ExclusivePerms() {
  PermSet s = PermsFor(true);
  s.unshared |= Bit(LockPerm::kConsistentRead);
  return s;
}

// Sets (F_RDLCK) or clears (F_UNLCK) an OFD lock on one byte. Returns 0 or errno.
int LockByte(int fd, int byte, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_pid = 0;  // required for OFD locks
  while (::fcntl(fd, F_OFD_SETLK, &fl) == -1) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

// Whether another open file description holds a lock on the byte (probe with a write
// lock, as qemu_lock_fd_test does). Returns 0 (free), EAGAIN (held) or another errno.
int TestByte(int fd, int byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_pid = 0;
  while (::fcntl(fd, F_OFD_GETLK, &fl) == -1) {
    if (errno != EINTR) return errno;
  }
  return fl.l_type == F_UNLCK ? 0 : EAGAIN;
}

bool LocksUnsupported(int err) { return err == ENOTSUP || err == EINVAL || err == ENOLCK; }

Status BusyError(const std::string& path, bool shared, int bit) {
  return Status::Busy("'{}': Failed to get {}\"{}\" lock: is another process using the image?", path,
                      shared ? "shared " : "", PermName(bit));
}

}  // namespace

static Status CheckPerms(int fd, const std::string& path, const PermSet& s) {
  for (int bit = 0; bit < kPermCount; ++bit) {
    unsigned b = 1u << bit;
    if (s.held & b) {  // somebody refusing a permission we want?
      int r = TestByte(fd, kSharedBase + bit);
      if (r == EAGAIN) return BusyError(path, false, bit);
      if (r != 0 && !LocksUnsupported(r))
        return Status::FromErrno(r, "'{}': cannot test lock: {}", path, std::strerror(r));
    }
    if (s.unshared & b) {  // somebody holding a permission we refuse?
      int r = TestByte(fd, kPermBase + bit);
      if (r == EAGAIN) return BusyError(path, true, bit);
      if (r != 0 && !LocksUnsupported(r))
        return Status::FromErrno(r, "'{}': cannot test lock: {}", path, std::strerror(r));
    }
  }
  return Status::Ok();
}

Status CheckImageLockable(int fd, const std::string& path, bool write) {
  return CheckPerms(fd, path, PermsFor(write));
}

// One attempt: take our bytes, then look for conflicting ones.
static Status LockImageOnce(File& f, const PermSet& s) {
  int fd = f.fd();
  if (fd < 0) return Status::Ok();
  // Take ours first, then look for others (qemu's order): two processes racing both see
  // each other's locks and at least one backs off.
  for (int bit = 0; bit < kPermCount; ++bit) {
    unsigned b = 1u << bit;
    int r = 0;
    if (s.held & b) r = LockByte(fd, kPermBase + bit, F_RDLCK);
    if (r == 0 && (s.unshared & b)) r = LockByte(fd, kSharedBase + bit, F_RDLCK);
    if (r != 0) {
      UnlockImage(f);
      if (LocksUnsupported(r)) return Status::Ok();  // host without OFD locks: as qemu, go on
      return Status::FromErrno(r, "'{}': cannot lock the image: {}", f.path(), std::strerror(r));
    }
  }
  // Downgrading a writer to a reader: drop the bytes a reader does not hold.
  for (int bit = 0; bit < kPermCount; ++bit) {
    unsigned b = 1u << bit;
    if (!(s.held & b)) (void)LockByte(fd, kPermBase + bit, F_UNLCK);
    if (!(s.unshared & b)) (void)LockByte(fd, kSharedBase + bit, F_UNLCK);
  }
  Status st = CheckPerms(fd, f.path(), s);
  if (!st.ok()) UnlockImage(f);
  return st;
}

static Status LockWithRetries(File& f, const PermSet& s, int wait_ms) {
  for (int waited = 0;; waited += 20) {
    Status st = LockImageOnce(f, s);
    if (st.kind() != ErrorKind::kBusy || waited >= wait_ms) return st;
    ::usleep(20 * 1000);
  }
}

Status LockImage(File& f, bool write, int wait_ms) { return LockWithRetries(f, PermsFor(write), wait_ms); }

Status LockImageExclusive(File& f, int wait_ms) { return LockWithRetries(f, ExclusivePerms(), wait_ms); }

Status LockImageSharingWrites(File& f, int wait_ms) {
  PermSet s;
  s.held = Bit(LockPerm::kConsistentRead);
  return LockWithRetries(f, s, wait_ms);
}

void UnlockImage(File& f) {
  int fd = f.fd();
  if (fd < 0) return;
  for (int bit = 0; bit < kPermCount; ++bit) {
    (void)LockByte(fd, kPermBase + bit, F_UNLCK);
    (void)LockByte(fd, kSharedBase + bit, F_UNLCK);
  }
}

}  // namespace vimgfs

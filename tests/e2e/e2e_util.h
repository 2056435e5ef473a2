// Helpers for the end-to-end mount tests: skip conditions, starting and stopping the
// vimgfs daemon, loop devices, qemu-img as the oracle.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/test_util.h"

namespace vimgfs::e2e {

// Why FUSE mounts cannot run here ("" when they can): not root, no /dev/fuse, no fusermount3.
std::string FuseUnavailableReason();
// Why loop devices cannot be used ("" when they can).
std::string LoopUnavailableReason();

#define REQUIRE_FUSE()                                         \
  do {                                                         \
    std::string _why = ::vimgfs::e2e::FuseUnavailableReason(); \
    if (!_why.empty()) GTEST_SKIP() << _why;                   \
    REQUIRE_QEMU_IMG();                                        \
  } while (0)

#define REQUIRE_LOOP()                                         \
  do {                                                         \
    std::string _why = ::vimgfs::e2e::LoopUnavailableReason(); \
    if (!_why.empty()) GTEST_SKIP() << _why;                   \
  } while (0)

// An unprivileged user for the tests that must run without root: nobody (65534), with
// /dev/fuse opened to all users (mode 0666, as Debian's udev rule sets it) while the
// object lives, and the previous mode restored after. Skip reason() when it cannot be.
class Unprivileged {
 public:
  Unprivileged();
  ~Unprivileged();
  Unprivileged(const Unprivileged&) = delete;
  Unprivileged& operator=(const Unprivileged&) = delete;
  const std::string& reason() const { return reason_; }
  // `sh -c command` as nobody, in dir (which is made reachable and writable for it).
  test::CommandResult Run(const std::string& command, const std::string& dir) const;

 private:
  std::string reason_;
  mode_t fuse_mode_ = 0;
  bool restore_ = false;
};

// Whether path is a mount point right now (/proc/self/mountinfo).
bool IsMountPoint(const std::string& path);
// Pid of the vimgfs daemon serving mountpoint (from /proc/*/cmdline), or -1.
pid_t FindDaemon(const std::string& mountpoint);
// Waits until no process has pid (up to timeout_ms); true when gone.
bool WaitGone(pid_t pid, int timeout_ms);

// One mount. Stop() (also run by the destructor) unmounts and waits for the daemon to
// finish closing the image, so the image can be checked right after.
class Mount {
 public:
  Mount() = default;
  ~Mount();
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

  // `vimgfs ARGS...` the normal (backgrounding) way; returns its exit code and stderr.
  // On success the daemon's pid is looked up by mountpoint.
  test::CommandResult Start(const std::vector<std::string>& args, const std::string& mountpoint);
  // `vimgfs -f ARGS...` as a child of this process, waiting until the mount is up.
  // Returns false (and reaps the child) if it exits first.
  bool StartForeground(const std::vector<std::string>& args, const std::string& mountpoint);

  // Unmounts (fusermount3 -u, retrying while busy for 3 s, then lazily) and waits for the
  // daemon to exit. Returns the daemon's exit status when it is our child, else 0 when it
  // went away; -1 when the mount was busy or the daemon hung (then it is killed).
  int Stop();
  // kill -9 the daemon, then detach the dead mount.
  void Kill();

  pid_t pid() const { return pid_; }
  const std::string& mountpoint() const { return mountpoint_; }
  bool active() const { return !mountpoint_.empty(); }

 private:
  std::string mountpoint_;
  pid_t pid_ = -1;
  bool child_ = false;
};

// losetup --find --show [-r] file -> "/dev/loopN" ("" on failure).
std::string LoopAttach(const std::string& file, bool read_only);
void LoopDetach(const std::string& dev);

// qemu-img check exit code (0 clean, 3 leaks only, 2 corrupt ...), output in *out.
int QemuCheck(const std::string& image, std::string* out = nullptr);
// qemu-img check, or vimgfs check for the formats qemu-img cannot check (exit 63: VHD); a
// VHDX with a pending log is checked with -r all, which replays it (its crash recovery).
int CheckImage(const std::string& image, std::string* out = nullptr);
// qemu-img create's arguments for an image of exactly `size` of format fmt (VHD: force_size,
// or qemu rounds the size up to a CHS geometry).
std::string ExactSizeCreateArgs(const std::string& fmt, const std::string& image, const std::string& size);
// qemu-img convert -O raw into dst; true on success.
bool QemuToRaw(const std::string& image, const std::string& dst);
// Creates an image with qemu-img create; fails the test on error.
void QemuCreate(const std::string& args);
// Runs a shell command, expecting exit 0; returns stdout.
std::string MustRun(const std::string& cmd);

// pread/pwrite the whole buffer; return false on short I/O or error (errno set).
bool PWriteAll(int fd, const void* buf, size_t n, uint64_t off);
bool PReadAll(int fd, void* buf, size_t n, uint64_t off);

}  // namespace vimgfs::e2e

// End-to-end: mount options and their effect — fstab-style option order, mount.fuse3,
// overlay, snapshot, locking against qemu, errors reported before backgrounding.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "e2e/e2e_util.h"
#include "io/lock.h"
#include "vimgfs/env.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RandomBytes;
using test::RunCommand;

constexpr uint64_t kMiB = 1ull << 20;

class MountOptions : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    mnt_ = dir_.File("mnt");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    image_ = dir_.File("a.qcow2");
    QemuCreate("-f qcow2 " + Quote(image_) + " 16M");
    MustRun("qemu-io -c 'write -P 0x11 0 1M' " + Quote(image_));
  }
  std::string Disk() const { return mnt_ + "/disk.raw"; }
  std::string MountOptionsOf(const std::string& mp) {
    std::ifstream in("/proc/self/mounts");
    std::string dev, where, type, opts, rest;
    while (in >> dev >> where >> type >> opts) {
      std::getline(in, rest);
      if (where == mp) return type + " " + opts;
    }
    return "";
  }
  uint8_t ByteAt(const std::string& path, uint64_t off) {
    int fd = open(path.c_str(), O_RDONLY);
    uint8_t b = 0xee;
    if (fd >= 0) {
      EXPECT_EQ(pread(fd, &b, 1, static_cast<off_t>(off)), 1);
      close(fd);
    }
    return b;
  }
  bool CanOpenForWrite(const std::string& path) {
    int fd = open(path.c_str(), O_RDWR);
    if (fd >= 0) close(fd);
    return fd >= 0;
  }

  test::TempDir dir_;
  Mount mount_;
  std::string mnt_, image_;
};

TEST_F(MountOptions, FstabStyleOptionsAfterPositionals) {
  // What mount.fuse3 runs for `/img/a.qcow2 /mnt/img fuse.vimgfs ro,format=qcow2 0 0`.
  auto r = mount_.Start({image_, mnt_, "-o", "ro,format=qcow2,dev,suid,noauto"}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string info = MountOptionsOf(mnt_);
  EXPECT_EQ(info.rfind("fuse.vimgfs ro", 0), 0u) << info;
  EXPECT_EQ(ByteAt(Disk(), 10), 0x11);
  EXPECT_FALSE(CanOpenForWrite(Disk()));
  EXPECT_EQ(mount_.Stop(), 0);

  // Explicit form, options mixed around the positionals.
  r = mount_.Start({"mount", "-o", "format=qcow2", image_, "-r", mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(CanOpenForWrite(Disk()));
  EXPECT_EQ(mount_.Stop(), 0);
}

TEST_F(MountOptions, MountFuse3Helper) {
  // mount -t fuse.vimgfs / fstab go through mount.fuse3, which runs 'vimgfs' from PATH.
  if (!test::HaveProgram("mount.fuse3")) GTEST_SKIP() << "mount.fuse3 not installed";
  std::string bindir = dir_.File("bin");
  ASSERT_EQ(mkdir(bindir.c_str(), 0755), 0);
  ASSERT_EQ(symlink(test::VimgfsBinary().c_str(), (bindir + "/vimgfs").c_str()), 0);
  auto r = RunCommand("PATH=" + Quote(bindir) + ":$PATH mount.fuse3 " + Quote(image_) + " " + Quote(mnt_) +
                      " -t fuse.vimgfs -o rw,format=qcow2,nodev,nosuid");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(IsMountPoint(mnt_));
  std::string info = MountOptionsOf(mnt_);
  EXPECT_EQ(info.rfind("fuse.vimgfs rw", 0), 0u) << info;
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(pwrite(fd, "\x22", 1, 5), 1);
  EXPECT_EQ(fsync(fd), 0);
  close(fd);
  pid_t pid = FindDaemon(mnt_);
  ASSERT_EQ(RunCommand("umount " + Quote(mnt_)).exit_code, 0);
  if (pid > 0) {
    EXPECT_TRUE(WaitGone(pid, 20000));
  }
  EXPECT_EQ(QemuCheck(image_), 0);
  auto out = MustRun("qemu-io -c 'read -P 0x22 5 1' " + Quote(image_));
  EXPECT_EQ(out.find("Pattern verification failed"), std::string::npos) << out;
}

TEST_F(MountOptions, MountTypeAndFstabAsInstalled) {
  // `cmake --install` puts vimgfs in /usr/local/bin, which is on mount(8)'s PATH. Simulate
  // that in a private mount namespace (a tmpfs over /usr/local/bin holding a link to the
  // built binary, a bind-mounted /etc/fstab), then use mount(8) as a user would.
  if (!test::HaveProgram("unshare") || !test::HaveProgram("mount.fuse3"))
    GTEST_SKIP() << "unshare or mount.fuse3 not installed";
  std::string fstab = dir_.File("fstab");
  std::string line = image_ + " " + mnt_ + " fuse.vimgfs ro,format=qcow2,noauto,nofail 0 0\n";
  test::WriteWholeFile(fstab, std::vector<uint8_t>(line.begin(), line.end()));
  std::string script = "set -e; mount -t tmpfs none /usr/local/bin; ln -s " + Quote(test::VimgfsBinary()) +
                       " /usr/local/bin/vimgfs; mount --bind " + Quote(fstab) +
                       " /etc/fstab; "
                       // fstab line
                       "mount " +
                       Quote(mnt_) + "; grep ' " + mnt_ +
                       " fuse.vimgfs ro,' /proc/self/mounts; "
                       "od -An -tx1 -N1 " +
                       Quote(Disk()) + "; umount " + Quote(mnt_) +
                       "; "
                       // mount -t with options after the positionals
                       "mount -t fuse.vimgfs " +
                       Quote(image_) + " " + Quote(mnt_) +
                       " -o rw; "
                       "grep ' " +
                       mnt_ +
                       " fuse.vimgfs rw,' /proc/self/mounts; "
                       "printf '\\125' | dd of=" +
                       Quote(Disk()) +
                       " bs=1 seek=7 conv=notrunc,fsync 2>/dev/null; "
                       "umount " +
                       Quote(mnt_);
  auto r = RunCommand("unshare --mount --propagation private sh -c " + Quote(script));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find(" 11"), std::string::npos) << r.out;
  // The daemon lived in the namespace; once it closed the image qemu can open it.
  for (int i = 0; i < 100 && RunCommand("qemu-img check " + Quote(image_)).exit_code != 0; ++i) usleep(20000);
  auto out = MustRun("qemu-io -c 'read -P 0x55 7 1' " + Quote(image_));
  EXPECT_EQ(out.find("verification failed"), std::string::npos) << out;
}

TEST_F(MountOptions, ErrorsBeforeBackgrounding) {
  auto r = mount_.Start({dir_.File("missing.qcow2"), mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("missing.qcow2"), std::string::npos) << r.err;
  EXPECT_FALSE(IsMountPoint(mnt_));
  r = mount_.Start({image_, dir_.File("nowhere")}, dir_.File("nowhere"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nowhere"), std::string::npos) << r.err;
  r = mount_.Start({"-F", "vdi", image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1) << "a qcow2 opened as vdi must be refused";
  EXPECT_FALSE(IsMountPoint(mnt_));
  r = mount_.Start({"--bogus", image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--bogus"), std::string::npos) << r.err;
  r = mount_.Start({"mount", "--help"}, mnt_);
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("overlay"), std::string::npos);
}

TEST_F(MountOptions, LockConflictWithQemu) {
  auto r = mount_.Start({image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto q = RunCommand("qemu-io -c 'write 0 4k' " + Quote(image_));
  EXPECT_NE(q.exit_code, 0);
  EXPECT_NE(q.err.find("Failed to get \"write\" lock"), std::string::npos) << q.err;
  // A second vimgfs mount of the same image is refused as well.
  std::string mnt2 = dir_.File("mnt2");
  ASSERT_EQ(mkdir(mnt2.c_str(), 0755), 0);
  Mount second;
  r = second.Start({"-r", image_, mnt2}, mnt2);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
  EXPECT_EQ(mount_.Stop(), 0);
  // Two read-only mounts share the image.
  ASSERT_EQ(mount_.Start({"-r", image_, mnt_}, mnt_).exit_code, 0);
  r = second.Start({"-r", image_, mnt2}, mnt2);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(mnt2 + "/disk.raw", 0), 0x11);
  EXPECT_EQ(second.Stop(), 0);
  EXPECT_EQ(mount_.Stop(), 0);

  // qemu holds the image for writing: vimgfs refuses, in the foreground, exit 1.
  pid_t qemu = fork();
  if (qemu == 0) {
    setpgid(0, 0);
    execlp("sh", "sh", "-c", ("sleep 5 | qemu-io " + Quote(image_) + " >/dev/null").c_str(), nullptr);
    _exit(127);
  }
  ASSERT_GT(qemu, 0);
  bool locked = false;
  for (int i = 0; i < 300 && !locked; ++i) {  // wait until qemu-io has its locks
    usleep(10000);
    auto f = Env::Default()->Open(image_, OpenMode::kReadOnly);
    ASSERT_TRUE(f.ok());
    locked = !CheckImageLockable((*f)->fd(), image_, true).ok();
  }
  ASSERT_TRUE(locked) << "qemu-io did not lock the image";
  r = mount_.Start({image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
  EXPECT_FALSE(IsMountPoint(mnt_));
  kill(-qemu, SIGKILL);
  waitpid(qemu, nullptr, 0);
}

TEST_F(MountOptions, LockImageAgainstQemuIo) {
  auto f = Env::Default()->Open(image_, OpenMode::kReadWrite);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(LockImage(**f, true).ok());
  auto q = RunCommand("qemu-io -c 'write 0 4k' " + Quote(image_));
  EXPECT_NE(q.err.find("Failed to get \"write\" lock"), std::string::npos) << q.err;
  // A second vimgfs user sees the conflict too (another open file description).
  auto g = Env::Default()->Open(image_, OpenMode::kReadOnly);
  ASSERT_TRUE(g.ok());
  Status st = LockImage(**g, false);
  EXPECT_EQ(st.kind(), ErrorKind::kBusy) << st.ToString();
  EXPECT_NE(st.message().find("a.qcow2"), std::string::npos) << st.ToString();
  // Downgraded to a reader: qemu may read (-r) but still not write.
  ASSERT_TRUE(LockImage(**f, false).ok());
  EXPECT_EQ(RunCommand("qemu-io -r -c 'read 0 4k' " + Quote(image_)).exit_code, 0);
  EXPECT_NE(RunCommand("qemu-io -c 'write 0 4k' " + Quote(image_)).exit_code, 0);
  UnlockImage(**f);
  EXPECT_EQ(RunCommand("qemu-io -c 'write 0 4k' " + Quote(image_)).exit_code, 0);
}

TEST_F(MountOptions, OverlayKeepsImageUntouched) {
  std::string before = test::Sha256OfFile(image_);
  std::string overlay = dir_.File("ov.qcow2");
  auto r = mount_.Start({"--overlay", overlay, image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 100), 0x11) << "overlay shows the image's data";
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> data(65536, 0x33);
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 512 * 1024 + 100));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  ASSERT_EQ(mount_.Stop(), 0);
  EXPECT_EQ(test::Sha256OfFile(image_), before) << "IMAGE changed under --overlay";
  EXPECT_EQ(QemuCheck(overlay), 0);
  auto info = nlohmann::json::parse(MustRun("qemu-img info --output=json " + Quote(overlay)));
  EXPECT_EQ(info["format"], "qcow2");
  EXPECT_EQ(info["backing-filename"], "a.qcow2") << "backing name relative to the overlay's folder";
  auto out =
      MustRun("qemu-io -r -c 'read -P 0x33 524388 65536' -c 'read -P 0x11 0 524388' " + Quote(overlay));
  EXPECT_EQ(out.find("verification failed"), std::string::npos) << out;

  // Reused on the next mount (via -o overlay=), data still there.
  r = mount_.Start({image_, mnt_, "-o", "overlay=" + overlay}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 512 * 1024 + 100), 0x33);
  EXPECT_EQ(mount_.Stop(), 0);

  // An existing file that is not a qcow2 backed by IMAGE is refused.
  std::string other = dir_.File("other.qcow2");
  QemuCreate("-f qcow2 " + Quote(other) + " 16M");
  r = mount_.Start({"--overlay", other, image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("other.qcow2"), std::string::npos) << r.err;
  test::WriteWholeFile(dir_.File("junk"), RandomBytes(4096, 1));
  r = mount_.Start({"--overlay", dir_.File("junk"), image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_FALSE(IsMountPoint(mnt_));
}

TEST_F(MountOptions, SnapshotIsReadOnlyView) {
  MustRun("qemu-img snapshot -c s1 " + Quote(image_));
  MustRun("qemu-io -c 'write -P 0x44 0 1M' " + Quote(image_));
  auto r = mount_.Start({"--snapshot", "s1", image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 1000), 0x11) << "snapshot content, not the current one";
  EXPECT_FALSE(CanOpenForWrite(Disk()));
  EXPECT_EQ(mount_.Stop(), 0);
  r = mount_.Start({image_, mnt_, "-o", "snapshot=s1"}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 1000), 0x11);
  EXPECT_EQ(mount_.Stop(), 0);
  r = mount_.Start({image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 1000), 0x44) << "current content";
  EXPECT_EQ(mount_.Stop(), 0);
  r = mount_.Start({"--snapshot", "nosuch", image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
}

TEST_F(MountOptions, UntrustedRefusesExternalReferences) {
  // The backing file is outside the overlay's folder.
  ASSERT_EQ(mkdir(dir_.File("sub").c_str(), 0755), 0);
  std::string top = dir_.File("sub/top.qcow2");
  QemuCreate("-f qcow2 -b ../a.qcow2 -F qcow2 " + Quote(top));
  auto r = mount_.Start({"--untrusted", top, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("../a.qcow2"), std::string::npos) << "the message names the reference: " << r.err;
  EXPECT_FALSE(IsMountPoint(mnt_));
  r = mount_.Start({top, mnt_, "-o", "ro,untrusted"}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_FALSE(IsMountPoint(mnt_));
  // Without external references the option changes nothing.
  r = mount_.Start({"--untrusted", image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ByteAt(Disk(), 0), 0x11);
  EXPECT_EQ(mount_.Stop(), 0);
}

TEST_F(MountOptions, DetectZeroesFreesClusters) {
  // Zero clusters written through the mount become zero clusters, not data.
  auto r = mount_.Start({image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> zeros(kMiB, 0);
  ASSERT_TRUE(PWriteAll(fd, zeros.data(), zeros.size(), 0));
  ASSERT_TRUE(PWriteAll(fd, zeros.data(), zeros.size(), 4 * kMiB));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  ASSERT_EQ(mount_.Stop(), 0);
  auto map = nlohmann::json::parse(MustRun("qemu-img map --output=json " + Quote(image_)));
  for (const auto& e : map) {
    uint64_t s = e["start"];
    if (s < kMiB || (s >= 4 * kMiB && s < 5 * kMiB)) {
      EXPECT_TRUE(e["zero"].get<bool>()) << e.dump();
    }
  }
  // Off: the same write allocates data.
  r = mount_.Start({image_, mnt_, "-o", "detect_zeroes=off"}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(PWriteAll(fd, zeros.data(), zeros.size(), 8 * kMiB));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  ASSERT_EQ(mount_.Stop(), 0);
  map = nlohmann::json::parse(MustRun("qemu-img map --output=json " + Quote(image_)));
  bool data_at_8m = false;
  for (const auto& e : map) {
    uint64_t s = e["start"];
    if (s == 8 * kMiB && e["data"].get<bool>()) data_at_8m = true;
  }
  EXPECT_TRUE(data_at_8m) << map.dump();
  EXPECT_EQ(QemuCheck(image_), 0);
}

// A mount whose image lives on another FUSE mount that dies (here: a vimgfs mount killed
// with -9) answers its clients with EIO, as a disk does, not with the host's ENOTCONN.
TEST_F(MountOptions, StackedMountReportsEioWhenTheLowerMountDies) {
  Mount lower;
  auto r = lower.Start({image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string upper_mnt = dir_.File("upper");
  ASSERT_EQ(mkdir(upper_mnt.c_str(), 0755), 0);
  r = mount_.Start({"-F", "raw", "-r", Disk(), upper_mnt}, upper_mnt);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string upper_disk = upper_mnt + "/disk.raw";
  EXPECT_EQ(ByteAt(upper_disk, 0), 0x11);
  lower.Kill();
  int fd = open(upper_disk.c_str(), O_RDONLY | O_DIRECT);
  ASSERT_GE(fd, 0) << strerror(errno);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 4096), 0);
  errno = 0;
  ssize_t n = pread(fd, buf, 4096, 8 * kMiB);  // never read before: not in any cache
  int err = errno;
  free(buf);
  close(fd);
  EXPECT_EQ(n, -1);
  EXPECT_EQ(err, EIO) << strerror(err);
  EXPECT_EQ(mount_.Stop(), 0);
}

}  // namespace
}  // namespace vimgfs::e2e

// End-to-end: buffered writers through the kernel's writeback cache (on by default for
// writable mounts; -o nowriteback_cache turns it off). The cache must change speed only:
// fsync and close still make every write durable, a stop by signal or unmount writes every
// dirty page back before the image closes, the size stays the disk's, and files over the
// same bytes (disk.raw and the partition files) stay coherent. The kill -9 suites
// (mount_crash_test.cc) run with the cache on.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <memory>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RandomBytes;
using test::RunCommand;

constexpr uint64_t kMiB = 1ull << 20;

class MountWriteback : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    mnt_ = dir_.File("mnt");
    image_ = dir_.File("disk.qcow2");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    QemuCreate("-f qcow2 " + Quote(image_) + " 64M");
  }
  std::string Disk() const { return mnt_ + "/disk.raw"; }
  // The image's bytes at [off, off + n), read by qemu-io (the mount must be gone).
  bool ImageHolds(uint64_t off, const std::vector<uint8_t>& want) {
    std::string raw = dir_.File("seen.raw");
    if (!QemuToRaw(image_, raw)) return false;
    auto all = test::ReadWholeFile(raw);
    return all.size() >= off + want.size() && std::equal(want.begin(), want.end(), all.begin() + off);
  }

  test::TempDir dir_;
  Mount mount_;
  std::string mnt_, image_;
};

// A write without fsync stays in the kernel's cache, so a daemon killed with -9 loses
// it (and with -o nowriteback_cache keeps it: a raw image's engine writes straight to the
// file): this shows the cache is really in use. An fsync'd write survives either way.
TEST_F(MountWriteback, WritesWaitInTheKernelUntilFsyncUnlessTurnedOff) {
  image_ = dir_.File("disk.img");
  QemuCreate("-f raw " + Quote(image_) + " 64M");
  for (bool cached : {true, false}) {
    SCOPED_TRACE(cached ? "writeback cache" : "nowriteback_cache");
    std::vector<std::string> args = {"-F", "raw", image_, mnt_};
    if (!cached) args.insert(args.begin(), {"-o", "nowriteback_cache"});
    ASSERT_TRUE(mount_.StartForeground(args, mnt_));
    auto synced = RandomBytes(65536, cached ? 1 : 2), unsynced = RandomBytes(65536, cached ? 3 : 4);
    int fd = open(Disk().c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(PWriteAll(fd, synced.data(), synced.size(), 4 * kMiB));
    ASSERT_EQ(fsync(fd), 0);
    ASSERT_TRUE(PWriteAll(fd, unsynced.data(), unsynced.size(), 8 * kMiB));
    mount_.Kill();
    close(fd);
    EXPECT_TRUE(ImageHolds(4 * kMiB, synced)) << "an fsync'd write was lost";
    EXPECT_EQ(ImageHolds(8 * kMiB, unsynced), !cached);
  }
}

// SIGTERM (also SIGINT, SIGHUP) while a program holds dirty pages and its descriptor:
// the daemon has the kernel write them back before the image closes, then unmounts.
TEST_F(MountWriteback, SigtermWritesBackDirtyPagesFirst) {
  ASSERT_TRUE(mount_.StartForeground({"-F", "qcow2", image_, mnt_}, mnt_));
  auto data = RandomBytes(3 * kMiB, 5);
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 10 * kMiB));
  ASSERT_EQ(kill(mount_.pid(), SIGTERM), 0);
  EXPECT_TRUE(WaitGone(mount_.pid(), 20000) || !IsMountPoint(mnt_));
  EXPECT_EQ(mount_.Stop(), 0) << "the daemon did not stop cleanly";
  close(fd);
  EXPECT_FALSE(IsMountPoint(mnt_)) << "SIGTERM left the mount behind";
  EXPECT_TRUE(ImageHolds(10 * kMiB, data)) << "SIGTERM dropped the kernel's dirty pages";
  EXPECT_EQ(QemuCheck(image_), 0);
}

// -o cache=none: the daemon reads and writes the image around the host's page cache
// (O_DIRECT), so the data is cached once, in disk.raw's pages. Buffered and O_DIRECT
// writers, an unaligned one among them, land in the image as written; the host's cache
// holds little of the image afterwards.
TEST_F(MountWriteback, CacheNoneKeepsTheImageOutOfTheHostPageCache) {
  if (std::string why = test::PageCacheBypassUnavailableReason(dir_.path()); !why.empty())
    GTEST_SKIP() << why;
  ASSERT_TRUE(mount_.StartForeground({"-o", "cache=none", "-F", "qcow2", image_, mnt_}, mnt_));
  auto bulk = RandomBytes(24 * kMiB, 7), odd = RandomBytes(1000, 8), direct = RandomBytes(kMiB, 9);
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(PWriteAll(fd, bulk.data(), bulk.size(), 0));
  ASSERT_TRUE(PWriteAll(fd, odd.data(), odd.size(), 30 * kMiB + 3));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  fd = open(Disk().c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0);
  void* aligned = nullptr;
  ASSERT_EQ(posix_memalign(&aligned, 4096, kMiB), 0);
  std::memcpy(aligned, direct.data(), kMiB);
  EXPECT_TRUE(PWriteAll(fd, aligned, kMiB, 40 * kMiB));
  std::memset(aligned, 0, kMiB);
  EXPECT_TRUE(PReadAll(fd, aligned, kMiB, 40 * kMiB));
  EXPECT_EQ(std::memcmp(aligned, direct.data(), kMiB), 0) << "an O_DIRECT read of an O_DIRECT write";
  free(aligned);
  close(fd);
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_LE(test::CachedBytes(image_), 4 * kMiB) << "the image went through the host's page cache";
  EXPECT_TRUE(ImageHolds(0, bulk));
  EXPECT_TRUE(ImageHolds(30 * kMiB + 3, odd));
  EXPECT_TRUE(ImageHolds(40 * kMiB, direct));
  EXPECT_EQ(QemuCheck(image_), 0);

  test::CommandResult bad = mount_.Start({"-o", "cache=directsync", image_, mnt_}, mnt_);
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("invalid cache mode 'directsync' (none or writeback)"), std::string::npos)
      << bad.err;
}

// Pages dirtied through a shared mapping after the descriptor is closed are only in the
// kernel; the unmount writes them back.
TEST_F(MountWriteback, UnmountWritesBackPagesDirtiedThroughAMapping) {
  ASSERT_TRUE(mount_.StartForeground({"-F", "qcow2", image_, mnt_}, mnt_));
  auto data = RandomBytes(256 * 1024, 6);
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  void* map = mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(map, MAP_FAILED);
  close(fd);
  std::memcpy(static_cast<uint8_t*>(map) + kMiB, data.data(), data.size());
  ASSERT_EQ(munmap(map, 2 * kMiB), 0);
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_TRUE(ImageHolds(kMiB, data)) << "the unmount dropped pages dirtied through mmap";
  EXPECT_EQ(QemuCheck(image_), 0);
}

// The kernel trusts its own size with the writeback cache: a regular-file mount point
// (made by the kernel with size 0) must still show the disk's size, and `cp` over the
// file (O_TRUNC) must neither shrink it nor fail.
TEST_F(MountWriteback, SizeStaysTheDisksThroughOTruncAndARegularFileMountPoint) {
  QemuCreate("-f qcow2 " + Quote(image_) + " 100M");  // a size that is no power of two
  MustRun("qemu-io -f qcow2 -c 'write -P 0x5a 104853504 4096' " + Quote(image_));
  std::string target = dir_.File("view.raw");
  test::WriteWholeFile(target, {});
  ASSERT_TRUE(mount_.StartForeground({"-F", "qcow2", image_, target}, target));
  struct stat st {};
  ASSERT_EQ(stat(target.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 100 * kMiB);
  int fd = open(target.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> last(4096);
  ASSERT_TRUE(PReadAll(fd, last.data(), last.size(), 100 * kMiB - 4096));
  EXPECT_EQ(last, std::vector<uint8_t>(4096, 0x5a)) << "the disk's last page, as the kernel holds it";
  close(fd);

  auto small = RandomBytes(10000, 7);
  test::WriteWholeFile(dir_.File("small"), small);
  auto cp = RunCommand("cp " + Quote(dir_.File("small")) + " " + Quote(target));
  EXPECT_EQ(cp.exit_code, 0) << cp.err;
  ASSERT_EQ(stat(target.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 100 * kMiB) << "O_TRUNC changed the size";
  fd = open(target.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(PReadAll(fd, last.data(), last.size(), 100 * kMiB - 4096));
  EXPECT_EQ(last, std::vector<uint8_t>(4096, 0x5a)) << "O_TRUNC dropped data";
  close(fd);
  EXPECT_NE(truncate(target.c_str(), 5 * kMiB), 0) << "any other size change stays refused";
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_TRUE(ImageHolds(0, small));
  EXPECT_EQ(QemuCheck(image_), 0);
}

// Past the end, a cached write can only fail when the kernel writes it back: fsync and
// close report ENOSPC, and what fits is written, as a disk would.
TEST_F(MountWriteback, AWritePastTheEndFailsAtFsync) {
  ASSERT_TRUE(mount_.StartForeground({"-F", "qcow2", image_, mnt_}, mnt_));
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  auto data = RandomBytes(8192, 8);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), static_cast<off_t>(64 * kMiB - 4096)), 8192);
  errno = 0;
  EXPECT_NE(fsync(fd), 0);
  EXPECT_EQ(errno, ENOSPC);
  close(fd);
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_TRUE(ImageHolds(64 * kMiB - 4096, std::vector<uint8_t>(data.begin(), data.begin() + 4096)));
  EXPECT_EQ(QemuCheck(image_), 0);
}

// A partition file and disk.raw over the same bytes, both open: the second one opened is
// served uncached, and its reads and writes first write back the other's dirty pages, so
// neither sees the other's writes late, even before any fsync.
TEST_F(MountWriteback, PartitionFileAndDiskStayCoherentWithoutFsync) {
  if (!test::HaveProgram("sfdisk")) GTEST_SKIP() << "sfdisk needed (apt-get install fdisk)";
  ASSERT_TRUE(mount_.StartForeground({"-F", "qcow2", image_, mnt_}, mnt_));
  ASSERT_EQ(RunCommand("printf 'label: dos\\n1M,,L\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  const uint64_t start = kMiB;
  for (bool part_first : {true, false}) {
    SCOPED_TRACE(part_first ? "p1 opened first" : "disk.raw opened first");
    int part = -1, disk = -1;
    if (part_first) part = open((mnt_ + "/p1").c_str(), O_RDWR);
    disk = open(Disk().c_str(), O_RDWR);
    if (!part_first) part = open((mnt_ + "/p1").c_str(), O_RDWR);
    ASSERT_GE(part, 0);
    ASSERT_GE(disk, 0);
    const uint64_t base = part_first ? 0 : 4 * kMiB;
    std::vector<uint8_t> got(65536);
    ASSERT_TRUE(PReadAll(disk, got.data(), got.size(), start + base));  // cached where it can be
    ASSERT_TRUE(PReadAll(part, got.data(), got.size(), base));
    auto via_part = RandomBytes(65536, part_first ? 9 : 10);
    ASSERT_TRUE(PWriteAll(part, via_part.data(), via_part.size(), base));
    ASSERT_TRUE(PReadAll(disk, got.data(), got.size(), start + base));
    EXPECT_EQ(got, via_part) << "disk.raw missed a write through p1";
    auto via_disk = RandomBytes(65536, part_first ? 11 : 12);
    ASSERT_TRUE(PWriteAll(disk, via_disk.data(), via_disk.size(), start + base + 65536));
    ASSERT_TRUE(PReadAll(part, got.data(), got.size(), base + 65536));
    EXPECT_EQ(got, via_disk) << "p1 missed a write through disk.raw";
    // The older cached write of the first file must not land over a newer one of the other.
    auto older = RandomBytes(4096, 13), newer = RandomBytes(4096, 14);
    int first = part_first ? part : disk, second = part_first ? disk : part;
    uint64_t first_base = part_first ? base : start + base, second_base = part_first ? start + base : base;
    ASSERT_TRUE(PWriteAll(first, older.data(), older.size(), first_base + 200000));
    ASSERT_TRUE(PWriteAll(second, newer.data(), newer.size(), second_base + 200000));
    ASSERT_EQ(fsync(first), 0);
    ASSERT_EQ(fsync(second), 0);
    got.resize(4096);
    ASSERT_TRUE(PReadAll(first, got.data(), got.size(), first_base + 200000));
    EXPECT_EQ(got, newer) << "an older cached write landed over a newer one";
    close(part);
    close(disk);
  }
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_EQ(QemuCheck(image_), 0);
}

}  // namespace
}  // namespace vimgfs::e2e

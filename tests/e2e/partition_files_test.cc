// End-to-end: the partition files p1, p2, ... beside disk.raw. Tables are written by the
// tools users use (sfdisk, sgdisk) through the mount; sfdisk --json is the oracle for the
// list, disk.raw for the bytes, qemu-img for the image afterwards.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

struct Slice {
  uint64_t offset;
  uint64_t length;
};

// pN -> byte range, as sfdisk reads the table of file.
std::map<std::string, Slice> SfdiskPartitions(const std::string& file) {
  auto r = RunCommand("sfdisk --json " + Quote(file));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::map<std::string, Slice> out;
  if (r.exit_code != 0) return out;
  auto table = nlohmann::json::parse(r.out)["partitiontable"];
  uint64_t sector = table.value("sectorsize", 512);
  for (const auto& p : table["partitions"]) {
    std::string node = p["node"];
    size_t digits = node.find_last_not_of("0123456789") + 1;
    out["p" + node.substr(digits)] = {p["start"].get<uint64_t>() * sector,
                                      p["size"].get<uint64_t>() * sector};
  }
  return out;
}

// The p* files of a mount, with their sizes.
std::map<std::string, uint64_t> ListedPartitions(const std::string& mnt) {
  std::map<std::string, uint64_t> out;
  for (const auto& e : std::filesystem::directory_iterator(mnt)) {
    std::string name = e.path().filename();
    if (name.size() > 1 && name[0] == 'p' && name.find_first_not_of("0123456789", 1) == std::string::npos)
      out[name] = e.file_size();
  }
  return out;
}

std::vector<uint8_t> ReadRange(const std::string& file, uint64_t off, size_t n) {
  std::vector<uint8_t> buf(n);
  int fd = open(file.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0) << file;
  if (fd >= 0) {
    EXPECT_TRUE(PReadAll(fd, buf.data(), n, off)) << file;
    close(fd);
  }
  return buf;
}

void WriteRange(const std::string& file, uint64_t off, const std::vector<uint8_t>& data) {
  int fd = open(file.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0) << file;
  EXPECT_TRUE(PWriteAll(fd, data.data(), data.size(), off)) << file;
  EXPECT_EQ(fsync(fd), 0);
  close(fd);
}

class PartitionFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    if (!test::HaveProgram("sfdisk") || !test::HaveProgram("sgdisk"))
      GTEST_SKIP() << "sfdisk and sgdisk needed (apt-get install fdisk gdisk)";
    mnt_ = dir_.File("img");
    image_ = dir_.File("disk.qcow2");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    QemuCreate("-f qcow2 " + Quote(image_) + " 128M");
  }
  void MountImage(std::vector<std::string> extra = {}) {
    extra.push_back(image_);
    extra.push_back(mnt_);
    auto r = mount_.Start(extra, mnt_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::string Disk() const { return mnt_ + "/disk.raw"; }
  std::string Part(const std::string& name) const { return mnt_ + "/" + name; }

  // Every listed file is its slice of disk.raw, both ways: bytes written through the
  // partition file read back through disk.raw at the partition's offset and the reverse.
  void ExpectSlicesOfTheDisk(const std::map<std::string, Slice>& parts) {
    uint64_t seed = 1;
    for (const auto& [name, slice] : parts) {
      SCOPED_TRACE(name);
      auto head = test::RandomBytes(8192, seed++);
      WriteRange(Part(name), slice.length - head.size(), head);  // its last bytes
      EXPECT_EQ(ReadRange(Disk(), slice.offset + slice.length - head.size(), head.size()), head);
      auto tail = test::RandomBytes(4096, seed++);
      WriteRange(Disk(), slice.offset + 512 * 1024, tail);
      EXPECT_EQ(ReadRange(Part(name), 512 * 1024, tail.size()), tail);
    }
  }

  test::TempDir dir_;
  Mount mount_;
  std::string mnt_, image_;
};

TEST_F(PartitionFiles, MbrPrimariesExtendedAndLogicalsAreTheirSlicesOfTheDisk) {
  MountImage();
  EXPECT_TRUE(ListedPartitions(mnt_).empty()) << "a blank disk has no partitions";
  // Two primaries, an extended partition holding three logicals: written through the mount.
  auto r = RunCommand("printf 'label: dos\\n,16M,L\\n,16M,L\\n,,E\\n,8M,L\\n,8M,L\\n,,L\\n' | sfdisk -q " +
                      Quote(Disk()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto expected = SfdiskPartitions(Disk());
  ASSERT_EQ(expected.size(), 6u);  // p1 p2 p3 (extended) p5 p6 p7
  std::map<std::string, uint64_t> want_sizes;
  for (const auto& [name, slice] : expected) want_sizes[name] = slice.length;
  EXPECT_EQ(ListedPartitions(mnt_), want_sizes);
  std::map<std::string, Slice> data_parts = expected;
  data_parts.erase("p3");  // writing over the extended partition's start would break the chain
  ExpectSlicesOfTheDisk(data_parts);
  EXPECT_EQ(ListedPartitions(mnt_), want_sizes) << "data writes must not change the table";

  // A file system made and edited through a logical partition's file.
  ASSERT_EQ(RunCommand("mkfs.ext4 -q -F " + Quote(Part("p6"))).exit_code, 0);
  std::string note = dir_.File("note");
  test::WriteWholeFile(note, {'e', 'd', 'i', 't', 'e', 'd'});
  r = RunCommand("debugfs -w -R " + Quote("write " + note + " note.txt") + " " + Quote(Part("p6")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(mount_.Stop(), 0);

  std::string out;
  EXPECT_EQ(QemuCheck(image_, &out), 0) << out;
  // qemu's view of the same bytes: the raw conversion, cut at p6's offset.
  std::string raw = dir_.File("qemu.raw"), p6 = dir_.File("p6.img");
  ASSERT_TRUE(QemuToRaw(image_, raw));
  const Slice s6 = expected["p6"];
  MustRun("dd if=" + Quote(raw) + " of=" + Quote(p6) + " bs=512 skip=" + std::to_string(s6.offset / 512) +
          " count=" + std::to_string(s6.length / 512) + " status=none");
  r = RunCommand("debugfs -R 'cat note.txt' " + Quote(p6));
  EXPECT_EQ(r.out, "edited");
  EXPECT_EQ(RunCommand("e2fsck -fn " + Quote(p6)).exit_code, 0);
}

TEST_F(PartitionFiles, GptPartitionsByNumberAndAFileSystemThroughALoopMount) {
  REQUIRE_LOOP();
  MountImage();
  auto r = RunCommand("sgdisk -n 1:2048:+16M -c 1:boot -n 3:0:+32M -c 3:root -n 2:0:0 " + Quote(Disk()));
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  auto expected = SfdiskPartitions(Disk());
  ASSERT_EQ(expected.size(), 3u);
  std::map<std::string, uint64_t> want_sizes;
  for (const auto& [name, slice] : expected) want_sizes[name] = slice.length;
  EXPECT_EQ(ListedPartitions(mnt_), want_sizes);
  EXPECT_EQ(want_sizes["p3"], 32u << 20) << "numbered by GPT entry, not by position";
  ExpectSlicesOfTheDisk(expected);

  // mount -o loop on a partition file: no partition scanning needed.
  std::string guest = dir_.File("guest");
  ASSERT_EQ(mkdir(guest.c_str(), 0755), 0);
  ASSERT_EQ(RunCommand("mkfs.ext4 -q -F " + Quote(Part("p3"))).exit_code, 0);
  std::string loop = LoopAttach(Part("p3"), false);
  ASSERT_FALSE(loop.empty());
  r = RunCommand("mount " + Quote(loop) + " " + Quote(guest) + " && echo hello > " + Quote(guest + "/hello") +
                 " && umount " + Quote(guest));
  LoopDetach(loop);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(mount_.Stop(), 0);
  std::string out;
  EXPECT_EQ(QemuCheck(image_, &out), 0) << out;
  std::string raw = dir_.File("qemu.raw"), p3 = dir_.File("p3.img");
  ASSERT_TRUE(QemuToRaw(image_, raw));
  MustRun("dd if=" + Quote(raw) + " of=" + Quote(p3) +
          " bs=512 skip=" + std::to_string(expected["p3"].offset / 512) +
          " count=" + std::to_string(expected["p3"].length / 512) + " status=none");
  EXPECT_EQ(RunCommand("debugfs -R 'cat hello' " + Quote(p3)).out, "hello\n");
}

TEST_F(PartitionFiles, ARewrittenTableShowsAtOnceAndOpenFilesKeepTheirRange) {
  MountImage();
  ASSERT_EQ(RunCommand("printf 'label: gpt\\n,32M\\n,32M\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  auto before = SfdiskPartitions(Disk());
  ASSERT_EQ(ListedPartitions(mnt_).size(), 2u);
  auto mark = test::RandomBytes(4096, 7);
  WriteRange(Part("p1"), 0, mark);
  int fd = open(Part("p1").c_str(), O_RDONLY);  // held across the rewrite
  ASSERT_GE(fd, 0);

  // p1 grows to 48M and p2 goes: the listing follows at once.
  ASSERT_EQ(RunCommand("printf 'label: gpt\\n,48M\\n' | sfdisk -q --wipe never " + Quote(Disk())).exit_code,
            0);
  auto after = SfdiskPartitions(Disk());
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(ListedPartitions(mnt_), (std::map<std::string, uint64_t>{{"p1", after["p1"].length}}));
  EXPECT_EQ(after["p1"].length, 48u << 20);
  struct stat st {};
  ASSERT_EQ(stat(Part("p1").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 48u << 20);
  EXPECT_NE(access(Part("p2").c_str(), F_OK), 0);

  // The descriptor opened before keeps the range it was opened with, as an open partition
  // of a block device does until the table is re-read.
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), before["p1"].length);
  std::vector<uint8_t> got(mark.size());
  EXPECT_TRUE(PReadAll(fd, got.data(), got.size(), 0));
  EXPECT_EQ(got, mark);
  close(fd);
}

// disk.raw and p1 are two inodes with two page caches over the same bytes: a write through
// one must not leave the other's cached pages stale, even on a descriptor opened before.
TEST_F(PartitionFiles, AWriteThroughOneFileShowsInTheOthersCachedPages) {
  MountImage();
  ASSERT_EQ(RunCommand("printf 'label: dos\\n,,L\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  const uint64_t start = SfdiskPartitions(Disk())["p1"].offset;
  int disk = open(Disk().c_str(), O_RDWR);
  int part = open(Part("p1").c_str(), O_RDWR);
  ASSERT_GE(disk, 0);
  ASSERT_GE(part, 0);
  std::vector<uint8_t> buf(65536);
  ASSERT_TRUE(PReadAll(disk, buf.data(), buf.size(), start));  // both caches hold the range
  ASSERT_TRUE(PReadAll(part, buf.data(), buf.size(), 0));

  auto through_part = test::RandomBytes(4096, 11);
  ASSERT_TRUE(PWriteAll(part, through_part.data(), through_part.size(), 8192));
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(PReadAll(disk, got.data(), got.size(), start + 8192));
  EXPECT_EQ(got, through_part) << "disk.raw served stale cached pages";

  auto through_disk = test::RandomBytes(4096, 12);
  ASSERT_TRUE(PWriteAll(disk, through_disk.data(), through_disk.size(), start + 16384));
  ASSERT_TRUE(PReadAll(part, got.data(), got.size(), 16384));
  EXPECT_EQ(got, through_disk) << "p1 served stale cached pages";

  // A punched hole too.
  ASSERT_EQ(fallocate(part, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 4096), 0);
  ASSERT_TRUE(PReadAll(disk, got.data(), got.size(), start + 8192));
  EXPECT_EQ(got, std::vector<uint8_t>(4096, 0));
  close(part);
  close(disk);
}

// Writers through disk.raw and p1 on the same bytes at once, readers beside them: each
// write drops the other file's cached pages while the other file's writes hold theirs
// (Server::WriteThrough). The mount must keep answering.
TEST_F(PartitionFiles, RacingWritesThroughTwoFilesNeverHang) {
  MountImage();
  ASSERT_EQ(RunCommand("printf 'label: dos\\n,,L\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  const uint64_t start = SfdiskPartitions(Disk())["p1"].offset;
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  auto writer = [&](const std::string& file, uint64_t base, uint8_t fill) {
    int fd = open(file.c_str(), O_WRONLY);
    std::vector<uint8_t> buf(65536, fill);
    while (fd >= 0 && !stop)
      for (int i = 0; i < 16; ++i)
        if (!PWriteAll(fd, buf.data(), buf.size(), base + i * buf.size())) failures++;
    if (fd >= 0) close(fd);
  };
  auto reader = [&](const std::string& file, uint64_t base) {
    int fd = open(file.c_str(), O_RDONLY);
    std::vector<uint8_t> buf(1 << 20);
    while (fd >= 0 && !stop)
      if (!PReadAll(fd, buf.data(), buf.size(), base)) failures++;
    if (fd >= 0) close(fd);
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back(writer, Disk(), start, 0xAA);
    threads.emplace_back(writer, Part("p1"), 0, 0xBB);
  }
  threads.emplace_back(reader, Disk(), start);
  threads.emplace_back(reader, Part("p1"), 0);
  std::this_thread::sleep_for(std::chrono::seconds(3));
  stop = true;
  // A hung mount leaves the threads blocked: a watchdog kills the daemon to free them.
  std::atomic<bool> joined{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 600 && !joined; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!joined) mount_.Kill();
  });
  auto began = std::chrono::steady_clock::now();
  for (auto& t : threads) t.join();
  joined = true;
  watchdog.join();
  EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(50)) << "the mount hung";
  EXPECT_EQ(failures, 0);
  if (mount_.active()) {
    EXPECT_EQ(mount_.Stop(), 0);
  }
  std::string out;
  EXPECT_EQ(QemuCheck(image_, &out), 0) << out;
}

TEST_F(PartitionFiles, WritesStopAtTheEndOfThePartition) {
  // Without the writeback cache a write past the end fails at once; with it (the
  // default) the kernel takes it into its cache and the failure comes at fsync. Either
  // way what fits is written and the next partition stays untouched.
  for (bool cached : {false, true}) {
    SCOPED_TRACE(cached ? "writeback cache" : "nowriteback_cache");
    if (cached) {
      ASSERT_EQ(mount_.Stop(), 0);
      MountImage();
    } else {
      MountImage({"-o", "nowriteback_cache"});
      ASSERT_EQ(RunCommand("printf 'label: dos\\n,8M,L\\n,8M,L\\n' | sfdisk -q " + Quote(Disk())).exit_code,
                0);
    }
    auto parts = SfdiskPartitions(Disk());
    auto p2_head = ReadRange(Part("p2"), 0, 4096);
    int fd = open(Part("p1").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    auto data = test::RandomBytes(8192, cached ? 3 : 4);
    const off_t last_page = static_cast<off_t>(parts["p1"].length - 4096);
    if (!cached) {
      EXPECT_EQ(pwrite(fd, data.data(), data.size(), last_page), 4096);  // straddling: the part inside
      errno = 0;
      EXPECT_EQ(pwrite(fd, data.data(), 4096, static_cast<off_t>(parts["p1"].length)), -1);
      EXPECT_EQ(errno, ENOSPC);
    } else {
      EXPECT_EQ(pwrite(fd, data.data(), data.size(), last_page), 8192);
      errno = 0;
      EXPECT_NE(fsync(fd), 0);
      EXPECT_EQ(errno, ENOSPC);
    }
    EXPECT_NE(ftruncate(fd, 1 << 20), 0) << "a partition's size is fixed";
    close(fd);
    EXPECT_EQ(ReadRange(Part("p2"), 0, 4096), p2_head) << "the next partition was overwritten";
    EXPECT_EQ(ReadRange(Disk(), parts["p1"].offset + last_page, 4096),
              std::vector<uint8_t>(data.begin(), data.begin() + 4096));
  }
}

TEST_F(PartitionFiles, NoPartitionsOptionShowsTheDiskOnly) {
  MountImage();
  ASSERT_EQ(RunCommand("printf 'label: dos\\n,8M,L\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  ASSERT_EQ(ListedPartitions(mnt_).size(), 1u);
  ASSERT_EQ(mount_.Stop(), 0);
  MountImage({"-o", "nopartitions"});
  EXPECT_TRUE(ListedPartitions(mnt_).empty());
  EXPECT_EQ(access(Disk().c_str(), R_OK), 0);
}

// The point of partition files: no root at all. nobody mounts the image, mounts the
// guest's ext4 with fuse2fs on p1, edits a file; root later sees the edit through a
// kernel loop mount, and the image checks clean.
TEST_F(PartitionFiles, AnUnprivilegedUserEditsAGuestWithFuse2fs) {
  REQUIRE_LOOP();
  if (!test::HaveProgram("fuse2fs")) GTEST_SKIP() << "fuse2fs not installed (apt-get install fuse2fs)";
  Unprivileged nobody;
  if (!nobody.reason().empty()) GTEST_SKIP() << nobody.reason();
  // The template, made by root: one ext4 partition with a file to edit.
  MountImage();
  ASSERT_EQ(RunCommand("printf 'label: dos\\n,,L\\n' | sfdisk -q " + Quote(Disk())).exit_code, 0);
  ASSERT_EQ(RunCommand("mkfs.ext4 -q -F " + Quote(Part("p1"))).exit_code, 0);
  ASSERT_EQ(mount_.Stop(), 0);
  ASSERT_EQ(chown(image_.c_str(), 65534, 65534), 0);
  ASSERT_EQ(chown(mnt_.c_str(), 65534, 65534), 0);
  std::string guest = dir_.File("guest");
  ASSERT_EQ(mkdir(guest.c_str(), 0755), 0);
  ASSERT_EQ(chown(guest.c_str(), 65534, 65534), 0);

  auto r =
      nobody.Run(Quote(test::VimgfsBinary()) + " " + Quote(image_) + " " + Quote(mnt_) + " && fuse2fs " +
                     Quote(Part("p1")) + " " + Quote(guest) + " -o fakeroot && echo 'SELINUX=disabled' > " +
                     Quote(guest + "/config") + " && fusermount3 -u " + Quote(guest) +
                     " && for i in $(seq 100); do fusermount3 -u " + Quote(mnt_) +
                     " 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
                 dir_.path());
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  pid_t daemon = FindDaemon(mnt_);
  if (daemon > 0) {
    EXPECT_TRUE(WaitGone(daemon, 10000));
  }
  if (IsMountPoint(guest)) RunCommand("fusermount3 -u " + Quote(guest));
  if (IsMountPoint(mnt_)) RunCommand("fusermount3 -u " + Quote(mnt_));
  ASSERT_EQ(r.exit_code, 0);

  std::string out;
  EXPECT_EQ(QemuCheck(image_, &out), 0) << out;
  MountImage();
  std::string loop = LoopAttach(Part("p1"), true);
  ASSERT_FALSE(loop.empty());
  r = RunCommand("mount -o ro " + Quote(loop) + " " + Quote(guest) + " && cat " + Quote(guest + "/config") +
                 "; umount " + Quote(guest));
  LoopDetach(loop);
  EXPECT_EQ(r.out, "SELINUX=disabled\n") << r.err;
}

}  // namespace
}  // namespace vimgfs::e2e

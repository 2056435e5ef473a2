// End-to-end: system calls on a mounted disk.raw (pread/pwrite/fsync/fallocate/lseek/
// truncate, concurrent writers), with qemu-img as the judge afterwards.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <random>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RandomBytes;
using test::RunCommand;

constexpr uint64_t kMiB = 1ull << 20;

class MountIo : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    mnt_ = dir_.File("mnt");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    image_ = dir_.File("disk." + GetParam());
    QemuCreate(ExactSizeCreateArgs(GetParam(), image_, "64M"));
  }
  // Mounts image_ on mnt_ the normal (backgrounding) way.
  void MountImage(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"-F", GetParam()};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back(image_);
    args.push_back(mnt_);
    auto r = mount_.Start(args, mnt_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::string Disk() const { return mnt_ + "/disk.raw"; }
  // Unmounts and expects a clean daemon exit and a clean image.
  void UnmountAndCheck() {
    EXPECT_EQ(mount_.Stop(), 0);
    ExpectCheckClean();
  }
  // The check passes (raw and qcow images cannot be checked: exit 63).
  void ExpectCheckClean() {
    std::string out;
    int code = CheckImage(image_, &out);
    if (GetParam() == "raw" || GetParam() == "qcow")
      EXPECT_EQ(code, 63) << out;
    else
      EXPECT_EQ(code, 0) << out;
  }
  std::vector<uint8_t> QemuContent() {
    std::string raw = dir_.File("content.raw");
    EXPECT_TRUE(QemuToRaw(image_, raw));
    auto v = test::ReadWholeFile(raw);
    unlink(raw.c_str());
    return v;
  }

  static std::unique_ptr<uint8_t, decltype(&free)> AlignedBuffer(size_t n) {
    void* p = nullptr;
    EXPECT_EQ(posix_memalign(&p, 4096, n), 0);
    return {static_cast<uint8_t*>(p), &free};
  }
  // Four threads write random pieces through disk.raw and the same pieces into `ref`, a
  // new 64 MiB raw file. Each thread owns every 4th 16 KiB unit of the first 32 MiB, so
  // neighbours share clusters (allocation and COW race) while the final bytes stay well
  // defined; some pieces are all zeros (the zero detection path). direct: O_DIRECT, with
  // page-aligned offsets, lengths and buffers. Reads disk.raw back against ref at the end.
  void RunInterleavedWriters(const std::string& ref, bool direct) {
    int rfd0 = open(ref.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(rfd0, 0);
    ASSERT_EQ(ftruncate(rfd0, 64 * kMiB), 0);
    close(rfd0);
    constexpr uint64_t kUnit = 16 * 1024, kUnits = 32 * kMiB / kUnit, kPage = 4096;
    const uint64_t grain = direct ? kPage : 1;
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        int fd = open(Disk().c_str(), O_RDWR | (direct ? O_DIRECT : 0));
        int rfd = open(ref.c_str(), O_RDWR);
        auto buf = AlignedBuffer(kUnit);
        std::mt19937_64 rng((direct ? 200 : 100) + t);
        for (int i = 0; i < 300 && fd >= 0 && rfd >= 0; ++i) {
          uint64_t unit = (rng() % (kUnits / 4)) * 4 + t;
          uint64_t in = (rng() % (kUnit / grain)) * grain;
          uint64_t len = (1 + rng() % ((kUnit - in) / grain)) * grain;
          auto data = RandomBytes(len, rng());
          if (i % 17 == 0) std::fill(data.begin(), data.end(), 0);
          std::memcpy(buf.get(), data.data(), len);
          uint64_t off = unit * kUnit + in;
          if (!PWriteAll(fd, buf.get(), len, off) || !PWriteAll(rfd, data.data(), len, off)) {
            ++failures;
            break;
          }
          if (i % 50 == 0 && fsync(fd) != 0) ++failures;
        }
        if (fd < 0 || rfd < 0) ++failures;
        if (fd >= 0) close(fd);
        if (rfd >= 0) close(rfd);
      });
    }
    for (auto& th : threads) th.join();
    ASSERT_EQ(failures.load(), 0);
    EXPECT_EQ(test::Sha256OfFile(Disk()), test::Sha256OfFile(ref));  // through the mount
  }
  // Unmounts, expects a clean image, and expects qemu to read it equal to `ref`.
  void ExpectImageMatches(const std::string& ref) {
    UnmountAndCheck();
    std::string raw = dir_.File("out.raw");
    ASSERT_TRUE(QemuToRaw(image_, raw));
    EXPECT_EQ(test::Sha256OfFile(raw), test::Sha256OfFile(ref));
  }

  test::TempDir dir_;  // outlives mount_
  Mount mount_;
  std::string mnt_, image_;
};

TEST_P(MountIo, ReadWriteAndBounds) {
  MountImage();
  // No sleep: the mount is usable as soon as vimgfs returns.
  struct stat st {};
  ASSERT_EQ(stat(Disk().c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 64 * kMiB);

  // The folder holds disk.raw and nothing else; nothing can be created in it.
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(mnt_)) names.insert(e.path().filename());
  EXPECT_EQ(names, std::set<std::string>{"disk.raw"});
  errno = 0;
  EXPECT_LT(open((mnt_ + "/other").c_str(), O_RDWR | O_CREAT, 0644), 0);
  EXPECT_NE(stat((mnt_ + "/other").c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);

  std::vector<uint8_t> model(64 * kMiB, 0);
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  auto put = [&](uint64_t off, size_t n, uint64_t seed) {
    auto data = RandomBytes(n, seed);
    ASSERT_TRUE(PWriteAll(fd, data.data(), n, off)) << strerror(errno);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(off));
  };
  put(12345, 70000, 1);
  put(8 * kMiB, kMiB, 2);
  put(8 * kMiB + 4096, 512, 3);            // in place, inside an allocated cluster
  put(30 * kMiB - 1000, 3 * kMiB + 7, 4);  // unaligned, several clusters
  std::vector<uint8_t> back(4 * kMiB);
  ASSERT_TRUE(PReadAll(fd, back.data(), back.size(), 29 * kMiB));
  EXPECT_TRUE(std::equal(back.begin(), back.end(), model.begin() + 29 * kMiB));

  // Bounds: short read at the end, nothing past it; writes past the end fail. The kernel's
  // writeback cache takes them in and the failure comes at fsync; what fits is written.
  char buf[8192];
  EXPECT_EQ(pread(fd, buf, 4096, 64 * kMiB - 100), 100);
  EXPECT_EQ(pread(fd, buf, 4096, 64 * kMiB), 0);
  std::memset(buf, 0x5a, sizeof buf);
  EXPECT_EQ(pwrite(fd, buf, 8192, 64 * kMiB - 4096), 8192);
  std::fill(model.end() - 4096, model.end(), 0x5a);
  errno = 0;
  EXPECT_NE(fsync(fd), 0);
  EXPECT_EQ(errno, ENOSPC);
  EXPECT_EQ(fsync(fd), 0) << "the error is reported once";
  char past[4096];
  std::memset(past, 1, sizeof past);
  ssize_t got = pread(fd, past, sizeof past, 64 * kMiB);
  EXPECT_TRUE(got == 0 || (got > 0 && std::all_of(past, past + got, [](char c) { return c == 0; })))
      << "bytes past the end that never reached the image are still served";
  close(fd);
  UnmountAndCheck();
  EXPECT_TRUE(QemuContent() == model) << "qemu-img sees other bytes than were written";
}

TEST_P(MountIo, FallocateRangesReadZeros) {
  MountImage();
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> model = RandomBytes(8 * kMiB, 7);
  ASSERT_TRUE(PWriteAll(fd, model.data(), model.size(), 0));
  const uint64_t p_off = 100000, p_len = 1536 * 1024;
  const uint64_t z_off = 5 * kMiB / 2 + 777, z_len = 700000;
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, p_off, p_len), 0) << strerror(errno);
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, z_off, z_len), 0) << strerror(errno);
  std::fill(model.begin() + p_off, model.begin() + p_off + p_len, 0);
  std::fill(model.begin() + z_off, model.begin() + z_off + z_len, 0);
  // Preallocating inside the disk is accepted; other modes are not supported.
  EXPECT_EQ(fallocate(fd, 0, 0, 4096), 0);
  EXPECT_EQ(fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 65536), -1);
  std::vector<uint8_t> back(model.size());
  ASSERT_TRUE(PReadAll(fd, back.data(), back.size(), 0));
  EXPECT_TRUE(back == model) << "punched / zeroed ranges must read back as zeros";
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  UnmountAndCheck();
  auto content = QemuContent();
  content.resize(model.size());
  EXPECT_TRUE(content == model);
  if (GetParam() == "qcow2") {
    // Whole clusters inside the punched range are zero or unallocated, not data.
    auto map = nlohmann::json::parse(MustRun("qemu-img map --output=json " + Quote(image_)));
    bool found = false;
    for (const auto& e : map) {
      uint64_t s = e["start"], l = e["length"];
      if (s >= 128 * 1024 && s + l <= p_off + p_len && e["zero"].get<bool>()) found = true;
    }
    EXPECT_TRUE(found) << map.dump();
  }
}

// Data runs as lseek(SEEK_DATA/SEEK_HOLE) walks them.
std::vector<std::pair<uint64_t, uint64_t>> SeekRuns(int fd, uint64_t size) {
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    off_t d = lseek(fd, pos, SEEK_DATA);
    if (d < 0) break;
    off_t h = lseek(fd, d, SEEK_HOLE);
    if (h <= d) {
      ADD_FAILURE() << "SEEK_HOLE " << h << " after data at " << d;
      break;
    }
    runs.emplace_back(d, h);
    pos = h;
  }
  return runs;
}

TEST_P(MountIo, LseekAgreesWithQemuImgMap) {
  MountImage();
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  auto data = RandomBytes(3 * 65536, 9);
  ASSERT_TRUE(PWriteAll(fd, data.data(), 4096, 0));
  ASSERT_TRUE(PWriteAll(fd, data.data(), 1000, 5 * 65536 + 100));
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 100 * 65536));
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 40 * kMiB));
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, 40 * kMiB + 65536, 65536), 0);
  ASSERT_EQ(fsync(fd), 0);
  auto runs = SeekRuns(fd, 64 * kMiB);
  errno = 0;
  EXPECT_EQ(lseek(fd, 64 * kMiB, SEEK_DATA), -1);
  EXPECT_EQ(errno, ENXIO);
  EXPECT_EQ(lseek(fd, 63 * kMiB, SEEK_HOLE), static_cast<off_t>(63 * kMiB));
  close(fd);
  UnmountAndCheck();

  if (GetParam() == "vhdx") {
    // qemu-img map sees a VHDX as all data (its driver has no block status), so it is no
    // reference here: every write lies in a data run, and the 8 MiB blocks never written
    // (8..40 MiB, 48..64 MiB) are holes.
    auto in_data = [&](uint64_t a, uint64_t b) {
      for (const auto& [s, e] : runs)
        if (s <= a && b <= e) return true;
      return false;
    };
    EXPECT_TRUE(in_data(0, 4096));
    EXPECT_TRUE(in_data(5 * 65536 + 100, 5 * 65536 + 1100));
    EXPECT_TRUE(in_data(100 * 65536, 103 * 65536));
    EXPECT_TRUE(in_data(40 * kMiB, 40 * kMiB + 65536));
    for (const auto& [s, e] : runs) {
      EXPECT_FALSE(s < 40 * kMiB && e > 8 * kMiB) << s << ".." << e;
      EXPECT_LE(e, 48 * kMiB);
    }
    EXPECT_GE(runs.size(), 2u);
    return;
  }
  auto map =
      nlohmann::json::parse(MustRun("qemu-img map --output=json -f " + GetParam() + " " + Quote(image_)));
  std::vector<std::pair<uint64_t, uint64_t>> expect;
  for (const auto& e : map) {
    if (e["zero"].get<bool>()) continue;
    uint64_t s = e["start"], l = e["length"];
    if (!expect.empty() && expect.back().second == s)
      expect.back().second = s + l;
    else
      expect.emplace_back(s, s + l);
  }
  EXPECT_EQ(runs, expect) << map.dump();
  EXPECT_GE(runs.size(), 3u);
}

TEST_P(MountIo, TruncateIsRefused) {
  MountImage();
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  errno = 0;
  EXPECT_EQ(ftruncate(fd, 64 * kMiB + 4096), -1);
  EXPECT_TRUE(errno == EPERM || errno == EINVAL) << strerror(errno);
  EXPECT_EQ(ftruncate(fd, 4096), -1);
  EXPECT_EQ(ftruncate(fd, 64 * kMiB), 0) << "truncating to the current size is harmless";
  close(fd);
  struct stat st {};
  ASSERT_EQ(stat(Disk().c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 64 * kMiB);
  UnmountAndCheck();
}

// O_TRUNC is ignored, as on a block device: `cp disk.img disk.raw` copies a raw image in,
// and the data past what cp wrote stays.
TEST_P(MountIo, OTruncIsIgnoredSoCpWorks) {
  MountImage();
  std::string ref = dir_.File("reference.raw");
  {
    auto tail = RandomBytes(kMiB, 7);
    int fd = open(Disk().c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(PWriteAll(fd, tail.data(), tail.size(), 63 * kMiB));
    close(fd);
  }
  std::string src = dir_.File("source.raw");
  test::WriteWholeFile(src, RandomBytes(40 * kMiB, 8));
  auto r = test::RunCommand("cp " + test::Quote(src) + " " + test::Quote(Disk()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat st {};
  ASSERT_EQ(stat(Disk().c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 64 * kMiB) << "the size did not change";
  // The expected disk: the source, zeros up to the tail written first, then that tail.
  auto expect = test::ReadWholeFile(src);
  expect.resize(63 * kMiB, 0);
  auto tail = RandomBytes(kMiB, 7);
  expect.insert(expect.end(), tail.begin(), tail.end());
  test::WriteWholeFile(ref, expect);
  EXPECT_EQ(test::Sha256OfFile(Disk()), test::Sha256OfFile(ref));
  ExpectImageMatches(ref);
}

TEST_P(MountIo, ConcurrentWritersMatchRawFile) {
  MountImage();
  std::string ref = dir_.File("reference.raw");
  RunInterleavedWriters(ref, /*direct=*/false);
  ExpectImageMatches(ref);
}

// O_DIRECT opens get FUSE direct I/O with parallel writes (the kernel no longer
// serializes them under the inode lock), so the engine sees truly concurrent writes to
// shared clusters. They must land exactly as on a raw file, and descriptors without
// O_DIRECT must never read stale page-cache data afterwards.
TEST_P(MountIo, DirectIoWritersMatchRawFileAndStayCoherent) {
  MountImage();
  std::string ref = dir_.File("reference.raw");
  RunInterleavedWriters(ref, /*direct=*/true);

  // Coherence both ways between a cached and a direct descriptor of the same range.
  int cached = open(Disk().c_str(), O_RDWR);
  int direct = open(Disk().c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(cached, 0);
  ASSERT_GE(direct, 0);
  const uint64_t off = 40 * kMiB;
  auto buf = AlignedBuffer(64 * 1024);
  std::vector<uint8_t> seen(64 * 1024);
  ASSERT_TRUE(PReadAll(cached, seen.data(), seen.size(), off));  // now in the page cache
  auto fresh = RandomBytes(seen.size(), 77);
  std::memcpy(buf.get(), fresh.data(), fresh.size());
  ASSERT_TRUE(PWriteAll(direct, buf.get(), fresh.size(), off));
  ASSERT_TRUE(PReadAll(cached, seen.data(), seen.size(), off));
  EXPECT_TRUE(seen == fresh) << "a cached descriptor read stale data after an O_DIRECT write";
  auto again = RandomBytes(seen.size(), 78);
  ASSERT_TRUE(PWriteAll(cached, again.data(), again.size(), off));
  ASSERT_TRUE(PReadAll(direct, buf.get(), again.size(), off));
  EXPECT_EQ(std::memcmp(buf.get(), again.data(), again.size()), 0)
      << "an O_DIRECT read missed a write made through a cached descriptor";
  close(cached);
  close(direct);
  int rfd = open(ref.c_str(), O_RDWR);
  ASSERT_GE(rfd, 0);
  ASSERT_TRUE(PWriteAll(rfd, again.data(), again.size(), off));
  close(rfd);
  ExpectImageMatches(ref);
}

TEST_P(MountIo, ReadOnlyMount) {
  auto seed = RandomBytes(65536, 3);
  test::WriteWholeFile(dir_.File("seed"), seed);
  MustRun("qemu-io -f " + GetParam() + " -c 'write -P 0x61 0 64k' " + Quote(image_));
  std::string before = test::Sha256OfFile(image_);
  MountImage({"-r"});
  errno = 0;
  EXPECT_LT(open(Disk().c_str(), O_RDWR), 0);
  EXPECT_EQ(errno, EROFS);
  int fd = open(Disk().c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  char c = 0;
  EXPECT_EQ(pread(fd, &c, 1, 100), 1);
  EXPECT_EQ(c, 0x61);
  close(fd);
  // A read-only mount shares reading with qemu but not writing.
  EXPECT_EQ(RunCommand("qemu-io -r -f " + GetParam() + " -c 'read 0 4k' " + Quote(image_)).exit_code, 0);
  auto w = RunCommand("qemu-io -f " + GetParam() + " -c 'write 0 4k' " + Quote(image_));
  EXPECT_NE(w.exit_code, 0);
  EXPECT_NE(w.err.find("lock"), std::string::npos) << w.err;
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_EQ(test::Sha256OfFile(image_), before) << "a read-only mount changed the image";
}

TEST_P(MountIo, RegularFileMountPoint) {
  std::string target = dir_.File("view.raw");
  test::WriteWholeFile(target, {});
  auto r = mount_.Start({"-s", "-F", GetParam(), image_, target}, target);  // single-threaded too
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat st {};
  ASSERT_EQ(stat(target.c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 64 * kMiB);
  int fd = open(target.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  auto data = RandomBytes(100000, 5);
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 1234567));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  EXPECT_EQ(mount_.Stop(), 0);
  auto content = QemuContent();
  ASSERT_EQ(content.size(), 64 * kMiB);
  EXPECT_TRUE(std::equal(data.begin(), data.end(), content.begin() + 1234567));
}

TEST_P(MountIo, SignalsCloseCleanly) {
  for (int sig : {SIGTERM, SIGINT}) {
    ASSERT_TRUE(mount_.StartForeground({"-F", GetParam(), image_, mnt_}, mnt_));
    int fd = open(Disk().c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    auto data = RandomBytes(200000, sig);
    ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 3 * kMiB));
    close(fd);
    kill(mount_.pid(), sig);
    for (int i = 0; i < 500 && IsMountPoint(mnt_); ++i) usleep(10000);
    EXPECT_FALSE(IsMountPoint(mnt_)) << "signal " << sig << " did not unmount";
    EXPECT_EQ(mount_.Stop(), 0) << "exit status after signal " << sig;
    ExpectCheckClean();
    auto content = QemuContent();
    ASSERT_GE(content.size(), 4 * kMiB);
    EXPECT_TRUE(std::equal(data.begin(), data.end(), content.begin() + 3 * kMiB));
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, MountIo,
                         ::testing::Values("raw", "qcow2", "vdi", "vmdk", "vpc", "vhdx", "qcow", "parallels",
                                           "qed"));

}  // namespace
}  // namespace vimgfs::e2e

namespace vimgfs::e2e {
namespace {

// A full host file system: writes fail with ENOSPC (never silently), the image stays
// consistent, and what was written before the failure reads back.
TEST(MountHostErrors, NoSpaceIsReportedAndImageStaysConsistent) {
  REQUIRE_FUSE();
  test::TempDir dir;
  std::string fsdir = dir.File("small"), mnt = dir.File("mnt");
  ASSERT_EQ(mkdir(fsdir.c_str(), 0755), 0);
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  if (RunCommand("mount -t tmpfs -o size=12m tmpfs " + Quote(fsdir)).exit_code != 0)
    GTEST_SKIP() << "cannot mount a tmpfs";
  std::string image = fsdir + "/full.qcow2";
  // Without the writeback cache the write that finds the host full fails; with it (the
  // default) the writes are taken into the kernel's cache and fsync reports ENOSPC.
  for (bool cached : {false, true}) {
    SCOPED_TRACE(cached ? "writeback cache" : "nowriteback_cache");
    Mount mount;  // unmounted before the tmpfs goes
    QemuCreate("-f qcow2 " + Quote(image) + " 64M");
    std::vector<std::string> args = {image, mnt};
    if (!cached) args.insert(args.begin(), {"-o", "nowriteback_cache"});
    auto r = mount.Start(args, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    int fd = open((mnt + "/disk.raw").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    uint64_t written = 0;
    int err = 0;
    for (uint64_t off = 0; off < 40 * kMiB; off += kMiB) {
      auto data = RandomBytes(kMiB, off);
      ssize_t n = pwrite(fd, data.data(), data.size(), static_cast<off_t>(off));
      if (n != static_cast<ssize_t>(data.size())) {
        err = n < 0 ? errno : 0;
        break;
      }
      written = off + kMiB;
    }
    if (!cached) {
      EXPECT_EQ(err, ENOSPC) << "a full host must show as ENOSPC, got " << strerror(err);
      EXPECT_GT(written, 2 * kMiB);
      EXPECT_LT(written, 12 * kMiB);
      (void)fsync(fd);
    } else {
      errno = 0;
      EXPECT_NE(fsync(fd), 0);
      EXPECT_EQ(errno, ENOSPC) << "a full host must show as ENOSPC at fsync";
    }
    // Acknowledged writes read back; with the cache, where the write-back failed the
    // image's own bytes (zeros here) show, never garbage.
    std::vector<uint8_t> back(kMiB);
    size_t landed = 0;
    for (uint64_t off = 0; off < written; off += kMiB) {
      ASSERT_TRUE(PReadAll(fd, back.data(), back.size(), off));
      auto want = RandomBytes(kMiB, off);
      if (!cached) {
        EXPECT_TRUE(back == want) << "at " << off;
        continue;
      }
      for (size_t p = 0; p < kMiB; p += 4096) {
        bool is_data = std::equal(back.begin() + p, back.begin() + p + 4096, want.begin() + p);
        bool is_zero =
            std::all_of(back.begin() + p, back.begin() + p + 4096, [](uint8_t c) { return c == 0; });
        EXPECT_TRUE(is_data || is_zero) << "garbage at " << off + p;
        landed += is_data;
      }
    }
    if (cached) {
      EXPECT_GT(landed, 0u) << "nothing reached the image before it was full";
    }
    close(fd);
    mount.Stop();
    std::string out;
    int check = QemuCheck(image, &out);
    EXPECT_TRUE(check == 0 || check == 3) << out;
    unlink(image.c_str());
  }
  RunCommand("umount " + Quote(fsdir));
}

}  // namespace
}  // namespace vimgfs::e2e

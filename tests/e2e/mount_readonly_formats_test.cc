// End-to-end: the read-only formats (bochs, cloop) under a real FUSE mount. A read-write
// mount is refused before backgrounding with a message naming the way out (-r, --overlay,
// convert); -r serves the disk byte for byte; --overlay takes writes into a qcow2 overlay
// and leaves the image untouched. The images are built in the test (qemu-img cannot
// create either format) and judged against what they were built to hold.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "e2e/e2e_util.h"
#include "support/bochs_cloop_builder.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RandomBytes;

struct Built {
  std::string format;
  std::string path;
  std::vector<uint8_t> expected;
};

class MountReadOnlyFormats : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    mnt_ = dir_.File("mnt");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    if (GetParam() == "bochs") {
      test::BochsBuilder b(8 << 20, 32 * 1024, 8);
      for (uint64_t s = 0; s < (8u << 20) / 512; s += 37) b.WriteSector(s, RandomBytes(512, s));
      image_ = dir_.File("disk.bochs");
      b.Write(image_);
      expected_ = b.Expected();
    } else {
      test::CloopBuilder c(64 * 1024);
      for (int i = 0; i < 100; ++i)
        c.AddBlock(i % 3 ? RandomBytes(64 * 1024, i) : std::vector<uint8_t>(64 * 1024, uint8_t(i)));
      image_ = dir_.File("disk.cloop");
      c.Write(image_);
      expected_ = c.Expected();
    }
  }
  std::string Disk() const { return mnt_ + "/disk.raw"; }
  std::vector<uint8_t> ReadDisk() {
    std::vector<uint8_t> out(expected_.size());
    int fd = open(Disk().c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    if (fd >= 0) {
      EXPECT_TRUE(PReadAll(fd, out.data(), out.size(), 0));
      struct stat st {};
      EXPECT_EQ(fstat(fd, &st), 0);
      EXPECT_EQ(static_cast<uint64_t>(st.st_size), expected_.size());
      close(fd);
    }
    return out;
  }

  test::TempDir dir_;
  Mount mount_;
  std::string mnt_, image_;
  std::vector<uint8_t> expected_;
};

TEST_P(MountReadOnlyFormats, ReadWriteMountRefused) {
  const std::string before = test::Sha256OfFile(image_);
  auto r = mount_.Start({image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("(" + GetParam() + ") cannot be written in place: mount it with -r"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(IsMountPoint(mnt_));
  r = mount_.Start({"-F", GetParam(), image_, mnt_}, mnt_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot be written in place"), std::string::npos) << r.err;
  EXPECT_FALSE(IsMountPoint(mnt_));
  EXPECT_EQ(test::Sha256OfFile(image_), before);
}

TEST_P(MountReadOnlyFormats, ReadOnlyMountServesTheDisk) {
  const std::string before = test::Sha256OfFile(image_);
  auto r = mount_.Start({"-r", image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(ReadDisk() == expected_);
  EXPECT_LT(open(Disk().c_str(), O_RDWR), 0);
  EXPECT_EQ(errno, EROFS);
  // qemu reads it beside the mount (both read-only).
  EXPECT_EQ(test::RunCommand("qemu-io -r -f " + GetParam() + " -c 'read 0 64k' " + Quote(image_)).exit_code,
            0);
  EXPECT_EQ(mount_.Stop(), 0);
  EXPECT_EQ(test::Sha256OfFile(image_), before);
}

TEST_P(MountReadOnlyFormats, OverlayTakesTheWrites) {
  const std::string before = test::Sha256OfFile(image_);
  const std::string overlay = dir_.File("ov.qcow2");
  auto r = mount_.Start({"--overlay", overlay, image_, mnt_}, mnt_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(ReadDisk() == expected_);
  int fd = open(Disk().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> data(100000, 0x3c);
  ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 300000));
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  std::copy(data.begin(), data.end(), expected_.begin() + 300000);
  EXPECT_TRUE(ReadDisk() == expected_);
  ASSERT_EQ(mount_.Stop(), 0);
  EXPECT_EQ(test::Sha256OfFile(image_), before) << "the image changed under --overlay";
  EXPECT_EQ(QemuCheck(overlay), 0);
  // qemu reads the overlay over the image as the mount did.
  ASSERT_TRUE(QemuToRaw(overlay, dir_.File("ov.raw")));
  EXPECT_TRUE(test::ReadWholeFile(dir_.File("ov.raw")) == expected_);
}

INSTANTIATE_TEST_SUITE_P(Formats, MountReadOnlyFormats, ::testing::Values("bochs", "cloop"));

}  // namespace
}  // namespace vimgfs::e2e

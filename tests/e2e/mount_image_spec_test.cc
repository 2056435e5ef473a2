// End-to-end: the mount takes an image spec as every command does: --image-opts lists and
// json: names with the driver, the file, a key secret, "backing": null and a substituted
// backing file; what disk.raw shows equals what qemu-img convert reads through the same
// spec, writes land where qemu reads them, and bad specs fail with one line.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

class MountImageSpec : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    // base: 0x11 in its first MiB; other: 0x22 there; top over base: 0x33 in its second.
    MustRun("qemu-img create -q -f qcow2 " + Quote(base_) +
            " 4M && qemu-io -f qcow2 -c 'write -P 0x11 0 1M' " + Quote(base_) + " >/dev/null");
    MustRun("qemu-img create -q -f qcow2 " + Quote(other_) +
            " 4M && qemu-io -f qcow2 -c 'write -P 0x22 0 1M' " + Quote(other_) + " >/dev/null");
    MustRun("qemu-img create -q -f qcow2 -b " + Quote(base_) + " -F qcow2 " + Quote(top_) +
            " && qemu-io -f qcow2 -c 'write -P 0x33 1M 1M' " + Quote(top_) + " >/dev/null");
  }
  // disk.raw mounted read-only from `args` equals qemu-img's reading of `qemu_args`.
  void ExpectSameAsQemu(const std::vector<std::string>& args, const std::string& qemu_args) {
    SCOPED_TRACE(qemu_args);
    const std::string raw = dir_.File("qemu.raw");
    MustRun("qemu-img convert -O raw " + qemu_args + " " + Quote(raw));
    Mount m;
    std::vector<std::string> all{"-r"};
    all.insert(all.end(), args.begin(), args.end());
    all.push_back(mnt_);
    auto r = m.Start(all, mnt_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(test::ReadWholeFile(mnt_ + "/disk.raw"), test::ReadWholeFile(raw));
    EXPECT_EQ(m.Stop(), 0);
  }
  test::TempDir dir_;
  const std::string mnt_ = dir_.File("mnt"), base_ = dir_.File("base.qcow2"),
                    other_ = dir_.File("other.qcow2"), top_ = dir_.File("top.qcow2");
};

TEST_F(MountImageSpec, SpecsShowWhatQemuReads) {
  const std::string opts = "driver=qcow2,file.filename=" + top_;
  ExpectSameAsQemu({"--image-opts", opts}, "--image-opts " + Quote(opts));
  const std::string no_backing =
      "json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"file\","
      "\"filename\":\"" +
      top_ + "\"}}";
  ExpectSameAsQemu({no_backing}, Quote(no_backing));
  const std::string swapped = opts + ",backing.driver=qcow2,backing.file.filename=" + other_;
  ExpectSameAsQemu({"--image-opts", swapped}, "--image-opts " + Quote(swapped));
  // The three differ where they should: the first MiB is base's, nothing, other's.
  const std::string raw = dir_.File("qemu.raw");
  EXPECT_EQ(test::ReadWholeFile(raw)[0], 0x22);
  EXPECT_EQ(test::ReadWholeFile(raw)[1 << 20], 0x33);
}

TEST_F(MountImageSpec, WritesThroughASpecReachTheImage) {
  const std::string opts = "driver=qcow2,file.filename=" + top_;
  {
    Mount m;
    auto r = m.Start({"--image-opts", opts, mnt_}, mnt_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    int fd = open((mnt_ + "/disk.raw").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const std::vector<uint8_t> data(65536, 0x44);
    ASSERT_TRUE(PWriteAll(fd, data.data(), data.size(), 3 << 20));
    EXPECT_EQ(fsync(fd), 0);
    close(fd);
    EXPECT_EQ(m.Stop(), 0);
  }
  auto r = RunCommand("qemu-io -f qcow2 -r -c 'read -P 0x44 3M 64k' -c 'read -P 0x11 0 1M' " + Quote(top_));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  EXPECT_EQ(QemuCheck(top_), 0);
  EXPECT_EQ(QemuCheck(base_), 0);
}

TEST_F(MountImageSpec, BadSpecsFailWithOneLine) {
  struct Case {
    std::vector<std::string> args;
    std::string err;
  } cases[] = {
      {{"--image-opts", "-F", "qcow2", "driver=qcow2,file.filename=" + top_},
       "vimgfs: --image-opts and --format are mutually exclusive\n"},
      {{"--image-opts", "driver=qcow2,file.filename=" + top_ + ",bogus=1"},
       "vimgfs: Could not open 'driver=qcow2,file.filename=" + top_ +
           ",bogus=1': Block format 'qcow2' does not support the option 'bogus'\n"},
      {{"--image-opts", "--overlay", dir_.File("o.qcow2"), "driver=qcow2,backing=null,file.filename=" + top_},
       "vimgfs: an overlay cannot be combined with an image spec's backing or data-file options\n"},
  };
  for (const Case& c : cases) {
    Mount m;
    std::vector<std::string> args = c.args;
    args.push_back(mnt_);
    auto r = m.Start(args, mnt_);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(r.err, c.err);
    EXPECT_FALSE(IsMountPoint(mnt_));
  }
}

}  // namespace
}  // namespace vimgfs::e2e

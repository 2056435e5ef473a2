// End-to-end: the seed workflow (ext4 on a loop device over disk.raw) and byte-exactness
// of disk.raw against `qemu-img convert -O raw` for images qemu made.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RandomBytes;
using test::RunCommand;

// ---- the seed workflow ----

struct GuestFile {
  std::string rel;
  size_t size;
  uint64_t seed;
};

class SeedWorkflow : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    REQUIRE_LOOP();
    mnt_ = dir_.File("img");
    guest_ = dir_.File("guest");
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    ASSERT_EQ(mkdir(guest_.c_str(), 0755), 0);
  }
  void TearDown() override {
    if (guest_mounted_) RunCommand("umount " + Quote(guest_));
    if (!loop_.empty()) LoopDetach(loop_);
    mount_.Stop();
  }
  // mount IMAGE -> losetup -> mount the ext4 inside.
  void MountAll(const std::string& image, bool read_only) {
    std::vector<std::string> args;
    if (read_only) args.push_back("-r");
    args.push_back(image);
    args.push_back(mnt_);
    auto r = mount_.Start(args, mnt_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    loop_ = LoopAttach(mnt_ + "/disk.raw", read_only);
    ASSERT_FALSE(loop_.empty()) << "losetup failed";
  }
  void MountGuest(bool read_only) {
    auto r =
        RunCommand("mount " + std::string(read_only ? "-o ro " : "") + Quote(loop_) + " " + Quote(guest_));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    guest_mounted_ = true;
  }
  void UnmountAll() {
    if (guest_mounted_) {
      ASSERT_EQ(RunCommand("umount " + Quote(guest_)).exit_code, 0);
      guest_mounted_ = false;
    }
    LoopDetach(loop_);
    loop_.clear();
    EXPECT_EQ(mount_.Stop(), 0);
  }

  test::TempDir dir_;
  Mount mount_;
  std::string mnt_, guest_, loop_;
  bool guest_mounted_ = false;
};

TEST_F(SeedWorkflow, Ext4OnLoopSurvivesRemount) {
  std::string image = dir_.File("tpl.qcow2");
  // As in the design's seed workflow: vimgfs creates the template.
  auto made = RunCommand(Quote(test::VimgfsBinary()) + " create -q -f qcow2 " + Quote(image) + " 1G");
  ASSERT_EQ(made.exit_code, 0) << made.err;
  MountAll(image, false);
  auto mk = RunCommand("mkfs.ext4 -q -F " + Quote(loop_));
  ASSERT_EQ(mk.exit_code, 0) << mk.err;
  MountGuest(false);

  // ~2000 files in 40 folders, random sizes and contents.
  std::vector<GuestFile> files;
  std::mt19937_64 rng(2024);
  for (int d = 0; d < 40; ++d) {
    std::string sub = "d" + std::to_string(d);
    ASSERT_EQ(mkdir((guest_ + "/" + sub).c_str(), 0755), 0);
    for (int i = 0; i < 50; ++i) {
      GuestFile f{sub + "/f" + std::to_string(i), static_cast<size_t>(rng() % 24000), rng()};
      test::WriteWholeFile(guest_ + "/" + f.rel, RandomBytes(f.size, f.seed));
      files.push_back(f);
    }
  }
  // Edit a text file the way an editor does (write a new copy, rename over).
  std::string conf = guest_ + "/limits.conf";
  std::string text = "# limits\n*    soft    nofile    1024\n";
  test::WriteWholeFile(conf, std::vector<uint8_t>(text.begin(), text.end()));
  text += "*    hard    nofile    65536\n";
  test::WriteWholeFile(conf + ".swp", std::vector<uint8_t>(text.begin(), text.end()));
  ASSERT_EQ(rename((conf + ".swp").c_str(), conf.c_str()), 0);
  UnmountAll();

  std::string out;
  EXPECT_EQ(QemuCheck(image, &out), 0) << out;
  auto own = RunCommand(Quote(test::VimgfsBinary()) + " check " + Quote(image));
  EXPECT_EQ(own.exit_code, 0) << own.out << own.err;

  MountAll(image, true);
  MountGuest(true);
  size_t bad = 0;
  for (const GuestFile& f : files) {
    if (test::ReadWholeFile(guest_ + "/" + f.rel) != RandomBytes(f.size, f.seed)) ++bad;
  }
  EXPECT_EQ(bad, 0u) << "files differ after remount";
  auto conf_back = test::ReadWholeFile(conf);
  EXPECT_EQ(std::string(conf_back.begin(), conf_back.end()), text);
  UnmountAll();
  EXPECT_EQ(QemuCheck(image, &out), 0) << out;
}

// ---- byte-exactness against qemu-img convert ----

struct ExactCase {
  const char* name;
  const char* format;  // of img
  const char* script;  // sh run in the temp dir; leaves the image in "img"
};

const ExactCase kExactCases[] = {
    {"qcow2_scattered", "qcow2",
     "qemu-img create -q -f qcow2 img 64M && qemu-io -c 'write -P 0x41 0 100k' "
     "-c 'write -P 0x42 1000000 333333' -c 'write -P 0x43 40M 2M' -c 'write -z 40M 64k' "
     "-c 'discard 41M 64k' -c 'write -P 0x44 63M 1M' img >/dev/null"},
    {"qcow2_compressed", "qcow2",
     "head -c 3M /dev/urandom > src && truncate -s 9000000 src && qemu-io -f raw "
     "-c 'write -P 0x51 4M 1M' -c 'write -P 0x52 6000000 777' src >/dev/null && "
     "qemu-img convert -c -f raw -O qcow2 src img"},
    {"qcow2_backing_chain", "qcow2",
     "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 0x61 0 16M' base >/dev/null && "
     "qemu-img create -q -f qcow2 -b base -F qcow2 mid && qemu-io -c 'write -P 0x62 1M 1M' "
     "-c 'write -z 4M 2M' -c 'write -P 0x63 5000000 1000' mid >/dev/null && "
     "qemu-img create -q -f qcow2 -b mid -F qcow2 img && qemu-io -c 'write -P 0x64 1536k 4k' "
     "-c 'write -z 8M 64k' img >/dev/null"},
    {"qcow2_zero_clusters", "qcow2",
     "qemu-img create -q -f qcow2 -o cluster_size=4k img 8M && qemu-io -c 'write -P 0x71 0 8M' "
     "-c 'write -z 4k 12k' -c 'write -z -u 1M 64k' -c 'discard 2M 8k' img >/dev/null"},
    {"qcow2_odd_size", "qcow2",
     "qemu-img create -q -f qcow2 img 10000001 && qemu-io -c 'write -P 0x81 9999360 512' img >/dev/null"},
    {"qcow2_extended_l2", "qcow2",
     "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k img 8M && "
     "qemu-io -c 'write -P 0x91 4k 4k' -c 'write -P 0x92 1M 7k' -c 'write -z 1028k 8k' img >/dev/null"},
    {"raw_odd_size", "raw", "head -c 12345 /dev/urandom > img"},
    {"vmdk_sparse", "vmdk",
     "qemu-img create -q -f vmdk img 32M && qemu-io -f vmdk -c 'write -P 0xa1 0 1M' "
     "-c 'write -P 0xa2 20M 70k' img >/dev/null"},
    {"vmdk_stream", "vmdk",
     "qemu-img create -q -f qcow2 src 16M && qemu-io -c 'write -P 0xb1 1M 3M' src >/dev/null && "
     "qemu-img convert -O vmdk -o subformat=streamOptimized src img"},
    {"vdi_dynamic", "vdi",
     "qemu-img create -q -f vdi img 32M && qemu-io -f vdi -c 'write -P 0xc1 0 1M' "
     "-c 'write -P 0xc2 3000000 5000' img >/dev/null"},
    {"vpc_dynamic", "vpc",
     "qemu-img create -q -f vpc img 32M && qemu-io -f vpc -c 'write -P 0xd1 0 1M' "
     "-c 'write -P 0xd2 3000000 5000' img >/dev/null"},
    {"vpc_fixed", "vpc",
     "qemu-img create -q -f vpc -o subformat=fixed img 8M && qemu-io -f vpc -c 'write -P 0xd3 4k 1M' img "
     ">/dev/null"},
    {"qcow", "qcow",
     "qemu-img create -q -f qcow img 32M && qemu-io -f qcow -c 'write -P 0xf1 0 1M' "
     "-c 'write -P 0xf2 3000000 5000' img >/dev/null"},
    {"vhdx_dynamic", "vhdx",
     "qemu-img create -q -f vhdx -o block_size=1M img 32M && qemu-io -f vhdx -c 'write -P 0xe1 0 1M' "
     "-c 'write -P 0xe2 3000000 5000' -c 'write -z 5M 1M' -c 'write -P 0xe3 31M 1M' img >/dev/null"},
    {"vhdx_fixed", "vhdx",
     "qemu-img create -q -f vhdx -o subformat=fixed,block_state_zero=off img 9M && "
     "qemu-io -f vhdx -c 'write -P 0xe4 4k 1M' -c 'write -P 0xe5 8M 512' img >/dev/null"},
    {"qed", "qed",
     "qemu-img create -q -f qed -o cluster_size=4k img 32M && qemu-io -f qed -c 'write -P 0xf1 0 1M' "
     "-c 'write -P 0xf2 3000000 5000' -c 'write -z 5M 1M' img >/dev/null"},
};

void PrintTo(const ExactCase& c, std::ostream* os) { *os << c.name; }

class ByteExact : public ::testing::TestWithParam<ExactCase> {};

TEST_P(ByteExact, DiskRawEqualsQemuConvert) {
  REQUIRE_FUSE();
  const ExactCase& c = GetParam();
  test::TempDir dir;
  Mount mount;
  auto made = RunCommand("cd " + Quote(dir.path()) + " && " + c.script);
  ASSERT_EQ(made.exit_code, 0) << made.err;
  std::string img = dir.File("img"), want = dir.File("want.raw"), mnt = dir.File("mnt");
  ASSERT_EQ(
      RunCommand(std::string("qemu-img convert -f ") + c.format + " -O raw " + Quote(img) + " " + Quote(want))
          .exit_code,
      0);
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  std::string before = test::Sha256OfFile(img);
  auto r = mount.Start({"-r", "-F", c.format, img, mnt}, mnt);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat a {
  }, b{};
  ASSERT_EQ(stat((mnt + "/disk.raw").c_str(), &a), 0);
  ASSERT_EQ(stat(want.c_str(), &b), 0);
  EXPECT_EQ(a.st_size, b.st_size);
  EXPECT_EQ(test::Sha256OfFile(mnt + "/disk.raw"), test::Sha256OfFile(want));
  EXPECT_EQ(mount.Stop(), 0);
  EXPECT_EQ(test::Sha256OfFile(img), before) << "a read-only mount changed the image";
}

INSTANTIATE_TEST_SUITE_P(QemuMade, ByteExact, ::testing::ValuesIn(kExactCases),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace vimgfs::e2e

namespace vimgfs::e2e {
namespace {

// A read-write mount of an image the format can't write in place is refused before the
// mount, with a message pointing at the ways that work; -r and --overlay then work.
TEST(MountStreamOptimized, ReadWriteMountIsRefusedWithAWayOut) {
  REQUIRE_FUSE();
  test::TempDir dir;
  auto made = RunCommand("cd " + Quote(dir.path()) +
                         " && qemu-img create -q -f raw src 8M && qemu-img convert -O vmdk -o "
                         "subformat=streamOptimized src img.vmdk");
  ASSERT_EQ(made.exit_code, 0) << made.err;
  std::string img = dir.File("img.vmdk"), mnt = dir.File("mnt");
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  {
    Mount mount;
    auto r = mount.Start({img, mnt}, mnt);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("--overlay"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("img.vmdk"), std::string::npos) << r.err;
  }
  {
    Mount mount;
    auto r = mount.Start({"--overlay", dir.File("ov.qcow2"), img, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(mount.Stop(), 0);
  }
}

}  // namespace
}  // namespace vimgfs::e2e

// Mounting a dmg (qemu's sample image): read-only with -r, byte-for-byte what qemu-img
// converts it to; a read-write mount is refused with the ways out; an overlay takes the
// writes and leaves the dmg as it was.
#include <gtest/gtest.h>

#include "e2e/e2e_util.h"
#include "support/test_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

TEST(DmgMount, ReadOnlyMountReadsLikeQemuImgAndAnOverlayTakesWrites) {
  REQUIRE_FUSE();
  test::TempDir dir;
  std::string image;
  REQUIRE_QEMU_SAMPLE(image, "simple-dmg.dmg", dir.path());
  const std::string raw = dir.File("qemu.raw"), mnt = dir.File("mnt");
  ASSERT_EQ(RunCommand("mkdir " + Quote(mnt)).exit_code, 0);
  auto r = RunCommand("qemu-img convert -f dmg -O raw " + Quote(image) + " " + Quote(raw) + " 2>/dev/null");
  ASSERT_EQ(r.exit_code, 0);
  const auto before = test::ReadWholeFile(image);
  {
    Mount m;
    r = m.Start({image, mnt}, mnt);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("mount it with -r"), std::string::npos) << r.err;
  }
  {
    Mount m;
    r = m.Start({"-r", image, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(test::Sha256OfFile(mnt + "/disk.raw"), test::Sha256OfFile(raw));
    EXPECT_EQ(m.Stop(), 0);
  }
  const std::string overlay = dir.File("over.qcow2");
  {
    Mount m;
    r = m.Start({"--overlay", overlay, image, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand("printf hello | dd of=" + Quote(mnt + "/disk.raw") +
                   " bs=1 seek=4096 conv=notrunc status=none");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(m.Stop(), 0);
  }
  r = RunCommand("qemu-io -r -c 'read -P 0x68 4096 1' " + Quote(overlay) + " 2>/dev/null");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  EXPECT_EQ(test::ReadWholeFile(image), before);
}

}  // namespace
}  // namespace vimgfs::e2e

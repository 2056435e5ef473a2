// End-to-end: an encrypted (luks) image made by qemu-img, mounted with its passphrase from
// --object: ext4 on a loop device over disk.raw, files in and out, the image readable by
// qemu afterwards; the passphrase gone from the daemon's command line; a wrong passphrase
// refused with one line before anything is mounted.
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

std::string Cmdline(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(MountLuks, Ext4InsideAnEncryptedImageAndTheSecretHidden) {
  REQUIRE_FUSE();
  REQUIRE_LOOP();
  test::TempDir dir;
  const std::string image = dir.File("disk.luks"), mnt = dir.File("mnt"), guest = dir.File("guest");
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  ASSERT_EQ(mkdir(guest.c_str(), 0755), 0);
  const std::string create =
      "qemu-img create -q -f luks --object secret,id=s0,data=topsecret123 "
      "-o key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv " +
      Quote(image) + " 64M";
  auto made = RunCommand(create);
  // qemu's key-derivation timer can read 0 ms on a loaded machine and give up: again.
  for (int i = 0; i < 10 && made.exit_code != 0; i++) made = RunCommand(create);
  ASSERT_EQ(made.exit_code, 0) << made.err;

  // A wrong passphrase: one line, exit 1, nothing mounted.
  {
    Mount m;
    auto r = m.Start({"--object", "secret,id=s0,data=nope", "--key-secret", "s0", image, mnt}, mnt);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "vimgfs: '" + image + "': Invalid password, cannot unlock any keyslot\n");
    EXPECT_FALSE(IsMountPoint(mnt));
  }

  const std::string pass_file = dir.File("pass");
  test::WriteWholeFile(pass_file, {'t', 'o', 'p', 's', 'e', 'c', 'r', 'e', 't', '1', '2', '3'});
  const std::vector<uint8_t> content = test::RandomBytes(3 << 20, 77);
  {
    Mount m;
    auto r = m.Start({"--object", "secret,id=s0,data=topsecret123", "--key-secret", "s0", image, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::string cmdline = Cmdline(m.pid());
    EXPECT_FALSE(cmdline.empty());
    EXPECT_EQ(cmdline.find("topsecret123"), std::string::npos) << cmdline;
    EXPECT_NE(cmdline.find("data=xxxxxxxxxxxx"), std::string::npos) << cmdline;
    std::string loop = LoopAttach(mnt + "/disk.raw", false);
    ASSERT_FALSE(loop.empty());
    auto mk = RunCommand("mkfs.ext4 -q -F " + Quote(loop) + " && mount " + Quote(loop) + " " + Quote(guest));
    ASSERT_EQ(mk.exit_code, 0) << mk.err;
    test::WriteWholeFile(guest + "/file.bin", content);
    EXPECT_EQ(RunCommand("umount " + Quote(guest)).exit_code, 0);
    LoopDetach(loop);
    EXPECT_EQ(m.Stop(), 0);
  }
  // qemu reads what the mount wrote: the guest file system is clean.
  const std::string raw = dir.File("plain.raw");
  auto conv = RunCommand("qemu-img convert --object secret,id=s0,file=" + Quote(pass_file) +
                         " --image-opts driver=luks,key-secret=s0,file.filename=" + Quote(image) +
                         " -O raw " + Quote(raw));
  ASSERT_EQ(conv.exit_code, 0) << conv.err;
  auto fsck = RunCommand("fsck.ext4 -n -f " + Quote(raw));
  EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;
  // Read-only again, the passphrase from a file this time.
  {
    Mount m;
    auto r =
        m.Start({"-r", "--object", "secret,id=k,file=" + pass_file, "-o", "key_secret=k", image, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string loop = LoopAttach(mnt + "/disk.raw", true);
    ASSERT_FALSE(loop.empty());
    ASSERT_EQ(RunCommand("mount -o ro " + Quote(loop) + " " + Quote(guest)).exit_code, 0);
    EXPECT_TRUE(test::ReadWholeFile(guest + "/file.bin") == content);
    EXPECT_EQ(RunCommand("umount " + Quote(guest)).exit_code, 0);
    LoopDetach(loop);
    EXPECT_EQ(m.Stop(), 0);
  }
}

}  // namespace
}  // namespace vimgfs::e2e

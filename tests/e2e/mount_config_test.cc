// Mount command-line parsing (no FUSE needed). src/fuse is built into the vimgfs binary
// only, so the parser's source is compiled in here directly.
#include "fuse/mount_config.cc"  // NOLINT: see above

#include <gtest/gtest.h>

namespace vimgfs::mount {
namespace {

Result<MountConfig> Parse(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return ParseMountArgs(static_cast<int>(argv.size()), argv.data());
}

TEST(MountConfig, FstabStyleOptionsAfterPositionals) {
  // What mount.fuse3 runs for an fstab line.
  auto c = Parse({"vimgfs", "/img/a.qcow2", "/mnt/img", "-o", "ro,format=qcow2,dev,suid,noauto,_netdev"});
  ASSERT_TRUE(c.ok()) << c.error().ToString();
  EXPECT_EQ(c->image, "/img/a.qcow2");
  EXPECT_EQ(c->mountpoint, "/mnt/img");
  EXPECT_TRUE(c->read_only);
  EXPECT_EQ(c->format, "qcow2");
  EXPECT_EQ(c->fuse_options, (std::vector<std::string>{"dev", "suid"}));
  EXPECT_FALSE(c->foreground);
}

TEST(MountConfig, ShortLongAndAttachedForms) {
  auto c = Parse({"mount", "-rfs", "-Fvmdk", "--overlay=/o.qcow2", "-oallow_other,cache_size=64M", "img",
                  "--untrusted", "mnt", "-o", "detect_zeroes=off"});
  ASSERT_TRUE(c.ok()) << c.error().ToString();
  EXPECT_TRUE(c->read_only);
  EXPECT_TRUE(c->foreground);
  EXPECT_TRUE(c->single_threaded);
  EXPECT_TRUE(c->untrusted);
  EXPECT_FALSE(c->detect_zeroes);
  EXPECT_EQ(c->format, "vmdk");
  EXPECT_EQ(c->overlay, "/o.qcow2");
  ASSERT_TRUE(c->cache_bytes.has_value());
  EXPECT_EQ(*c->cache_bytes, 64ull << 20);
  EXPECT_EQ(c->fuse_options, (std::vector<std::string>{"allow_other"}));

  c = Parse({"vimgfs", "--snapshot", "s1", "-d", "-o", "rw", "a", "b"});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->snapshot, "s1");
  EXPECT_TRUE(c->debug);
  EXPECT_TRUE(c->foreground) << "-d implies -f";
  EXPECT_FALSE(c->read_only);
  // Later wins: -o ro then rw.
  c = Parse({"vimgfs", "a", "b", "-o", "ro", "-o", "rw"});
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->read_only);
}

TEST(MountConfig, Errors) {
  EXPECT_FALSE(Parse({"vimgfs", "a"}).ok());
  EXPECT_FALSE(Parse({"vimgfs", "a", "b", "c"}).ok());
  auto bad = Parse({"vimgfs", "-x", "a", "b"});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("-x"), std::string::npos);
  EXPECT_FALSE(Parse({"vimgfs", "a", "b", "-o"}).ok());
  EXPECT_FALSE(Parse({"vimgfs", "a", "b", "-o", "detect_zeroes=maybe"}).ok());
  EXPECT_FALSE(Parse({"vimgfs", "a", "b", "-o", "cache_size=lots"}).ok());
  EXPECT_FALSE(Parse({"vimgfs", "--overlay", "o", "--snapshot", "s", "a", "b"}).ok());
  EXPECT_FALSE(Parse({"vimgfs", "a", "b", "-o", "fd=3"}).ok());
  auto help = Parse({"mount", "--help"});
  ASSERT_TRUE(help.ok());
  EXPECT_TRUE(help->help);
  EXPECT_NE(MountUsage("vimgfs").find("fuse.vimgfs"), std::string::npos);
}

TEST(MountConfig, DoubleDashEndsOptions) {
  auto c = Parse({"vimgfs", "-r", "--", "-odd-name.qcow2", "mnt"});
  ASSERT_TRUE(c.ok()) << c.error().ToString();
  EXPECT_EQ(c->image, "-odd-name.qcow2");
  EXPECT_TRUE(c->read_only);
}

}  // namespace
}  // namespace vimgfs::mount

// VMDK: a write that fails (EIO, ENOSPC) at any point of a workload must reach the caller
// and leave an image qemu-img checks clean and reads whole; every byte then holds either
// its old or its new content (grains are linked only after their data is durable).
// One variant clears a grain directory entry so writes there allocate new grain tables.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "support/fault_env.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kSize = 64 << 20;

struct Op {
  uint64_t off;
  uint64_t len;
  bool zero;
};
const Op kOps[] = {{0, 70000, false},
                   {100000, 200000, false},
                   {(32 << 20) - 1000, 5000, false},
                   {(40 << 20) + 3, 65536, false},
                   {1 << 20, 128 << 10, true},
                   {(63 << 20), 1 << 20, false}};

std::vector<std::byte> Pattern(size_t n, int salt) {
  std::vector<std::byte> d(n);
  for (size_t i = 0; i < n; i++) d[i] = std::byte(((i * 13) + salt * 31 + 1) & 0xff);
  return d;
}

Status Workload(Image& img) {
  int salt = 0;
  for (const Op& op : kOps) {
    Status s = op.zero ? img.WriteZeroes(op.off, op.len, false) : img.Write(op.off, Pattern(op.len, ++salt));
    if (!s.ok()) return s;
  }
  return img.Flush();
}

struct VmdkFaultCase {
  const char* options;
  bool drop_gd_entry;
  int err;
};
void PrintTo(const VmdkFaultCase& c, std::ostream* os) {
  *os << (*c.options ? c.options : "default") << (c.drop_gd_entry ? ", new grain table" : "")
      << (c.err == EIO ? ", EIO" : ", ENOSPC");
}

class VmdkFaultTest : public ::testing::TestWithParam<VmdkFaultCase> {};

TEST_P(VmdkFaultTest, EveryFailedWriteLeavesAConsistentImage) {
  REQUIRE_QEMU_IMG();
  const VmdkFaultCase& fc = GetParam();
  test::TempDir dir;
  const std::string pristine = dir.File("pristine.vmdk"), work = dir.File("work.vmdk");
  auto cr = RunCommand(std::string("qemu-img create -q -f vmdk ") +
                       (*fc.options ? std::string("-o ") + fc.options + " " : "") + Quote(pristine) + " 64M");
  ASSERT_EQ(cr.exit_code, 0) << cr.err;
  auto pr = RunCommand("qemu-io -f vmdk -c 'write -P 0x5e 0 16M' " + Quote(pristine));
  ASSERT_EQ(pr.exit_code, 0) << pr.err;
  if (fc.drop_gd_entry) {
    // Second GD entry (guest 32..64 MiB) cleared in both directories: unallocated there.
    auto b = test::ReadWholeFile(pristine);
    uint64_t gd = b[56] | (b[57] << 8), rgd = b[48] | (b[49] << 8);
    std::memset(b.data() + gd * 512 + 4, 0, 4);
    std::memset(b.data() + rgd * 512 + 4, 0, 4);
    test::WriteWholeFile(pristine, b);
  }
  const std::string old_raw = dir.File("old.raw"), new_raw = dir.File("new.raw");
  ASSERT_EQ(RunCommand("qemu-img convert -O raw " + Quote(pristine) + " " + Quote(old_raw)).exit_code, 0);

  test::FaultEnv counting(Env::Default());
  std::filesystem::copy_file(pristine, work);
  int total_writes;
  {
    OpenOptions o;
    o.env = &counting;
    auto img = Image::Open(work, o);
    ASSERT_TRUE(img.ok()) << img.error().ToString();
    ASSERT_TRUE(Workload(**img).ok());
    ASSERT_TRUE((*img)->Close().ok());
    total_writes = counting.writes_seen();
  }
  ASSERT_EQ(RunCommand("qemu-img convert -O raw " + Quote(work) + " " + Quote(new_raw)).exit_code, 0);
  auto old_bytes = test::ReadWholeFile(old_raw), new_bytes = test::ReadWholeFile(new_raw);
  ASSERT_GT(total_writes, 6);

  int checked = 0;
  for (int nth = 1; nth <= total_writes; nth++) {
    std::filesystem::remove(work);
    std::filesystem::copy_file(pristine, work);
    test::FaultEnv fenv(Env::Default());
    fenv.SetRule({std::nullopt, nth, fc.err, /*sticky=*/true});
    {
      OpenOptions o;
      o.env = &fenv;
      auto img = Image::Open(work, o);
      ASSERT_TRUE(img.ok()) << img.error().ToString();
      Status s = Workload(**img);
      if (fenv.triggered()) {
        EXPECT_FALSE(s.ok()) << "write " << nth << " failed but nobody was told";
        EXPECT_EQ(s.err(), fc.err) << s.ToString();
      }
      (void)(*img)->Close();
    }
    auto chk = RunCommand("qemu-img check " + Quote(work));
    EXPECT_EQ(chk.exit_code, 0) << "failing write " << nth << ":\n" << chk.out << chk.err;
    const std::string got_raw = dir.File("got.raw");
    auto conv = RunCommand("qemu-img convert -O raw " + Quote(work) + " " + Quote(got_raw));
    ASSERT_EQ(conv.exit_code, 0) << conv.err;
    auto got = test::ReadWholeFile(got_raw);
    ASSERT_EQ(got.size(), kSize);
    for (uint64_t i = 0; i < kSize; i += 512) {
      bool is_old = std::memcmp(got.data() + i, old_bytes.data() + i, 512) == 0;
      bool is_new = std::memcmp(got.data() + i, new_bytes.data() + i, 512) == 0;
      ASSERT_TRUE(is_old || is_new) << "failing write " << nth << ": sector at " << i
                                    << " is neither old nor new";
    }
    checked++;
  }
  EXPECT_EQ(checked, total_writes);
}

INSTANTIATE_TEST_SUITE_P(Vmdk, VmdkFaultTest,
                         ::testing::Values(VmdkFaultCase{"", false, EIO},
                                           VmdkFaultCase{"zeroed_grain=on", false, ENOSPC},
                                           VmdkFaultCase{"", true, EIO},
                                           VmdkFaultCase{"zeroed_grain=on", true, ENOSPC}),
                         [](const auto& info) {
                           std::string n = std::string(*info.param.options ? "zeroed" : "plain") +
                                           (info.param.drop_gd_entry ? "_newgt" : "") +
                                           (info.param.err == EIO ? "_EIO" : "_ENOSPC");
                           return n;
                         });

}  // namespace
}  // namespace vimgfs

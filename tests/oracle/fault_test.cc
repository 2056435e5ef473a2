// A write that fails (EIO, ENOSPC) at any point of an allocation must reach the caller and
// leave an image that qemu-img check finds free of corruption (leaks are allowed).
// The workload is run once cleanly to count its host writes, then once per write with
// that write failing.
#include <gtest/gtest.h>

#include <filesystem>

#include "support/fault_env.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;

// Allocating writes that cross clusters, an L2 table boundary (512-byte clusters: an L2
// table maps 32 KiB), refcount-block growth, zeroing and discards; stops at the first error.
Status Workload(Image& img, bool* saw_error) {
  std::vector<std::byte> data(70000);
  for (size_t i = 0; i < data.size(); i++) data[i] = std::byte((i * 7) & 0xff);
  const uint64_t offsets[] = {0, 1000, 30000, 1 << 20, (4 << 20) - 100, 7 << 20};
  for (uint64_t off : offsets) {
    Status s = img.Write(off, data);
    if (!s.ok()) {
      *saw_error = true;
      return s;
    }
  }
  Status s = img.WriteZeroes(2 << 20, 64 << 10, true);
  if (s.ok()) s = img.Discard(0, 32 << 10);
  if (s.ok()) s = img.Flush();
  if (!s.ok()) *saw_error = true;
  return s;
}

struct FaultCase {
  std::string create_options;
  int err;
};
// ctest lists the case by its options, not as a byte dump.
void PrintTo(const FaultCase& c, std::ostream* os) {
  *os << c.create_options << (c.err == EIO ? " EIO" : " ENOSPC");
}

class FaultTest : public ::testing::TestWithParam<FaultCase> {};

TEST_P(FaultTest, EveryFailedWriteLeavesACleanImage) {
  REQUIRE_QEMU_IMG();
  const FaultCase& fc = GetParam();
  test::TempDir dir;
  std::string pristine = dir.File("pristine.qcow2");
  auto cr =
      RunCommand("qemu-img create -q -f qcow2 -o " + fc.create_options + " " + Quote(pristine) + " 16M");
  ASSERT_EQ(cr.exit_code, 0) << cr.err;

  // Clean run: count the writes.
  test::FaultEnv counting(Env::Default());
  std::string work = dir.File("work.qcow2");
  std::filesystem::copy_file(pristine, work);
  int total_writes;
  {
    OpenOptions o;
    o.env = &counting;
    auto img = Image::Open(work, o);
    ASSERT_TRUE(img.ok()) << img.error().ToString();
    bool saw = false;
    ASSERT_TRUE(Workload(**img, &saw).ok());
    ASSERT_TRUE((*img)->Close().ok());
    total_writes = counting.writes_seen();
  }
  ASSERT_GT(total_writes, 5);

  // Then fail each write in turn (every third, to keep the run short, plus the first few).
  int checked = 0;
  for (int nth = 1; nth <= total_writes; nth += (nth < 12 ? 1 : 3)) {
    std::filesystem::remove(work);
    std::filesystem::copy_file(pristine, work);
    test::FaultEnv fenv(Env::Default());
    fenv.SetRule({std::nullopt, nth, fc.err, /*sticky=*/true});
    bool saw_error = false;
    {
      OpenOptions o;
      o.env = &fenv;
      auto img = Image::Open(work, o);
      ASSERT_TRUE(img.ok()) << img.error().ToString();
      Status s = Workload(**img, &saw_error);
      if (fenv.triggered()) {
        EXPECT_FALSE(s.ok()) << "write " << nth << " failed but nobody was told";
        EXPECT_EQ(s.err(), fc.err) << s.ToString();
      }
      (void)(*img)->Close();  // may fail too: the device is still "broken"
    }
    auto chk = RunCommand("qemu-img check " + Quote(work));
    EXPECT_TRUE(chk.exit_code == 0 || chk.exit_code == 3)
        << "failing write " << nth << " of " << total_writes << " corrupted the image:\n"
        << chk.out << chk.err;
    checked++;
  }
  EXPECT_GT(checked, 5);
}

INSTANTIATE_TEST_SUITE_P(Qcow2, FaultTest,
                         ::testing::Values(FaultCase{"cluster_size=512", EIO},
                                           FaultCase{"cluster_size=512", ENOSPC},
                                           FaultCase{"cluster_size=65536,lazy_refcounts=on", EIO},
                                           FaultCase{"cluster_size=4096,refcount_bits=1", ENOSPC},
                                           FaultCase{"cluster_size=4096,compat=0.10", EIO}),
                         [](const auto& info) {
                           std::string n =
                               info.param.create_options + (info.param.err == EIO ? "_EIO" : "_ENOSPC");
                           for (char& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

}  // namespace
}  // namespace vimgfs

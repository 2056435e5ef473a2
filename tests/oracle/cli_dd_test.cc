// `dd` beside qemu-img dd: the same messages and exit codes, and outputs that read the
// same (qemu-img compare) and have the same size, for block sizes, counts and skips that
// cut blocks in every way, across formats.
#include <string>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliDdTest : public CliTwinTest {
 protected:
  void SetUp() override {
    CliTwinTest::SetUp();
    if (IsSkipped()) return;
    InBoth(
        "qemu-img create -q -f qcow2 in.qcow2 3M && qemu-io -c 'write -P 7 0 1M' -c 'write -P 9 1536k 5000' "
        "-c 'write -P 3 3000k 72k' in.qcow2 >/dev/null");
  }
  // Runs `dd ARGS` in both folders, then compares the two outputs with each other.
  void Same(const std::string& args, const std::string& out_fmt = "raw") {
    if (!ExpectSame("dd " + args)) return;
    const std::string cmp = "qemu-img compare -f " + out_fmt + " -F " + out_fmt + " v/out q/out";
    CommandResult c = Sh(cmp);
    EXPECT_EQ(c.exit_code, 0) << args << "\n" << c.out << c.err;
    auto size = [&](const char* dir) {
      return Sh("qemu-img info --output=json -f " + out_fmt + " " + dir + "/out | grep virtual-size").out;
    };
    EXPECT_EQ(size("v"), size("q")) << args;
    MustSh("rm -f v/out q/out");
  }
};

TEST_F(CliDdTest, CopiesAsQemu) {
  Same("if=in.qcow2 of=out");
  Same("bs=4k if=in.qcow2 of=out");
  Same("bs=1000 count=1600 if=in.qcow2 of=out");
  Same("bs=64k skip=7 count=20 if=in.qcow2 of=out");
  Same("bs=3333 skip=11 if=in.qcow2 of=out");
  Same("bs=1M count=100 if=in.qcow2 of=out");
  Same("-f qcow2 -O qcow2 bs=64k skip=2 if=in.qcow2 of=out", "qcow2");
  Same("-O vmdk bs=512 count=4096 if=in.qcow2 of=out", "vmdk");
  Same("-O vdi skip=1 bs=1M if=in.qcow2 of=out", "vdi");
}

TEST_F(CliDdTest, EdgesAndErrorsAsQemu) {
  Same("bs=1M skip=5 if=in.qcow2 of=out");  // past the end: a warning and an empty output
  for (const char* args :
       {"", "if=in.qcow2", "of=out", "bs=0 if=in.qcow2 of=out", "bs=3G if=in.qcow2 of=out",
        "bs=x if=in.qcow2 of=out", "count=-1 if=in.qcow2 of=out", "seek=1 if=in.qcow2 of=out",
        "if=in.qcow2 of=out junk", "-O foo if=in.qcow2 of=out", "-O bochs if=in.qcow2 of=out",
        "if=missing.qcow2 of=out"}) {
    ExpectSame(std::string("dd ") + args);
  }
}

}  // namespace
}  // namespace vimgfs::test

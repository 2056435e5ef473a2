// `vimgfs map` and `vimgfs compare` against qemu-img on the same images.
#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliMapCompareTest : public CliTest {
 protected:
  void ExpectSame(const std::string& args) {
    SCOPED_TRACE(args);
    CommandResult v = V(args), q = Q(args);
    EXPECT_EQ(v.exit_code, q.exit_code) << v.err << q.err;
    EXPECT_EQ(v.out, q.out);
  }
  void MakeImages() {
    for (std::string fmt : {"qcow2", "vmdk", "vdi", "raw"}) {
      std::string f = "a." + fmt;
      MustSh("qemu-img create -q -f " + fmt + " " + f + " 32M");
      MustSh("qemu-io -f " + fmt +
             " -c 'write -P 1 0 192k' -c 'write -P 2 4M 64k' -c 'write -z 8M 1M' "
             "-c 'write -P 3 20M 1M' " +
             f + " >/dev/null");
    }
    MustSh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2");
    MustSh("qemu-io -c 'write -P 9 64k 64k' -c 'write -z 20M 64k' top.qcow2 >/dev/null");
  }
};

TEST_F(CliMapCompareTest, MapHumanAndJson) {
  MakeImages();
  for (std::string f : {"a.qcow2", "a.vmdk", "a.vdi", "a.raw", "top.qcow2"}) {
    ExpectSame("map " + f);
    ExpectSame("map --output=json " + f);
    ExpectSame("map --output=json --start-offset=128k --max-length=9M " + f);
    ExpectSame("map --start-offset=4M --max-length=17M " + f);
  }
  // Compressed clusters cannot be shown in the human layout.
  MustSh("qemu-img create -q -f qcow2 c.qcow2 1M && qemu-io -c 'write -c -P 5 0 64k' c.qcow2 >/dev/null");
  ExpectSame("map --output=json c.qcow2");
  CommandResult v = V("map c.qcow2");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_EQ(v.err, "vimgfs: File contains external, encrypted or compressed clusters.\n");
}

TEST_F(CliMapCompareTest, Compare) {
  MakeImages();
  MustSh("qemu-img convert -O raw top.qcow2 top.raw");
  for (std::string a : {"a.qcow2", "a.vmdk", "a.vdi"}) {
    ExpectSame("compare " + a + " a.raw");
    ExpectSame("compare -s " + a + " a.raw");
    ExpectSame("compare " + a + " top.raw");
    ExpectSame("compare -f raw -F qcow2 top.raw " + a);
  }
  ExpectSame("compare top.qcow2 top.raw");
  ExpectSame("compare -q top.qcow2 a.raw");
  // Sizes differ: warning, then content of the longer image past the shorter one.
  MustSh("qemu-img create -q -f raw short.raw 16M && qemu-img create -q -f raw long.raw 20M");
  ExpectSame("compare short.raw long.raw");
  ExpectSame("compare -s short.raw long.raw");
  MustSh("qemu-io -f raw -c 'write -P 7 17000000 10' long.raw >/dev/null");
  ExpectSame("compare short.raw long.raw");
  // Errors: exit 2.
  CommandResult v = V("compare a.raw missing.raw");
  EXPECT_EQ(v.exit_code, 2);
  EXPECT_EQ(v.err,
            "vimgfs: Could not open 'missing.raw': Could not open 'missing.raw': No such file or "
            "directory\n");  // as qemu-img words it
}

}  // namespace
}  // namespace vimgfs::test

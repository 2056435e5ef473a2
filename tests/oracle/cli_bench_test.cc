// `bench` beside qemu-img bench: the same output (the time masked), messages and exit
// codes for every option and its bad values, and write runs that leave the same bytes.
#include <regex>
#include <string>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliBenchTest : public CliTwinTest {
 protected:
  void SetUp() override {
    CliTwinTest::SetUp();
    if (IsSkipped()) return;
    InBoth("qemu-img create -q -f qcow2 t.qcow2 64M && qemu-io -c 'write -P 7 0 8M' t.qcow2 >/dev/null");
  }
  // bench ARGS in both folders: same stdout (but the time), stderr and exit code.
  void Same(const std::string& args) {
    SCOPED_TRACE(args);
    CommandResult q = Sh("cd q && qemu-img bench " + args);
    CommandResult v = Sh("cd v && ../bin/qemu-img bench " + args);
    const std::regex time("in [0-9]+\\.[0-9]{3} seconds");
    EXPECT_EQ(std::regex_replace(v.out, time, "in T seconds"),
              std::regex_replace(q.out, time, "in T seconds"));
    EXPECT_EQ(v.err, q.err);
    EXPECT_EQ(v.exit_code, q.exit_code);
  }
};

TEST_F(CliBenchTest, OutputAndErrorsAsQemu) {
  for (const char* args :
       {"-c 100 t.qcow2", "-c 100 -d 4 -s 64k -S 1M -o 3M t.qcow2", "-c 50 -s 0 t.qcow2",
        "-c 30 -S 60M t.qcow2", "-c 10 -t none -n t.qcow2", "-c 10 -i io_uring -U t.qcow2",
        "-q -c 10 -f qcow2 t.qcow2", "-c 10 -o 64M t.qcow2", "-c 3 -o 63M -s 2M t.qcow2",
        // bad values and combinations
        "-c x t.qcow2", "-c -1 t.qcow2", "-d 3000000000 t.qcow2", "-s 3G t.qcow2", "-S x t.qcow2",
        "-o -5 t.qcow2", "-t bogus t.qcow2", "-i bogus t.qcow2", "-n t.qcow2", "--pattern 256 -w t.qcow2",
        "--flush-interval 64 t.qcow2", "-w --flush-interval 2 -d 4 t.qcow2", "-w -U t.qcow2", "",
        "t.qcow2 t.qcow2", "-c 1 missing.qcow2", "-c 1 -f raw -w --image-opts t.qcow2"}) {
    Same(args);
  }
}

TEST_F(CliBenchTest, WritesLandWhereQemuWritesThem) {
  for (const char* args : {"-w -c 200 -d 8 --pattern 0x5a -o 1M -S 12k -s 8k t.qcow2",
                           "-w -c 64 -d 4 --flush-interval 8 --pattern 0x33 -S 1M t.qcow2",
                           "-w -c 40 -d 4 --flush-interval 4 --no-drain -t writethrough --pattern 9 -o 20M "
                           "-s 64k t.qcow2",
                           "-w -c 300 -s 512 -S 256k -o 63M t.qcow2"}) {
    Same(args);
  }
  CommandResult cmp = Sh("qemu-img compare v/t.qcow2 q/t.qcow2");
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
  // The runs wrote something: the first one's pattern is there (its second request; the
  // later runs overwrote the first).
  CommandResult io = Io("-r -c 'read -P 0x5a 1060864 8k' v/t.qcow2");
  EXPECT_EQ(io.out.find("Pattern verification failed"), std::string::npos) << io.out;
  EXPECT_EQ(Sh("qemu-img check -q v/t.qcow2").exit_code, 0);
}

}  // namespace
}  // namespace vimgfs::test

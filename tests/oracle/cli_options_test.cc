// The command line of every command: qemu-img's messages and exit codes for unrecognized
// options, missing arguments and wrong operand counts, --help, options after operands.
#include <string>
#include <vector>

#include "oracle/cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliOptionsTest : public CliTest {};

const std::vector<std::string> kCommands = {"check", "commit", "compare", "convert", "create",
                                            "info",  "map",    "rebase",  "resize",  "snapshot"};

std::string FirstLine(const std::string& s) { return s.substr(0, s.find('\n')); }

// qemu-img's first error line with our program name in its place.
std::string AsVimgfs(const std::string& qemu_line) {
  const std::string prefix = "qemu-img: ";
  if (qemu_line.rfind(prefix, 0) != 0) return "unexpected qemu-img output: " + qemu_line;
  return "vimgfs: " + qemu_line.substr(prefix.size());
}

TEST_F(CliOptionsTest, BadCommandLinesFailAsInQemuImg) {
  MustSh("qemu-img create -q -f qcow2 a.qcow2 1M && qemu-img create -q -f qcow2 b.qcow2 1M");
  const std::vector<std::string> bad = {"--no-such-option a.qcow2 b.qcow2", "-Z a.qcow2 b.qcow2",
                                        "a.qcow2 b.qcow2 -f", "--backing-chain=3 a.qcow2 b.qcow2"};
  for (const std::string& cmd : kCommands) {
    for (const std::string& args : bad) {
      if (args == "a.qcow2 b.qcow2 -f") {
        if (cmd == "resize") continue;    // "-f" is taken as the size
        if (cmd == "snapshot") continue;  // vimgfs snapshot takes -f, qemu-img's does not
      }
      CommandResult q = Q(cmd + " " + args);
      CommandResult v = V(cmd + " " + args);
      SCOPED_TRACE(cmd + " " + args);
      EXPECT_EQ(v.exit_code, q.exit_code) << q.err << v.err;
      EXPECT_EQ(v.exit_code, 1);
      EXPECT_EQ(FirstLine(v.err), AsVimgfs(FirstLine(q.err)));
      EXPECT_NE(v.err.find("Try 'vimgfs " + cmd + " --help'"), std::string::npos) << v.err;
      EXPECT_EQ(v.out, "");
    }
  }
}

// Run under the name qemu-img (a symlink), vimgfs says "qemu-img:" and points at
// 'qemu-img --help', so scripts that match qemu-img's stderr keep working.
TEST_F(CliOptionsTest, UnderTheNameQemuImgErrorsReadAsQemuImgs) {
  MustSh("qemu-img create -q -f qcow2 a.qcow2 1M");
  MustSh("mkdir bin && ln -s " + Quote(VimgfsBinary()) + " bin/qemu-img");
  const std::vector<std::string> lines = {"info nosuch.qcow2", "resize -Z a.qcow2 2M", "check",
                                          "resize a.qcow2 512k", "snapshot -U -c s a.qcow2"};
  for (const std::string& line : lines) {
    SCOPED_TRACE(line);
    CommandResult q = Q(line);
    CommandResult v = Sh("bin/qemu-img " + line);
    EXPECT_EQ(v.exit_code, q.exit_code) << q.err << v.err;
    EXPECT_EQ(v.err, q.err);
  }
}

TEST_F(CliOptionsTest, WrongOperandCountsFailAsInQemuImg) {
  MustSh("qemu-img create -q -f qcow2 a.qcow2 1M");
  const std::vector<std::string> lines = {"info",
                                          "info a.qcow2 a.qcow2",
                                          "check",
                                          "map a.qcow2 a.qcow2",
                                          "compare a.qcow2",
                                          "compare a.qcow2 a.qcow2 a.qcow2",
                                          "convert a.qcow2",
                                          "snapshot",
                                          "snapshot -l -a x a.qcow2",
                                          "commit",
                                          "rebase -b '' a.qcow2 a.qcow2",
                                          "resize a.qcow2",
                                          "resize a.qcow2 a.qcow2 1M",
                                          "create -f qcow2"};
  for (const std::string& line : lines) {
    SCOPED_TRACE(line);
    CommandResult q = Q(line);
    CommandResult v = V(line);
    EXPECT_EQ(v.exit_code, q.exit_code) << q.err << v.err;
    EXPECT_EQ(FirstLine(v.err), AsVimgfs(FirstLine(q.err)));
  }
}

// -t and -T on every command that takes them: an unknown mode fails before anything is
// done, with qemu-img's words and exit status; a known one (none bypasses the host's page
// cache) works as the default does.
TEST_F(CliOptionsTest, CacheModesAreCheckedAsInQemuImg) {
  MustSh(
      "qemu-img create -q -f qcow2 base.qcow2 1M && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "
      "a.qcow2");
  const std::vector<std::string> lines = {"check -T bogus a.qcow2",
                                          "compare -T bogus a.qcow2 a.qcow2",
                                          "rebase -u -b '' -t bogus a.qcow2",
                                          "rebase -u -b '' -T bogus a.qcow2",
                                          "commit -t bogus a.qcow2",
                                          "amend -o compat=1.1 -t bogus a.qcow2",
                                          "convert -t bogus a.qcow2 o.raw",
                                          "convert -T bogus a.qcow2 o.raw",
                                          "check -T none a.qcow2",
                                          "compare -T directsync a.qcow2 base.qcow2",
                                          "commit -t none a.qcow2",
                                          "rebase -t none -T none -b '' a.qcow2"};
  for (const std::string& line : lines) {
    SCOPED_TRACE(line);
    CommandResult q = Q(line);
    CommandResult v = V(line);
    EXPECT_EQ(v.exit_code, q.exit_code) << q.err << v.err;
    EXPECT_EQ(FirstLine(v.err), q.err.empty() ? "" : AsVimgfs(FirstLine(q.err)));
    EXPECT_EQ(v.out, q.out);
  }
}

TEST_F(CliOptionsTest, HelpAndOptionsAfterOperands) {
  for (const std::string& cmd : kCommands) {
    CommandResult v = V(cmd + " --help");
    EXPECT_EQ(v.exit_code, 0) << cmd;
    EXPECT_EQ(v.out.rfind("usage: vimgfs " + cmd, 0), 0u) << v.out;
    EXPECT_EQ(V(cmd + " -h").out, v.out);
  }
  // getopt's permutation: options may follow the file names, as with qemu-img.
  MustSh("qemu-img create -q -f raw r.img 1M");
  CommandResult v = V("info r.img --output json -f raw");
  auto j = Json(v);
  EXPECT_EQ(j["format"], "raw");
  EXPECT_EQ(Ok(V("convert r.img out.qcow2 -O qcow2")), "");
  EXPECT_EQ(Json(Q("info --output=json out.qcow2"))["format"], "qcow2");
}

}  // namespace
}  // namespace vimgfs::test

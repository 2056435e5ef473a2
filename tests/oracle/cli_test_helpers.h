// Helpers for the CLI oracle tests: run vimgfs and qemu-img side by side in one folder.
#pragma once

#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/test_util.h"

namespace vimgfs::test {

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveProgram("qemu-img")) GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils)";
  }
  // Runs `vimgfs ARGS` / `qemu-img ARGS` / any shell line inside the temp folder.
  CommandResult V(const std::string& args) { return Sh(Quote(VimgfsBinary()) + " " + args); }
  CommandResult Q(const std::string& args) { return Sh("qemu-img " + args); }
  CommandResult Io(const std::string& args) { return Sh("qemu-io " + args); }
  CommandResult Sh(const std::string& line) { return RunCommand("cd " + Quote(dir_.path()) + " && " + line); }
  // Sh for a line that runs qemu's LUKS code: qemu's PBKDF2 timing fails now and then on a
  // loaded machine ("Unable to get accurate CPU usage": its thread CPU clock showed no
  // time passed), and that run is not the oracle's answer, so it is run again.
  CommandResult ShQemu(const std::string& line) {
    CommandResult r = Sh(line);
    for (int i = 0; i < 20 && r.err.find("Unable to get accurate CPU usage") != std::string::npos; i++) {
      Sh("sleep 0.2");
      r = Sh(line);
    }
    return r;
  }
  // Runs a command that must succeed.
  std::string Ok(const CommandResult& r) {
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  void MustSh(const std::string& line) {
    CommandResult r = Sh(line);
    ASSERT_EQ(r.exit_code, 0) << line << "\n" << r.out << r.err;
  }
  nlohmann::json Json(const CommandResult& r) {
    EXPECT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r.out;
    return j;
  }
  std::string F(const std::string& name) const { return dir_.File(name); }

  TempDir dir_;
};

// Runs each command line twice: with qemu-img in q/ and with vimgfs under the name
// qemu-img in v/, so that every line of output can be compared as it is.
class CliTwinTest : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    if (IsSkipped()) return;
    MustSh("mkdir q v bin && ln -s " + Quote(VimgfsBinary()) + " bin/qemu-img");
  }
  // `qemu-img ARGS` (a shell line: pipes work) in both folders; stdout, stderr and the exit
  // status must be the same. Returns whether qemu-img succeeded.
  bool ExpectSame(const std::string& args) { return Compare(args, "v"); }
  // As ExpectSame, but both programs read the same files (those in q/): for output that
  // depends on how the host file system has allocated a file (map, measure: holes, the
  // allocated size), which two copies written alike need not share at every moment.
  bool ExpectSameOnOneCopy(const std::string& args) { return Compare(args, "q"); }
  // Runs a shell line in both folders (setting up the same images).
  void InBoth(const std::string& line) {
    MustSh("cd q && " + line);
    MustSh("cd v && " + line);
  }
  // qemu-img in q/, vimgfs (as qemu-img) in folder v_dir.
  bool Compare(const std::string& args, const std::string& v_dir) {
    SCOPED_TRACE(args);
    CommandResult q = ShQemu("cd q && qemu-img " + args);
    CommandResult v = Sh("cd " + v_dir + " && ../bin/qemu-img " + args);
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(v.err, q.err);
    EXPECT_EQ(v.exit_code, q.exit_code);
    return q.exit_code == 0;
  }
  // The files each command left in its folder.
  void ExpectSameFiles() { EXPECT_EQ(Sh("cd v && ls").out, Sh("cd q && ls").out); }
};

}  // namespace vimgfs::test

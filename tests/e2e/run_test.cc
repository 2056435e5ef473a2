// End-to-end: `vimgfs run IMAGE -- COMMAND`. Each test ends by checking that nothing is
// left behind: no mount under the run's folder, no loop device on it, no folder, the
// image clean for qemu-img check.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "e2e/e2e_util.h"

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

class RunCommandInGuest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_FUSE();
    for (const char* tool : {"sfdisk", "mkfs.ext4", "debugfs", "fuse2fs"})
      if (!test::HaveProgram(tool))
        GTEST_SKIP() << tool << " needed (apt-get install fdisk e2fsprogs fuse2fs)";
    tmp_ = dir_.File("tmp");
    ASSERT_EQ(mkdir(tmp_.c_str(), 0777), 0);
    image_ = dir_.File("guest.qcow2");
    MakeGuest();
  }
  void TearDown() override { ExpectNothingLeft(); }

  // A GPT disk as a distribution ships it: p1 a small ext4 "boot", p2 the root file system
  // (label guestroot) with /etc/os-release and /etc/hostname.
  void MakeGuest() {
    QemuCreate("-f qcow2 " + Quote(image_) + " 256M");
    std::string mnt = dir_.File("make");
    ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
    Mount m;
    auto r = m.Start({image_, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    MustRun("printf 'label: gpt\\nsize=16M, type=L, name=boot\\ntype=L, name=root\\n' | sfdisk -q " +
            Quote(mnt + "/disk.raw"));
    MustRun("mkfs.ext4 -q -F -L boot " + Quote(mnt + "/p1"));
    MustRun("mkfs.ext4 -q -F -L guestroot " + Quote(mnt + "/p2"));
    std::string hostname = dir_.File("hostname"), os_release = dir_.File("os-release");
    MustRun("echo template > " + Quote(hostname) + " && echo ID=debian > " + Quote(os_release));
    MustRun("debugfs -w -R 'mkdir etc' " + Quote(mnt + "/p2") + " 2>/dev/null");
    MustRun("debugfs -w -R " + Quote("write " + hostname + " etc/hostname") + " " + Quote(mnt + "/p2") +
            " 2>/dev/null");
    MustRun("debugfs -w -R " + Quote("write " + os_release + " etc/os-release") + " " + Quote(mnt + "/p2") +
            " 2>/dev/null");
    ASSERT_EQ(m.Stop(), 0);
  }

  // `vimgfs run ARGS` with its temporary folder inside the test's folder.
  test::CommandResult Run(const std::string& args) {
    return RunCommand("TMPDIR=" + Quote(tmp_) + " " + Quote(test::VimgfsBinary()) + " run " + args);
  }

  // What a later run (or qemu) sees: the file's content in the guest root.
  std::string GuestFile(const std::string& rel) {
    auto r = Run("-r " + Quote(image_) + " -- cat " + Quote(rel));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }

  void ExpectNothingLeft() {
    std::ifstream mounts("/proc/self/mountinfo");
    std::string line;
    while (std::getline(mounts, line))
      EXPECT_EQ(line.find(tmp_), std::string::npos) << "left mounted: " << line;
    auto loops = RunCommand("losetup -l -n -O BACK-FILE");
    EXPECT_EQ(loops.out.find(tmp_), std::string::npos) << "left attached: " << loops.out;
    std::error_code ec;
    EXPECT_TRUE(std::filesystem::is_empty(tmp_, ec)) << "the run's folder stays in " << tmp_;
    if (!image_.empty() && access(image_.c_str(), F_OK) == 0) {
      std::string out;
      int rc = QemuCheck(image_, &out);
      if (allow_leaks_ && rc == 3) rc = 0;
      EXPECT_EQ(rc, 0) << out;
    }
  }

  test::TempDir dir_;
  std::string tmp_, image_;
  bool allow_leaks_ = false;
};

TEST_F(RunCommandInGuest, EditsTheGuestAndFindsTheRootPartition) {
  auto r = Run(Quote(image_) + " -- sh -c 'echo \"$VIMGFS_ROOT\" > etc/where; echo edited > etc/hostname'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("using p2, which holds /etc/os-release"), std::string::npos) << r.err;
  EXPECT_EQ(GuestFile("etc/hostname"), "edited\n");
  EXPECT_EQ(GuestFile("etc/where").rfind(tmp_, 0), 0u) << "VIMGFS_ROOT is the guest root";
}

TEST_F(RunCommandInGuest, PicksPartitionsByNumberAndByLabel) {
  auto r = Run("-p 1 " + Quote(image_) + " -- sh -c 'test -d lost+found && test ! -e etc'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = Run("--partition guestroot " + Quote(image_) + " -- cat etc/hostname");  // ext4 label
  EXPECT_EQ(r.out, "template\n") << r.err;
  r = Run("--partition root " + Quote(image_) + " -- cat etc/hostname");  // GPT name
  EXPECT_EQ(r.out, "template\n") << r.err;
  r = Run("-p 7 " + Quote(image_) + " -- true");
  EXPECT_EQ(r.exit_code, 125);
  EXPECT_NE(r.err.find("has no partition 7 (partitions: p1 p2)"), std::string::npos) << r.err;
}

TEST_F(RunCommandInGuest, PassesOnTheCommandsFailure) {
  auto r = Run(Quote(image_) + " -- sh -c 'echo half > etc/hostname; exit 42'");
  EXPECT_EQ(r.exit_code, 42);
  EXPECT_EQ(GuestFile("etc/hostname"), "half\n") << "what the command wrote before failing stays";
  EXPECT_EQ(Run(Quote(image_) + " -- /no/such/program").exit_code, 127);
}

TEST_F(RunCommandInGuest, InterruptedCommandStillTearsDown) {
  std::string started = dir_.File("started");
  std::string cmd = "TMPDIR=" + Quote(tmp_) + " exec " + Quote(test::VimgfsBinary()) + " run " +
                    Quote(image_) + " -- sh -c 'echo partial > etc/hostname; sync; touch " + started +
                    "; sleep 30'";  // the marker last: the signal must find the write done
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 1000 && access(started.c_str(), F_OK) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(access(started.c_str(), F_OK), 0) << "the command never started";
  kill(pid, SIGINT);  // as `kill -INT`: forwarded to the command
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGINT);
  EXPECT_EQ(GuestFile("etc/hostname"), "partial\n");
}

TEST_F(RunCommandInGuest, EndsWhatTheCommandLeftRunning) {
  // A background process with its working directory in the guest would keep it busy.
  auto r = Run(Quote(image_) + " -- sh -c 'sleep 300 > /dev/null 2>&1 & echo started'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "started\n");
  EXPECT_NE(r.err.find("ending the processes COMMAND left running"), std::string::npos) << r.err;
}

// A crash of everything while the guest file system was mounted leaves its journal
// needing recovery; each way of mounting it replays the journal before COMMAND runs.
class RunAfterAGuestCrash : public RunCommandInGuest {
 protected:
  void SetUp() override {
    RunCommandInGuest::SetUp();
    if (IsSkipped()) return;
    REQUIRE_LOOP();
  }
  void Crash(const std::string& content) {
    allow_leaks_ = true;  // the image's daemon was killed too: qcow2 may leak clusters
    std::string mnt = dir_.File("crash"), guest = dir_.File("crash-guest");
    mkdir(mnt.c_str(), 0755);
    mkdir(guest.c_str(), 0755);
    Mount m;
    auto r = m.Start({image_, mnt}, mnt);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string loop = LoopAttach(mnt + "/p2", false);
    ASSERT_FALSE(loop.empty());
    MustRun("mount " + Quote(loop) + " " + Quote(guest) + " && echo " + content + " > " +
            Quote(guest + "/etc/crash") + " && sync");
    m.Kill();  // the daemon dies with the guest file system mounted
    RunCommand("umount -l " + Quote(guest));
    LoopDetach(loop);
    ASSERT_EQ(m.Start({"-r", image_, mnt}, mnt).exit_code, 0);
    auto features = RunCommand("dumpe2fs -h " + Quote(mnt + "/p2"));
    ASSERT_NE(features.out.find("needs_recovery"), std::string::npos) << "no dirty journal to replay";
    ASSERT_EQ(m.Stop(), 0);
  }
};

TEST_F(RunAfterAGuestCrash, ReadOnlyRunReplaysIntoAThrowawayOverlay) {
  Crash("journaled");
  std::string before = test::Sha256OfFile(image_);
  auto r = Run("-r " + Quote(image_) + " -- cat etc/crash");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "journaled\n");
  EXPECT_EQ(test::Sha256OfFile(image_), before) << "-r changed the image";
  r = Run("-r --fuse2fs " + Quote(image_) + " -- cat etc/crash");
  EXPECT_EQ(r.out, "journaled\n") << r.err;
  EXPECT_EQ(test::Sha256OfFile(image_), before) << "-r --fuse2fs changed the image";
}

TEST_F(RunAfterAGuestCrash, KernelMountReplaysTheJournal) {
  Crash("kernel");
  auto r = Run(Quote(image_) + " -- cat etc/crash");
  EXPECT_EQ(r.out, "kernel\n") << r.err;
}

TEST_F(RunAfterAGuestCrash, Fuse2fsRunReplaysTheJournalFirst) {
  Crash("fuse2fs");
  auto r = Run("--fuse2fs " + Quote(image_) + " -- sh -c 'cat etc/crash; echo more >> etc/crash'");
  EXPECT_EQ(r.out, "fuse2fs\n") << r.err;
  EXPECT_NE(r.err.find("replaying the guest file system's journal"), std::string::npos) << r.err;
  EXPECT_EQ(GuestFile("etc/crash"), "fuse2fs\nmore\n");
}

TEST_F(RunCommandInGuest, AnUnprivilegedUserRunsWithFuse2fs) {
  Unprivileged nobody;
  if (!nobody.reason().empty()) GTEST_SKIP() << nobody.reason();
  ASSERT_EQ(chown(image_.c_str(), 65534, 65534), 0);
  ASSERT_EQ(chown(tmp_.c_str(), 65534, 65534), 0);
  auto r = nobody.Run("TMPDIR=" + Quote(tmp_) + " " + Quote(test::VimgfsBinary()) + " run " + Quote(image_) +
                          " -- sh -c 'id -u; sed -i s/template/by-nobody/ etc/hostname'",
                      dir_.path());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "65534\n");
  EXPECT_EQ(GuestFile("etc/hostname"), "by-nobody\n");
}

}  // namespace
}  // namespace vimgfs::e2e

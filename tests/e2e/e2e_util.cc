#include "e2e/e2e_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace vimgfs::e2e {
namespace {

using test::Quote;
using test::RunCommand;

void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

std::string Canonical(const std::string& p) {
  std::error_code ec;
  auto c = std::filesystem::canonical(p, ec);
  return ec ? p : c.string();
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      out += static_cast<char>(std::strtol(s.substr(i + 1, 3).c_str(), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::string FuseUnavailableReason() {
  if (geteuid() != 0) return "end-to-end mount tests need root";
  if (access("/dev/fuse", R_OK | W_OK) != 0) return "/dev/fuse is missing or not accessible";
  if (!test::HaveProgram("fusermount3")) return "fusermount3 not installed (apt-get install fuse3)";
  if (access(test::VimgfsBinary().c_str(), X_OK) != 0)
    return "vimgfs binary not built: " + test::VimgfsBinary();
  return "";
}

std::string LoopUnavailableReason() {
  if (geteuid() != 0) return "loop devices need root";
  if (!test::HaveProgram("losetup")) return "losetup not installed";
  if (access("/dev/loop-control", R_OK | W_OK) != 0) return "/dev/loop-control missing";
  if (!test::HaveProgram("mkfs.ext4")) return "mkfs.ext4 not installed";
  return "";
}

Unprivileged::Unprivileged() {
  if (geteuid() != 0) {
    reason_ = "switching to an unprivileged user needs root";
    return;
  }
  if (!test::HaveProgram("setpriv")) {
    reason_ = "setpriv not installed (util-linux)";
    return;
  }
  struct stat st {};
  if (stat("/dev/fuse", &st) != 0) {
    reason_ = "/dev/fuse is missing";
    return;
  }
  fuse_mode_ = st.st_mode & 07777;
  if ((fuse_mode_ & 0006) != 0006) {
    if (chmod("/dev/fuse", 0666) != 0) {
      reason_ = "cannot open /dev/fuse to unprivileged users";
      return;
    }
    restore_ = true;
  }
}

Unprivileged::~Unprivileged() {
  if (restore_) chmod("/dev/fuse", fuse_mode_);
}

test::CommandResult Unprivileged::Run(const std::string& command, const std::string& dir) const {
  chmod(dir.c_str(), 0777);
  return RunCommand("cd " + Quote(dir) + " && setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=" +
                    Quote(dir) + " TMPDIR=" + Quote(dir) + " sh -c " + Quote(command));
}

bool IsMountPoint(const std::string& path) {
  std::string want = Canonical(path);
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, dev, root, mp;
    ls >> id >> parent >> dev >> root >> mp;
    if (Unescape(mp) == want || Unescape(mp) == path) return true;
  }
  return false;
}

// Whatever part of a /proc file could be read; empty when the process is gone.
static std::string ReadProcFile(const std::string& path) {
  std::string all;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return all;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) all.append(buf, static_cast<size_t>(n));
  close(fd);
  return all;
}

pid_t FindDaemon(const std::string& mountpoint) {
  std::string want = Canonical(mountpoint);
  DIR* d = opendir("/proc");
  if (!d) return -1;
  pid_t found = -1;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    // A process may exit while we read: read(2) then fails with ESRCH, which
    // std::ifstream turns into an exception, so read with plain syscalls.
    std::string all = ReadProcFile(std::string("/proc/") + e->d_name + "/cmdline");
    std::vector<std::string> args;
    std::string cur;
    for (char c : all) {
      if (c == '\0') {
        args.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (args.empty() || args[0].find("vimgfs") == std::string::npos) continue;
    for (size_t i = 1; i < args.size(); ++i) {
      if (args[i] == mountpoint || (args[i].size() > 0 && args[i][0] == '/' && args[i] == want)) {
        found = static_cast<pid_t>(pid);
        break;
      }
    }
    if (found > 0) break;
  }
  closedir(d);
  return found;
}

bool WaitGone(pid_t pid, int timeout_ms) {
  for (int waited = 0; waited < timeout_ms; waited += 10) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return true;
    // A zombie that our shell left behind also counts as gone.
    std::string s = ReadProcFile("/proc/" + std::to_string(pid) + "/stat");
    auto rp = s.rfind(')');
    if (rp != std::string::npos && rp + 2 < s.size() && s[rp + 2] == 'Z') return true;
    SleepMs(10);
  }
  return false;
}

Mount::~Mount() {
  if (active()) Stop();
}

test::CommandResult Mount::Start(const std::vector<std::string>& args, const std::string& mountpoint) {
  std::string cmd = Quote(test::VimgfsBinary());
  for (const auto& a : args) cmd += " " + Quote(a);
  test::CommandResult r = RunCommand(cmd);
  if (r.exit_code == 0) {
    mountpoint_ = mountpoint;
    pid_ = FindDaemon(mountpoint);
    child_ = false;
  }
  return r;
}

bool Mount::StartForeground(const std::vector<std::string>& args, const std::string& mountpoint) {
  std::vector<std::string> all = {test::VimgfsBinary(), "-f"};
  all.insert(all.end(), args.begin(), args.end());
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  if (pid < 0) return false;
  for (int waited = 0; waited < 15000; waited += 10) {
    if (IsMountPoint(mountpoint)) {
      pid_ = pid;
      child_ = true;
      mountpoint_ = mountpoint;
      return true;
    }
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) return false;
    SleepMs(10);
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return false;
}

int Mount::Stop() {
  if (!active()) return 0;
  bool lazy = false;
  for (int i = 0; IsMountPoint(mountpoint_); ++i) {
    if (i == 30) {  // still busy after 3 s (a test leaked a descriptor): detach lazily
      RunCommand("fusermount3 -u -z " + Quote(mountpoint_));
      lazy = true;
      break;
    }
    if (RunCommand("fusermount3 -u " + Quote(mountpoint_)).exit_code == 0) break;
    SleepMs(100);
  }
  int code = lazy ? -1 : 0;
  int wait_ms = lazy ? 3000 : 30000;
  if (child_ && pid_ > 0) {
    int status = 0;
    bool reaped = false;
    for (int waited = 0; waited < wait_ms; waited += 10) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped = true;
        break;
      }
      SleepMs(10);
    }
    if (!reaped) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      code = -1;
    } else if (!lazy) {
      code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
  } else if (pid_ > 0) {
    if (!WaitGone(pid_, wait_ms)) {
      kill(pid_, SIGKILL);  // never leave a daemon behind a finished test
      code = -1;
    }
  }
  mountpoint_.clear();
  pid_ = -1;
  return code;
}

void Mount::Kill() {
  if (!active()) return;
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    if (child_)
      waitpid(pid_, nullptr, 0);
    else
      WaitGone(pid_, 10000);
  }
  for (int i = 0; i < 50 && IsMountPoint(mountpoint_); ++i) {
    if (RunCommand("fusermount3 -u -z " + Quote(mountpoint_)).exit_code == 0) break;
    SleepMs(50);
  }
  mountpoint_.clear();
  pid_ = -1;
}

std::string LoopAttach(const std::string& file, bool read_only) {
  auto r = RunCommand(std::string("losetup --find --show ") + (read_only ? "-r " : "") + Quote(file));
  if (r.exit_code != 0) return "";
  std::string dev = r.out;
  while (!dev.empty() && (dev.back() == '\n' || dev.back() == ' ')) dev.pop_back();
  return dev;
}

void LoopDetach(const std::string& dev) {
  for (int i = 0; i < 50; ++i) {
    if (RunCommand("losetup -d " + Quote(dev)).exit_code == 0) return;
    SleepMs(100);
  }
}

int QemuCheck(const std::string& image, std::string* out) {
  auto r = RunCommand("qemu-img check " + Quote(image));
  if (out) *out = r.out + r.err;
  return r.exit_code;
}

int CheckImage(const std::string& image, std::string* out) {
  std::string qemu_out;
  int code = QemuCheck(image, &qemu_out);
  if (code == 1 && qemu_out.find("contains a log that needs to be replayed") != std::string::npos) {
    // A VHDX left with a pending log (a crash between a log entry and its BAT write): the
    // log is its recovery, which qemu-img applies only under -r. Replayed, it must be clean.
    auto r = RunCommand("qemu-img check -r all " + Quote(image));
    if (out) *out = qemu_out + r.out + r.err;
    return r.exit_code;
  }
  if (code == 2 && qemu_out.find("ERROR image was not closed correctly") != std::string::npos &&
      qemu_out.find("\n1 errors were found") != std::string::npos) {
    // A parallels image left marked in use by the killed writer, as qemu leaves it: that
    // mark is the one error, and -r all clears it. Cleared, it must be clean.
    auto r = RunCommand("qemu-img check -r all " + Quote(image));
    if (out) *out = qemu_out + r.out + r.err;
    return r.exit_code;
  }
  if (code != 63) {
    if (out) *out = qemu_out;
    return code;
  }
  auto r = RunCommand(Quote(test::VimgfsBinary()) + " check " + Quote(image));
  if (out) *out = r.out + r.err;
  return r.exit_code;
}

std::string ExactSizeCreateArgs(const std::string& fmt, const std::string& image, const std::string& size) {
  return "-f " + fmt + (fmt == "vpc" ? " -o force_size=on " : " ") + Quote(image) + " " + size;
}

bool QemuToRaw(const std::string& image, const std::string& dst) {
  return RunCommand("qemu-img convert -O raw " + Quote(image) + " " + Quote(dst)).exit_code == 0;
}

void QemuCreate(const std::string& args) {
  auto r = RunCommand("qemu-img create -q " + args);
  ASSERT_EQ(r.exit_code, 0) << "qemu-img create " << args << ": " << r.err;
}

std::string MustRun(const std::string& cmd) {
  auto r = RunCommand(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.out << r.err;
  return r.out;
}

bool PWriteAll(int fd, const void* buf, size_t n, uint64_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, static_cast<const char*>(buf) + done, n - done, static_cast<off_t>(off + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    done += static_cast<size_t>(w);
  }
  return true;
}

bool PReadAll(int fd, void* buf, size_t n, uint64_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(off + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<size_t>(r);
  }
  return true;
}

}  // namespace vimgfs::e2e

// vimgfs run: mount the image, mount the guest file system of one partition, run a
// command inside it, and take everything down again in the right order, whatever the
// command does (docs/ARCHITECTURE.md, "vimgfs run").
//
// Every piece runs in a process group of its own. COMMAND's group gets the terminal, so a
// Ctrl-C reaches COMMAND (and what it started) only; signals sent to this process go on to
// COMMAND's group. Once COMMAND exits, what it left running in its group is ended (it
// would hold the guest file system busy), and this process tears down:
//   image mount (mount::RunMount in a forked child, foreground)
//     -> guest mount: root: losetup + mount(8); otherwise (or --fuse2fs): fuse2fs
//       -> COMMAND, its working directory the guest root
//     <- umount / fusermount3 -u, losetup -d and wait for the loop device to let go
//   <- fusermount3 -u of the image mount and wait for its daemon: the image is closed.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "fuse/mount.h"
#include "fuse/mount_config.h"
#include "guest/partition_table.h"
#include "util/endian.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs run [-f fmt] [-r] [-p N | --partition LABEL] [--fuse2fs] [--untrusted]\n"
    "                  IMAGE -- COMMAND [ARG...]\n"
    "\n"
    "Mounts IMAGE, mounts the guest file system of one of its partitions, runs COMMAND with\n"
    "the guest root as its working directory (also in $VIMGFS_ROOT), then unmounts both and\n"
    "closes the image, also when COMMAND fails or is interrupted. As root the guest file\n"
    "system is mounted by the kernel through a loop device; otherwise (or with --fuse2fs)\n"
    "by fuse2fs, which needs no privileges and reads ext2/3/4.\n"
    "  -f fmt            image format (probed when absent)\n"
    "  -r, --read-only   leave IMAGE untouched and mount the guest file system read-only\n"
    "                    (a journal left by a crash is replayed into a throwaway overlay)\n"
    "  -p N, --partition-number N\n"
    "                    the partition pN (see the mount's partition files)\n"
    "  --partition LABEL the partition whose GPT name or ext2/3/4 label is LABEL\n"
    "  --fuse2fs         mount the guest with fuse2fs even as root\n"
    "  --untrusted       open no backing file, data file or extent the image names\n"
    "A guest file system left dirty by a crash has its journal replayed first, as at boot.\n"
    "Without -p or --partition: the disk itself when it has no partition table, the only\n"
    "partition, or else the ext2/3/4 partition holding /etc/os-release (named on stderr).\n"
    "Exit status: COMMAND's (128+N when a signal N ended it); 125 when vimgfs run itself\n"
    "failed (then COMMAND did not run, or the teardown failed and says what is left);\n"
    "126 or 127 when COMMAND could not be run.\n";

constexpr int kRunFailed = 125;

void Say(const std::string& line) { std::fprintf(stderr, "vimgfs run: %s\n", line.c_str()); }

// ---- signals: remembered, forwarded to COMMAND when another process sent them ----

volatile sig_atomic_t g_signal = 0;
volatile pid_t g_command_group = 0;

void OnSignal(int sig) {
  g_signal = sig;
  pid_t group = g_command_group;
  if (group > 0) kill(-group, sig);
}

void CatchSignals() {
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaction(sig, &sa, nullptr);
}

// The terminal, when this process is in its foreground group (else -1): COMMAND's group
// then takes the foreground while it runs.
int ForegroundTerminal() {
  return isatty(STDIN_FILENO) && tcgetpgrp(STDIN_FILENO) == getpgrp() ? STDIN_FILENO : -1;
}

// Hands the terminal to group; SIGTTOU would stop a background group doing this.
void GiveTerminal(int tty, pid_t group) {
  if (tty < 0) return;
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGTTOU);
  sigprocmask(SIG_BLOCK, &block, &old);
  tcsetpgrp(tty, group);
  sigprocmask(SIG_SETMASK, &old, nullptr);
}

bool Interrupted() { return g_signal != 0; }

// ---- children ----

struct SpawnOptions {
  bool own_group = false;         // out of the terminal's reach (the mounts, COMMAND)
  int give_terminal = -1;         // with own_group: take this terminal's foreground
  bool stdout_to_stderr = false;  // keep COMMAND's stdout clean
  int stdout_fd = -1;             // else where stdout goes
  std::string cwd;
  bool exec_errors_as_shell = false;  // exit 126/127 like a shell when exec fails
  bool quiet = false;                 // stderr to /dev/null (banners, retried "busy")
};

pid_t Spawn(const std::vector<std::string>& argv, const SpawnOptions& o) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = fork();
  if (pid > 0 && o.own_group) setpgid(pid, pid);  // both sides: no race with kill(-pid)
  if (pid != 0) return pid;
  if (o.own_group) setpgid(0, 0);
  GiveTerminal(o.give_terminal, getpid());
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) signal(sig, SIG_DFL);
  if (o.stdout_fd >= 0)
    dup2(o.stdout_fd, STDOUT_FILENO);
  else if (o.stdout_to_stderr)
    dup2(STDERR_FILENO, STDOUT_FILENO);
  if (o.quiet) {
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0) dup2(null, STDERR_FILENO);
  }
  if (!o.cwd.empty() && chdir(o.cwd.c_str()) != 0) {
    std::fprintf(stderr, "vimgfs run: cannot enter %s: %s\n", o.cwd.c_str(), std::strerror(errno));
    _exit(kRunFailed);
  }
  execvp(args[0], args.data());
  int err = errno;
  std::fprintf(stderr, "vimgfs run: %s: %s\n", args[0], std::strerror(err));
  _exit(o.exec_errors_as_shell ? (err == ENOENT ? 127 : 126) : kRunFailed);
}

// Waits for pid; its exit status, or 128+N when signal N ended it.
int Wait(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return kRunFailed;
  }
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

// Runs a helper program to completion; its stdout in *out when given.
int RunTool(const std::vector<std::string>& argv, std::string* out = nullptr, bool quiet = false) {
  int fds[2] = {-1, -1};
  SpawnOptions o;
  o.stdout_to_stderr = true;
  o.quiet = quiet;
  if (out != nullptr) {
    if (pipe2(fds, O_CLOEXEC) != 0) return kRunFailed;
    o.stdout_fd = fds[1];
  }
  pid_t pid = Spawn(argv, o);
  if (out != nullptr) {
    close(fds[1]);
    char buf[4096];
    ssize_t n;
    while ((n = read(fds[0], buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
      if (n > 0) out->append(buf, static_cast<size_t>(n));
    close(fds[0]);
  }
  return pid < 0 ? kRunFailed : Wait(pid);
}

// Whether dir is a mount point, from /proc/self/mountinfo: a FUSE mount whose server died
// fails every stat(2) but is still there to unmount.
bool IsMountPoint(const std::string& dir) {
  std::string escaped;  // mountinfo writes space, tab, newline and backslash as \ooo
  for (char ch : dir) {
    if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\\')
      escaped += fmt::format("\\{:03o}", static_cast<unsigned char>(ch));
    else
      escaped += ch;
  }
  FILE* f = std::fopen("/proc/self/mountinfo", "re");
  if (f == nullptr) return false;
  bool found = false;
  char* line = nullptr;
  size_t cap = 0;
  while (!found && getline(&line, &cap, f) > 0) {
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT ...": the fifth field.
    const char* p = line;
    for (int field = 0; field < 4 && p != nullptr; ++field) {
      p = std::strchr(p, ' ');
      if (p != nullptr) ++p;
    }
    if (p == nullptr) continue;
    const char* end = std::strchr(p, ' ');
    found = end != nullptr && std::string_view(p, static_cast<size_t>(end - p)) == escaped;
  }
  std::free(line);
  std::fclose(f);
  return found;
}

// Waits until dir is mounted by child. false when the child exits first (its status in
// *child_status) or the mount is not up within 30 s (the child is then killed); either way
// the child is reaped.
bool WaitMounted(const std::string& dir, pid_t child, int* child_status) {
  for (int i = 0; i < 3000; ++i) {
    if (IsMountPoint(dir)) return true;
    int status = 0;
    if (waitpid(child, &status, WNOHANG) == child) {
      *child_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(child, SIGKILL);
  Wait(child);
  *child_status = -1;
  return false;
}

// Unmounts a FUSE mount, retrying while busy (a loop device lets go of its file a moment
// after it is detached) for up to 10 s.
bool UnmountFuse(const std::string& dir) {
  for (int i = 0; i < 100; ++i) {
    if (!IsMountPoint(dir)) return true;
    // fusermount3's "busy" complaints while retrying are noise; the last try speaks.
    if (RunTool({"fusermount3", "-u", dir}, nullptr, true) == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return RunTool({"fusermount3", "-u", dir}) == 0;
}

bool UnmountKernel(const std::string& dir) {
  for (int i = 0; i < 100; ++i) {
    if (!IsMountPoint(dir) || RunTool({"umount", dir}, nullptr, true) == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return RunTool({"umount", dir}) == 0;
}

// Detaches a loop device and waits until it has let go of its file (the kernel may finish
// that a moment later), so the image mount under it can go.
bool DetachLoop(const std::string& dev) {
  if (RunTool({"losetup", "-d", dev}) != 0) return false;
  std::string name = dev.substr(dev.rfind('/') + 1);
  std::string backing = "/sys/block/" + name + "/loop/backing_file";
  for (int i = 0; i < 500; ++i) {
    if (access(backing.c_str(), F_OK) != 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// ---- choosing the partition ----

Result<guest::PartitionTable> TableOf(const std::string& disk) {
  int fd = open(disk.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "opening {}", disk);
  struct stat st {};
  fstat(fd, &st);
  auto read = [fd](uint64_t off, std::span<std::byte> out) -> Status {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(off + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Status::FromErrno(n < 0 ? errno : EIO, "reading the partition table");
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  };
  auto table = guest::ReadPartitionTable(read, static_cast<uint64_t>(st.st_size));
  close(fd);
  return table;
}

// What run needs of an ext2/3/4 superblock (at byte 1024: magic at 56, incompatible
// features at 96, volume name at 120).
struct ExtSuperblock {
  std::string label;
  bool needs_recovery = false;  // the journal holds transactions not yet applied
};

// nullopt when file holds no ext2/3/4 file system.
std::optional<ExtSuperblock> ReadExtSuperblock(const std::string& file) {
  std::byte sb[1024];
  int fd = open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  ssize_t n = pread(fd, sb, sizeof sb, 1024);
  close(fd);
  if (n != static_cast<ssize_t>(sizeof sb) || LoadLE16(sb + 56) != 0xEF53) return std::nullopt;
  constexpr uint32_t kIncompatRecover = 0x4;
  const char* label = reinterpret_cast<const char*>(sb + 120);
  return ExtSuperblock{std::string(label, strnlen(label, 16)), (LoadLE32(sb + 96) & kIncompatRecover) != 0};
}

// Whether the ext2/3/4 file system in file has /etc/os-release (debugfs reads it without
// mounting, journal or not).
bool HoldsOsRelease(const std::string& file) {
  if (!ReadExtSuperblock(file)) return false;
  std::string out;
  int rc = RunTool({"debugfs", "-R", "stat /etc/os-release", file}, &out, true);
  return rc == 0 && out.find("Inode:") != std::string::npos;
}

struct Choice {
  std::string file;  // partition file (or disk.raw) to mount
  std::string why;   // said on stderr when the choice was ours
};

Result<Choice> ChoosePartition(const std::string& disk_dir, std::optional<unsigned> number,
                               const std::string& label) {
  const std::string disk = disk_dir + "/disk.raw";
  ASSIGN_OR_RETURN(guest::PartitionTable table, TableOf(disk));
  std::vector<const guest::Partition*> parts;
  for (const guest::Partition& p : table.partitions)
    if (!p.extended) parts.push_back(&p);
  auto file_of = [&](const guest::Partition& p) { return fmt::format("{}/p{}", disk_dir, p.number); };
  auto names = [&] {
    std::string s;
    for (const guest::Partition* p : parts) s += fmt::format(" p{}", p->number);
    return s.empty() ? std::string(" none") : s;
  };
  if (number) {
    for (const guest::Partition* p : parts)
      if (p->number == *number) return Choice{file_of(*p), ""};
    return Status::NotFound("the image has no partition {} (partitions:{})", *number, names());
  }
  if (!label.empty()) {
    for (const guest::Partition* p : parts) {
      auto sb = ReadExtSuperblock(file_of(*p));
      if (p->label == label || (sb && sb->label == label)) return Choice{file_of(*p), ""};
    }
    return Status::NotFound("no partition is named or labelled '{}' (partitions:{})", label, names());
  }
  if (table.kind == guest::PartitionTable::Kind::kNone)
    return Choice{disk, "no partition table: the whole disk"};
  if (parts.size() == 1)
    return Choice{file_of(*parts[0]), fmt::format("p{}, the only partition", parts[0]->number)};
  for (const guest::Partition* p : parts)
    if (HoldsOsRelease(file_of(*p)))
      return Choice{file_of(*p), fmt::format("p{}, which holds /etc/os-release", p->number)};
  return Status::NotFound(
      "no partition holds an ext2/3/4 file system with /etc/os-release: name one with -p "
      "(partitions:{})",
      names());
}

// ---- the run ----

struct Options {
  std::string format;
  bool read_only = false;
  std::optional<unsigned> number;
  std::string label;
  bool fuse2fs = false;
  bool untrusted = false;
};

class Run {
 public:
  Run(Options o, std::string image) : o_(std::move(o)), image_(std::move(image)) {}

  int Go(const std::vector<std::string>& command) {
    int rc = kRunFailed;
    if (Setup()) rc = RunCommand(command);
    bool clean = Teardown();
    if (!clean) {
      if (rc != kRunFailed && ran_) Say(fmt::format("COMMAND exited with status {}", rc));
      return kRunFailed;
    }
    return rc;
  }

 private:
  bool Setup() {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/vimgfs-run.XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      Say(fmt::format("cannot make a folder in {}: {}", tmp && *tmp ? tmp : "/tmp", std::strerror(errno)));
      return false;
    }
    // Canonical, as /proc/self/mountinfo names mount points (TMPDIR may be a symlink).
    char* real = realpath(templ.c_str(), nullptr);
    dir_ = real != nullptr ? real : templ;
    std::free(real);
    disk_dir_ = dir_ + "/disk";
    root_ = dir_ + "/root";
    // -r: writes (the guest's journal replay, say) land in a throwaway overlay; the
    // image is opened read-only and the guest file system mounted read-only.
    if (o_.read_only) overlay_ = dir_ + "/overlay.qcow2";
    if (mkdir(disk_dir_.c_str(), 0700) != 0 || mkdir(root_.c_str(), 0755) != 0) {
      Say(fmt::format("cannot make folders in {}: {}", dir_, std::strerror(errno)));
      return false;
    }
    if (!MountImage() || Interrupted()) return false;
    auto choice = ChoosePartition(disk_dir_, o_.number, o_.label);
    if (!choice.ok()) {
      Say(fmt::format("{}: {}", image_, choice.error().message()));
      return false;
    }
    if (!choice->why.empty()) Say("using " + choice->why);
    if (Interrupted()) return false;
    return (geteuid() == 0 && !o_.fuse2fs) ? MountWithKernel(choice->file) : MountWithFuse2fs(choice->file);
  }

  bool MountImage() {
    mount::MountConfig c;
    c.image = image_;
    c.mountpoint = disk_dir_;
    c.overlay = overlay_;
    c.format = o_.format;
    c.untrusted = o_.untrusted;
    c.foreground = true;
    std::fflush(nullptr);
    mount_pid_ = fork();
    if (mount_pid_ < 0) {
      Say(fmt::format("fork: {}", std::strerror(errno)));
      return false;
    }
    if (mount_pid_ == 0) {
      setpgid(0, 0);
      for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) signal(sig, SIG_DFL);
      int null = open("/dev/null", O_RDWR | O_CLOEXEC);
      if (null >= 0) dup2(null, STDIN_FILENO);
      dup2(STDERR_FILENO, STDOUT_FILENO);
      std::fflush(nullptr);
      _exit(mount::RunMount(c));
    }
    int status = 0;
    if (!WaitMounted(disk_dir_, mount_pid_, &status)) {
      mount_pid_ = -1;  // reaped; it said why unless it hung
      if (status <= 0) Say("the image mount did not come up");
      return false;
    }
    return true;
  }

  bool MountWithKernel(const std::string& file) {
    std::string dev;
    // The loop device is writable even with -r (the overlay takes the writes): ext4 then
    // replays a journal left by a crash before a read-only mount, as at boot. Direct I/O:
    // the loop device's page cache is then the only one (faster, see the man page).
    std::vector<std::string> attach = {"losetup", "--find", "--show", "--direct-io=on", file};
    if (RunTool(attach, &dev) != 0 || dev.empty()) {
      Say("losetup could not attach a loop device");
      return false;
    }
    loop_ = dev.substr(0, dev.find('\n'));
    std::vector<std::string> mount = {"mount"};
    if (o_.read_only) mount.insert(mount.end(), {"-o", "ro"});
    mount.insert(mount.end(), {loop_, root_});
    if (RunTool(mount) != 0) {
      Say(fmt::format("mount {} failed", loop_));
      return false;
    }
    return true;
  }

  bool MountWithFuse2fs(const std::string& file) {
    // fuse2fs does not replay a journal (1.47 even crashes on one that needs it): e2fsck
    // does, as the kernel would at mount.
    auto sb = ReadExtSuperblock(file);
    if (sb && sb->needs_recovery) {
      Say("replaying the guest file system's journal (it was not unmounted cleanly)");
      int rc = RunTool({"e2fsck", "-E", "journal_only", "-p", file});
      if (rc > 1) {
        Say(fmt::format("e2fsck could not replay the journal (exit {}): run 'e2fsck -f' on the partition",
                        rc));
        return false;
      }
    }
    std::vector<std::string> args = {"fuse2fs", file, root_, "-f"};
    if (o_.read_only) args.insert(args.end(), {"-o", "ro"});
    if (geteuid() != 0) args.insert(args.end(), {"-o", "fakeroot"});  // edit root's files
    SpawnOptions so;
    so.own_group = true;
    so.stdout_to_stderr = true;
    used_fuse2fs_ = true;
    fuse2fs_pid_ = Spawn(args, so);
    if (fuse2fs_pid_ < 0) {
      Say(fmt::format("fork: {}", std::strerror(errno)));
      return false;
    }
    int status = 0;
    if (!WaitMounted(root_, fuse2fs_pid_, &status)) {
      if (status == 127 || status == kRunFailed) Say("fuse2fs is needed (Debian package fuse2fs)");
      Say(fmt::format("fuse2fs could not mount {}", file.substr(file.rfind('/') + 1)));
      fuse2fs_pid_ = -1;
      return false;
    }
    return true;
  }

  int RunCommand(const std::vector<std::string>& command) {
    if (setenv("VIMGFS_ROOT", root_.c_str(), 1) != 0) return kRunFailed;
    SpawnOptions so;
    so.cwd = root_;
    so.exec_errors_as_shell = true;
    so.own_group = true;
    so.give_terminal = ForegroundTerminal();
    std::fflush(nullptr);
    pid_t pid = Spawn(command, so);
    if (pid < 0) {
      Say(fmt::format("fork: {}", std::strerror(errno)));
      return kRunFailed;
    }
    GiveTerminal(so.give_terminal, pid);
    g_command_group = pid;
    if (g_signal != 0) kill(-pid, g_signal);  // a signal that came during the set-up
    ran_ = true;
    int rc = Wait(pid);
    EndGroup(pid);
    g_command_group = 0;
    GiveTerminal(so.give_terminal, getpgrp());
    return rc;
  }

  // Ends what COMMAND left running in its group (SIGTERM, then SIGKILL after 3 s): it
  // would keep the guest file system busy. Those processes are reparented to this one
  // (a child subreaper), so they are reaped here too.
  static void EndGroup(pid_t group) {
    while (waitpid(-group, nullptr, WNOHANG) > 0) {  // those that already ended
    }
    if (kill(-group, 0) != 0) return;
    Say("ending the processes COMMAND left running");
    kill(-group, SIGTERM);
    for (int i = 0; i < 300; ++i) {
      while (waitpid(-group, nullptr, WNOHANG) > 0) {
      }
      if (kill(-group, 0) != 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(-group, SIGKILL);
    while (waitpid(-group, nullptr, 0) > 0) {
    }
  }

  // Every step is tried even when one before it failed; what stays behind is named.
  bool Teardown() {
    bool ok = true;
    sync();
    if (!root_.empty() && IsMountPoint(root_)) {  // also a fuse2fs that died after mounting
      bool down = used_fuse2fs_ ? UnmountFuse(root_) : UnmountKernel(root_);
      if (!down) {
        Say(fmt::format("the guest file system at {} is busy and stays mounted", root_));
        ok = false;
      }
    }
    if (fuse2fs_pid_ > 0 && ok) {
      if (Wait(fuse2fs_pid_) != 0) {
        Say("fuse2fs reported an error while closing the guest file system");
        ok = false;
      }
    }
    if (!loop_.empty() && ok && !DetachLoop(loop_)) {
      Say(fmt::format("the loop device {} stays attached", loop_));
      ok = false;
    }
    if (mount_pid_ > 0) {
      if (ok && UnmountFuse(disk_dir_)) {
        if (Wait(mount_pid_) != 0) {
          Say(fmt::format("{} was not closed cleanly: run 'vimgfs check' on it", image_));
          ok = false;
        }
      } else {
        Say(fmt::format("the image stays mounted at {} (serving process {})", disk_dir_, mount_pid_));
        ok = false;
      }
    }
    if (ok && !dir_.empty()) {
      if (!overlay_.empty()) unlink(overlay_.c_str());
      rmdir(root_.c_str());
      rmdir(disk_dir_.c_str());
      rmdir(dir_.c_str());
    }
    return ok;
  }

  Options o_;
  std::string image_;
  std::string dir_, disk_dir_, root_;
  std::string overlay_;  // -r: the throwaway qcow2 taking the guest mount's writes
  pid_t mount_pid_ = -1;
  pid_t fuse2fs_pid_ = -1;
  std::string loop_;
  bool used_fuse2fs_ = false;
  bool ran_ = false;
};

}  // namespace

int RunRun(int argc, char** argv) {
  Options o;
  std::string number;
  OptionParser opts("run", kUsage, kRunFailed);
  opts.Value('f', nullptr, &o.format)
      .Flag('r', "read-only", &o.read_only)
      .Value('p', "partition-number", &number)
      .Value(0, "partition", &o.label)
      .Flag(0, "fuse2fs", &o.fuse2fs)
      .Flag(0, "untrusted", &o.untrusted);
  if (auto stop = opts.Parse(argc, argv)) return *stop == 0 ? 0 : kRunFailed;
  const std::vector<std::string>& rest = opts.operands();
  if (rest.size() < 2) {
    PrintError("run: expecting IMAGE -- COMMAND [ARG...]");
    return kRunFailed;
  }
  if (!number.empty()) {
    char* end = nullptr;
    unsigned long n = std::strtoul(number.c_str(), &end, 10);
    if (*end != '\0' || n == 0 || n > guest::kMaxPartitions) {
      PrintError(fmt::format("run: invalid partition number '{}'", number));
      return kRunFailed;
    }
    o.number = static_cast<unsigned>(n);
  }
  if (o.number && !o.label.empty()) {
    PrintError("run: -p and --partition name the partition twice: give one");
    return kRunFailed;
  }
  CatchSignals();
  prctl(PR_SET_CHILD_SUBREAPER, 1);  // COMMAND's orphans come to us (see EndGroup)
  Run run(o, rest[0]);
  return run.Go({rest.begin() + 1, rest.end()});
}

}  // namespace vimgfs::cli

// The mount's life cycle (see mount.h).
//
// Order matters:
//  1. open the image (or create/reuse the overlay) and take qemu-compatible locks on every
//     file of the chain; any error is printed and exits 1 while still in the foreground;
//  2. fuse_session_mount: the mount point now exists;
//  3. fuse_daemonize: the parent exits 0 only now, so `vimgfs IMG MNT && cat MNT/disk.raw`
//     works. OFD locks belong to the open file description and survive the fork;
//  4. serve until unmount or SIGINT/SIGTERM/SIGHUP; on a signal the kernel first writes
//     back the dirty pages of its writeback cache (StopOnSignal), while we still serve;
//  5. unmount, Image::Close() (flush + clear the dirty flag), exit 0.
#include "fuse/mount.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>

#include "crypto/secrets.h"
#include "engine/serve.h"
#include "fuse/server.h"
#include "vimgfs/image.h"

namespace vimgfs::mount {
namespace {

namespace fs = std::filesystem;

std::string FuseOptionString(const MountConfig& c, const std::string& image, bool read_only) {
  bool has_fsname = false, has_subtype = false;
  std::string out;
  for (const std::string& o : c.fuse_options) {
    has_fsname |= o.starts_with("fsname=");
    has_subtype |= o.starts_with("subtype=");
    if (!out.empty()) out += ',';
    out += o;
  }
  auto add = [&](const std::string& o) {
    if (!out.empty()) out += ',';
    out += o;
  };
  // libfuse splits -o at commas (a backslash escapes one); keep the name readable.
  std::string fsname;
  for (char ch : image) {
    if (ch == ',' || ch == '\\') fsname += '\\';
    fsname += ch;
  }
  if (!has_fsname) add("fsname=" + fsname);
  if (!has_subtype) add("subtype=vimgfs");
  add("default_permissions");
  if (read_only) add("ro");
  return out;
}

constexpr int kStopSignals[] = {SIGTERM, SIGINT, SIGHUP};
constexpr int kWakeSignal = SIGUSR2;  // interrupts the loop's wait once it should end

void IgnoreWake(int) {}

// Blocks the stop signals in the calling thread (and the threads it starts later: the
// loop's workers), so that only StopOnSignal's thread receives them; arranges for
// kWakeSignal to interrupt blocking calls without doing anything else.
Status PrepareSignals() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : kStopSignals) sigaddset(&set, sig);
  if (pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) return Status::FromErrno(errno, "blocking signals");
  struct sigaction sa {};
  sa.sa_handler = IgnoreWake;  // no SA_RESTART: a read of /dev/fuse returns EINTR
  sigemptyset(&sa.sa_mask);
  if (sigaction(kWakeSignal, &sa, nullptr) != 0) return Status::FromErrno(errno, "installing a handler");
  sa.sa_handler = SIG_IGN;  // a vanished client must not kill the daemon
  if (sigaction(SIGPIPE, &sa, nullptr) != 0) return Status::FromErrno(errno, "ignoring SIGPIPE");
  return Status::Ok();
}

// Ends the session on SIGTERM, SIGINT or SIGHUP. Ending it at once (libfuse's handlers)
// would drop the pages the kernel holds dirty in its writeback cache: writes a program
// made and never fsync'd, which a clean stop must keep. So first syncfs() on the mount,
// which makes the kernel write them all back to the loop, still serving; then the loop
// ends. A second signal during the sync ends it at once (the image may hang).
class StopOnSignal {
 public:
  StopOnSignal(fuse_session* se, std::string mountpoint, Server* server)
      : se_(se), mountpoint_(std::move(mountpoint)), server_(server), loop_thread_(pthread_self()) {
    thread_ = std::thread([this] { Watch(); });
  }
  // Call when the loop has returned.
  ~StopOnSignal() {
    loop_done_ = true;
    pthread_kill(thread_.native_handle(), kWakeSignal);
    thread_.join();
  }

 private:
  int Wait(int timeout_ms) {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : kStopSignals) sigaddset(&set, sig);
    struct timespec ts {
      timeout_ms / 1000, (timeout_ms % 1000) * 1000000L
    };
    return sigtimedwait(&set, nullptr, &ts);  // -1 on timeout or interruption
  }
  void Watch() {
    int sig = -1;
    while (!loop_done_ && sig < 0) sig = Wait(1000);
    if (loop_done_) return;
    std::atomic<bool> synced{false};
    std::thread sync([&] {
      int fd = ::open(mountpoint_.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
      if (fd < 0 || ::syncfs(fd) != 0)
        server_->Log(fmt::format("writing back cached pages before stopping: {}", std::strerror(errno)));
      if (fd >= 0) ::close(fd);
      synced = true;
    });
    bool again = false;
    while (!synced && !loop_done_ && !again) again = Wait(100) > 0;
    if (again) server_->Log("stopping without writing back the kernel's cached pages (second signal)");
    fuse_session_exit(se_);
    // The loop notices at its next wake-up: interrupt its wait until it returns.
    while (!loop_done_) {
      pthread_kill(loop_thread_, kWakeSignal);
      Wait(50);
    }
    if (synced)
      sync.join();
    else
      sync.detach();  // stuck in the kernel; the process exits soon
  }

  fuse_session* se_;
  std::string mountpoint_;
  Server* server_;
  pthread_t loop_thread_;
  std::atomic<bool> loop_done_{false};
  std::thread thread_;
};

struct SessionDeleter {
  void operator()(fuse_session* se) const { fuse_session_destroy(se); }
};

// fuse_session_new rewrites the argument list into heap copies that the caller owns.
struct ArgsFreer {
  fuse_args* args;
  ~ArgsFreer() { fuse_opt_free_args(args); }
};

}  // namespace

int RunMount(const MountConfig& c) {
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "vimgfs: %s\n", msg.c_str());
    return 1;
  };
  struct stat mst {};
  if (::stat(c.mountpoint.c_str(), &mst) != 0)
    return fail(fmt::format("'{}': mount point does not exist", c.mountpoint));
  if (!S_ISDIR(mst.st_mode) && !S_ISREG(mst.st_mode))
    return fail(fmt::format("'{}': mount point must be a directory or a regular file", c.mountpoint));

  ServeOptions serve;
  serve.image = c.image;
  serve.format = c.format;
  serve.overlay = c.overlay;
  serve.snapshot = c.snapshot;
  serve.read_only = c.read_only;
  serve.untrusted = c.untrusted;
  serve.cache_bytes = c.cache_bytes;
  serve.direct_io = c.direct_io;
  for (const std::string& object : c.objects) {
    auto added = crypto::SecretStore::Process().AddObject(object);
    if (!added.ok()) {
      std::fprintf(stderr, "vimgfs: %s\n", added.error().message().c_str());
      return 1;
    }
  }
  serve.key_secret = c.key_secret;
  serve.open_backing = c.open_backing;
  serve.data_file = c.data_file;
  serve.backing_specs = c.backing_specs;
  serve.secrets = crypto::SecretStore::Process().Lookup();
  serve.warn = [](const std::string& line) { std::fprintf(stderr, "vimgfs: %s\n", line.c_str()); };
  serve.cannot_write_hint =
      "mount it with -r, write to an overlay with --overlay FILE, or convert it (vimgfs convert -O qcow2)";
  auto opened = OpenForServing(serve);
  if (!opened.ok()) return fail(opened.error().ToString());
  std::unique_ptr<Image> image = std::move(*opened);

  ServerOptions so;
  so.read_only = image->read_only();
  so.detect_zeroes = c.detect_zeroes;
  so.root_is_file = S_ISREG(mst.st_mode);
  so.partitions = c.partitions;
  so.single_threaded = c.single_threaded;
  so.writeback_cache = c.writeback_cache;
  so.foreground = c.foreground;
  so.uid = ::getuid();
  so.gid = ::getgid();
  struct stat ist {};
  if (::stat(image->path().c_str(), &ist) == 0) {
    so.file_mode = ist.st_mode & 0666;
    so.time = ist.st_mtim;
  }
  if (so.read_only) so.file_mode &= ~0222u;
  Server server(image.get(), so);

  std::error_code ec;
  std::string abs_image = fs::absolute(c.image, ec).string();
  std::string opts = FuseOptionString(c, ec ? c.image : abs_image, so.read_only);
  // Absolute: the daemon's working directory becomes / (fuse_daemonize, even in the
  // foreground), and the stop unmounts and syncs by this path.
  std::string mountpoint = fs::absolute(c.mountpoint, ec).string();
  if (ec) mountpoint = c.mountpoint;
  std::vector<std::string> arg_strings = {"vimgfs", "-o", opts};
  if (c.debug) arg_strings.push_back("-d");
  std::vector<char*> argv;
  for (auto& a : arg_strings) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  ArgsFreer free_args{&args};

  std::unique_ptr<fuse_session, SessionDeleter> se(
      fuse_session_new(&args, &Server::Ops(), sizeof(fuse_lowlevel_ops), &server));
  if (!se) return fail(fmt::format("cannot start FUSE with options '{}'", opts));
  server.set_session(se.get());
  if (Status st = PrepareSignals(); !st.ok()) return fail(st.ToString());
  if (fuse_session_mount(se.get(), mountpoint.c_str()) != 0)
    return fail(fmt::format("cannot mount on '{}'", c.mountpoint));
  if (!c.foreground) openlog("vimgfs", LOG_PID, LOG_DAEMON);
  // Only now does the parent exit: the mount is in place and the image locked.
  if (fuse_daemonize(c.foreground ? 1 : 0) != 0) {
    fuse_session_unmount(se.get());
    return fail("cannot go to the background");
  }

  int ret;
  {
    StopOnSignal stopper(se.get(), mountpoint, &server);  // after the fork: threads die in it
    if (c.single_threaded) {
      ret = fuse_session_loop(se.get());
    } else {
      fuse_loop_config* cfg = fuse_loop_cfg_create();
      fuse_loop_cfg_set_clone_fd(cfg, 0);
      // Enough threads that requests waiting on the kernel (a cache drop that writes
      // dirty pages back to us) never starve the ones that would let them go on; each
      // holds about 2 MiB of buffers, so idle ones beyond 8 end.
      fuse_loop_cfg_set_max_threads(cfg, 64);
      fuse_loop_cfg_set_idle_threads(cfg, 8);
      ret = fuse_session_loop_mt(se.get(), cfg);
      fuse_loop_cfg_destroy(cfg);
    }
  }
  fuse_session_unmount(se.get());
  se.reset();

  Status closed = image->Close();
  int code = 0;
  if (ret < 0) {  // >0: the signal that ended the loop, a clean stop
    server.Log(fmt::format("FUSE session failed: {}", std::strerror(-ret)));
    code = 1;
  }
  if (!closed.ok()) {
    server.Log(fmt::format("closing '{}' failed: {}", image->path(), closed.ToString()));
    code = 1;
  }
  return code;
}

}  // namespace vimgfs::mount

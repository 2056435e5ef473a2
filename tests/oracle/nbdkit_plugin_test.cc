// The nbdkit plugin, judged by qemu: images qemu-img and qemu-io made are served by
// `nbdkit vimgfs` on a unix socket, and qemu-img compare, qemu-io and nbdinfo talk to it as
// they would to any NBD server. What the plugin writes must pass qemu-img check.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "oracle/cli_test_helpers.h"

#ifdef VIMGFS_TEST_LIBNBD
#include <libnbd.h>
#endif

namespace vimgfs::test {
namespace {

#ifdef VIMGFS_NBDKIT_PLUGIN
const char* const kPlugin = VIMGFS_NBDKIT_PLUGIN;
#else
const char* const kPlugin = nullptr;
#endif

// `nbdkit` as a shell command line.
std::string Nbdkit() {
#ifdef VIMGFS_ASAN_RUNTIME
  // A sanitized plugin in an uninstrumented nbdkit: the runtime must load first, and the
  // leaks nbdkit itself leaves at exit are not ours.
  return "LD_PRELOAD=" + Quote(VIMGFS_ASAN_RUNTIME) + " ASAN_OPTIONS=detect_leaks=0 nbdkit";
#else
  return "nbdkit";
#endif
}

// One `nbdkit -f` serving the plugin on a unix socket, a child of the test.
class NbdServer {
 public:
  ~NbdServer() { Kill(); }

  // Starts nbdkit with the plugin and args; true once the socket answers.
  // nbdkit_flags go before the plugin name (nbdkit's own options).
  bool Start(const std::string& dir, const std::vector<std::string>& args,
             const std::vector<std::string>& nbdkit_flags = {}) {
    socket_ = dir + "/nbd.sock";
    unlink(socket_.c_str());  // nbdkit leaves it behind and will not bind over it
    std::vector<std::string> argv = {"nbdkit", "-f"};
    argv.insert(argv.end(), nbdkit_flags.begin(), nbdkit_flags.end());
    for (const std::string& a : {std::string("-U"), socket_, std::string(kPlugin)}) argv.push_back(a);
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = fork();
    if (pid_ == 0) {
#ifdef VIMGFS_ASAN_RUNTIME
      setenv("LD_PRELOAD", VIMGFS_ASAN_RUNTIME, 1);  // as in Nbdkit()
      setenv("ASAN_OPTIONS", "detect_leaks=0", 1);
#endif
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(s.data());
      a.push_back(nullptr);
      execvp("nbdkit", a.data());
      _exit(127);
    }
    for (int i = 0; i < 500; ++i) {
      if (RunCommand("nbdinfo --size " + Quote(uri())).exit_code == 0) return true;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  // SIGTERM (nbdkit closes the plugin: the image is flushed and closed); exit status.
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    return Reap();
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    Reap();
  }
  std::string uri() const { return "nbd+unix:///?socket=" + socket_; }

 private:
  int Reap() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  pid_t pid_ = -1;
  std::string socket_;
};

class NbdkitPlugin : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    if (IsSkipped()) return;
    if (kPlugin == nullptr)
      GTEST_SKIP() << "the nbdkit plugin was not built (apt-get install nbdkit-plugin-dev)";
    for (const char* tool : {"nbdkit", "nbdinfo", "qemu-io"})
      if (!HaveProgram(tool))
        GTEST_SKIP() << tool << " not installed (apt-get install nbdkit libnbd-bin qemu-utils)";
  }
  NbdServer server_;
};

// Creation options for each writable format, and the size they are made with.
struct FormatCase {
  const char* format;
  const char* options;
};
const FormatCase kFormats[] = {
    {"qcow2", ""}, {"qcow2", "-o cluster_size=4096,compat=0.10"},
    {"vmdk", ""},  {"vmdk", "-o subformat=twoGbMaxExtentSparse"},
    {"vdi", ""},   {"vpc", "-o force_size=on"},
    {"vhdx", ""},  {"qed", ""},
    {"qcow", ""},  {"parallels", ""},
    {"raw", ""},
};

TEST_F(NbdkitPlugin, ServesEveryFormatAsQemuReadsIt) {
  for (const FormatCase& c : kFormats) {
    SCOPED_TRACE(std::string(c.format) + " " + c.options);
    MustSh("rm -f img && qemu-img create -q -f " + std::string(c.format) + " " + c.options + " img 64M");
    MustSh("qemu-io -f " + std::string(c.format) +
           " -c 'write -P 0x5a 1M 3M' -c 'write -P 0xa5 40M 64k' img");
    ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img"), "readonly=true"}));
    auto r = Sh("qemu-img compare -U -f " + std::string(c.format) + " img -F raw " + Quote(server_.uri()));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_EQ(server_.Stop(), 0);
  }
}

// Four clients at once (multi-conn), each writing and flushing its own region: every byte
// lands, the image checks clean, and qemu reads back what each wrote.
TEST_F(NbdkitPlugin, FourClientsWriteAtOnce) {
  for (const char* format : {"qcow2", "vmdk", "vdi", "vhdx"}) {
    SCOPED_TRACE(format);
    MustSh(std::string("rm -f img && qemu-img create -q -f ") + format + " img 128M");
    ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}));
    EXPECT_EQ(Json(Sh("nbdinfo --json " + Quote(server_.uri())))["exports"][0]["can_multi_conn"], true);
    std::string clients;
    for (int i = 0; i < 4; ++i) {
      std::string region = std::to_string(i * 24) + "M";
      clients += "qemu-io -f raw -c 'write -P 0x" + std::to_string(i + 1) + "1 " + region +
                 " 16M' -c flush " + Quote(server_.uri()) + " > /dev/null & ";
    }
    MustSh(clients + "wait");
    ASSERT_EQ(server_.Stop(), 0);
    auto check = Q(std::string("check -f ") + format + " img");
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    for (int i = 0; i < 4; ++i) {
      auto r = Io(std::string("-f ") + format + " -c 'read -P 0x" + std::to_string(i + 1) + "1 " +
                  std::to_string(i * 24) + "M 16M' img");
      EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos)
          << "client " << i << ": " << r.out;
      EXPECT_EQ(r.exit_code, 0);
    }
  }
}

// cache=none: the image's files are written around the host's page cache (O_DIRECT), and
// what clients wrote is there and checks clean; a cache mode it does not know stops nbdkit.
TEST_F(NbdkitPlugin, CacheNoneKeepsTheImageOutOfTheHostPageCache) {
  if (std::string why = PageCacheBypassUnavailableReason(dir_.path()); !why.empty()) GTEST_SKIP() << why;
  MustSh("qemu-img create -q -f qcow2 img 64M");
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img"), "cache=none"}));
  MustSh("qemu-io -f raw -c 'write -P 0x3d 0 24M' -c 'write -P 0x4e 30000001 777' -c flush " +
         Quote(server_.uri()) + " >/dev/null");
  ASSERT_EQ(server_.Stop(), 0);
  EXPECT_LE(CachedBytes(F("img")), 4u << 20) << "the image went through the host's page cache";
  Ok(Q("check -f qcow2 img"));
  auto r = Io("-f qcow2 -c 'read -P 0x3d 0 24M' -c 'read -P 0x4e 30000001 777' img");
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
#ifndef VIMGFS_ASAN_RUNTIME  // a failed configuration: see AnImageThatCannotBeServedFailsAtStart
  r = Sh(Nbdkit() + " -U - " + Quote(kPlugin) + " file=img cache=directsync --run true");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("invalid cache mode 'directsync' (none or writeback)"), std::string::npos) << r.err;
#endif
}

// nbdinfo --map (block status through the plugin) classifies every byte as vimgfs map does:
// data, zero clusters, unallocated parts, through a backing file.
TEST_F(NbdkitPlugin, BlockStatusIsTheImagesMap) {
  MustSh("qemu-img create -q -f qcow2 base.qcow2 16M && qemu-io -c 'write -P 1 0 4M' base.qcow2");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
  MustSh("qemu-io -c 'write -P 2 2M 1M' -c 'write -z 3M 2M' -c 'write -P 3 10M 64k' top.qcow2");
  nlohmann::json map = Json(V("map --output=json top.qcow2"));
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("top.qcow2"), "readonly=true"}));
  nlohmann::json extents = Json(Sh("nbdinfo --map --json " + Quote(server_.uri())));
  // Both as (start, end, reads-as-zeros, holds-data) runs, neighbours of one kind merged.
  struct Run {
    uint64_t start, end;
    bool zero, data;
    bool operator==(const Run&) const = default;
  };
  auto add = [](std::vector<Run>& runs, Run r) {
    if (!runs.empty() && runs.back().end == r.start && runs.back().zero == r.zero &&
        runs.back().data == r.data)
      runs.back().end = r.end;
    else
      runs.push_back(r);
  };
  std::vector<Run> want, got;
  for (const auto& m : map) {
    uint64_t start = m["start"], length = m["length"];
    add(want, {start, start + length, m["zero"].get<bool>(), m["data"].get<bool>()});
  }
  for (const auto& e : extents) {
    uint64_t start = e["offset"], length = e["length"], type = e["type"];
    add(got, {start, start + length, (type & 2) != 0, (type & 1) == 0});
  }
  EXPECT_EQ(got, want) << extents.dump() << "\n" << map.dump();
  EXPECT_GE(want.size(), 4u) << "the image should mix data, zeros and holes";
}

// kill -9 of nbdkit while a client writes: the image stays consistent (leaked clusters at
// worst) and every write flushed before the kill is there.
TEST_F(NbdkitPlugin, KillMidWriteKeepsWhatWasFlushed) {
  MustSh("qemu-img create -q -f qcow2 img 256M");
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}));
  MustSh("qemu-io -f raw -c 'write -P 0x77 0 8M' -c flush " + Quote(server_.uri()) + " > /dev/null");
  // A writer that never flushes, killed with the server under it.
  Sh("(for i in $(seq 0 77); do echo \"write -P 0x33 $((16 + i * 3))M 3M\"; done) | "
     "timeout 20 qemu-io -f raw " +
     Quote(server_.uri()) + " > /dev/null 2>&1 & sleep 0.2");
  server_.Kill();
  Sh("wait");
  auto check = Q("check img");
  EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.out << check.err;  // 3: leaks only
  auto r = Io("-c 'read -P 0x77 0 8M' img");
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
}

// readonly=true: writes are refused, and the image takes qemu's shared lock only, so other
// readers go on; a read-write server holds the write lock qemu-img respects.
TEST_F(NbdkitPlugin, ReadOnlyServesWithASharedLock) {
  MustSh("qemu-img create -q -f qcow2 img 16M");
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img"), "readonly=true"}));
  auto w = Sh("qemu-io -f raw -c 'write 0 64k' " + Quote(server_.uri()));
  EXPECT_NE((w.out + w.err).find("ermission denied"), std::string::npos) << w.out << w.err;  // EPERM/EROFS
  EXPECT_EQ(Q("info img").exit_code, 0) << "a reader beside a read-only server";
  ASSERT_EQ(server_.Stop(), 0);
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}));
  auto info = Q("info img");
  EXPECT_NE(info.exit_code, 0);
  EXPECT_NE(info.err.find("lock"), std::string::npos) << info.err;
}

// nbdkit -r: the image is opened read-only as with readonly=true (nothing written to it, not
// even the in-use marks of its bitmaps), however nbdkit's options are spelled.
TEST_F(NbdkitPlugin, ReadOnlyServerOpensTheImageReadOnly) {
  MustSh(
      "qemu-img create -q -f qcow2 img 16M && qemu-img bitmap --add img b && qemu-io -c 'write 0 64k' img");
  const std::string before = Sh("sha256sum < img").out;
  for (const std::vector<std::string>& flags : std::vector<std::vector<std::string>>{
           {"-r"}, {"--readonly"}, {"-vr"}, {"-t", "4", "--read-only"}, {"--threads=4", "-r"}}) {
    SCOPED_TRACE(flags.back());
    ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}, flags));
    EXPECT_EQ(Q("info img").exit_code, 0) << "a reader beside a read-only server";
    MustSh("qemu-img convert -f raw -O raw " + Quote(server_.uri()) + " out.raw");
    ASSERT_EQ(server_.Stop(), 0);
    EXPECT_EQ(Sh("sha256sum < img").out, before);
  }
  // Without it, options with values ("-t 2", "-P rw.pid": no 'r' flag there) change nothing.
  ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}, {"-t", "2", "-P", F("rw.pid")}));
  EXPECT_NE(Q("info img").exit_code, 0) << "a read-write server holds the write lock";
  ASSERT_EQ(server_.Stop(), 0);
}

#ifdef VIMGFS_TEST_LIBNBD
// NBD's fast zero: done where the format marks clusters zero without writing them (qcow2
// v3), refused at once with ENOTSUP and nothing changed where it would have to write the
// zeros (qcow version 1 has no zero clusters).
TEST_F(NbdkitPlugin, FastZeroOnlyWhereTheFormatMarksZeros) {
  for (const char* format : {"qcow2", "qcow"}) {
    SCOPED_TRACE(format);
    MustSh(std::string("rm -f img && qemu-img create -q -f ") + format + " img 16M && qemu-io -f " + format +
           " -c 'write -P 0x6d 0 4M' img");
    ASSERT_TRUE(server_.Start(dir_.path(), {"file=" + F("img")}));
    nbd_handle* h = nbd_create();
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(nbd_connect_uri(h, server_.uri().c_str()), 0) << nbd_get_error();
    EXPECT_EQ(nbd_can_fast_zero(h), 1);
    int r = nbd_zero(h, 1 << 20, 1 << 20, LIBNBD_CMD_FLAG_FAST_ZERO);
    int err = r == 0 ? 0 : nbd_get_errno();
    nbd_shutdown(h, 0);
    nbd_close(h);
    ASSERT_EQ(server_.Stop(), 0);
    bool fast = std::string(format) == "qcow2";
    if (fast) {
      EXPECT_EQ(r, 0);
      EXPECT_EQ(
          Io("-f qcow2 -c 'read -P 0 1M 1M' -c 'read -P 0x6d 0 1M' img").out.find("verification failed"),
          std::string::npos);
    } else {
      EXPECT_EQ(r, -1);
      EXPECT_EQ(err, ENOTSUP);
      auto read = Io("-f qcow -c 'read -P 0x6d 0 4M' img");
      EXPECT_EQ(read.out.find("verification failed"), std::string::npos)
          << "a refused fast zero changed data";
    }
    EXPECT_EQ(Q(std::string("check -f ") + format + " img").exit_code,
              format == std::string("qcow") ? 63 : 0);
  }
}
#endif

TEST_F(NbdkitPlugin, AnImageThatCannotBeServedFailsAtStart) {
  MustSh("qemu-img create -q -f vmdk -o subformat=streamOptimized s.vmdk 16M");
  ASSERT_FALSE(server_.Start(dir_.path(), {"file=" + F("s.vmdk")}));
  auto r = Sh(Nbdkit() + " -U - " + Quote(kPlugin) + " file=s.vmdk --run true");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("cannot be written in place: serve it with readonly=true"), std::string::npos)
      << r.err;
  // untrusted=true: the rules of the mount's --untrusted.
  MustSh(
      "mkdir -p inner && qemu-img create -q -f qcow2 outside.qcow2 16M && "
      "qemu-img create -q -f qcow2 -b ../outside.qcow2 -F qcow2 inner/top.qcow2");
  r = Sh(Nbdkit() + " -U - " + Quote(kPlugin) + " file=inner/top.qcow2 untrusted=true --run true");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("refused with --untrusted"), std::string::npos) << r.err;
#ifndef VIMGFS_ASAN_RUNTIME
  // Not in sanitizer builds: nbdkit leaves a failed configuration through exit(1), and with
  // libasan preloaded p11-kit's destructor (gnutls's) then deadlocks on glibc's locale lock.
  // The normal build runs it.
  r = Sh(Nbdkit() + " -U - " + Quote(kPlugin) + " file=missing.qcow2 --run true");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("missing.qcow2"), std::string::npos) << r.err;
#endif
}

}  // namespace
}  // namespace vimgfs::test

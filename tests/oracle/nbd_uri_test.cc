// Images on NBD servers: qcow2 files served as raw bytes by nbdkit's file plugin (the way
// any NBD server, qemu-nbd or rbd-nbd, would serve them), opened by vimgfs through NBD URIs.
// qemu-img on the local files is the oracle.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "oracle/cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class NbdUri : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    if (IsSkipped()) return;
    for (const char* tool : {"nbdkit", "nbdinfo", "qemu-io"})
      if (!HaveProgram(tool))
        GTEST_SKIP() << tool << " not installed (apt-get install nbdkit libnbd-bin qemu-utils)";
    MustSh("mkdir exports");
  }
  void TearDown() override { StopServer(); }

  // nbdkit's file plugin serving every file of exports/ as the export of its name.
  void StartServer() {
    socket_ = F("nbd.sock");
    MustSh("nbdkit -U " + Quote(socket_) + " -P nbdkit.pid file dir=" + Quote(F("exports")));
    for (int i = 0; i < 250 && Sh("test -S " + Quote(socket_)).exit_code != 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    running_ = true;
  }
  void StopServer() {
    if (!running_) return;
    Sh("kill $(cat nbdkit.pid); for i in $(seq 100); do kill -0 $(cat nbdkit.pid) 2>/dev/null || break; "
       "sleep 0.05; "
       "done; rm -f " +
       Quote(socket_));
    running_ = false;
  }
  std::string Uri(const std::string& exported) const {
    return Quote("nbd+unix:///" + exported + "?socket=" + socket_);
  }

  std::string socket_;
  bool running_ = false;
};

TEST_F(NbdUri, ReadsAChainWhereTheServerHoldsIt) {
  MustSh(
      "cd exports && qemu-img create -q -f qcow2 base.qcow2 64M && qemu-io -c 'write -P 0x11 0 4M' "
      "base.qcow2");
  MustSh(
      "cd exports && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && "
      "qemu-io -c 'write -P 0x22 2M 1M' -c 'write -z 8M 1M' top.qcow2");
  StartServer();
  auto info = Ok(V("info --backing-chain " + Uri("top.qcow2")));
  EXPECT_NE(info.find("file format: qcow2"), std::string::npos) << info;
  EXPECT_NE(info.find("actual path: nbd+unix:///base.qcow2?socket="), std::string::npos) << info;
  EXPECT_NE(info.find("disk size: unavailable"), std::string::npos) << info;
  EXPECT_EQ(V("check " + Uri("top.qcow2")).exit_code, 0);
  // The map and the bytes, as qemu-img reads the same files locally.
  EXPECT_EQ(Json(V("map --output=json " + Uri("top.qcow2"))), Json(Q("map --output=json exports/top.qcow2")));
  MustSh(Quote(VimgfsBinary()) + " convert -O raw " + Uri("top.qcow2") + " remote.raw");
  MustSh("qemu-img convert -O raw exports/top.qcow2 local.raw && cmp remote.raw local.raw");
  EXPECT_EQ(V("compare " + Uri("top.qcow2") + " exports/top.qcow2").exit_code, 0);
}

// nbd://host:port over loopback TCP, as a storage server is reached.
TEST_F(NbdUri, ReadsOverTcp) {
  MustSh(
      "qemu-img create -q -f qcow2 exports/t.qcow2 16M && qemu-io -c 'write -P 0x3c 0 1M' exports/t.qcow2");
  int port = 0;
  for (int attempt = 0; attempt < 20 && port == 0; ++attempt) {
    int candidate = 20000 + (getpid() * 7 + attempt * 131) % 30000;
    if (Sh("nbdkit -i 127.0.0.1 -p " + std::to_string(candidate) + " -P tcp.pid file dir=exports")
            .exit_code == 0)
      port = candidate;
  }
  ASSERT_NE(port, 0) << "no free loopback port for nbdkit";
  std::string uri = "nbd://127.0.0.1:" + std::to_string(port) + "/t.qcow2";
  auto r = V("compare " + Quote(uri) + " exports/t.qcow2");
  Sh("kill $(cat tcp.pid)");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST_F(NbdUri, WritesIntoAnImageWithRoomOnTheServer) {
  // An export cannot grow: a preallocated image has a home for every cluster already.
  MustSh("qemu-img create -q -f qcow2 -o preallocation=falloc exports/disk.qcow2 32M");
  MustSh("head -c 8M /dev/urandom > data.raw && truncate -s 32M data.raw");
  StartServer();
  MustSh(Quote(VimgfsBinary()) + " convert -n -f raw -O qcow2 data.raw " + Uri("disk.qcow2"));
  StopServer();
  EXPECT_EQ(Q("check exports/disk.qcow2").exit_code, 0);
  EXPECT_EQ(Q("compare -f raw data.raw exports/disk.qcow2").exit_code, 0);
}

TEST_F(NbdUri, AWriteThatWouldGrowTheImageFailsCleanly) {
  MustSh("qemu-img create -q -f qcow2 exports/small.qcow2 32M");
  StartServer();
  MustSh("head -c 4M /dev/urandom > data.raw && truncate -s 32M data.raw");
  auto r = V("convert -n -f raw -O qcow2 data.raw " + Uri("small.qcow2"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("an export cannot grow"), std::string::npos) << r.err;
  StopServer();
  auto check = Q("check exports/small.qcow2");
  EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.out << check.err;  // 3: leaks only
}

TEST_F(NbdUri, MountsAnImageOnAServer) {
  if (geteuid() != 0 || access("/dev/fuse", R_OK | W_OK) != 0)
    GTEST_SKIP() << "mounting needs root and /dev/fuse";
  MustSh(
      "qemu-img create -q -f qcow2 exports/m.qcow2 16M && qemu-io -c 'write -P 0x5c 1M 1M' exports/m.qcow2");
  MustSh("qemu-img convert -O raw exports/m.qcow2 local.raw && mkdir mnt");
  StartServer();
  MustSh(Quote(VimgfsBinary()) + " -r " + Uri("m.qcow2") + " mnt");
  auto r = Sh("cmp mnt/disk.raw local.raw");
  Sh("fusermount3 -u mnt");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // A local overlay over the image on the server: writes land in the overlay, which
  // stores the URI as its backing name (qemu follows it); the export is left as it was.
  const std::string before = Sha256OfFile(F("exports/m.qcow2"));
  MustSh(Quote(VimgfsBinary()) + " --overlay ov.qcow2 " + Uri("m.qcow2") + " mnt");
  r = Sh("dd if=/dev/zero of=mnt/disk.raw bs=64k seek=17 count=1 conv=notrunc oflag=direct status=none");
  Sh("fusermount3 -u mnt");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (int i = 0; i < 100 && Sh("qemu-img info ov.qcow2").exit_code != 0; ++i)
    usleep(50000);  // lock released
  EXPECT_EQ(Sha256OfFile(F("exports/m.qcow2")), before);
  Ok(Q("check ov.qcow2"));
  EXPECT_NE(Ok(Q("info ov.qcow2")).find("backing file: nbd+unix:///m.qcow2?socket="), std::string::npos);
  Ok(Io("-r -c 'read -P 0x5c 1M 64k' -c 'read -P 0 1088k 64k' -c 'read -P 0x5c 1152k 64k' ov.qcow2"));
  // Mounted again, read-only: the same overlay, the same disk.
  MustSh("qemu-img convert -O raw ov.qcow2 ov.raw");
  MustSh(Quote(VimgfsBinary()) + " -r --overlay ov.qcow2 " + Uri("m.qcow2") + " mnt");
  r = Sh("cmp mnt/disk.raw ov.raw");
  Sh("fusermount3 -u mnt");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// Names inside an image on a server reach that server only, by a bare export name.
TEST_F(NbdUri, BackingNamesStayOnTheSameServer) {
  MustSh("qemu-img create -q -f qcow2 -u -b sub/base.qcow2 -F qcow2 exports/deep.qcow2 16M");
  MustSh("qemu-img create -q -f qcow2 -u -b /etc/passwd -F raw exports/abs.qcow2 16M");
  StartServer();
  auto r = V("info --backing-chain " + Uri("deep.qcow2"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("only an export of the same server, by a bare name"), std::string::npos) << r.err;
  r = V("info --backing-chain " + Uri("abs.qcow2"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("by a bare name"), std::string::npos) << r.err;
  // An image is "created" on a server only in an export that exists (as qemu does it).
  r = V("create -f qcow2 " + Uri("new.qcow2") + " 16M");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("new.qcow2"), std::string::npos) << r.err;
}

// iotest 302: convert without -n into an existing export formats it, as qemu-img does (the
// export's first sector is wiped, the image written into it, the export keeping its size):
// how a qcow2 goes straight into a member of an OVA tar served by qemu-nbd --offset.
TEST_F(NbdUri, ConvertFormatsAnExistingExport) {
  MustSh(
      "qemu-img create -q -f qcow2 disk.qcow2 1G && qemu-io -c 'write -P 0x3d 1M 64k' disk.qcow2 >/dev/null");
  const nlohmann::json measure = Json(Q("measure -O qcow2 --output=json disk.qcow2"));
  // Room for the image, after 4 KiB of something else (a tar member's header, say).
  MustSh("head -c 4096 /dev/urandom > ova && truncate -s " +
         std::to_string(4096 + measure["required"].get<uint64_t>()) + " ova && cp ova ova.before");
  const std::string sock = F("ova.sock");
  MustSh("qemu-nbd --fork --pid-file=ova.pid -t -f raw --offset 4096 -x exp -k " + Quote(sock) + " ova");
  const std::string uri = Quote("nbd+unix:///exp?socket=" + sock);
  Ok(V("convert -f qcow2 -O qcow2 -c disk.qcow2 " + uri));
  Ok(Q("compare disk.qcow2 " + uri));
  Ok(Q("check " + uri));
  Ok(V("create -q -f qcow2 " + uri + " 64M"));  // again, a fresh image over the old one
  EXPECT_NE(Ok(Q("info " + uri)).find("virtual size: 64 MiB"), std::string::npos);
  Ok(Q("check " + uri));
  MustSh(
      "kill $(cat ova.pid); for i in $(seq 200); do kill -0 $(cat ova.pid) 2>/dev/null || break; sleep 0.05; "
      "done");
  // What lies before the export is untouched.
  MustSh("cmp -n 4096 ova ova.before");
}

// qemu's way of naming a server in --image-opts and json: (libvirt writes these): the nbd
// driver's server.* and export, under file.* below a format or alone; qemu-img reading
// the same spec is the oracle, and the server's files read locally too.
TEST_F(NbdUri, ImageSpecsNameTheServerAsQemuDoes) {
  MustSh(
      "qemu-img create -q -f qcow2 exports/s.qcow2 16M && qemu-io -c 'write -P 0x5a 1M 1M' "
      "-c 'write -z 4M 1M' exports/s.qcow2");
  StartServer();
  const std::string opts = "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=" + socket_ +
                           ",file.export=s.qcow2";
  const std::string json =
      "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"nbd\",\"export\":\"s.qcow2\","
      "\"server\":{\"type\":\"unix\",\"path\":\"" +
      socket_ + "\"}}}";
  const nlohmann::json local = Json(Q("map --output=json exports/s.qcow2"));
  EXPECT_EQ(Json(V("map --output=json --image-opts " + Quote(opts))), local);
  EXPECT_EQ(Json(V("map --output=json " + Quote(json))), local);
  EXPECT_EQ(Json(Q("map --output=json --image-opts " + Quote(opts))), local);
  MustSh(Quote(VimgfsBinary()) + " convert -O raw " + Quote(json) + " remote.raw");
  MustSh("qemu-img convert -O raw exports/s.qcow2 local.raw && cmp remote.raw local.raw");
  // The protocol alone: the export's bytes are the disk.
  const std::string raw = "driver=nbd,server.type=unix,server.path=" + socket_ + ",export=s.qcow2";
  MustSh(Quote(VimgfsBinary()) + " convert -O raw --image-opts " + Quote(raw) + " bytes.raw");
  EXPECT_EQ(Sh("cmp -n $(stat -c %s exports/s.qcow2) bytes.raw exports/s.qcow2").exit_code, 0);
  // A local overlay whose backing file is read from the server, named by backing.file.*
  // (qemu-img refuses this spec when the overlay stores a backing name, so the oracle is
  // the local chain: the same file).
  MustSh(
      "qemu-img create -q -f qcow2 -b exports/s.qcow2 -F qcow2 top.qcow2 16M && qemu-io -c 'write -P 0x61 0 "
      "64k' "
      "top.qcow2");
  const std::string chain =
      "driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2,backing.file.driver=nbd,"
      "backing.file.server.type=unix,backing.file.server.path=" +
      socket_ + ",backing.file.export=s.qcow2";
  MustSh(Quote(VimgfsBinary()) + " convert -O raw --image-opts " + Quote(chain) + " v-chain.raw");
  MustSh("qemu-img convert -O raw top.qcow2 q-chain.raw && cmp v-chain.raw q-chain.raw");
  auto info = Ok(V("info --backing-chain --image-opts " + Quote(chain)));
  EXPECT_NE(info.find("image: nbd+unix:///s.qcow2?socket="), std::string::npos) << info;
  // What cannot name a server fails with one line.
  auto r = V("info --image-opts driver=nbd,server.type=unix");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err, "vimgfs: Could not open 'driver=nbd,server.type=unix': Parameter 'path' is missing\n");
  r = V("info --image-opts driver=nbd,server.type=inet");
  EXPECT_EQ(r.err, "vimgfs: Could not open 'driver=nbd,server.type=inet': NBD server address missing\n");
  // A context the server does not offer (nbdkit's file plugin has base:allocation only).
  r = V("info --image-opts " + Quote(raw + ",x-dirty-bitmap=qemu:dirty-bitmap:b"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("requested x-dirty-bitmap qemu:dirty-bitmap:b not found"), std::string::npos) << r.err;
}

// qemu's x-dirty-bitmap: block status read through another metadata context (a dirty
// bitmap qemu-nbd -B exports, or qemu-nbd -A's allocation depth), shown by map as qemu-img
// map shows it (backup tools read a VM's dirty areas this way). Reads still read the data.
TEST_F(NbdUri, MapReadsAnotherMetadataContextAsQemuDoes) {
  MustSh(
      "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null && "
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && "
      "qemu-io -c 'write -P 2 1M 64k' -c 'write -z 3M 1M' top.qcow2 >/dev/null && "
      "qemu-img bitmap --add top.qcow2 b && qemu-io -c 'write -P 3 2M 128k' top.qcow2 >/dev/null");
  const std::string sock = F("ctx.sock");
  MustSh("qemu-nbd --fork --pid-file=ctx.pid -t -r -A -B b -f qcow2 -k " + Quote(sock) + " top.qcow2");
  const std::string server = "driver=nbd,server.type=unix,server.path=" + sock;
  for (std::string context : {"", "qemu:dirty-bitmap:b", "qemu:allocation-depth"}) {
    SCOPED_TRACE(context);
    const std::string spec = Quote(server + (context.empty() ? "" : ",x-dirty-bitmap=" + context));
    EXPECT_EQ(Json(V("map --output=json --image-opts " + spec)),
              Json(Q("map --output=json --image-opts " + spec)));
    MustSh(Quote(VimgfsBinary()) + " convert -O raw --image-opts " + spec + " ctx.raw");
    MustSh("qemu-img convert -O raw top.qcow2 top.raw && cmp ctx.raw top.raw");
  }
  // The same context named in a json: spec and under file.* of a format on the server.
  const std::string json = "json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"" + sock +
                           "\"},\"x-dirty-bitmap\":\"qemu:dirty-bitmap:b\"}";
  EXPECT_EQ(Json(V("map --output=json " + Quote(json))), Json(Q("map --output=json " + Quote(json))));
  MustSh(
      "kill $(cat ctx.pid); for i in $(seq 200); do kill -0 $(cat ctx.pid) 2>/dev/null || break; sleep 0.05; "
      "done");
}

// qemu-nbd run as usual (one client, then it exits): the open is that one connection.
TEST_F(NbdUri, AOneClientServerIsEnough) {
  MustSh("qemu-img create -q -f qcow2 one.qcow2 4M && qemu-io -c 'write -P 0x42 1M 512k' one.qcow2");
  const std::string sock = F("one.sock");
  // qemu-nbd exits after its one client has gone, but on its own time: the next server or
  // the final qemu-img must wait for it to release the socket and the image's lock.
  auto serve_once = [&] {
    MustSh("qemu-nbd --fork --pid-file=qnbd.pid -k " + Quote(sock) + " -x exp -f qcow2 one.qcow2");
  };
  auto wait_server_gone = [&] {
    MustSh("for i in $(seq 200); do kill -0 $(cat qnbd.pid) 2>/dev/null || exit 0; sleep 0.05; done; exit 1");
  };
  for (const char* cmd : {"convert -f raw -O raw", "map -f raw --output=json"}) {
    SCOPED_TRACE(cmd);
    serve_once();
    const std::string uri = Quote("nbd+unix:///exp?socket=" + sock);
    auto r = V(std::string(cmd) + " " + uri + (std::string(cmd).starts_with("convert") ? " v.raw" : ""));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    wait_server_gone();
    if (std::string(cmd).starts_with("map")) {
      serve_once();
      EXPECT_EQ(Json(r), Json(Q(std::string(cmd) + " " + uri)));
      wait_server_gone();
    }
  }
  MustSh("qemu-img convert -O raw one.qcow2 q.raw && cmp v.raw q.raw");
}

}  // namespace
}  // namespace vimgfs::test

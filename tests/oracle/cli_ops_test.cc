// resize, snapshot, rebase and commit: vimgfs and qemu-img on copies of the same images
// must leave images that compare equal and check clean.
#include <sys/stat.h>
#include <unistd.h>

#include <tuple>

#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"
#include "io/lock.h"
#include "vimgfs/env.h"

namespace vimgfs::test {
namespace {

class CliOpsTest : public CliTest {
 protected:
  // Runs `vimgfs ARGS v.EXT` and `qemu-img ARGS q.EXT` on copies; same exit code and stdout.
  void Both(const std::string& args_before, const std::string& file_ext, const std::string& args_after = "") {
    SCOPED_TRACE(args_before + " <file> " + args_after);
    CommandResult v = V(args_before + " v." + file_ext + " " + args_after);
    CommandResult q = Q(args_before + " q." + file_ext + " " + args_after);
    EXPECT_EQ(v.exit_code, q.exit_code) << v.err << "\nqemu: " << q.err;
    EXPECT_EQ(v.out, q.out);
  }
  void Copies(const std::string& ext) {
    MustSh("cp orig." + ext + " v." + ext + " && cp orig." + ext + " q." + ext);
  }
  void ExpectSameImages(const std::string& ext) {
    CommandResult c = Q("compare v." + ext + " q." + ext);
    EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
    nlohmann::json vi = Json(Q("info --output=json v." + ext)), qi = Json(Q("info --output=json q." + ext));
    EXPECT_EQ(vi["virtual-size"], qi["virtual-size"]);
  }
  // Starts qemu-io holding `image` open (qemu-io ARGS image; killed through holder.pid) and
  // waits until its locks are there, with a probe that takes none (polling with qemu-img
  // would hold a shared lock for a moment, and a qemu-io starting right then gives up).
  bool HoldWithQemuIo(const std::string& args, const std::string& image) {
    MustSh("(sleep 60 </dev/null 2>/dev/null | qemu-io " + args + " " + image +
           " >/dev/null 2>holder.err & echo $! > holder.pid)");
    for (int i = 0; i < 200; i++) {  // up to about 20 s on a loaded machine
      auto f = Env::Default()->Open(F(image), OpenMode::kReadOnly);
      if (f.ok() && !CheckImageLockable((*f)->fd(), F(image), true).ok()) return true;
      usleep(100000);
    }
    ADD_FAILURE() << "qemu-io did not lock " << image << ": "
                  << Sh("cat holder.err; ps -ef | grep qemu-io").out;
    return false;
  }
  // Each line run by vimgfs and by qemu-img (o.raw and o.qcow2 removed before each): both
  // exit with `code`, and both say `msg` when it is not empty.
  struct LockCase {
    std::string args;
    int code;
    std::string msg;
  };
  void ExpectLikeQemuImg(const std::vector<LockCase>& cases, bool same_stdout) {
    for (const auto& [args, code, msg] : cases) {
      SCOPED_TRACE(args);
      MustSh("rm -f o.raw o.qcow2");
      CommandResult v = V(args);
      MustSh("rm -f o.raw o.qcow2");
      CommandResult q = Q(args);
      EXPECT_EQ(v.exit_code, code) << v.err;
      EXPECT_EQ(q.exit_code, code) << q.err;
      if (!msg.empty()) {
        EXPECT_NE(v.err.find(msg), std::string::npos) << v.err;
        EXPECT_NE(q.err.find(msg), std::string::npos) << q.err;
      }
      if (same_stdout) {
        EXPECT_EQ(v.out, q.out);
      }
    }
  }
};

TEST_F(CliOpsTest, ResizeEveryResizableFormat) {
  for (std::string fmt : {"qcow2", "raw"}) {
    SCOPED_TRACE(fmt);
    MustSh("qemu-img create -q -f " + fmt + " orig." + fmt + " 8M");
    MustSh("qemu-io -f " + fmt + " -c 'write -P 1 0 8M' orig." + fmt + " >/dev/null");
    Copies(fmt);
    Both("resize -f " + fmt, fmt, "+4M");
    ExpectSameImages(fmt);
    Both("resize -f " + fmt, fmt, "16M");
    Both("resize -f " + fmt, fmt, "2M");  // shrinking needs --shrink
    Both("resize -f " + fmt + " --shrink", fmt, "-- -1M");
    Both("resize -f " + fmt + " --shrink", fmt, "5M");
    ExpectSameImages(fmt);
    Both("resize -q -f " + fmt, fmt, "6M");
    if (fmt == "qcow2") {
      EXPECT_EQ(Q("check v.qcow2").exit_code, 0);
    }
  }
}

// --preallocation on growth: same exit codes and errors as qemu-img, and the grown area
// is allocated as qemu allocates it (qcow2 falloc/full: data clusters; metadata: clusters
// that read as zeros; raw: host space), the old data untouched.
TEST_F(CliOpsTest, ResizeWithPreallocation) {
  auto host_bytes = [&](const std::string& f) {
    struct stat st {};
    EXPECT_EQ(stat(F(f).c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  };
  auto grown_data = [&](const std::string& f) {  // bytes past 1M that map as data
    uint64_t n = 0;
    for (const auto& run : Json(Q("map --output=json " + f)))
      if (run["data"] == true && run["start"].get<uint64_t>() >= (1u << 20))
        n += run["length"].get<uint64_t>();
    return n;
  };
  for (std::string fmt : {"qcow2", "raw", "vdi"}) {
    for (std::string mode : {"off", "metadata", "falloc", "full", "bogus"}) {
      SCOPED_TRACE(fmt + " " + mode);
      MustSh("rm -f orig.* v.* q.*");
      MustSh("qemu-img create -q -f " + fmt + " orig." + fmt + " 1M");
      MustSh("qemu-io -f " + fmt + " -c 'write -P 7 0 900k' orig." + fmt + " >/dev/null");
      Copies(fmt);
      const int64_t before = static_cast<int64_t>(host_bytes("v." + fmt));
      CommandResult v = V("resize -f " + fmt + " --preallocation=" + mode + " v." + fmt + " 3M");
      CommandResult q = Q("resize -f " + fmt + " --preallocation=" + mode + " q." + fmt + " 3M");
      if (fmt == "vdi" && mode == "off") continue;  // vimgfs grows VDI, qemu cannot resize it
      EXPECT_EQ(v.exit_code, q.exit_code) << v.err << "\nqemu: " << q.err;
      if (v.exit_code != 0) {  // same message after the program name
        if (fmt != "vdi") {
          EXPECT_EQ(v.err.substr(8), q.err.substr(10));
        }
        continue;
      }
      EXPECT_EQ(Q("compare v." + fmt + " orig." + fmt).exit_code, 0);  // grown area reads zeros
      ExpectSameImages(fmt);
      if (fmt == "qcow2") {
        EXPECT_EQ(Q("check v.qcow2").exit_code, 0);
        EXPECT_EQ(grown_data("v.qcow2"), grown_data("q.qcow2"));
      }
      // Host space for the 2 MiB grown area: reserved by falloc and full, not otherwise
      // (the file may reuse some free space it had, and new metadata takes a little).
      bool reserved = mode == "falloc" || mode == "full";
      int64_t grew = static_cast<int64_t>(host_bytes("v." + fmt)) - before;
      if (reserved) {
        EXPECT_GE(grew, 3 << 19) << "grew by " << grew;
      } else {
        EXPECT_LT(grew, 1 << 19) << "grew by " << grew;
      }
    }
  }
}

TEST_F(CliOpsTest, LargePreallocatedGrowthWritesNoData) {
  // 64 GiB more with metadata preallocation (sparse), 256 MiB with falloc (reserved,
  // unwritten): the clusters are allocated without the zeros passing through the engine
  // (64 GiB of them would take minutes and, for a moment, the disk).
  for (std::string mode : {"metadata", "falloc"}) {
    SCOPED_TRACE(mode);
    const uint64_t grow = mode == "metadata" ? 64ull << 30 : 256ull << 20;  // tmpfs reserves RAM
    MustSh("rm -f v.qcow2 q.qcow2 && qemu-img create -q -f qcow2 v.qcow2 1M && cp v.qcow2 q.qcow2");
    Ok(V("resize --preallocation=" + mode + " v.qcow2 +" + std::to_string(grow)));
    Ok(Q("resize --preallocation=" + mode + " q.qcow2 +" + std::to_string(grow)));
    EXPECT_EQ(Q("check v.qcow2").exit_code, 0);
    EXPECT_EQ(Q("compare v.qcow2 q.qcow2").exit_code, 0);
    nlohmann::json vi = Json(Q("info --output=json v.qcow2"));
    nlohmann::json qi = Json(Q("info --output=json q.qcow2"));
    EXPECT_EQ(vi["virtual-size"], qi["virtual-size"]);
    if (mode == "metadata") {  // sparse: only tables take space, as in qemu's image
      EXPECT_LT(vi["actual-size"].get<uint64_t>(), 64ull << 20);
      EXPECT_LT(vi["actual-size"].get<uint64_t>(), 2 * qi["actual-size"].get<uint64_t>() + (1 << 20));
    }
    uint64_t v_data = 0, q_data = 0;
    for (const auto& run : Json(Q("map --output=json v.qcow2")))
      if (run["data"] == true) v_data += run["length"].get<uint64_t>();
    for (const auto& run : Json(Q("map --output=json q.qcow2")))
      if (run["data"] == true) q_data += run["length"].get<uint64_t>();
    EXPECT_EQ(v_data, q_data);
    EXPECT_EQ(v_data, grow);
  }
}

TEST_F(CliOpsTest, Snapshots) {
  MustSh("qemu-img create -q -f qcow2 orig.qcow2 8M");
  MustSh("qemu-io -c 'write -P 1 0 1M' orig.qcow2 >/dev/null");
  Copies("qcow2");
  Both("snapshot -c s1", "qcow2");
  MustSh(
      "qemu-io -c 'write -P 2 0 512k' v.qcow2 >/dev/null && qemu-io -c 'write -P 2 0 512k' q.qcow2 "
      ">/dev/null");
  Both("snapshot -c s2", "qcow2");
  CommandResult v = V("snapshot -l v.qcow2");
  EXPECT_NE(v.out.find(" s1 "), std::string::npos) << v.out;
  EXPECT_NE(v.out.find(" s2 "), std::string::npos);
  Both("snapshot -a s1", "qcow2");
  ExpectSameImages("qcow2");
  Both("snapshot -d s2", "qcow2");
  Both("snapshot -d nosuch", "qcow2");
  Both("snapshot -a nosuch", "qcow2");
  EXPECT_EQ(Q("check v.qcow2").exit_code, 0);
  nlohmann::json vi = Json(Q("info --output=json v.qcow2"));
  ASSERT_EQ(vi["snapshots"].size(), 1u);
  EXPECT_EQ(vi["snapshots"][0]["name"], "s1");
  // Formats without internal snapshots.
  MustSh("qemu-img create -q -f raw r.raw 1M");
  EXPECT_EQ(V("snapshot -l r.raw").exit_code, 0);
  EXPECT_EQ(V("snapshot -c x r.raw").exit_code, 1);
}

TEST_F(CliOpsTest, RebaseSafeAndUnsafe) {
  MustSh("qemu-img create -q -f qcow2 old.qcow2 4M && qemu-io -c 'write -P 1 0 1M' old.qcow2 >/dev/null");
  MustSh(
      "qemu-img create -q -f qcow2 new.qcow2 4M && qemu-io -c 'write -P 1 0 512k' -c 'write -P 4 3M 64k' "
      "new.qcow2 >/dev/null");
  MustSh("qemu-img create -q -f qcow2 -b old.qcow2 -F qcow2 orig.qcow2");
  MustSh("qemu-io -c 'write -P 7 2M 64k' orig.qcow2 >/dev/null");
  MustSh("qemu-img convert -O raw orig.qcow2 before.raw");
  Copies("qcow2");
  Both("rebase -b new.qcow2 -F qcow2", "qcow2");
  EXPECT_EQ(Q("compare before.raw v.qcow2").exit_code, 0);
  EXPECT_EQ(Q("check v.qcow2").exit_code, 0);
  nlohmann::json vi = Json(Q("info --output=json v.qcow2"));
  EXPECT_EQ(vi["backing-filename"], "new.qcow2");
  // Same clusters copied as qemu did.
  EXPECT_EQ(Q("map --output=json v.qcow2").out.size() > 0, true);
  EXPECT_EQ(Json(Q("map --output=json v.qcow2")).size(), Json(Q("map --output=json q.qcow2")).size());
  // Detach entirely.
  Both("rebase -b ''", "qcow2");
  EXPECT_EQ(Q("compare before.raw v.qcow2").exit_code, 0);
  EXPECT_FALSE(Json(Q("info --output=json v.qcow2")).contains("backing-filename"));
  // -u rewrites the name only.
  Copies("qcow2");
  Both("rebase -u -b new.qcow2 -F qcow2", "qcow2");
  ExpectSameImages("qcow2");
  Both("rebase -b new.qcow2", "qcow2");  // no -F: refused
}

TEST_F(CliOpsTest, Commit) {
  MustSh("qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
  MustSh("qemu-io -c 'write -P 7 512k 1M' -c 'write -z 3M 64k' top.qcow2 >/dev/null");
  MustSh("qemu-img convert -O raw top.qcow2 want.raw");
  CommandResult v = V("commit top.qcow2");
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(v.out, "Image committed.\n");
  EXPECT_EQ(Q("compare want.raw base.qcow2").exit_code, 0);
  EXPECT_EQ(Q("compare want.raw top.qcow2").exit_code, 0);
  EXPECT_EQ(Q("check base.qcow2").exit_code, 0);
  EXPECT_EQ(Q("check top.qcow2").exit_code, 0);
  // The overlay was emptied, as qemu-img commit does: every byte now comes from the base.
  nlohmann::json map = Json(Q("map --output=json top.qcow2"));
  for (const auto& run : map) EXPECT_EQ(run["depth"], 1) << run.dump();
  v = V("commit base.qcow2");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_EQ(v.err, "vimgfs: Image does not have a backing file\n");
}

// -d keeps the overlay's data, and so does -b (emptying an overlay whose data went past
// its own backing file would lose the layers between); a VMDK overlay is never emptied.
// qemu-img on copies of the same chains leaves the same allocation.
TEST_F(CliOpsTest, CommitKeepsTheOverlayWithDOrB) {
  auto top_layer_bytes = [&](const std::string& img) {
    uint64_t n = 0;
    for (const auto& run : Json(Q("map --output=json " + img)))
      if (run["depth"] == 0 && run["data"] == true) n += run["length"].get<uint64_t>();
    return n;
  };
  for (const std::string& tool : {std::string("vimgfs"), std::string("qemu")}) {
    SCOPED_TRACE(tool);
    auto run = [&](const std::string& args) { return tool == "qemu" ? Q(args) : V(args); };
    MustSh("rm -f b.qcow2 m.qcow2 t.qcow2 bv.vmdk tv.vmdk");
    MustSh("qemu-img create -q -f qcow2 b.qcow2 4M");
    MustSh("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 m.qcow2");
    MustSh("qemu-img create -q -f qcow2 -b m.qcow2 -F qcow2 t.qcow2");
    MustSh("qemu-io -c 'write -P 9 0 1M' t.qcow2 >/dev/null");
    ASSERT_EQ(run("commit -d -q t.qcow2").exit_code, 0);
    EXPECT_EQ(top_layer_bytes("t.qcow2"), 1u << 20);
    ASSERT_EQ(run("commit -q -b b.qcow2 t.qcow2").exit_code, 0);
    EXPECT_EQ(top_layer_bytes("t.qcow2"), 1u << 20);
    EXPECT_EQ(Q("compare t.qcow2 b.qcow2").exit_code, 0);
    MustSh("qemu-img create -q -f vmdk bv.vmdk 4M");
    MustSh("qemu-img create -q -f vmdk -b bv.vmdk -F vmdk tv.vmdk");
    MustSh("qemu-io -f vmdk -c 'write -P 3 0 1M' tv.vmdk >/dev/null");
    ASSERT_EQ(run("commit -q tv.vmdk").exit_code, 0);
    EXPECT_EQ(top_layer_bytes("tv.vmdk"), 1u << 20);
    EXPECT_EQ(Q("compare tv.vmdk bv.vmdk").exit_code, 0);
  }
}

// While qemu-io holds an image for writing, the commands refuse it, and overlays that
// need it as a backing file, as qemu-img does (shared "write" lock for readers, "write"
// lock for writers); -U reads it anyway, and an overlay can still be created on it (only
// its size is read).
TEST_F(CliOpsTest, CommandsHonourQemuLocks) {
  MustSh("qemu-img create -q -f qcow2 a.qcow2 8M && qemu-img create -q -f qcow2 b.qcow2 8M");
  MustSh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2");  // a.qcow2 is its backing
  ASSERT_TRUE(HoldWithQemuIo("", "a.qcow2"));
  ExpectLikeQemuImg(
      {
          {"info a.qcow2", 1, "Failed to get shared \"write\" lock"},
          {"map a.qcow2", 1, "Failed to get shared \"write\" lock"},
          {"convert -O raw a.qcow2 o.raw", 1, "Failed to get shared \"write\" lock"},
          {"resize a.qcow2 16M", 1, "Failed to get \"write\" lock"},
          {"convert -n -O qcow2 b.qcow2 a.qcow2", 1, "Failed to get \"write\" lock"},
          {"info -U a.qcow2", 0, ""},
          {"check -U a.qcow2", 0, ""},
          {"create -q -f qcow2 -b a.qcow2 -F qcow2 o.qcow2", 0, ""},
          // An image in use is not truncated by a create or convert over it.
          {"create -q -f qcow2 a.qcow2 8M", 1, "Failed to get \"write\" lock"},
          {"convert -O qcow2 b.qcow2 a.qcow2", 1, "Failed to get \"write\" lock"},
          // Backing files are locked shared too, except where only the name is read.
          {"map top.qcow2", 1, "\"write\" lock"},
          {"info --backing-chain top.qcow2", 1, "\"write\" lock"},
          {"commit top.qcow2", 1, "\"write\" lock"},
          {"info top.qcow2", 0, ""},
          // -U shares what a command reads, never the image it writes.
          {"convert -U -n -O qcow2 b.qcow2 a.qcow2", 1, "Failed to get \"write\" lock"},
          {"rebase -U -u -b b.qcow2 -F qcow2 a.qcow2", 1, "Failed to get \"write\" lock"},
      },
      /*same_stdout=*/false);
  // Run as qemu-img, the refusal reads as qemu-img's, hint line and all (iotest 153).
  MustSh("ln -sf " + Quote(VimgfsBinary()) + " qemu-img");
  CommandResult as_qemu = Sh("./qemu-img info a.qcow2"), q = Q("info a.qcow2");
  EXPECT_EQ(as_qemu.err, q.err);
  EXPECT_NE(q.err.find("\nIs another process using the image [a.qcow2]?"), std::string::npos) << q.err;
  Ok(Q("check -U a.qcow2"));  // still the image qemu-io holds
  MustSh("kill $(cat holder.pid)");
}

// A raw image's file is all data, so qemu-img's readers let a writer (a VM, qemu-io) go on
// writing it: info, map, check, compare, measure and dd read it while it is in use; convert,
// which wants its sources unchanged while it copies, is refused, from a raw image or through
// one as a backing file.
TEST_F(CliOpsTest, RawImagesInUseAreReadAsQemuImgReadsThem) {
  MustSh("qemu-img create -q -f raw a.raw 8M && qemu-img create -q -f qcow2 -b a.raw -F raw top.qcow2");
  ASSERT_TRUE(HoldWithQemuIo("-f raw", "a.raw"));
  const std::string refused = "Failed to get shared \"write\" lock";
  ExpectLikeQemuImg({{"info a.raw", 0, ""},
                     {"map -f raw a.raw", 0, ""},
                     {"check -f raw a.raw", 63, ""},
                     {"compare a.raw a.raw", 0, ""},
                     {"measure -O qcow2 a.raw", 0, ""},
                     {"dd -O raw if=a.raw of=o.raw bs=1M count=1", 0, ""},
                     {"info --backing-chain top.qcow2", 0, ""},
                     {"convert -f raw -O raw a.raw o.raw", 1, refused},
                     {"convert -O raw top.qcow2 o.raw", 1, refused}},
                    /*same_stdout=*/true);
  MustSh("kill $(cat holder.pid)");
}

// -U (force-share) is for readers only: every command that would write the image refuses
// it as qemu-img does, and leaves the image as it was.
TEST_F(CliOpsTest, ForceShareIsRefusedByCommandsThatWrite) {
  MustSh("qemu-img create -q -f qcow2 a.qcow2 8M && qemu-io -c 'write -P 0x11 0 64k' a.qcow2 >/dev/null");
  MustSh("qemu-img snapshot -c s a.qcow2");
  std::string before = Sha256OfFile(F("a.qcow2"));
  for (std::string args : {"snapshot -U -c t a.qcow2", "snapshot -U -d s a.qcow2", "snapshot -U -a s a.qcow2",
                           "check -U -r leaks a.qcow2", "check -U -r all a.qcow2"}) {
    SCOPED_TRACE(args);
    for (bool vimgfs : {true, false}) {
      CommandResult r = vimgfs ? V(args) : Q(args);
      EXPECT_EQ(r.exit_code, 1) << r.err;
      EXPECT_NE(r.err.find("Could not open 'a.qcow2': force-share=on can only be used with read-only images"),
                std::string::npos)
          << r.err;
      EXPECT_EQ(Sha256OfFile(F("a.qcow2")), before)
          << (vimgfs ? "vimgfs" : "qemu-img") << " changed the image";
    }
  }
  // Reading with -U is fine.
  for (std::string args : {"snapshot -U -l a.qcow2", "check -U a.qcow2"}) {
    EXPECT_EQ(V(args).exit_code, 0) << args;
    EXPECT_EQ(Q(args).exit_code, 0) << args;
  }
}

}  // namespace
}  // namespace vimgfs::test

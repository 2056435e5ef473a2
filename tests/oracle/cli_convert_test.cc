// `vimgfs convert` judged by qemu-img: every source format to every target format and
// subformat compares equal, passes `qemu-img check`, and is the format qemu detects.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>

#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliConvertTest : public CliTest {
 protected:
  // Writes a pattern qemu-io understands into an image: random-ish data, text-like data,
  // a zeroed range and a hole.
  void Fill(const std::string& fmt, const std::string& name) {
    MustSh("qemu-io -f " + fmt +
           " -c 'write -P 0x41 0 100k' -c 'write -P 0x5a 1M 64k' "
           "-c 'write -P 0 3M 128k' -c 'write -P 0x17 5000k 300k' " +
           name + " >/dev/null");
  }
  // The sources of the matrix, made by qemu.
  void MakeSources() {
    // qcow2 with a backing file, a compressed cluster and data in both layers.
    MustSh("qemu-img create -q -f qcow2 base.qcow2 8M");
    Fill("qcow2", "base.qcow2");
    MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 src.qcow2");
    MustSh(
        "qemu-io -c 'write -P 0x66 64k 64k' -c 'write -c -P 0x77 2M 64k' -c 'write -z 5M 64k' "
        "src.qcow2 >/dev/null");
    MustSh("qemu-img create -q -f vmdk src.vmdk 8M");
    Fill("vmdk", "src.vmdk");
    MustSh("qemu-img create -q -f vdi src.vdi 8M");
    Fill("vdi", "src.vdi");
    MustSh("qemu-img create -q -f raw src.raw 8M");
    Fill("raw", "src.raw");
  }
  // Converts with vimgfs and judges the output with qemu-img.
  void ConvertAndJudge(const std::string& src, const std::string& src_fmt, const std::string& args,
                       const std::string& out, const std::string& out_fmt) {
    SCOPED_TRACE("convert " + args + " " + src + " -> " + out);
    CommandResult v = V("convert -f " + src_fmt + " " + args + " " + src + " " + out);
    ASSERT_EQ(v.exit_code, 0) << v.err;
    EXPECT_EQ(v.out, "");
    CommandResult cmp = Q("compare -f " + src_fmt + " -F " + out_fmt + " " + src + " " + out);
    EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
    CommandResult chk = Q("check -f " + out_fmt + " " + out);
    EXPECT_TRUE(chk.exit_code == 0 || (chk.exit_code == 63 && out_fmt == "raw")) << chk.out << chk.err;
    nlohmann::json info = Json(Q("info --output=json " + out));
    EXPECT_EQ(info["format"], out_fmt);
    EXPECT_EQ(info["virtual-size"], 8 << 20);
  }
};

struct Target {
  std::string args, fmt, ext;
};

TEST_F(CliConvertTest, Matrix) {
  MakeSources();
  const std::vector<std::pair<std::string, std::string>> sources = {
      {"src.qcow2", "qcow2"}, {"src.vmdk", "vmdk"}, {"src.vdi", "vdi"}, {"src.raw", "raw"}};
  const std::vector<Target> targets = {
      {"-O qcow2", "qcow2", "qcow2"},
      {"-O qcow2 -c", "qcow2", "qcow2"},
      {"-O qcow2 -c -o compression_type=zstd", "qcow2", "qcow2"},
      {"-O qcow2 -o compat=0.10", "qcow2", "qcow2"},
      {"-O qcow2 -o cluster_size=4k", "qcow2", "qcow2"},
      {"-O vmdk", "vmdk", "vmdk"},
      {"-O vmdk -o subformat=streamOptimized", "vmdk", "vmdk"},
      {"-O vmdk -o subformat=monolithicFlat", "vmdk", "vmdk"},
      {"-O vmdk -o subformat=twoGbMaxExtentSparse", "vmdk", "vmdk"},
      {"-O vdi", "vdi", "vdi"},
      {"-O vdi -o static=on", "vdi", "vdi"},
      {"-O raw", "raw", "raw"},
  };
  int n = 0;
  for (const auto& [src, sfmt] : sources) {
    for (const Target& t : targets) {
      std::string out = "out" + std::to_string(n++) + "." + t.ext;
      ConvertAndJudge(src, sfmt, t.args, out, t.fmt);
    }
  }
}

TEST_F(CliConvertTest, CompressedOutputIsCompressed) {
  MustSh("qemu-img create -q -f raw text.raw 4M");
  // Text-like, compressible data over every cluster.
  MustSh("yes 'the quick brown fox jumps over the lazy dog' | head -c 4194304 > text.raw");
  for (const std::string& ct : {std::string("zlib"), std::string("zstd")}) {
    SCOPED_TRACE(ct);
    std::string out = "c-" + ct + ".qcow2";
    Ok(V("convert -c -O qcow2 -o compression_type=" + ct + " text.raw " + out));
    EXPECT_EQ(Q("compare text.raw " + out).exit_code, 0);
    CommandResult chk = Q("check " + out);
    EXPECT_EQ(chk.exit_code, 0) << chk.out << chk.err;
    EXPECT_NE(chk.out.find("100.00% compressed clusters"), std::string::npos) << chk.out;
    struct stat st;
    ASSERT_EQ(stat(F(out).c_str(), &st), 0);
    EXPECT_LT(st.st_size, 1 << 20);
    nlohmann::json info = Json(Q("info --output=json " + out));
    EXPECT_EQ(info["format-specific"]["data"]["compression-type"], ct);
  }
}

// Each 64 KiB cluster is 16 KiB of random bytes written four times: only back-references
// of 16 KiB compress it, so every cluster being compressed shows such streams are written,
// and qemu reading them back equal shows qemu takes them (qemu's inflate for qcow2 is set
// up with a 4 KiB window, but decodes a whole cluster in one call).
TEST_F(CliConvertTest, FarBackReferencesReadBackInQemu) {
  MustSh("for i in $(seq 16); do head -c 16384 /dev/urandom > q; cat q q q q; done > far.raw");
  Ok(V("convert -c -O qcow2 far.raw far.qcow2"));
  EXPECT_EQ(Q("compare far.raw far.qcow2").exit_code, 0);
  CommandResult chk = Q("check far.qcow2");
  EXPECT_EQ(chk.exit_code, 0) << chk.out << chk.err;
  EXPECT_NE(chk.out.find("100.00% compressed clusters"), std::string::npos) << chk.out;
  Ok(V("convert -O vmdk -o subformat=streamOptimized far.raw far.vmdk"));
  EXPECT_EQ(Q("compare far.raw far.vmdk").exit_code, 0);
  struct stat st;
  ASSERT_EQ(stat(F("far.vmdk").c_str(), &st), 0);
  EXPECT_LT(st.st_size, 700 * 1024) << "grains were not compressed";
}

TEST_F(CliConvertTest, SparseOutputAndFullAllocation) {
  MustSh("qemu-img create -q -f raw s.raw 64M");
  MustSh("qemu-io -f raw -c 'write -P 0x33 32M 64k' s.raw >/dev/null");
  Ok(V("convert -O raw s.raw sparse.raw"));
  Ok(V("convert -S 0 -O raw s.raw full.raw"));
  Ok(V("convert -O qcow2 s.raw sparse.qcow2"));
  EXPECT_EQ(Q("compare s.raw sparse.raw").exit_code, 0);
  EXPECT_EQ(Q("compare s.raw full.raw").exit_code, 0);
  struct stat sp, fu, q2;
  ASSERT_EQ(stat(F("sparse.raw").c_str(), &sp), 0);
  ASSERT_EQ(stat(F("full.raw").c_str(), &fu), 0);
  ASSERT_EQ(stat(F("sparse.qcow2").c_str(), &q2), 0);
  EXPECT_LT(sp.st_blocks * 512, 1 << 20);
  EXPECT_GE(fu.st_blocks * 512, 60 << 20);
  EXPECT_LT(q2.st_size, 1 << 20);
  // Zero data inside an allocated range is not written either.
  MustSh("qemu-io -f raw -c 'write -P 0 0 8M' s.raw >/dev/null");
  Ok(V("convert -O qcow2 s.raw z.qcow2"));
  nlohmann::json map = Json(Q("map --output=json z.qcow2"));
  for (const auto& e : map)
    if (e["data"] == true) {
      EXPECT_EQ(e["start"], 32 << 20) << e.dump();
    }
}

TEST_F(CliConvertTest, BackingTargetKeepsOnlyTheTopLayer) {
  MakeSources();
  Ok(V("convert -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 thin.qcow2"));
  EXPECT_EQ(Q("compare src.qcow2 thin.qcow2").exit_code, 0);
  EXPECT_EQ(Q("check thin.qcow2").exit_code, 0);
  nlohmann::json info = Json(Q("info --output=json thin.qcow2"));
  EXPECT_EQ(info["backing-filename"], "base.qcow2");
  // Only the top layer's clusters are allocated in the thin copy.
  nlohmann::json vmap = Json(Q("map --output=json thin.qcow2"));
  nlohmann::json smap = Json(Q("map --output=json src.qcow2"));
  auto depth0 = [](const nlohmann::json& m) {
    uint64_t n = 0;
    for (const auto& e : m)
      if (e["depth"] == 0 && e["present"] == true) n += e["length"].get<uint64_t>();
    return n;
  };
  EXPECT_EQ(depth0(vmap), depth0(smap));
  // -B without -F is refused, as by qemu-img.
  EXPECT_EQ(V("convert -O qcow2 -B base.qcow2 src.qcow2 x.qcow2").exit_code, 1);
}

TEST_F(CliConvertTest, ConcatenatesSourcesLikeQemu) {
  MakeSources();
  Ok(V("convert -O qcow2 src.raw src.vdi src.qcow2 cat.qcow2"));
  Ok(Q("convert -O raw src.raw src.vdi src.qcow2 qcat.raw"));
  EXPECT_EQ(Q("compare cat.qcow2 qcat.raw").exit_code, 0);
  nlohmann::json info = Json(Q("info --output=json cat.qcow2"));
  EXPECT_EQ(info["virtual-size"], 24 << 20);
}

TEST_F(CliConvertTest, ExistingTargetAndSnapshot) {
  MakeSources();
  MustSh("qemu-img create -q -f qcow2 existing.qcow2 8M");
  MustSh("qemu-io -c 'write -P 0x99 0 8M' existing.qcow2 >/dev/null");
  Ok(V("convert -n -O qcow2 src.vdi existing.qcow2"));
  EXPECT_EQ(Q("compare src.vdi existing.qcow2").exit_code, 0);
  EXPECT_EQ(Q("check existing.qcow2").exit_code, 0);
  EXPECT_EQ(V("convert --target-is-zero -O qcow2 src.vdi x.qcow2").exit_code, 1);

  MustSh("qemu-img create -q -f qcow2 snap.qcow2 8M");
  Fill("qcow2", "snap.qcow2");
  MustSh("qemu-img snapshot -c s1 snap.qcow2");
  MustSh("qemu-io -c 'write -P 0x12 0 1M' snap.qcow2 >/dev/null");
  Ok(V("convert -l snapshot.name=s1 -O raw snap.qcow2 v.raw"));
  Ok(Q("convert -l snapshot.name=s1 -O raw snap.qcow2 q.raw"));
  EXPECT_EQ(Q("compare v.raw q.raw").exit_code, 0);
  EXPECT_NE(Q("compare v.raw snap.qcow2").exit_code, 0);
}

// -m sets how far reads run ahead of writes; -t/-T take qemu's cache modes. Every
// setting gives the same output, and bad values are refused with qemu-img's words.
TEST_F(CliConvertTest, RequestsInFlightAndCacheModes) {
  MakeSources();
  for (const std::string& args : {std::string("-m 1"), std::string("-m 16 -W"),
                                  std::string("-t writeback -T none"), std::string("-t none")}) {
    SCOPED_TRACE(args);
    ConvertAndJudge("src.qcow2", "qcow2", "-O qcow2 " + args, "m.qcow2", "qcow2");
    ConvertAndJudge("src.vdi", "vdi", "-O raw " + args, "m.raw", "raw");
  }
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"-m 0", "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"},
      {"-m 17", "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"},
      {"-m x", "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"},
      {"-t foo", "Invalid cache option: foo"},
      {"-T foo", "Invalid source cache option: foo"},
  };
  for (const auto& [args, msg] : bad) {
    SCOPED_TRACE(args);
    CommandResult v = V("convert " + args + " -O qcow2 src.raw bad.qcow2");
    CommandResult q = Q("convert " + args + " -O qcow2 src.raw bad.qcow2");
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_EQ(q.exit_code, 1);
    EXPECT_EQ(v.err, "vimgfs: " + msg + "\n");
    EXPECT_EQ(q.err, "qemu-img: " + msg + "\n");
  }
}

TEST_F(CliConvertTest, Errors) {
  CommandResult r = V("convert -O qcow2 missing.qcow2 out.qcow2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err,
            "vimgfs: Could not open 'missing.qcow2': Could not open 'missing.qcow2': No such file or "
            "directory\n");  // as qemu-img words it
  MustSh("qemu-img create -q -f raw r.raw 1M");
  r = V("convert -c -O raw r.raw out.raw");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("Compression not supported"), std::string::npos);
  r = V("convert -O nosuch r.raw out.img");
  EXPECT_EQ(r.exit_code, 1);
  r = V("convert -O qcow2 -o help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("compression_type"), std::string::npos);
}

// -C: raw into raw is copied by the kernel (copy_file_range), holes kept as holes; into an
// existing image (-n) the holes are punched; other formats copy as usual. The bytes equal
// the source's and qemu-img's -C output either way.
TEST_F(CliConvertTest, CopyOffloadingCopiesRawIntoRawInTheKernel) {
  MustSh(
      "truncate -s 64M s.raw && head -c 3M /dev/urandom | dd of=s.raw bs=1M seek=5 conv=notrunc status=none "
      "&& "
      "head -c 1M /dev/urandom | dd of=s.raw bs=1M seek=40 conv=notrunc status=none");
  MustSh(Quote(VimgfsBinary()) +
         " convert -C -f raw -O raw s.raw v.raw && qemu-img convert -C -f raw -O raw "
         "s.raw q.raw && cmp s.raw v.raw && cmp s.raw q.raw");
  EXPECT_LT(std::stoull(Sh("du -k v.raw | cut -f1").out), 8192u) << "the holes stay holes";
  MustSh("head -c 64M /dev/urandom > n.raw && " + Quote(VimgfsBinary()) +
         " convert -C -n -f raw -O raw s.raw n.raw && cmp s.raw n.raw");
  EXPECT_LT(std::stoull(Sh("du -k n.raw | cut -f1").out), 8192u) << "the target's old data punched out";
  MustSh(Quote(VimgfsBinary()) +
         " convert -C -f raw -O qcow2 s.raw v.qcow2 && qemu-img compare -f raw s.raw v.qcow2");
  if (!HaveProgram("strace"))
    GTEST_SKIP() << "strace not installed: whether the kernel copied is not checked";
  if (Sh("strace -o /dev/null true").exit_code != 0)
    GTEST_SKIP() << "strace cannot trace here (no ptrace): whether the kernel copied is not checked";
  auto traced = Sh("strace -f -e trace=copy_file_range " + Quote(VimgfsBinary()) +
                   " convert -C -f raw -O raw s.raw t.raw 2>&1 >/dev/null | grep -c '^.*copy_file_range(' ");
  EXPECT_GE(std::stoi(traced.out), 2) << "one call per data run at least";
  auto plain = Sh("strace -f -e trace=copy_file_range " + Quote(VimgfsBinary()) +
                  " convert -f raw -O raw s.raw u.raw 2>&1 >/dev/null | grep -c 'copy_file_range(' || true");
  EXPECT_EQ(std::stoi(plain.out), 0) << "without -C the pipeline copies";
}

// -C from a chain into raw: the data clusters of a qcow2 and of its raw backing file go by
// copy_file_range from their host offsets (qemu offloads them too); zero clusters stay holes;
// a compressed cluster is read and written as usual. Equal to qemu-img's -C output.
TEST_F(CliConvertTest, CopyOffloadingCopiesDataClustersOfAChain) {
  MustSh(
      "truncate -s 16M base.raw && head -c 2M /dev/urandom | dd of=base.raw bs=1M seek=8 conv=notrunc "
      "status=none");
  MustSh(
      "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 && "
      "qemu-io -c 'write -P 0x21 0 1M' -c 'write -z 8M 512k' -c 'write -c -P 0x22 12M 64k' top.qcow2 "
      ">/dev/null");
  MustSh(Quote(VimgfsBinary()) + " convert -C -O raw top.qcow2 v.raw");
  MustSh("qemu-img convert -C -O raw top.qcow2 q.raw && cmp v.raw q.raw");
  if (!HaveProgram("strace") || Sh("strace -o /dev/null true").exit_code != 0)
    GTEST_SKIP() << "strace cannot trace here: whether the kernel copied is not checked";
  auto traced = Sh("strace -f -e trace=copy_file_range " + Quote(VimgfsBinary()) +
                   " convert -C -O raw top.qcow2 t.raw 2>&1 >/dev/null | grep -c 'copy_file_range(' ");
  EXPECT_GE(std::stoi(traced.out), 2) << "the qcow2's data and the backing file's, by the kernel";
  MustSh("cmp t.raw q.raw");
}

// -t none and directsync write the target around the host's page cache (O_DIRECT, qemu's
// cache.direct=on) and -T none reads the source so: the bytes are the same (qemu-img
// compares and checks them), and the host's cache keeps little of either file, where the
// default keeps the whole output.
TEST_F(CliConvertTest, CacheNoneGoesAroundTheHostPageCache) {
  if (std::string why = PageCacheBypassUnavailableReason(dir_.path()); !why.empty()) GTEST_SKIP() << why;
  MustSh(
      "qemu-img create -q -f qcow2 s.qcow2 64M && "
      "qemu-io -c 'write -P 0x3c 0 40M' -c 'write -P 0x11 50M 1k' s.qcow2 >/dev/null");
  constexpr uint64_t kLittle = 4 << 20;  // metadata and unaligned tails go through the cache
  for (const auto& [fmt, mode] : std::vector<std::pair<std::string, std::string>>{
           {"qcow2", "none"}, {"raw", "none"}, {"vmdk", "directsync"}, {"vdi", "none"}}) {
    SCOPED_TRACE(fmt + " -t " + mode);
    const std::string out = "o." + fmt;
    DropCachedPages(dir_.File("s.qcow2"));
    Ok(V("convert -t " + mode + " -T none -O " + fmt + " s.qcow2 " + out));
    EXPECT_LE(CachedBytes(dir_.File("s.qcow2")), kLittle) << "the source was read through the cache";
    EXPECT_LE(CachedBytes(dir_.File(out)), kLittle) << "the output was written through the cache";
    Ok(Q("compare -f qcow2 -F " + fmt + " s.qcow2 " + out));
    if (fmt != "raw") Ok(Q("check -f " + fmt + " " + out));
  }
  // The same asked for in an image spec, as qemu takes it (cache.direct, file.cache.direct).
  for (const char* key : {"cache.direct", "file.cache.direct"}) {
    DropCachedPages(dir_.File("s.qcow2"));
    Ok(V(std::string("convert -O raw --image-opts driver=qcow2,file.filename=s.qcow2,") + key +
         "=on spec.raw"));
    EXPECT_LE(CachedBytes(dir_.File("s.qcow2")), kLittle) << key << "=on read the source through the cache";
    Ok(Q("compare -f qcow2 -F raw s.qcow2 spec.raw"));
  }
  Ok(V("convert -O raw s.qcow2 cached.raw"));
  EXPECT_GE(CachedBytes(dir_.File("cached.raw")), 20u << 20) << "without -t none the output is cached";
  EXPECT_GE(CachedBytes(dir_.File("s.qcow2")), 20u << 20) << "without -T none the source is cached";
  CommandResult bad = V("convert -t bogus -O raw s.qcow2 x.raw");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("Invalid cache option: bogus"), std::string::npos) << bad.err;
}

class CliConvertProgressTest : public CliTwinTest {};

// -p prints qemu-img's figure even into a pipe: 0 first, then each time the share of the
// data copied so far (in qemu's pieces: runs of at most 2 MiB, or clusters when
// compressing) moved by more than one point, 100 twice and a newline.
TEST_F(CliConvertProgressTest, ProgressLinesAsQemuImgPrintsThem) {
  InBoth(
      "qemu-img create -q -f qcow2 t.qcow2 128M && qemu-io -c 'write 0 1M' -c 'write 2M 1M' "
      "-c 'write 4M 1M' -c 'write 32M 1M' -c 'write 50M 7M' -c 'write -z 60M 1M' "
      "-c 'write 70M 100k' t.qcow2 >/dev/null");
  InBoth("qemu-img convert -O raw t.qcow2 t.raw");
  InBoth(
      "qemu-img create -q -f qcow2 -b t.qcow2 -F qcow2 top.qcow2 && "
      "qemu-io -c 'write 1M 3M' top.qcow2 >/dev/null");
  for (const std::string args :
       {"-p -O qcow2 t.qcow2", "-p -O raw t.qcow2", "-p -c -O qcow2 t.qcow2", "-p -S 0 -O raw t.qcow2",
        "-p -O vmdk -o subformat=streamOptimized t.qcow2", "-p -q -O raw t.qcow2", "-p -O qcow2 t.raw",
        "-p -O qcow2 t.qcow2 t.raw", "-p -O qcow2 top.qcow2", "-p -O qcow2 -B t.qcow2 -F qcow2 top.qcow2",
        "-p -c -O qcow2 top.qcow2", "-p -O raw nosuch.qcow2"}) {
    ExpectSame("convert " + args + " out.img");
    MustSh("rm -f q/out.img v/out.img");
  }
}

}  // namespace
}  // namespace vimgfs::test

namespace vimgfs::test {
namespace {

// The lines of an error stream, sorted, with the program's name made qemu-img's: the
// same warnings, whatever order the reader and the writer interleave them in.
std::vector<std::string> SortedWarnings(const std::string& err, const std::string& program) {
  std::vector<std::string> lines;
  for (size_t pos = 0; pos < err.size();) {
    size_t nl = err.find('\n', pos);
    std::string line = err.substr(pos, nl - pos);
    if (line.rfind(program + ": ", 0) == 0) line = "qemu-img: " + line.substr(program.size() + 2);
    if (line.rfind("qemu-img: warning: ", 0) == 0) lines.push_back(line);
    pos = nl == std::string::npos ? err.size() : nl + 1;
  }
  std::sort(lines.begin(), lines.end());
  return lines;
}

// --salvage on a qcow2 image with an L2 entry qemu calls corrupt (an unaligned cluster):
// without it both refuse; with it both write zeros for each sector given up, warn for
// each, and produce the same disk.
TEST_F(CliConvertTest, SalvageGoesOnPastBadClustersAsQemu) {
  MustSh(
      "qemu-img create -q -f qcow2 -o cluster_size=4096 c.qcow2 64k && "
      "qemu-io -c 'write -P 5 0 64k' c.qcow2 >/dev/null");
  MustSh(
      "python3 -c \"import struct;f=open('c.qcow2','r+b');f.seek(40);l1=struct.unpack('>Q',f.read(8))[0];"
      "f.seek(l1);l2=struct.unpack('>Q',f.read(8))[0]&0x00fffffffffffe00;f.seek(l2+16);"
      "f.write(struct.pack('>Q',(1<<63)|0x5200))\"");
  EXPECT_EQ(V("convert -O raw c.qcow2 v0.raw").exit_code, 1);
  EXPECT_EQ(Q("convert -O raw c.qcow2 q0.raw").exit_code, 1);
  CommandResult v = V("convert --salvage -O raw c.qcow2 v.raw");
  CommandResult q = Q("convert --salvage -O raw c.qcow2 q.raw");
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(q.exit_code, 0) << q.err;
  EXPECT_EQ(SortedWarnings(v.err, "vimgfs"), SortedWarnings(q.err, "qemu-img"));
  EXPECT_EQ(SortedWarnings(v.err, "vimgfs").size(), 24u);  // 8 sectors: status twice, read once
  EXPECT_EQ(Sh("cmp v.raw q.raw").exit_code, 0);
  CommandResult quiet = V("convert -q --salvage -O raw c.qcow2 vq.raw");
  EXPECT_EQ(quiet.exit_code, 0);
  EXPECT_EQ(quiet.err, "");
}

// -r holds the writer to the rate: 3 MiB at 1 MiB/s take at least two seconds, and the
// copy is whole; commit takes it too.
TEST_F(CliConvertTest, RateLimit) {
  MustSh("qemu-img create -q -f qcow2 s.qcow2 4M && qemu-io -c 'write -P 3 0 3M' s.qcow2 >/dev/null");
  const auto start = std::chrono::steady_clock::now();
  CommandResult v = V("convert -r 1M -O qcow2 s.qcow2 out.qcow2");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_GE(secs, 2.0);
  EXPECT_EQ(Q("compare s.qcow2 out.qcow2").exit_code, 0);
  CommandResult bad = V("convert -r 1x -O qcow2 s.qcow2 out2.qcow2");
  CommandResult qbad = Q("convert -r 1x -O qcow2 s.qcow2 out2.qcow2");
  EXPECT_EQ(bad.exit_code, qbad.exit_code);
  MustSh(
      "qemu-img create -q -f qcow2 -b s.qcow2 -F qcow2 top.qcow2 && qemu-io -c 'write -P 4 0 1M' top.qcow2 "
      ">/dev/null");
  CommandResult c = V("commit -r 4M top.qcow2");
  EXPECT_EQ(c.exit_code, 0) << c.err;
  CommandResult r = Io("-c 'read -P 4 0 1M' -c 'read -P 3 1M 2M' s.qcow2");
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace vimgfs::test

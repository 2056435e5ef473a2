// `vimgfs create` and `vimgfs info` against qemu-img on the same images.
#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliInfoTest : public CliTest {
 protected:
  // An image of each format with some data, made by qemu.
  void MakeImage(const std::string& fmt, const std::string& name, const std::string& opts = "") {
    MustSh("qemu-img create -q -f " + fmt + (opts.empty() ? "" : " -o " + opts) + " " + name + " 64M");
    MustSh("qemu-io -f " + fmt + " -c 'write -P 0x11 0 192k' -c 'write -P 0x22 8M 64k' " + name +
           " >/dev/null");
  }
  void ExpectSameInfo(const std::string& args) {
    CommandResult v = V("info " + args), q = Q("info " + args);
    EXPECT_EQ(v.exit_code, q.exit_code) << v.err;
    EXPECT_EQ(v.out, q.out) << "vimgfs info " << args;
  }
};

TEST_F(CliInfoTest, JsonMatchesQemuForEveryFormat) {
  struct Case {
    std::string fmt, name, opts;
  };
  for (const Case& c :
       {Case{"qcow2", "a.qcow2", ""}, Case{"qcow2", "v2.qcow2", "compat=0.10"},
        Case{"qcow2", "z.qcow2", "compression_type=zstd,cluster_size=4096"},
        // qemu-img counts only the qcow2 file in the disk size, not the data file
        Case{"qcow2", "d.qcow2", "data_file=d.data,data_file_raw=on"},
        Case{"qcow2", "l.qcow2", "lazy_refcounts=on,extended_l2=on"}, Case{"vmdk", "a.vmdk", ""},
        // ... but every extent of a VMDK
        Case{"vmdk", "s.vmdk", "subformat=twoGbMaxExtentSparse"}, Case{"vdi", "a.vdi", ""},
        Case{"raw", "a.raw", ""}}) {
    SCOPED_TRACE(c.name);
    MakeImage(c.fmt, c.name, c.opts);
    if (c.name == "l.qcow2") MustSh("qemu-img bitmap --add -g 128k --disable l.qcow2 b0");
    nlohmann::json v = Json(V("info --output=json " + c.name));
    nlohmann::json q = Json(Q("info --output=json " + c.name));
    for (const char* key : {"virtual-size", "format", "filename", "cluster-size", "dirty-flag",
                            "format-specific", "actual-size"})
      EXPECT_EQ(v[key], q[key]) << key;
    EXPECT_EQ(v, q);
    // The human layout too, byte for byte.
    ExpectSameInfo(c.name);
    ExpectSameInfo("-f " + c.fmt + " --output=json " + c.name);
  }
}

TEST_F(CliInfoTest, BackingFileAndChain) {
  MakeImage("qcow2", "base.qcow2");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
  MustSh("qemu-io -c 'write -P 0x33 1M 64k' top.qcow2 >/dev/null");
  nlohmann::json v = Json(V("info --output=json top.qcow2"));
  EXPECT_EQ(v["backing-filename"], "base.qcow2");
  EXPECT_EQ(v["backing-filename-format"], "qcow2");
  EXPECT_EQ(v["full-backing-filename"], "base.qcow2");
  ExpectSameInfo("top.qcow2");
  ExpectSameInfo("--output=json top.qcow2");
  ExpectSameInfo("--backing-chain top.qcow2");
  ExpectSameInfo("--backing-chain --output=json top.qcow2");
  // An absolute image path gives an "actual path" for the relative backing name.
  ExpectSameInfo(F("top.qcow2"));
}

TEST_F(CliInfoTest, InfoDoesNotOpenTheBackingFile) {
  MustSh("qemu-img create -q -f qcow2 -u -b missing.qcow2 -F qcow2 top.qcow2 16M");
  CommandResult v = V("info top.qcow2");
  ASSERT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.out.find("backing file: missing.qcow2\n"), std::string::npos) << v.out;
  ExpectSameInfo("top.qcow2");
  // --untrusted still names the reference without opening it.
  v = V("info --untrusted top.qcow2");
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.out.find("missing.qcow2"), std::string::npos);
  // --backing-chain must open it and fails naming the file.
  v = V("info --backing-chain top.qcow2");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_NE(v.err.find("missing.qcow2"), std::string::npos) << v.err;
}

TEST_F(CliInfoTest, SnapshotTable) {
  MakeImage("qcow2", "s.qcow2");
  MustSh("qemu-img snapshot -c first s.qcow2 && qemu-img snapshot -c second s.qcow2");
  ExpectSameInfo("s.qcow2");
  ExpectSameInfo("--output=json s.qcow2");
  CommandResult v = V("snapshot -l s.qcow2"), q = Q("snapshot -l s.qcow2");
  EXPECT_EQ(v.out, q.out);
}

// qemu-iotests 043: a chain that loops names the image that repeats, in qemu-img's words.
TEST_F(CliInfoTest, BackingChainLoopIsNamedAsQemuImgNamesIt) {
  MustSh("qemu-img create -q -f qcow2 self.qcow2 1M && qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2");
  MustSh(
      "qemu-img create -q -f qcow2 b1.qcow2 1M && qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 b2.qcow2"
      " && qemu-img create -q -f qcow2 -b b2.qcow2 -F qcow2 t.qcow2"
      " && qemu-img rebase -u -b b2.qcow2 -F qcow2 b1.qcow2");
  for (const char* args :
       {"--backing-chain self.qcow2", "--backing-chain t.qcow2", "--backing-chain --output=json t.qcow2"}) {
    SCOPED_TRACE(args);
    CommandResult v = V(std::string("info ") + args), q = Q(std::string("info ") + args);
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_EQ(v.exit_code, q.exit_code);
    ASSERT_EQ(q.err.rfind("qemu-img: ", 0), 0u) << q.err;
    EXPECT_EQ(v.err, "vimgfs: " + q.err.substr(10));
  }
}

TEST_F(CliInfoTest, ErrorsNameTheFile) {
  CommandResult v = V("info nonexistent.qcow2");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_EQ(v.err,
            "vimgfs: Could not open 'nonexistent.qcow2': Could not open 'nonexistent.qcow2': No such file or "
            "directory\n");  // as qemu-img words it
  MakeImage("raw", "r.raw");
  v = V("info -f qcow2 r.raw");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_NE(v.err.find("'r.raw'"), std::string::npos) << v.err;
  v = V("info --output=xml r.raw");
  EXPECT_EQ(v.exit_code, 1);
}

TEST_F(CliInfoTest, CreateFormattingLineMatchesQemu) {
  MustSh("mkdir q v");
  const std::vector<std::string> cases = {
      "-f qcow2 x.qcow2 1G",
      "-f qcow2 -o cluster_size=4k,lazy_refcounts=on x.qcow2 10M",
      "-f qcow2 -o compat=0.10 x.qcow2 10M",
      "-f qcow2 -o compression_type=zstd,extended_l2=on x.qcow2 10M",
      "-f qcow2 -o preallocation=metadata x.qcow2 10M",
      "-f raw x.raw 10M",
      "x.img 3M",
      "-f vmdk x.vmdk 100M",
      "-f vmdk -o subformat=streamOptimized x.vmdk 100M",
      "-f vmdk -o subformat=monolithicFlat,adapter_type=lsilogic x.vmdk 10M",
      "-f vmdk -o subformat=twoGbMaxExtentSparse x.vmdk 10M",
      "-f vdi x.vdi 100M",
      "-f vdi -o static=on x.vdi 10M",
  };
  for (const std::string& c : cases) {
    SCOPED_TRACE(c);
    CommandResult v = Sh("cd v && " + Quote(VimgfsBinary()) + " create " + c);
    CommandResult q = Sh("cd q && qemu-img create " + c);
    ASSERT_EQ(v.exit_code, 0) << v.err;
    EXPECT_EQ(v.out, q.out);
    // The image vimgfs made is what qemu would have made: same info and a clean check.
    std::string name = c.substr(0, c.rfind(' '));
    name = name.substr(name.rfind(' ') + 1);
    nlohmann::json vi = Json(Q("info --output=json v/" + name));
    nlohmann::json qi = Json(Q("info --output=json q/" + name));
    EXPECT_EQ(vi["format"], qi["format"]);
    EXPECT_EQ(vi["virtual-size"], qi["virtual-size"]);
    EXPECT_EQ(vi["cluster-size"], qi["cluster-size"]);
    if (qi.contains("format-specific") && qi["format"] == "qcow2") {
      EXPECT_EQ(vi["format-specific"], qi["format-specific"]);
    }
    CommandResult chk = Q("check v/" + name);
    EXPECT_TRUE(chk.exit_code == 0 || chk.exit_code == 63) << chk.out << chk.err;
    MustSh("rm -f v/* q/*");
  }
}

TEST_F(CliInfoTest, CreateWithBackingAndErrors) {
  MakeImage("qcow2", "base.qcow2");
  CommandResult v = V("create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
  CommandResult q = Q("create -f qcow2 -b base.qcow2 -F qcow2 qtop.qcow2");
  ASSERT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(v.out.substr(v.out.find(',')), q.out.substr(q.out.find(',')));
  nlohmann::json j = Json(Q("info --output=json top.qcow2"));
  EXPECT_EQ(j["backing-filename"], "base.qcow2");
  EXPECT_EQ(j["virtual-size"], 64 << 20);
  EXPECT_EQ(Q("compare base.qcow2 top.qcow2").exit_code, 0);

  // Errors: one line naming the file, exit 1, as qemu-img.
  for (const std::string& bad :
       {std::string("-f qcow2 -o foo=bar e.qcow2 1M"), std::string("-f qcow2 e.qcow2"),
        std::string("-f nosuchfmt e.img 1M"), std::string("-f qcow2 e.qcow2 12Q"),
        std::string("-f qcow2 -b missing.qcow2 -F qcow2 e.qcow2"),
        std::string("-f qcow2 -b base.qcow2 e.qcow2")}) {
    SCOPED_TRACE(bad);
    CommandResult e = V("create " + bad);
    CommandResult eq = Q("create " + bad);
    EXPECT_EQ(e.exit_code, 1);
    EXPECT_EQ(eq.exit_code, 1);
    EXPECT_EQ(e.err.rfind("vimgfs: ", 0), 0u) << e.err;
  }
  v = V("create -q -f qcow2 quiet.qcow2 1M");
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_EQ(v.out, "");
  v = V("create -f qcow2 -o help");
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_NE(v.out.find("cluster_size=<size>"), std::string::npos) << v.out;
  EXPECT_NE(v.out.find("compression_type="), std::string::npos);
}

}  // namespace
}  // namespace vimgfs::test

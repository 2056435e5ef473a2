// json: image names and --image-opts lists, beside qemu-img: the same output, messages and
// exit codes for the forms scripts use (a format over the file protocol, backing: null,
// tuning options), and the same refusals.
#include <string>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliImageSpecTest : public CliTwinTest {
 protected:
  void SetUp() override {
    CliTwinTest::SetUp();
    if (IsSkipped()) return;
    InBoth("qemu-img create -q -f qcow2 b.qcow2 1M && qemu-io -c 'write -P 5 0 64k' b.qcow2 >/dev/null");
    InBoth(
        "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2 && qemu-io -c 'write -P 6 512k 64k' "
        "t.qcow2 >/dev/null");
  }
};

TEST_F(CliImageSpecTest, JsonNamesReadAsQemu) {
  const std::string t = R"('json:{"driver": "qcow2", "file": {"driver": "file", "filename": "t.qcow2"}}')";
  const std::string flat = R"('json:{"driver": "qcow2", "file.filename": "t.qcow2", "cache-size": 1048576}')";
  const std::string no_backing =
      R"('json:{"driver": "qcow2", "backing": null, "file": {"driver": "file", "filename": "t.qcow2"}}')";
  const std::string quoted =
      R"("json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 't.qcow2'}}")";
  for (const std::string& name : {t, flat, no_backing, quoted}) {
    ExpectSameOnOneCopy("map --output=json " + name);
    ExpectSame("check " + name);
    ExpectSame("compare " + name + " t.qcow2");
    ExpectSameOnOneCopy("measure -O qcow2 " + name);
  }
  ExpectSame("info " + t + " | head -3");
  ExpectSame("convert -O raw " + no_backing + " out.raw && qemu-img compare -f raw out.raw b.qcow2; echo $?");
  // A json: backing name typed for create is opened (its size) and stored as typed; vimgfs
  // then refuses to follow it from inside the image, qemu follows it.
  EXPECT_TRUE(ExpectSame("create -f qcow2 -F qcow2 -b " + t + " j.qcow2"));
  EXPECT_TRUE(ExpectSame("info j.qcow2"));
  auto chain = Sh("cd v && ../bin/qemu-img info --backing-chain j.qcow2");
  EXPECT_NE(chain.exit_code, 0);
  EXPECT_NE(chain.err.find("refusing to follow 'json:"), std::string::npos) << chain.err;
}

TEST_F(CliImageSpecTest, ImageOptsListsReadAsQemu) {
  for (const char* opts :
       {"driver=qcow2,file.filename=t.qcow2", "driver=qcow2,file.driver=file,file.filename=t.qcow2",
        "driver=qcow2,file.filename=t.qcow2,lazy-refcounts=off,l2-cache-size=65536",
        "driver=raw,file.filename=b.qcow2", "driver=qcow2,file.filename=t.qcow2,file.locking=off"}) {
    ExpectSameOnOneCopy(std::string("map --output=json --image-opts ") + opts);
    ExpectSame(std::string("compare --image-opts ") + opts + " " + opts);
    ExpectSame(std::string("info --image-opts ") + opts + " | head -2");
  }
  ExpectSame("check --image-opts driver=qcow2,file.filename=t.qcow2");
  // The file protocol alone: qemu-img info names it as the format ("file").
  ExpectSame("info --output=json --image-opts driver=file,filename=b.qcow2 | grep -v actual-size");
  ExpectSame(R"(info 'json:{"driver": "file", "filename": "b.qcow2"}' | head -2)");
  // convert's target as a list: only into an existing image (-n), its driver its own.
  InBoth("qemu-img create -q -f qcow2 o.qcow2 1M");
  ExpectSame(
      "convert -n --target-image-opts t.qcow2 driver=qcow2,file.filename=o.qcow2 && "
      "qemu-img compare t.qcow2 o.qcow2");
  InBoth("qemu-img create -q -f qcow2 c.qcow2 1M");
  ExpectSame(
      "convert -n -c --target-image-opts t.qcow2 driver=qcow2,file.filename=c.qcow2 && "
      "qemu-img compare t.qcow2 c.qcow2");
  ExpectSame("convert --target-image-opts t.qcow2 driver=qcow2,file.filename=o.qcow2");
  ExpectSame("convert -n -O qcow2 --target-image-opts t.qcow2 driver=qcow2,file.filename=o.qcow2");
  ExpectSame("snapshot -l --image-opts driver=qcow2,file.filename=t.qcow2");
}

TEST_F(CliImageSpecTest, BadSpecsFailAsQemu) {
  ExpectSame("info --image-opts -f qcow2 driver=qcow2,file.filename=t.qcow2");
  ExpectSame(
      R"(info 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "t.qcow2"}, "foo": 1}')");
  ExpectSame("info --image-opts driver=qcow2,file.filename=t.qcow2,nosuch=1");
  ExpectSame("info --image-opts driver=qcow2,file.filename=missing.qcow2");
  ExpectSame("info -U --image-opts driver=qcow2,file.filename=t.qcow2,force-share=off");
  // qemu's JSON parser words its errors its own way: the failure and the exit code match.
  CommandResult v = V(R"(info 'json:{"driver": "qcow2"')");
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_NE(v.err.find("Could not parse the JSON options"), std::string::npos) << v.err;
  // The user's own command line only: nesting deep enough to exhaust a recursive parser is
  // refused, not followed.
  std::string deep = "'json:{\"driver\": \"qcow2\", \"x\": " + std::string(100000, '[') + "}'";
  v = V("info " + deep);
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_NE(v.err.find("nested too deeply"), std::string::npos) << v.err.substr(0, 300);
}

}  // namespace
}  // namespace vimgfs::test

namespace vimgfs::test {
namespace {

// An encrypted overlay over an encrypted base, each with its own passphrase: backing.*
// gives the base's driver, file and key (qemu's iotest 198). Read, compare, info (its
// json: name) and commit as qemu-img; the committed base reads back in qemu.
TEST_F(CliImageSpecTest, BackingOptionsOpenAnEncryptedChainAsQemu) {
  const std::string secrets = "--object secret,id=s0,data=base --object secret,id=s1,data=layer ";
  // Made once by qemu-img for both folders (its PBKDF2 timing may need retries).
  for (const std::string& line :
       {"qemu-img create -q -f qcow2 " + secrets +
            "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 b.qcow2 1M",
        "qemu-img create -q -f qcow2 " + secrets +
            "-o encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10 -b b.qcow2 -F qcow2 "
            "t.qcow2"}) {
    CommandResult made = ShQemu(line);
    ASSERT_EQ(made.exit_code, 0) << made.err;
  }
  InBoth("cp ../b.qcow2 ../t.qcow2 .");
  const std::string base = "driver=qcow2,file.filename=b.qcow2,encrypt.key-secret=s0";
  const std::string chain =
      "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s1,backing.driver=qcow2,"
      "backing.file.filename=b.qcow2,backing.encrypt.key-secret=s0";
  InBoth("qemu-io " + secrets + "-c 'write -P 1 0 1M' --image-opts " + base + " >/dev/null");
  InBoth("qemu-io " + secrets + "-c 'write -P 2 64k 64k' --image-opts " + chain + " >/dev/null");
  EXPECT_TRUE(ExpectSame("info " + secrets + "--image-opts " + base + " | head -2"));
  EXPECT_TRUE(ExpectSame("compare " + secrets + "--image-opts " + chain + " " + chain));
  EXPECT_TRUE(
      ExpectSame("convert " + secrets + "--image-opts " + chain + " -O raw out.raw && md5sum out.raw"));
  EXPECT_TRUE(ExpectSame("commit " + secrets + "--image-opts " + chain));
  CommandResult r = Sh("qemu-io " + secrets +
                       "-c 'read -P 1 0 64k' -c 'read -P 2 64k 64k' -c 'read -P 1 128k 896k' "
                       "--image-opts driver=qcow2,file.filename=v/b.qcow2,encrypt.key-secret=s0");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  EXPECT_EQ(Sh("qemu-img check " + secrets +
               "--image-opts driver=qcow2,file.filename=v/b.qcow2,"
               "encrypt.key-secret=s0")
                .exit_code,
            0);
}

}  // namespace
}  // namespace vimgfs::test

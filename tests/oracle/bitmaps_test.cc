// qcow2 persistent dirty bitmaps: through vimgfs's writes, the bitmap command and convert
// --bitmaps, twin images handled alike by vimgfs and by qemu-img must end with the same
// bitmaps (names, flags, and the dirty areas qemu-nbd reports for each), check clean, and
// inconsistent bitmaps stay so; errors are qemu-img's lines and exit codes.
#include <regex>

#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class BitmapsTest : public CliTwinTest {
 protected:
  // The dirty areas of `bitmap` in dir/name, as qemu-nbd serves them (x-dirty-bitmap: the
  // dirty runs are the ones block status reports as holes). The server is gone, its lock
  // released, before this returns.
  std::string DirtyMap(const std::string& dir, const std::string& name, const std::string& bitmap) {
    const std::string sock = F(dir + ".sock");
    CommandResult r =
        Sh("rm -f " + sock + " && (qemu-nbd -r -f qcow2 -B " + bitmap + " -k " + sock + " -t " + dir + "/" +
           name + " & echo $! > " + dir + ".pid) && for i in $(seq 50); do [ -S " + sock +
           " ] && break; sleep 0.1; done && qemu-img map --output=json --image-opts "
           "driver=nbd,server.type=unix,server.path=" +
           sock + ",x-dirty-bitmap=qemu:dirty-bitmap:" + bitmap + "; kill $(cat " + dir +
           ".pid); for i in $(seq 200); do kill -0 $(cat " + dir +
           ".pid) 2>/dev/null || break; sleep 0.05; done");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  nlohmann::json Bitmaps(const std::string& dir, const std::string& name) {
    CommandResult r = Sh("qemu-img info --output=json " + dir + "/" + name);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    return j["format-specific"]["data"]["bitmaps"];
  }
  void ExpectSameBitmaps(const std::string& name, const std::vector<std::string>& bitmaps) {
    EXPECT_EQ(Bitmaps("v", name), Bitmaps("q", name));
    for (const std::string& b : bitmaps) {
      SCOPED_TRACE(b);
      EXPECT_EQ(DirtyMap("v", name, b), DirtyMap("q", name, b));
    }
    CommandResult c = Sh("qemu-img check v/" + name);
    EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
  }
};

TEST_F(BitmapsTest, WritesAreRecordedAsInQemu) {
  InBoth(
      "qemu-img create -q -f qcow2 d.qcow2 8M && qemu-img bitmap --add d.qcow2 b0 && "
      "qemu-img bitmap --add -g 1M --disable d.qcow2 off && qemu-img bitmap --add -g 4k d.qcow2 fine");
  MustSh(
      "qemu-img create -q -f raw s1.raw 8M && qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 5M 700' "
      "s1.raw >/dev/null");
  MustSh("qemu-img create -q -f raw s2.raw 8M && qemu-io -f raw -c 'write -P 3 2M 100k' s2.raw >/dev/null");
  // Two opens, each adding to what the last one stored.
  for (const char* src : {"s1.raw", "s2.raw"}) {
    EXPECT_TRUE(
        ExpectSame(std::string("convert -n --target-is-zero -f raw -O qcow2 ../") + src + " d.qcow2"));
  }
  ExpectSameBitmaps("d.qcow2", {"b0", "off", "fine"});
  const std::string b0 = DirtyMap("v", "d.qcow2", "b0");
  EXPECT_EQ(nlohmann::json::parse(b0, nullptr, false).size(), 7u) << b0;  // three dirty runs
  // A snapshot taken and applied: the disk may differ anywhere, so vimgfs marks every
  // enabled bitmap dirty (qemu-img leaves them as they are: not compared here).
  EXPECT_TRUE(ExpectSame("snapshot -c s d.qcow2"));
  CommandResult a = Sh("cd v && ../bin/qemu-img snapshot -a s d.qcow2");
  EXPECT_EQ(a.exit_code, 0) << a.err;
  const std::string all = DirtyMap("v", "d.qcow2", "b0");
  EXPECT_EQ(nlohmann::json::parse(all, nullptr, false).size(), 1u) << all;
  EXPECT_NE(all.find("\"present\": false"), std::string::npos) << all;
}

// A bitmap left in use by a writer that died is inconsistent: kept as it is (and marked
// so), while the others go on recording; a resize is refused in qemu's words.
TEST_F(BitmapsTest, InconsistentBitmapsStayInconsistent) {
  InBoth(
      "qemu-img create -q -f qcow2 d.qcow2 8M && qemu-img bitmap --add d.qcow2 good && "
      "qemu-img bitmap --add d.qcow2 bad");
  // Set the in-use flag of the second directory entry, as a killed writer leaves it.
  InBoth(
      "python3 -c \"import struct;f=open('d.qcow2','r+b');h=f.read(4096);p=104 if h[103]==0 else 0;"
      "o=struct.unpack('>I',h[100:104])[0]\n"
      "while True:\n"
      "  t,l=struct.unpack('>II',h[o:o+8])\n"
      "  if t==0x23852875: break\n"
      "  o+=8+((l+7)&~7)\n"
      "d=struct.unpack('>Q',h[o+24:o+32])[0];f.seek(d);e=f.read(24);n=struct.unpack('>H',e[18:20])[0];"
      "x=struct.unpack('>I',e[20:24])[0];s=d+((24+n+x+7)&~7)+12;f.seek(s);"
      "fl=struct.unpack('>I',f.read(4))[0];f.seek(s);f.write(struct.pack('>I',fl|1))\"");
  MustSh("qemu-img create -q -f raw s.raw 8M && qemu-io -f raw -c 'write -P 1 3M 64k' s.raw >/dev/null");
  EXPECT_TRUE(ExpectSame("convert -n --target-is-zero -f raw -O qcow2 ../s.raw d.qcow2"));
  ExpectSameBitmaps("d.qcow2", {"good"});
  const nlohmann::json list = Bitmaps("v", "d.qcow2");
  ASSERT_EQ(list.size(), 2u) << list.dump();
  EXPECT_EQ(list[1]["name"], "bad");
  EXPECT_NE(list[1]["flags"].dump().find("in-use"), std::string::npos) << list.dump();
  EXPECT_EQ(list[0]["flags"].dump().find("in-use"), std::string::npos) << list.dump();
  ExpectSame("resize d.qcow2 16M");
}

// Writes made by qemu-io in both twins (a shell line run in each folder).
constexpr const char* kWriteBase = "qemu-io -f qcow2 -c 'write 3M 1M' d.base >/dev/null";

// qemu-iotests' qemu-img-bitmaps, step by step: every change of the bitmap command made by
// vimgfs in one twin and by qemu-img in the other, writes between them by qemu-io.
TEST_F(BitmapsTest, BitmapCommandMatchesQemu) {
  InBoth("qemu-img create -q -f qcow2 d.base 10M");
  EXPECT_TRUE(ExpectSame("bitmap --add -f qcow2 d.base b0"));
  InBoth(kWriteBase);
  InBoth("qemu-img create -q -f qcow2 -b d.base -F qcow2 d.qcow2 10M");
  InBoth("qemu-io -f qcow2 -c 'write 0 1M' d.qcow2 >/dev/null");
  EXPECT_TRUE(ExpectSame("bitmap --add -g 512k -f qcow2 d.qcow2 b1"));
  EXPECT_TRUE(ExpectSame("bitmap --add --disable -f qcow2 d.qcow2 b2"));
  InBoth("qemu-io -f qcow2 -c 'write 3M 1M' d.qcow2 >/dev/null");
  EXPECT_TRUE(ExpectSame("bitmap --clear -f qcow2 d.qcow2 b1"));
  InBoth("qemu-io -f qcow2 -c 'write 1M 1M' d.qcow2 >/dev/null");
  EXPECT_TRUE(ExpectSame("bitmap --disable -f qcow2 d.qcow2 b1"));
  EXPECT_TRUE(ExpectSame("bitmap --enable -f qcow2 d.qcow2 b2"));
  InBoth("qemu-io -f qcow2 -c 'write 2M 1M' d.qcow2 >/dev/null");
  ExpectSameBitmaps("d.qcow2", {"b1", "b2"});

  // Merges: from another file (its bitmap kept as it is), from this one, through a
  // bitmap added in the same command; a name given with --image-opts.
  EXPECT_TRUE(ExpectSame("bitmap --add --disable -f qcow2 d.qcow2 b0"));
  EXPECT_TRUE(ExpectSame("bitmap --add --merge b0 -b d.base -F qcow2 -f qcow2 d.qcow2 tmp"));
  EXPECT_TRUE(ExpectSame("bitmap --merge tmp -f qcow2 d.qcow2 b0"));
  EXPECT_TRUE(ExpectSame("bitmap --merge b2 --merge b1 -f qcow2 d.qcow2 b0"));
  EXPECT_TRUE(
      ExpectSame("bitmap --remove --image-opts driver=qcow2,file.driver=file,file.filename=d.qcow2 tmp"));
  ExpectSameBitmaps("d.qcow2", {"b0", "b1", "b2"});
  ExpectSameBitmaps("d.base", {"b0"});
  // Removed and added again in one command: a new, empty and enabled bitmap, last.
  EXPECT_TRUE(ExpectSame("bitmap --remove --add d.qcow2 b1"));
  ExpectSameBitmaps("d.qcow2", {"b0", "b1", "b2"});
  // Every bitmap removed: the extension goes, and with it the autoclear bit.
  for (const char* b : {"b0", "b1", "b2"})
    EXPECT_TRUE(ExpectSame(std::string("bitmap --remove d.qcow2 ") + b));
  EXPECT_TRUE(ExpectSame("info d.qcow2 | grep -c bitmaps || true"));
  EXPECT_EQ(Sh("qemu-img check v/d.qcow2").exit_code, 0);
}

// Granularities differ: each set bit of the source marks every bit of the target its
// bytes overlap, both ways (qemu's hbitmap_merge), including a last granule past the end.
TEST_F(BitmapsTest, MergesAcrossGranularities) {
  InBoth("qemu-img create -q -f qcow2 d.qcow2 10000000");
  EXPECT_TRUE(ExpectSame("bitmap --add -g 4k d.qcow2 fine"));
  EXPECT_TRUE(ExpectSame("bitmap --add -g 2M d.qcow2 coarse"));
  EXPECT_TRUE(ExpectSame("bitmap --add -g 512 d.qcow2 tiny"));
  InBoth(
      "qemu-io -f qcow2 -c 'write 4096 512' -c 'write 3000000 70000' -c 'write 9999000 1000' d.qcow2 "
      ">/dev/null");
  EXPECT_TRUE(ExpectSame("bitmap --disable d.qcow2 coarse"));
  EXPECT_TRUE(ExpectSame("bitmap --clear d.qcow2 coarse"));
  EXPECT_TRUE(ExpectSame("bitmap --merge tiny d.qcow2 coarse"));
  EXPECT_TRUE(ExpectSame("bitmap --add -g 64k --disable --merge coarse d.qcow2 mid"));
  EXPECT_TRUE(ExpectSame("bitmap --add -g 1k --disable --merge fine d.qcow2 small"));
  ExpectSameBitmaps("d.qcow2", {"fine", "coarse", "tiny", "mid", "small"});
}

// Each refusal of qemu-img bitmap, in its words and with its exit code; what succeeded
// before a failing operation stays.
TEST_F(BitmapsTest, BitmapErrorsInQemuWords) {
  InBoth(
      "qemu-img create -q -f qcow2 d.qcow2 10M && qemu-img create -q -f qcow2 o.qcow2 20M && "
      "qemu-img bitmap --add o.qcow2 other");
  for (const char* args : {
           "bitmap d.qcow2 b",
           "bitmap --add d.qcow2",
           "bitmap -g 64k --clear d.qcow2 b",
           "bitmap -F qcow2 --clear d.qcow2 b",
           "bitmap -b o.qcow2 --clear d.qcow2 b",
           "bitmap --add -g 1000 d.qcow2 b",
           "bitmap --add -g 256 d.qcow2 b",
           "bitmap --add -g 4G d.qcow2 b",
           "bitmap --add -g 4x d.qcow2 b",
           "bitmap --add d.qcow2 ''",
           "bitmap --remove d.qcow2 b",
           "bitmap --clear d.qcow2 b",
           "bitmap --enable d.qcow2 b",
           "bitmap --add d.qcow2 b",
           "bitmap --add d.qcow2 b",
           "bitmap --merge nope d.qcow2 b",
           "bitmap --add --merge other -b o.qcow2 d.qcow2 c",
           "bitmap --merge other -b missing.qcow2 d.qcow2 b",
           "bitmap --remove -f raw d.qcow2 b",
           "info d.qcow2",
       })
    ExpectSame(args);
  // Errors that name the image: qemu names its node ("#block123"), vimgfs the file.
  InBoth("qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M");
  for (const char* args : {"bitmap --add v2.qcow2 b", "bitmap --add -f raw v2.qcow2 b"}) {
    SCOPED_TRACE(args);
    CommandResult q = Sh(std::string("cd q && qemu-img ") + args);
    CommandResult v = Sh(std::string("cd v && ../bin/qemu-img ") + args);
    EXPECT_EQ(std::regex_replace(q.err, std::regex("#block[0-9]+"), "v2.qcow2"), v.err);
    EXPECT_EQ(v.exit_code, q.exit_code);
  }
}

// convert --bitmaps: the source's bitmaps (enabled or not, any granularity) made anew in
// the target with the same bits; inconsistent ones refused or skipped as qemu-img does.
TEST_F(BitmapsTest, ConvertCopiesBitmaps) {
  InBoth(
      "qemu-img create -q -f qcow2 s.qcow2 10M && qemu-img bitmap --add s.qcow2 b1 && "
      "qemu-img bitmap --add -g 1M --disable s.qcow2 b2 && qemu-img bitmap --add -g 4k s.qcow2 b3 && "
      "qemu-io -f qcow2 -c 'write 1M 64k' -c 'write 7M 5000' s.qcow2 >/dev/null && "
      "qemu-img bitmap --add s.qcow2 b4");
  EXPECT_TRUE(ExpectSame("convert --bitmaps -O qcow2 s.qcow2 t.qcow2"));
  ExpectSameBitmaps("t.qcow2", {"b1", "b2", "b3", "b4"});
  EXPECT_TRUE(ExpectSame("convert --bitmaps -O qcow2 -o cluster_size=4k s.qcow2 small.qcow2"));
  ExpectSameBitmaps("small.qcow2", {"b1", "b2", "b3", "b4"});
  // Into an existing image that already has one of the names.
  InBoth("qemu-img create -q -f qcow2 n.qcow2 10M && qemu-img bitmap --add n.qcow2 b3");
  ExpectSame("convert -n --bitmaps -O qcow2 s.qcow2 n.qcow2");

  ExpectSame("convert --skip-broken-bitmaps -O qcow2 s.qcow2 x.qcow2");
  ExpectSame("convert --bitmaps -O raw s.qcow2 r.raw");
  ExpectSame("convert --bitmaps -O qcow2 s.qcow2 s.qcow2 two.qcow2");
  InBoth("qemu-img create -q -f raw plain.raw 1M");
  ExpectSame("convert --bitmaps -f raw -O qcow2 plain.raw p.qcow2");
  ExpectSameFiles();

  // b2 and b4 left in use by a writer that died (qemu-io's abort).
  InBoth(
      "qemu-io -f qcow2 -c 'write 0 4k' -c abort s.qcow2 >/dev/null 2>&1; qemu-img bitmap --remove s.qcow2 "
      "b1");
  ExpectSame("convert --bitmaps -O qcow2 s.qcow2 c1.qcow2");
  EXPECT_TRUE(ExpectSame("convert --bitmaps --skip-broken-bitmaps -O qcow2 s.qcow2 c2.qcow2"));
  EXPECT_TRUE(ExpectSame("info c2.qcow2"));
  ExpectSameFiles();
}

}  // namespace
}  // namespace vimgfs::test

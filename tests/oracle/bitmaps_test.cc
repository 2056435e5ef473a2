// qcow2 persistent dirty bitmaps through vimgfs's writes: twin images written alike by
// vimgfs and by qemu-img must end with the same bitmaps (names, flags, and the dirty
// areas qemu-nbd reports for each), check clean, and inconsistent bitmaps stay so.
#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class BitmapsTest : public CliTwinTest {
 protected:
  // The dirty areas of `bitmap` in dir/name, as qemu-nbd serves them (x-dirty-bitmap: the
  // dirty runs are the ones block status reports as holes).
  std::string DirtyMap(const std::string& dir, const std::string& name, const std::string& bitmap) {
    const std::string sock = F(dir + ".sock");
    CommandResult r =
        Sh("rm -f " + sock + " && (qemu-nbd -r -f qcow2 -B " + bitmap + " -k " + sock + " -t " + dir + "/" +
           name + " & echo $! > " + dir + ".pid) && for i in $(seq 50); do [ -S " + sock +
           " ] && break; sleep 0.1; done && qemu-img map --output=json --image-opts "
           "driver=nbd,server.type=unix,server.path=" +
           sock + ",x-dirty-bitmap=qemu:dirty-bitmap:" + bitmap + "; kill $(cat " + dir + ".pid)");
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

}  // namespace
}  // namespace vimgfs::test

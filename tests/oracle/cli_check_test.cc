// `vimgfs check` against `qemu-img check` on clean and damaged copies of the same images.
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliCheckTest : public CliTest {
 protected:
  // Writes two big-endian bytes at off (a 16-bit refcount entry).
  void Poke16(const std::string& file, uint64_t off, int value) {
    char esc[32];
    std::snprintf(esc, sizeof esc, "\\%03o\\%03o", (value >> 8) & 0xff, value & 0xff);
    MustSh(std::string("printf '") + esc + "' | dd of=" + file + " bs=1 seek=" + std::to_string(off) +
           " conv=notrunc 2>/dev/null");
  }
  // Writes a big-endian 64-bit table entry at off.
  void Poke64(const std::string& file, uint64_t off, uint64_t value) {
    std::string esc;
    for (int i = 7; i >= 0; i--) {
      char b[8];
      std::snprintf(b, sizeof b, "\\%03o", static_cast<unsigned>((value >> (8 * i)) & 0xff));
      esc += b;
    }
    MustSh("printf '" + esc + "' | dd of=" + file + " bs=1 seek=" + std::to_string(off) +
           " conv=notrunc 2>/dev/null");
  }
  // qemu's layout of a fresh 64k-cluster image: refcount block at 0x20000, L1 cluster 3.
  void MakeBase(const std::string& name) {
    MustSh("qemu-img create -q -f qcow2 " + name + " 16M");
    MustSh("qemu-io -c 'write -P 1 0 128k' -c 'write -c -P 2 1M 64k' " + name + " >/dev/null");
  }
  void ExpectSameCheck(const std::string& args, bool compare_stdout = true) {
    SCOPED_TRACE("check " + args);
    CommandResult v = V("check " + args), q = Q("check " + args);
    EXPECT_EQ(v.exit_code, q.exit_code) << v.out << v.err << "\nqemu:\n" << q.out << q.err;
    if (compare_stdout) {
      EXPECT_EQ(v.out, q.out);
    }
  }
};

TEST_F(CliCheckTest, CleanImagesOfEveryFormat) {
  MakeBase("a.qcow2");
  MustSh("qemu-img create -q -f vmdk a.vmdk 16M && qemu-io -f vmdk -c 'write -P 3 0 1M' a.vmdk >/dev/null");
  MustSh("qemu-img create -q -f vdi a.vdi 16M && qemu-io -f vdi -c 'write -P 3 0 1M' a.vdi >/dev/null");
  MustSh("qemu-img create -q -f raw a.raw 16M");
  for (std::string f : {"a.qcow2", "a.vmdk", "a.vdi", "a.raw"}) {
    ExpectSameCheck(f);
    ExpectSameCheck("--output=json " + f);
  }
  CommandResult v = V("check a.raw");
  EXPECT_EQ(v.exit_code, 63);
  EXPECT_EQ(v.err, "vimgfs: This image format does not support checks\n");
  EXPECT_EQ(V("check -q a.qcow2").out, "");
}

TEST_F(CliCheckTest, CorruptionAndRepair) {
  MakeBase("bad.qcow2");
  Poke16("bad.qcow2", 0x20000 + 2 * 3, 0);  // the L1 table's cluster: refcount 0
  MustSh("cp bad.qcow2 qbad.qcow2");
  ExpectSameCheck("bad.qcow2");
  ExpectSameCheck("--output=json bad.qcow2");
  EXPECT_EQ(V("check bad.qcow2").exit_code, 2);
  // -r all repairs it; both tools then find it clean.
  CommandResult v = V("check -r all bad.qcow2"), q = Q("check -r all qbad.qcow2");
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(q.exit_code, 0);
  EXPECT_NE(v.out.find("The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n"
                       "    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found"),
            std::string::npos)
      << v.out;
  EXPECT_EQ(Q("check bad.qcow2").exit_code, 0);
  EXPECT_EQ(Q("compare bad.qcow2 qbad.qcow2").exit_code, 0);
}

// Damage to the refcount table itself (issue 10): both tools call it corrupt, -r leaks
// refuses, -r all writes a new refcount structure that qemu then finds clean.
TEST_F(CliCheckTest, BrokenRefcountTable) {
  MakeBase("base.qcow2");
  struct Case {
    std::string name;
    uint64_t entry;
    int exit_code;
  };
  const std::vector<Case> cases = {
      {"reserved.qcow2", 0x20000 | 0x100, 2},  // reserved bit 8 of refcount table entry 0
      {"outside.qcow2", 0x1000000, 2},         // the block past the end of the file
      {"unaligned.qcow2", 0x20200, 1},         // no refcount can be read: check errors
  };
  for (const auto& [name, entry, exit_code] : cases) {
    SCOPED_TRACE(name);
    MustSh("cp base.qcow2 " + name);
    Poke64(name, 0x10000, entry);
    CommandResult v = V("check " + name), q = Q("check " + name);
    EXPECT_EQ(q.exit_code, exit_code) << q.err;
    EXPECT_EQ(v.exit_code, exit_code) << v.out << v.err;
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(V("check -r leaks " + name).exit_code, 1);
    v = V("check -r all " + name);
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
    q = Q("check " + name);
    EXPECT_EQ(q.exit_code, 0) << q.out << q.err;
    MustSh("cp base.qcow2 clean.qcow2");
    EXPECT_EQ(Q("compare " + name + " clean.qcow2").exit_code, 0);
  }
}

TEST_F(CliCheckTest, LeaksAndRepair) {
  MakeBase("leak.qcow2");
  MustSh("truncate -s 1M leak.qcow2");
  Poke16("leak.qcow2", 0x20000 + 2 * 12, 1);  // cluster 12: refcount 1, no reference
  MustSh("cp leak.qcow2 qleak.qcow2");
  CommandResult v = V("check leak.qcow2"), q = Q("check leak.qcow2");
  EXPECT_EQ(v.exit_code, 3);
  EXPECT_EQ(q.exit_code, 3);
  EXPECT_EQ(v.out.substr(0, v.out.find("Image end")), q.out.substr(0, q.out.find("Image end")));
  nlohmann::json vj = Json(V("check --output=json leak.qcow2 || true"));
  nlohmann::json qj = Json(Q("check --output=json leak.qcow2 || true"));
  EXPECT_EQ(vj["leaks"], 1);
  EXPECT_EQ(vj["leaks"], qj["leaks"]);
  EXPECT_EQ(vj["check-errors"], qj["check-errors"]);
  v = V("check -r leaks leak.qcow2");
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_NE(v.out.find("    1 leaked clusters\n"), std::string::npos) << v.out;
  EXPECT_EQ(Q("check leak.qcow2").exit_code, 0);
  EXPECT_EQ(Q("compare leak.qcow2 qleak.qcow2").exit_code, 0);
  EXPECT_EQ(V("check -r bogus leak.qcow2").exit_code, 1);
}

}  // namespace
}  // namespace vimgfs::test

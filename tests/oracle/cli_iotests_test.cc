// Data and metadata cases from qemu's qemu-iotests, each as a scenario run with vimgfs
// and with qemu-img on copies of the same images, judged by qemu-img / qemu-io. The iotest
// each one comes from is named above it.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliIotestsTest : public CliTest {
 protected:
  // Runs `vimgfs ARGS v.qcow2` and `qemu-img ARGS q.qcow2`: same exit code, stdout and
  // message (after the program name).
  void Both(const std::string& args, const std::string& after = "") {
    SCOPED_TRACE(args + " <file> " + after);
    CommandResult v = V(args + " v.qcow2 " + after);
    CommandResult q = Q(args + " q.qcow2 " + after);
    EXPECT_EQ(v.exit_code, q.exit_code) << v.err << "\nqemu: " << q.err;
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(Named(Message(v.err), "v.qcow2"), Named(Message(q.err), "q.qcow2"));
  }
  // `text` with the image's name `name` written as IMG (the copies have their own names).
  static std::string Named(std::string text, const std::string& name) {
    for (size_t at; (at = text.find(name)) != std::string::npos;) text.replace(at, name.size(), "IMG");
    return text;
  }
  // Error lines without the program's name (the first word of each line).
  static std::string Message(const std::string& err) {
    std::string out;
    for (size_t pos = 0; pos < err.size();) {
      size_t nl = err.find('\n', pos);
      std::string line = err.substr(pos, nl == std::string::npos ? std::string::npos : nl + 1 - pos);
      size_t colon = line.find(": ");
      out += colon == std::string::npos ? line : line.substr(colon + 2);
      pos = nl == std::string::npos ? err.size() : nl + 1;
    }
    return out;
  }
  // qemu-img map's runs without host offsets (where clusters land may differ).
  nlohmann::json Map(const std::string& f) {
    nlohmann::json runs = Json(Q("map --output=json " + f));
    for (auto& r : runs) r.erase("offset");
    return runs;
  }
  // v.qcow2 and q.qcow2 read the same, map the same (but for host offsets) and check clean.
  void ExpectSame(bool same_map = true) {
    CommandResult c = Q("compare v.qcow2 q.qcow2");
    EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
    if (same_map) {
      EXPECT_EQ(Map("v.qcow2"), Map("q.qcow2"));
    }
    nlohmann::json vi = Json(Q("info --output=json v.qcow2")), qi = Json(Q("info --output=json q.qcow2"));
    EXPECT_EQ(vi["virtual-size"], qi["virtual-size"]);
    CommandResult chk = Q("check v.qcow2");
    EXPECT_EQ(chk.exit_code, 0) << chk.out << chk.err;
  }
  void Copies(const std::string& from) { MustSh("cp " + from + " v.qcow2 && cp " + from + " q.qcow2"); }
};

// iotest 292: a shrink keeps the partial last cluster, data past the new end included; a
// grow over a longer backing file must then read zeros there, not that stale data (qemu
// writes zeros over it), nor the backing file's data. Without a backing file qemu writes
// nothing and the old bytes show again; so must we.
TEST_F(CliIotestsTest, ShrinkThenGrowOverLongerBackingReadsZerosPastTheOldEnd) {
  for (std::string opts : {"", "cluster_size=4096", "extended_l2=on", "compat=0.10"}) {
    for (std::string top_fill : {"full", "empty", "compressed", "snapshot"}) {
      for (bool backing : {true, false}) {
        SCOPED_TRACE("-o '" + opts + "' top " + top_fill + (backing ? " over a backing file" : " alone"));
        MustSh("rm -f *.qcow2");
        std::string o = opts.empty() ? "" : " -o " + opts;
        if (backing) {
          MustSh("qemu-img create -q -f qcow2" + o + " base.qcow2 1M");
          MustSh("qemu-io -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null");
          MustSh("qemu-img create -q -f qcow2" + o + " -b base.qcow2 -F qcow2 orig.qcow2 1M");
        } else {
          MustSh("qemu-img create -q -f qcow2" + o + " orig.qcow2 1M");
        }
        if (top_fill == "full" || top_fill == "snapshot")
          MustSh("qemu-io -c 'write -P 0x22 0 1M' orig.qcow2 >/dev/null");
        if (top_fill == "compressed") MustSh("qemu-io -c 'write -c -P 0x22 0 1M' orig.qcow2 >/dev/null");
        if (top_fill == "snapshot") MustSh("qemu-img snapshot -c s orig.qcow2");
        Copies("orig.qcow2");
        Both("resize --shrink", "520k");
        Both("resize", "567k");
        Both("resize", "1M");  // whole clusters past the old end too
        // With extended L2, a write into an unallocated cluster allocates all of its
        // subclusters here, only the written ones in qemu: the same reads, another map.
        ExpectSame(/*same_map=*/!(opts == "extended_l2=on" && top_fill == "empty" && backing));
      }
    }
  }
  // 292 itself.
  MustSh("rm -f *.qcow2 && qemu-img create -q -f qcow2 base.qcow2 1M");
  MustSh("qemu-io -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 v.qcow2 1M");
  MustSh("qemu-io -c 'write -P 0x22 0 1M' v.qcow2 >/dev/null");
  Ok(V("resize --shrink v.qcow2 520k"));
  Ok(V("resize v.qcow2 567k"));
  Ok(Io("-c 'read -P 0x22 0 520k' -c 'read -P 0 520k 47k' v.qcow2"));
  EXPECT_EQ(Ok(Io("-c 'read -P 0 520k 47k' v.qcow2")).find("Pattern verification failed"), std::string::npos);
}

// iotest 244: growing an image whose raw data file already holds data past the old end:
// the qcow2 view must be the data file, grown part included. A shrink cuts the data file
// too, as qemu does.
TEST_F(CliIotestsTest, GrowWithRawDataFileShowsTheDataFile) {
  std::vector<std::string> maps;
  for (std::string tool : {"v", "q"}) {  // each in its own folder: the image names t.data
    SCOPED_TRACE(tool);
    auto in = [&](const std::string& line) { return "cd " + tool + " && " + line; };
    MustSh("mkdir " + tool);
    MustSh(in("qemu-img create -q -f qcow2 -o data_file=t.data,data_file_raw=on t.qcow2 1M"));
    MustSh(in("qemu-io -c 'write -P 42 0 1M' t.qcow2 >/dev/null"));
    MustSh(in("truncate -s 2M t.data && qemu-io -f raw -c 'write -P 84 1M 1M' t.data >/dev/null"));
    // Inside the folder: qemu takes a relative data file name from the working directory.
    Ok(Sh(in((tool == "v" ? Quote(VimgfsBinary()) : std::string("qemu-img")) + " resize t.qcow2 2M")));
    CommandResult c = Sh(in("qemu-img compare -f raw t.data t.qcow2"));
    EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
    Ok(Sh(in("qemu-io -c 'read -P 42 0 1M' -c 'read -P 84 1M 1M' t.qcow2")));
    CommandResult chk = Sh(in("qemu-img check t.qcow2"));
    EXPECT_EQ(chk.exit_code, 0) << chk.out << chk.err;
    maps.push_back(Ok(Sh(in("qemu-img map --output=json t.qcow2"))));
  }
  EXPECT_EQ(maps[0], maps[1]);
}

TEST_F(CliIotestsTest, ResizeCutsAndGrowsTheExternalDataFileAsQemu) {
  auto size = [&](const std::string& f) { return Ok(Sh("stat -c %s " + f)); };
  for (std::string raw : {"on", "off"}) {
    SCOPED_TRACE("data_file_raw=" + raw);
    for (std::string tool : {"v", "q"}) {
      MustSh("rm -f " + tool + ".qcow2 " + tool + ".data");
      MustSh("qemu-img create -q -f qcow2 -o data_file=" + tool + ".data,data_file_raw=" + raw + " " + tool +
             ".qcow2 1M");
      MustSh("qemu-io -c 'write -P 7 0 1M' " + tool + ".qcow2 >/dev/null");
    }
    Both("resize --shrink", "520k");
    EXPECT_EQ(size("v.data"), size("q.data"));
    MustSh("truncate -s 3M v.data && truncate -s 3M q.data");
    Both("resize", "2M");
    EXPECT_EQ(size("v.data"), size("q.data"));
    ExpectSame();
  }
}

// iotest 061: a v2 snapshot need not record the disk size, so qemu refuses to resize a v2
// image that has snapshots (a v3 one is fine).
TEST_F(CliIotestsTest, ResizeRefusesAVersion2ImageWithSnapshots) {
  MustSh("qemu-img create -q -f qcow2 -o compat=0.10 orig.qcow2 32M");
  MustSh("qemu-io -c 'write -P 0x2a 24M 64k' orig.qcow2 >/dev/null && qemu-img snapshot -c foo orig.qcow2");
  Copies("orig.qcow2");
  Both("resize", "64M");
  EXPECT_NE(V("resize v.qcow2 64M").err.find("Can't resize a v2 image which has snapshots"),
            std::string::npos);
  Both("resize --shrink", "16M");
  ExpectSame();
  MustSh("qemu-img create -q -f qcow2 orig.qcow2 32M && qemu-img snapshot -c foo orig.qcow2");
  Copies("orig.qcow2");
  Both("resize", "64M");
  ExpectSame();
}

// iotest 020: commit -b takes a relative base name against the folder of the image whose
// backing file it is, not the working directory.
TEST_F(CliIotestsTest, CommitBaseNameIsRelativeToTheOverlaysFolder) {
  for (std::string tool : {"v", "q"}) {
    SCOPED_TRACE(tool);
    auto run = [&](const std::string& args) { return tool == "v" ? V(args) : Q(args); };
    MustSh("rm -rf subdir && mkdir subdir");
    MustSh("qemu-img create -q -f qcow2 subdir/t.base 1M");
    MustSh("qemu-img create -q -f qcow2 -b t.base -F qcow2 subdir/t.mid");
    MustSh("qemu-img create -q -f qcow2 -b t.mid -F qcow2 subdir/t");
    MustSh("qemu-io -c 'write -P 5 0 64k' subdir/t >/dev/null");
    EXPECT_EQ(Ok(run("commit -b t.mid subdir/t")), "Image committed.\n");
    CommandResult bad = run("commit -b subdir/t.mid subdir/t");
    EXPECT_EQ(bad.exit_code, 1);
    EXPECT_EQ(Message(bad.err), "Did not find 'subdir/t.mid' in the backing chain of 'subdir/t'\n");
    EXPECT_EQ(Ok(run("commit -b " + F("subdir/t.mid") + " subdir/t")), "Image committed.\n");
    EXPECT_EQ(Ok(run("commit -b t.base subdir/t")), "Image committed.\n");  // further down
    Ok(Io("-c 'read -P 5 0 64k' subdir/t.base"));
  }
}

// iotest 261: qemu-img snapshot -c stores an instruction count of 0 (no -1), which
// `snapshot -l` shows in its ICOUNT column.
TEST_F(CliIotestsTest, SnapshotCreateStoresIcountZero) {
  MustSh("qemu-img create -q -f qcow2 v.qcow2 1M && qemu-img create -q -f qcow2 q.qcow2 1M");
  Ok(V("snapshot -c s v.qcow2"));
  Ok(Q("snapshot -c s q.qcow2"));
  auto icount = [&](const std::string& f) {  // the last column of the last line
    std::string list = Ok(Q("snapshot -l " + f));
    auto end = list.find_last_not_of(" \n");
    auto start = list.find_last_of(" ", end);
    return list.substr(start + 1, end - start);
  };
  EXPECT_EQ(icount("v.qcow2"), "0");
  EXPECT_EQ(icount("q.qcow2"), "0");
}

// iotest 176: a persistent dirty bitmap survives snapshot -c / -d and commit (which empties
// the overlay): qemu keeps it, and these change no guest data it would have to record.
TEST_F(CliIotestsTest, SnapshotAndCommitKeepPersistentBitmaps) {
  auto bitmaps = [&](const std::string& f) {
    nlohmann::json j = Json(Q("info --output=json " + f));
    return j["format-specific"]["data"].value("bitmaps", nlohmann::json::array()).dump();
  };
  MustSh("qemu-img create -q -f qcow2 base.qcow2 1M");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 orig.qcow2 1M");
  MustSh("qemu-img bitmap --add orig.qcow2 bitmap0");
  MustSh("qemu-io -c 'write -P 3 0 64k' orig.qcow2 >/dev/null");
  const std::string before = bitmaps("orig.qcow2");
  ASSERT_NE(before, "[]");
  Copies("orig.qcow2");
  Both("snapshot -c snap");
  EXPECT_EQ(bitmaps("v.qcow2"), before);
  Both("snapshot -d snap");
  EXPECT_EQ(bitmaps("v.qcow2"), before);
  ExpectSame();
  for (std::string args : {"commit", "commit -d", "commit -b base.qcow2"}) {
    SCOPED_TRACE(args);
    MustSh("cp orig.qcow2 v.qcow2");
    Ok(V(args + " v.qcow2"));
    EXPECT_EQ(bitmaps("v.qcow2"), before);
    CommandResult chk = Q("check v.qcow2");
    EXPECT_EQ(chk.exit_code, 0) << chk.out << chk.err;
  }
}

// iotest 252: rebasing an image that had no backing file (or reads past its old backing
// file's end) onto one with data: where the new backing file would show through, the
// image gets zero clusters, as qemu-img writes them, not clusters of zero data.
TEST_F(CliIotestsTest, RebaseWritesZeroClustersWhereTheOldBackingFileEnded) {
  MustSh("qemu-img create -q -f qcow2 orig.qcow2 384k && qemu-img create -q -f qcow2 new.qcow2 384k");
  MustSh("qemu-img create -q -f qcow2 short.qcow2 128k");
  MustSh("qemu-io -c 'write -P 0x22 0 128k' -c 'write -P 0x11 128k 128k' orig.qcow2 >/dev/null");
  MustSh(
      "qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x11 128k 64k' -c 'write -P 0x11 256k 64k' "
      "new.qcow2 >/dev/null");
  for (std::string old_backing : {"", "short.qcow2"}) {
    SCOPED_TRACE("old backing file '" + old_backing + "'");
    MustSh("cp orig.qcow2 o.qcow2");
    if (!old_backing.empty()) MustSh("qemu-img rebase -u -b short.qcow2 -F qcow2 o.qcow2");
    Copies("o.qcow2");
    Both("rebase -b new.qcow2 -F qcow2");
    ExpectSame();
    Ok(Io("-c 'read -P 0 256k 128k' v.qcow2"));
  }
}

// iotest 313: committing an overlay that reads zeros everywhere leaves the base's clusters
// unmapped (qemu's commit is a mirror job with unmap on), so the base has none allocated.
TEST_F(CliIotestsTest, CommitOfZeroedOverlayUnmapsTheBase) {
  for (std::string tool : {"v", "q"}) {
    SCOPED_TRACE(tool);
    MustSh("rm -f base.qcow2 top.qcow2");
    MustSh("qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 2M");
    MustSh("qemu-io -c 'write -P 1 0 2M' base.qcow2 >/dev/null");
    MustSh("qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top.qcow2");
    MustSh("qemu-io -c 'write -z 0 2M' top.qcow2 >/dev/null");
    Ok(tool == "v" ? V("commit top.qcow2") : Q("commit top.qcow2"));
    Ok(Io("-c 'read -P 0 0 2M' base.qcow2"));
    std::string chk = Ok(Q("check base.qcow2"));
    EXPECT_EQ(chk.find("allocated"), std::string::npos) << chk;  // no "N/M = x% allocated" line
  }
}

// iotests 163 and 250: a shrink gives back what it freed, as qemu does: the host space of
// freed clusters is punched, refcount blocks that count nothing leave the table, and the
// file ends after the last cluster in use.
TEST_F(CliIotestsTest, ShrinkGivesBackHostSpaceAndCutsTheFile) {
  auto usage = [&](const std::string& f) {
    return std::stoull(Ok(Sh("du --block-size=1 " + f + " | cut -f1")));
  };
  auto size = [&](const std::string& f) { return std::stoull(Ok(Sh("stat -c %s " + f))); };
  // 250: data at both ends of a metadata-preallocated image, then a shrink to 5M.
  MustSh("qemu-img create -q -f qcow2 -o cluster_size=1M,preallocation=metadata orig.qcow2 2100M");
  MustSh(
      "qemu-io -c 'discard 0 10M' -c 'discard 2090M 10M' -c 'write 2090M 10M' -c 'write 0 10M' "
      "orig.qcow2 >/dev/null");
  Copies("orig.qcow2");
  const uint64_t before = usage("v.qcow2");
  Both("resize --shrink", "5M");
  // The 10M written past the new end are given back, at least (qemu also writes
  // its whole refcount table out, so it may keep a little more).
  EXPECT_GE(before - usage("v.qcow2"), 10u << 20);
  EXPECT_LE(usage("v.qcow2"), usage("q.qcow2"));
  EXPECT_EQ(size("v.qcow2"), size("q.qcow2"));
  ExpectSame();
  // 163: written sequentially far past the new end, with 1-bit refcounts to need several
  // refcount blocks; after the shrink the file is cut as qemu cuts it.
  for (std::string bits : {"1", "16"}) {
    SCOPED_TRACE("refcount_bits=" + bits);
    MustSh("rm -f orig.qcow2 check.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=" +
           bits + " orig.qcow2 32M");
    MustSh("qemu-io -c 'write -P 0xff 0 32M' orig.qcow2 >/dev/null");
    MustSh("qemu-img create -q -f qcow2 -o cluster_size=512 check.qcow2 10M");
    MustSh("qemu-io -c 'write -P 0xff 0 10M' check.qcow2 >/dev/null");
    Copies("orig.qcow2");
    Both("resize --shrink", "10M");
    EXPECT_EQ(size("v.qcow2"), size("q.qcow2"));
    EXPECT_EQ(Q("compare v.qcow2 check.qcow2").exit_code, 0);
    ExpectSame();
  }
}

// iotest 114: a second backing-format extension replaces the first, as in qemu: info
// shows the format it names (even one no driver has), and rebase -u -F writes one again.
TEST_F(CliIotestsTest, LaterBackingFormatExtensionWins) {
  MustSh("qemu-img create -q -f qcow2 t.base 4M");
  MustSh("qemu-img create -q -f qcow2 -u -b t.base -F qcow2 t.qcow2 4M");
  // Insert a second extension (type 0xE2792ACA, "foo") before the end marker, moving what
  // follows (the backing file name) down by its 16 bytes.
  std::vector<uint8_t> img = ReadWholeFile(F("t.qcow2"));
  auto be32 = [&](size_t at) {
    return uint32_t{img[at]} << 24 | uint32_t{img[at + 1]} << 16 | uint32_t{img[at + 2]} << 8 | img[at + 3];
  };
  size_t pos = be32(100);  // v3 header_length
  while (be32(pos) != 0) pos += 8 + (be32(pos + 4) + 7) / 8 * 8;
  const std::vector<uint8_t> ext = {0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3, 'f', 'o', 'o', 0, 0, 0, 0, 0};
  img.insert(img.begin() + pos, ext.begin(), ext.end());
  img.erase(img.begin() + 65536, img.begin() + 65536 + ext.size());  // the header cluster's padding
  uint64_t backing_offset = uint64_t{be32(8)} << 32 | be32(12);
  ASSERT_GT(backing_offset, pos);
  backing_offset += ext.size();
  for (int i = 0; i < 8; i++) img[8 + i] = static_cast<uint8_t>(backing_offset >> (56 - 8 * i));
  WriteWholeFile(F("t.qcow2"), img);
  EXPECT_NE(Ok(Q("info t.qcow2")).find("backing file format: foo\n"), std::string::npos);
  Copies("t.qcow2");
  CommandResult v = V("info v.qcow2");
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.out.find("backing file: t.base\nbacking file format: foo\n"), std::string::npos) << v.out;
  Both("rebase -u -b t.base");
  Both("rebase -u -b t.base -F qcow2");
  EXPECT_NE(Ok(Q("info v.qcow2")).find("backing file format: qcow2\n"), std::string::npos);
  Ok(Io("-c 'read -P 0 0 4k' v.qcow2"));
}

// iotest 036: unknown incompatible feature bits are named as qemu names them: the feature
// table's names first, then one mask of the bits it does not name.
TEST_F(CliIotestsTest, UnknownIncompatibleFeaturesAreListedAsQemuListsThem) {
  for (uint8_t top_byte : {0x80, 0xe0, 0x60}) {
    SCOPED_TRACE(top_byte);
    MustSh("rm -f orig.qcow2 && qemu-img create -q -f qcow2 orig.qcow2 1M");
    std::vector<uint8_t> img = ReadWholeFile(F("orig.qcow2"));
    img[72] |= top_byte;  // incompatible_features, most significant byte
    WriteWholeFile(F("orig.qcow2"), img);
    Copies("orig.qcow2");
    CommandResult v = V("info v.qcow2"), q = Q("info q.qcow2");
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_EQ(q.exit_code, 1);
    EXPECT_NE(q.err.find("Unsupported qcow2 feature(s): Unknown incompatible feature: "), std::string::npos);
    EXPECT_EQ(Message(v.err).substr(Message(v.err).find("Unsupported")),
              Message(q.err).substr(Message(q.err).find("Unsupported")));
  }
}

// Writes `bytes` at `offset` of a file in the test folder (qemu-iotests' poke_file).
void Poke(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  std::vector<uint8_t> img = ReadWholeFile(path);
  if (img.size() < offset + bytes.size()) img.resize(offset + bytes.size(), 0);
  std::copy(bytes.begin(), bytes.end(), img.begin() + static_cast<std::ptrdiff_t>(offset));
  WriteWholeFile(path, img);
}
// Bytes [from, to) of a file (zeros past its end).
std::vector<uint8_t> Peek(const std::string& path, uint64_t from, uint64_t to) {
  std::vector<uint8_t> img = ReadWholeFile(path);
  img.resize(std::max<uint64_t>(img.size(), to), 0);
  return std::vector<uint8_t>(img.begin() + static_cast<std::ptrdiff_t>(from),
                              img.begin() + static_cast<std::ptrdiff_t>(to));
}
// The big-endian 64-bit word at `offset` of a file (a qcow2 header field, say).
uint64_t Peek64(const std::string& path, uint64_t offset) {
  uint64_t v = 0;
  for (uint8_t b : Peek(path, offset, offset + 8)) v = v << 8 | b;
  return v;
}

// iotests 108 and 039: check -r all rebuilds a refcount structure it cannot trust where
// qemu rebuilds it (the first free clusters, so a file that cannot grow is rebuilt inside
// itself), grows the file for a refcount block past its end, says what qemu-img says, and
// clears the dirty and corrupt marks once nothing is left wrong.
TEST_F(CliIotestsTest, RepairRebuildsRefcountsWhereAndAsQemuDoes) {
  struct Case {
    const char* name;
    const char* make;  // shell, makes t.qcow2
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> pokes;
    bool zero_first_refcount = false;  // cluster 0 counted free in the first refcount block
  };
  const std::vector<Case> cases = {
      {"no refcount table",
       "qemu-img create -q -f qcow2 t.qcow2 64M && qemu-io -c 'write -P 42 0 64k' t.qcow2",
       {{0x30, {0, 0, 0, 0, 0, 0, 0, 0}}, {0x38, {0, 0, 0, 0}}}},
      {"refblock past the end, otherwise clean",
       "qemu-img create -q -f qcow2 t.qcow2 64M",
       {{0x10008, {0, 0, 0, 0, 0, 0x10, 0, 0}}, {0x20020, {0, 1}}}},
      {"refblock past the end, unallocated",
       "qemu-img create -q -f qcow2 t.qcow2 64M",
       {{0x10008, {0, 0, 0, 0, 0, 0x10, 0, 0}}}},
      {"refblock past INT64_MAX",
       "qemu-img create -q -f qcow2 t.qcow2 64M",
       {{0x10008, {0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0}}}},
      {"header cluster counted free, room left in the file",
       "qemu-img create -q -f qcow2 -o cluster_size=512 t.qcow2 1M && qemu-io -c 'write 0 64k' t.qcow2 && "
       "truncate -s +256K t.qcow2",
       {},
       true},
      {"dirty lazy-refcount image",
       "qemu-img create -q -f qcow2 -o compat=1.1,lazy_refcounts=on t.qcow2 128M && "
       "(qemu-io -c 'write -P 0x5a 0 512' -c 'sigraise 9' t.qcow2 >/dev/null 2>&1; true)",
       {}},
      {"corrupt mark and a leak",
       "qemu-img create -q -f qcow2 t.qcow2 1M && qemu-io -c 'write 0 64k' t.qcow2",
       {{79, {0x02}}, {0x20006, {0, 2}}}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    MustSh("rm -f t.qcow2 v.qcow2 q.qcow2 && " + std::string(c.make));
    for (const auto& [offset, bytes] : c.pokes) Poke(F("t.qcow2"), offset, bytes);
    if (c.zero_first_refcount) Poke(F("t.qcow2"), Peek64(F("t.qcow2"), Peek64(F("t.qcow2"), 48)), {0, 0});
    Copies("t.qcow2");
    Both("check -r all");
    // Where the new refcount table went (offset and clusters), and the feature marks.
    EXPECT_EQ(Peek(F("v.qcow2"), 48, 60), Peek(F("q.qcow2"), 48, 60));
    EXPECT_EQ(Peek(F("v.qcow2"), 72, 80), Peek(F("q.qcow2"), 72, 80));
    EXPECT_EQ(ReadWholeFile(F("v.qcow2")).size(), ReadWholeFile(F("q.qcow2")).size());
    ExpectSame();
  }
}

// iotests 061 and 039: a command that opens a dirty lazy-refcount image to write repairs it
// first, as qemu's open runs check -r all: the same lines on stderr, the refcount structure
// rebuilt where qemu rebuilds it, the dirty mark gone, then the command's own work.
TEST_F(CliIotestsTest, WritingCommandsRepairADirtyImageAsQemuOpensIt) {
  MustSh(
      "qemu-img create -q -f qcow2 -o compat=1.1,lazy_refcounts=on t.qcow2 64M && "
      "(qemu-io -c 'write -P 0x2a 0 128k' -c flush -c 'sigraise 9' t.qcow2 >/dev/null 2>&1; true)");
  struct Command {
    const char* args;
    const char* after;  // after the image's name
    bool same_layout;   // where the rebuilt refcount table lands, as qemu (snapshot -c
                        // lays out its own tables past the file's end, not as qemu)
  };
  for (const Command& c : {Command{"amend -o compat=0.10", "", true}, Command{"resize", "+1M", true},
                           Command{"snapshot -c s", "", false}, Command{"bitmap --add", "b", true}}) {
    SCOPED_TRACE(c.args);
    Copies("t.qcow2");
    Both(c.args, c.after);
    if (c.same_layout) {
      EXPECT_EQ(Peek(F("v.qcow2"), 48, 60), Peek(F("q.qcow2"), 48, 60));
    }
    EXPECT_EQ(Peek(F("v.qcow2"), 72, 80), Peek(F("q.qcow2"), 72, 80));
    ExpectSame();
    Ok(Io("-c 'read -P 0x2a 0 128k' v.qcow2"));
  }
}

// iotest 261: a snapshot table past qemu's limits (an entry with more than 1 KiB of extra
// data, more than 65536 entries) refuses the open with qemu's words and hint, fails a check,
// and check -r all drops what is past the limits as qemu does, findings and counts alike.
TEST_F(CliIotestsTest, SnapshotTablePastQemusLimitsIsRefusedAndRepairedAsQemu) {
  MustSh(
      "qemu-img create -q -f qcow2 t.qcow2 64M && qemu-io -c 'write -P 7 0 64k' t.qcow2 >/dev/null && "
      "qemu-img snapshot -c one t.qcow2 && qemu-img snapshot -c two t.qcow2");
  const uint64_t table = Peek64(F("t.qcow2"), 64);
  struct Case {
    const char* name;
    uint64_t offset;
    std::vector<uint8_t> bytes;
    bool repairable;  // qemu-img check -r all leaves it clean
  };
  const std::vector<Case> cases = {
      {"64 KiB of extra data in entry 0", table + 36, {0, 1, 0, 0}, true},
      {"65538 snapshots", 60, {0, 1, 0, 2}, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    MustSh("cp t.qcow2 poked.qcow2");
    Poke(F("poked.qcow2"), c.offset, c.bytes);
    Copies("poked.qcow2");
    Both("info");
    Both("check");
    if (!c.repairable) continue;
    CommandResult v = V("check -r all v.qcow2"), q = Q("check -r all q.qcow2");
    EXPECT_EQ(v.exit_code, q.exit_code);
    EXPECT_EQ(Message(v.err), Message(q.err));
    // Where the rewritten snapshot table goes differs, and so the image end offset.
    EXPECT_EQ(v.out.substr(0, v.out.find("Image end offset")),
              q.out.substr(0, q.out.find("Image end offset")));
    EXPECT_EQ(Ok(Q("snapshot -l v.qcow2")), Ok(Q("snapshot -l q.qcow2")));
    ExpectSame();
  }
}

// iotest 244: qemu-img map looks through a qcow2 image's data clusters into the host
// file's holes only when the image looks metadata-preallocated (more clusters counted than
// the file holds). A raw external data file's holes are data then, not zeros; and an image
// vimgfs creates must weigh as qemu's own does (its whole first cluster written).
TEST_F(CliIotestsTest, MapShowsHostHolesOnlyWhereQemuLooksForThem) {
  for (const char* creator : {"qemu-img", "vimgfs"}) {
    SCOPED_TRACE(creator);
    const std::string tool = std::string(creator) == "qemu-img" ? "qemu-img" : Quote(VimgfsBinary());
    MustSh("rm -f t.qcow2 t.data && " + tool +
           " create -q -f qcow2 -o data_file=t.data,data_file_raw=on t.qcow2 64M && "
           "qemu-io -c 'write -P 0x11 1M 4M' -c 'discard 2M 2M' -c 'write -z 3M 3M' t.qcow2 >/dev/null");
    CommandResult v = V("map --output=json t.qcow2"), q = Q("map --output=json t.qcow2");
    EXPECT_EQ(v.exit_code, 0) << v.err;
    EXPECT_EQ(v.out, q.out);
    EXPECT_NE(
        q.out.find("{ \"start\": 0, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": false"),
        std::string::npos)
        << q.out;
  }
  // A sparse copy looks preallocated: there qemu reports the holes as zeros, and so must we.
  MustSh(
      "rm -f t.qcow2 && qemu-img create -q -f qcow2 t.qcow2 8M && "
      "qemu-io -c 'write -P 0 0 4M' -c 'write -P 5 4M 1M' t.qcow2 >/dev/null && "
      "cp --sparse=always t.qcow2 s.qcow2");
  CommandResult v = V("map --output=json s.qcow2"), q = Q("map --output=json s.qcow2");
  EXPECT_EQ(v.out, q.out);
  EXPECT_NE(q.out.find("\"zero\": true, \"data\": true"), std::string::npos) << q.out;
}

// iotest 112: a snapshot shares every cluster, so each refcount grows by one; where that
// would pass the refcount width's maximum (a 2-bit count at 3, a 64-bit count at 2^64-1)
// the snapshot is refused with qemu's errno and the image keeps its data and counts: a
// 64-bit count must not wrap to zero (that would free a cluster in use).
TEST_F(CliIotestsTest, SnapshotPastTheRefcountMaximumIsRefused) {
  for (int bits : {2, 64}) {
    SCOPED_TRACE(bits);
    MustSh("rm -f t.qcow2 && qemu-img create -q -f qcow2 -o refcount_bits=" + std::to_string(bits) +
           " t.qcow2 64M && qemu-io -c 'write -P 0x5a 0 512' t.qcow2 >/dev/null");
    if (bits == 64) {
      // The data cluster's count at the maximum, and no COPIED flag: qemu-iotests' setup.
      Poke(F("t.qcow2"), 0x20028, std::vector<uint8_t>(8, 0xff));
      Poke(F("t.qcow2"), 0x40000, {0, 0, 0, 0, 0, 5, 0, 0});
    } else {
      MustSh("qemu-img snapshot -c s1 t.qcow2 && qemu-img snapshot -c s2 t.qcow2");  // count 3
    }
    Copies("t.qcow2");
    CommandResult before = Q("check v.qcow2");
    Both("snapshot -c foo");
    EXPECT_EQ(Named(Q("snapshot -l v.qcow2").out, "v.qcow2"), Named(Q("snapshot -l t.qcow2").out, "t.qcow2"));
    Ok(Io("-c 'read -P 0x5a 0 512' v.qcow2"));
    CommandResult after = Q("check v.qcow2");
    EXPECT_EQ(after.exit_code, before.exit_code) << after.out;
    EXPECT_EQ(after.out.find("ERROR"), std::string::npos) << after.out;
  }
}

// iotest 080: a damaged snapshot entry is found when the snapshot is used, not at open (as
// qemu): the active image still reads and converts; loading, applying or deleting the
// snapshot, and amend (which walks every snapshot), fail with qemu's reason. A snapshot
// table past the end of the file reads as empty entries, as qemu reads it, and at qemu's
// limit of 65536 snapshots another one is refused with qemu's errno.
TEST_F(CliIotestsTest, DamagedSnapshotEntriesFailWhereTheyAreUsed) {
  MustSh(
      "qemu-img create -q -f qcow2 t.qcow2 64M && qemu-io -c 'write -P 0x61 0 512' t.qcow2 >/dev/null && "
      "qemu-img snapshot -c test t.qcow2 && qemu-io -c 'write -P 0x62 0 512' t.qcow2 >/dev/null");
  const uint64_t table = Peek64(F("t.qcow2"), 64);
  struct Damage {
    const char* name;
    uint64_t at;  // in the snapshot's entry
    std::vector<uint8_t> bytes;
    const char* reason;
  };
  for (const Damage& d : {Damage{"unaligned L1 offset", 0, {0, 0, 0, 0, 0, 0x40, 0x02, 0}, "offset invalid"},
                          Damage{"L1 too large", 8, {0x10, 0, 0, 0}, "too large"}}) {
    SCOPED_TRACE(d.name);
    MustSh("cp t.qcow2 d.qcow2");
    Poke(F("d.qcow2"), table + d.at, d.bytes);
    Copies("d.qcow2");
    Ok(V("convert -O raw v.qcow2 v.raw"));
    Ok(Q("convert -O raw q.qcow2 q.raw"));
    MustSh("cmp v.raw q.raw");
    Ok(Io("-r -c 'read -P 0x62 0 512' v.qcow2"));
    Both("convert -l test", "snap.raw");
    Both("snapshot -d test");
    for (const char* op : {"snapshot -a test", "amend -o compat=0.10"}) {
      SCOPED_TRACE(op);
      CommandResult v = V(std::string(op) + " v.qcow2");
      EXPECT_EQ(v.exit_code, 1);
      EXPECT_NE(v.err.find(std::string("Snapshot L1 table ") + d.reason), std::string::npos) << v.err;
    }
    // The failed operations left the image as it was: qemu-img check finds the same.
    CommandResult cv = Q("check v.qcow2"), cq = Q("check q.qcow2");
    EXPECT_EQ(cv.exit_code, cq.exit_code);
    EXPECT_EQ(Named(cv.out + cv.err, "v.qcow2"), Named(cq.out + cq.err, "q.qcow2"));
    Both("check");
  }
  // 65536 snapshots whose table lies past the end of the file (qemu-iotests' setup).
  MustSh("qemu-img create -q -f qcow2 t.qcow2 64M");
  Poke(F("t.qcow2"), 64, {0, 0, 0, 0, 1, 0, 0, 0});
  Poke(F("t.qcow2"), 60, {0, 1, 0, 0});
  Copies("t.qcow2");
  Both("snapshot -c test");
  Ok(V("compare v.qcow2 t.qcow2"));  // still opens, still the same disk
}

// qemu-img snapshot's words and exit codes: names may repeat; a failed create says its
// errno; a format without snapshots cannot load one and finds none to delete.
TEST_F(CliIotestsTest, SnapshotErrorsInQemusWords) {
  MustSh("qemu-img create -q -f qcow2 t.qcow2 1M && qemu-img create -q -f raw t.raw 1M");
  Copies("t.qcow2");
  Both("snapshot -c a");
  Both("snapshot -c a");
  EXPECT_EQ(Ok(Q("snapshot -l v.qcow2")).size(), Ok(Q("snapshot -l q.qcow2")).size());
  Both("snapshot -a nosuch");
  Both("snapshot -d nosuch");
  for (const char* op : {"-c a", "-a a", "-d a"}) {
    SCOPED_TRACE(op);
    CommandResult v = V(std::string("snapshot ") + op + " t.raw"),
                  q = Q(std::string("snapshot ") + op + " t.raw");
    EXPECT_EQ(v.exit_code, q.exit_code);
    // The raw-probing warning first (qemu-img -a prints it twice: it opens the image
    // twice), then the error as the last line.
    auto last_line = [](const std::string& m) { return m.substr(m.rfind('\n', m.size() - 2) + 1); };
    EXPECT_EQ(last_line(Message(v.err)), last_line(Message(q.err)));
    EXPECT_EQ(v.err.rfind("WARNING: Image format was not specified for 't.raw' and probing guessed raw.", 0),
              0u)
        << v.err;
  }
}

// iotest 274: past the end of a short image between the top and the base, the top reads
// zeros whatever the base holds; commit -b gives the base those zeros.
TEST_F(CliIotestsTest, CommitOverAShortIntermediateWritesItsZerosIntoTheBase) {
  MustSh("qemu-img create -q -f qcow2 base.qcow2 2M && qemu-io -c 'write -P 1 0 2M' base.qcow2 >/dev/null");
  MustSh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 1M");
  MustSh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 2M");
  Ok(V("commit -b base.qcow2 top.qcow2"));
  Ok(Io("-c 'read -P 1 0 1M' -c 'read -P 0 1M 1M' base.qcow2"));
  Ok(Q("check base.qcow2"));
}

// iotest 122: convert -n into an image of its own keeps that image's backing file open:
// the source's zeros must hide what the backing file holds, by zero flags (version 3) or
// by written zeros (version 2, which has none). -B with -n names the backing file the
// copy may rely on instead.
TEST_F(CliIotestsTest, ConvertIntoAnExistingOverlayHidesItsBackingData) {
  MustSh("qemu-img create -q -f qcow2 src.qcow2 4M && qemu-io -c 'write -P 7 1M 1M' src.qcow2 >/dev/null");
  MustSh("qemu-img create -q -f qcow2 b.qcow2 4M && qemu-io -c 'write -P 9 0 4M' b.qcow2 >/dev/null");
  for (std::string compat : {"1.1", "0.10"}) {
    SCOPED_TRACE(compat);
    for (std::string tool : {"v", "q"}) {
      const std::string t = tool + ".qcow2";
      MustSh("rm -f " + t + " && qemu-img create -q -f qcow2 -o compat=" + compat + " -b b.qcow2 -F qcow2 " +
             t + " 4M");
      Ok(tool == "v" ? V("convert -O qcow2 -n src.qcow2 " + t) : Q("convert -O qcow2 -n src.qcow2 " + t));
    }
    Ok(Q("compare src.qcow2 v.qcow2"));
    ExpectSame();
  }
  // -B with -n: accepted, the target's backing file provides what the source's does.
  MustSh(
      "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 ov.qcow2 4M && qemu-io -c 'write -P 3 0 64k' ov.qcow2 "
      ">/dev/null");
  MustSh("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 out.qcow2 4M");
  Ok(V("convert -O qcow2 -B b.qcow2 -n ov.qcow2 out.qcow2"));
  Ok(Q("compare ov.qcow2 out.qcow2"));
  EXPECT_EQ(Map("out.qcow2")[0]["depth"], 0);
  EXPECT_EQ(Map("out.qcow2")[1]["depth"], 1);
}

// iotest 122: -S 0 allocates everything, compressed or not, zeros included; images laid
// out as qemu lays them (L2 table, then data), so a fresh copy's data is one contiguous run.
TEST_F(CliIotestsTest, ConvertFullAllocationAndLayoutAsQemu) {
  MustSh("qemu-img create -q -f qcow2 src.qcow2 64M && qemu-io -c 'write -P 1 0 3M' src.qcow2 >/dev/null");
  for (std::string opts : {"-S 0", "-c -S 0", ""}) {
    SCOPED_TRACE(opts);
    MustSh("rm -f v.qcow2 q.qcow2");
    Ok(V("convert -O qcow2 " + opts + " src.qcow2 v.qcow2"));
    Ok(Q("convert -O qcow2 " + opts + " src.qcow2 q.qcow2"));
    EXPECT_EQ(Q("map --output=json v.qcow2").out, Q("map --output=json q.qcow2").out);
    Ok(Q("compare src.qcow2 v.qcow2"));
  }
}

// iotest 274: a grow with preallocation over a longer backing file: metadata gives the
// zeros host clusters under their zero flags (L2 table before data, refcount blocks after
// the run), falloc and full give zeroed data clusters; laid out as qemu lays them.
TEST_F(CliIotestsTest, PreallocatedGrowOverALongerBackingFileAsQemu) {
  struct Case {
    const char* mode;
    const char* base;
    const char* old_size;
    const char* new_size;
  };
  for (const Case& c : {Case{"metadata", "6G", "4G", "7G"}, Case{"falloc", "10M", "5M", "15M"},
                        Case{"full", "16M", "8M", "12M"}}) {
    SCOPED_TRACE(c.mode);
    MustSh(std::string("rm -f base.qcow2 && qemu-img create -q -f qcow2 base.qcow2 ") + c.base);
    MustSh(std::string("qemu-io -c 'write -P 1 ") + c.old_size + " 64k' base.qcow2 >/dev/null");
    MustSh(std::string("rm -f o.qcow2 && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 o.qcow2 ") +
           c.old_size);
    Copies("o.qcow2");
    Both(std::string("resize --preallocation=") + c.mode, c.new_size);
    EXPECT_EQ(Q("map --output=json v.qcow2").out, Q("map --output=json q.qcow2").out);
    Ok(Io(std::string("-c 'read -P 0 ") + c.old_size + " 64k' v.qcow2"));
    ExpectSame();
  }
  // Preallocation is for growing only (iotest 106).
  Both("resize --shrink --preallocation=falloc", "-- -64K");
}

// iotest 175: a fresh raw image has its first block written (qemu's file driver does it
// for the alignment probe), so map and the host allocation show it as qemu's do.
TEST_F(CliIotestsTest, FreshRawImageHasItsFirstBlockAsQemu) {
  for (const char* size : {"1M", "1536"}) {
    SCOPED_TRACE(size);
    MustSh("rm -f v.raw q.raw");
    Ok(V(std::string("create -f raw v.raw ") + size));
    Ok(Q(std::string("create -f raw q.raw ") + size));
    EXPECT_EQ(Q("map --output=json -f raw v.raw").out, Q("map --output=json -f raw q.raw").out);
    EXPECT_EQ(Sh("stat -c %b v.raw").out, Sh("stat -c %b q.raw").out);
  }
}

// iotest 242: a persistent bitmap outside qemu's constraints (here an unknown flag) makes
// qemu refuse the whole image at open, in these words; so do we. Cleared, it opens again.
TEST_F(CliIotestsTest, BitmapOutsideQemusConstraintsRefusesTheImage) {
  MustSh("qemu-img create -q -f qcow2 b.qcow2 1M && qemu-img bitmap --add b.qcow2 bitmap-0");
  // The bitmap directory's offset (extension 0x23852875), then the entry's flags word.
  const std::string flags_at =
      "python3 -c \"import struct,sys; d=open('b.qcow2','rb').read(); p=struct.unpack('>I',d[100:104])[0]\n"
      "while True:\n"
      "  t,l=struct.unpack('>II',d[p:p+8])\n"
      "  if t==0x23852875: print(struct.unpack('>Q',d[p+24:p+32])[0]+12); break\n"
      "  p+=8+(l+7)//8*8\"";
  const std::string at = Ok(Sh(flags_at));
  ASSERT_FALSE(at.empty());
  MustSh("printf '\\000\\000\\000\\006' | dd of=b.qcow2 bs=1 seek=" + at.substr(0, at.size() - 1) +
         " conv=notrunc status=none");
  Copies("b.qcow2");
  Both("info");
  EXPECT_NE(Q("info q.qcow2").err.find("Bitmap 'bitmap-0' doesn't satisfy the constraints"),
            std::string::npos);
  MustSh("printf '\\000\\000\\000\\002' | dd of=v.qcow2 bs=1 seek=" + at.substr(0, at.size() - 1) +
         " conv=notrunc status=none");
  Ok(V("info v.qcow2"));
}

}  // namespace
}  // namespace vimgfs::test

// qcow (version 1) against qemu-img 7.2: images qemu makes (plain, with a backing file,
// compressed by convert -c, odd sizes) read byte-for-byte like `qemu-img convert -O raw`
// and show the same info and map; images vimgfs creates are qemu's byte for byte; what
// vimgfs writes (through the engine, convert -O qcow, convert -c) qemu reads back
// identically; check, resize and rebase -u are refused as qemu-img refuses them; commit
// empties the overlay as qemu does; hostile headers and tables are refused with one line.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "formats/qcow/qcow_internal.h"
#include "support/test_util.h"
#include "util/checked.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kKiB = 1024, kMiB = 1 << 20;

std::string Vimgfs() { return Quote(test::VimgfsBinary()); }

Result<std::unique_ptr<Image>> OpenQcow(const std::string& path, bool read_only) {
  OpenOptions o;
  o.read_only = read_only;
  o.format = "qcow";
  return Image::Open(path, o);
}

std::vector<uint8_t> ReadAll(Image& img) {
  std::vector<uint8_t> buf(img.size());
  Status s = img.Read(0, std::as_writable_bytes(std::span(buf)));
  EXPECT_TRUE(s.ok()) << s.message();
  return buf;
}

std::vector<uint8_t> QemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string raw = dir.File("qemu.raw");
  auto r = RunCommand("qemu-img convert -f qcow -O raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  auto v = test::ReadWholeFile(raw);
  std::filesystem::remove(raw);
  return v;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f qcow";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

// qemu-img 7.2's convert -c to qcow writes every cluster, then fails its final
// zero-length "align at EOF" compressed write (qcow refuses it) and exits 1 without a
// message: the image is complete, so only a message would mean a real failure.
void QemuConvertCompressed(const std::string& args) {
  auto r = RunCommand("qemu-img convert -c -O qcow " + args);
  ASSERT_TRUE(r.exit_code == 0 || (r.exit_code == 1 && r.err.empty())) << r.exit_code << ": " << r.err;
}

// vimgfs reads the image as qemu-img converts it, and info and map (both outputs) agree.
void ExpectLikeQemu(const test::TempDir& dir, const std::string& image) {
  SCOPED_TRACE(image);
  auto img = OpenQcow(image, true);
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ(ReadAll(**img), QemuRaw(dir, image));
  img->reset();
  for (const std::string cmd : {"info", "info --output=json", "map", "map --output=json"}) {
    auto theirs = RunCommand("qemu-img " + cmd + " " + Quote(image));
    auto ours = RunCommand(Vimgfs() + " " + cmd + " " + Quote(image));
    EXPECT_EQ(ours.exit_code, theirs.exit_code) << cmd << ": " << ours.err;
    EXPECT_EQ(ours.out, theirs.out) << cmd;
  }
}

TEST(Qcow1Oracle, QemuMadeImagesReadByteExactWithInfoAndMapAlike) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.qcow"), top = dir.File("top.qcow"), odd = dir.File("odd.qcow");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(base) + " 9M").exit_code, 0);
  // Across an L2 table (2 MiB of guest per table with 4 KiB clusters), partial clusters.
  QemuIo(base, {"write -P 0x11 0 64k", "write -P 0x22 2047k 6k", "write -P 0x33 5000k 1536",
                "write -P 0x44 9215k 1k"});
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow -b base.qcow -F qcow " + Quote(top)).exit_code, 0);
  QemuIo(top, {"write -P 0x55 32k 1k", "write -P 0x66 2046k 4k", "write -z 5000k 512"});
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(odd) + " 1000001").exit_code, 0);
  QemuIo(odd, {"write -P 0x77 999424 512"});
  for (const std::string& image : {base, top, odd}) ExpectLikeQemu(dir, image);
  // The backing chain is shown as qemu shows it (qcow stores no backing format).
  auto theirs = RunCommand("qemu-img info --backing-chain " + Quote(top));
  auto ours = RunCommand(Vimgfs() + " info --backing-chain " + Quote(top));
  EXPECT_EQ(ours.out, theirs.out);
}

TEST(Qcow1Oracle, CompressedClustersReadLikeQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string src = dir.File("src.raw"), image = dir.File("c.qcow");
  // Compressible text, random (stored uncompressed) and zero stretches.
  std::vector<uint8_t> data(3 * kMiB);
  std::mt19937_64 rng(7);
  for (size_t i = 0; i < kMiB; ++i) data[i] = static_cast<uint8_t>("qcow version one "[i % 17]);
  for (size_t i = kMiB; i < kMiB + 200 * kKiB; ++i) data[i] = static_cast<uint8_t>(rng());
  for (size_t i = 2 * kMiB + 5; i < 2 * kMiB + 9000; ++i) data[i] = static_cast<uint8_t>(i * 7);
  test::WriteWholeFile(src, data);
  QemuConvertCompressed("-f raw " + Quote(src) + " " + Quote(image));
  ExpectLikeQemu(dir, image);
  auto img = OpenQcow(image, true);
  ASSERT_TRUE(img.ok());
  EXPECT_EQ(ReadAll(**img), data);
}

TEST(Qcow1Oracle, WritesThroughTheEngineReadBackInQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.qcow"), top = dir.File("top.qcow"), comp = dir.File("comp.qcow");
  ASSERT_EQ(RunCommand(Vimgfs() + " create -q -f qcow " + Quote(base) + " 6M").exit_code, 0);
  QemuIo(base, {"write -P 0x5a 0 6M"});
  ASSERT_EQ(RunCommand(Vimgfs() + " create -q -f qcow -b base.qcow -F qcow " + Quote(top)).exit_code, 0);
  // A compressed image to overwrite partly: the rest of each cluster must survive.
  QemuConvertCompressed(Quote(base) + " " + Quote(comp));
  for (const std::string& image : {top, comp}) {
    SCOPED_TRACE(image);
    std::vector<uint8_t> model(6 * kMiB, 0x5a);
    {
      auto img = OpenQcow(image, false);
      ASSERT_TRUE(img.ok()) << img.error().message();
      std::mt19937_64 rng(11);
      for (int i = 0; i < 60; ++i) {
        const uint64_t len = 1 + rng() % (20 * kKiB);
        const uint64_t off = rng() % (model.size() - len);
        auto bytes = test::RandomBytes(len, rng());
        ASSERT_TRUE((*img)->Write(off, std::as_bytes(std::span(bytes))).ok());
        std::memcpy(&model[off], bytes.data(), len);
        if (i % 20 == 19) {
          ASSERT_TRUE((*img)->Flush().ok());
        }
      }
      EXPECT_EQ(ReadAll(**img), model);
      ASSERT_TRUE((*img)->Close().ok());
    }
    EXPECT_EQ(QemuRaw(dir, image), model);
    auto theirs = RunCommand("qemu-img map --output=json " + Quote(image));
    auto ours = RunCommand(Vimgfs() + " map --output=json " + Quote(image));
    EXPECT_EQ(ours.out, theirs.out);
  }
}

TEST(Qcow1Oracle, ConvertToQcowPlainAndCompressedReadsBackInQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string src = dir.File("src.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + Quote(src) + " 5M").exit_code, 0);
  auto r = RunCommand("qemu-io -c 'write -P 0x61 0 1M' -c 'write -P 0x62 3M 4097' " + Quote(src));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const std::string flags : {"", "-c "}) {
    const std::string out = dir.File("out.qcow");
    r = RunCommand(Vimgfs() + " convert " + flags + "-O qcow " + Quote(src) + " " + Quote(out));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand("qemu-img compare -f qcow2 -F qcow " + Quote(src) + " " + Quote(out));
    EXPECT_EQ(r.exit_code, 0) << flags << r.out << r.err;
    ExpectLikeQemu(dir, out);
    if (!flags.empty()) {
      // convert -c stored compressed clusters: qemu's map shows data without an offset.
      r = RunCommand("qemu-img map --output=json " + Quote(out));
      EXPECT_NE(r.out.find("\"data\": true}"), std::string::npos) << r.out;
    }
  }
}

TEST(Qcow1Oracle, CreateWritesQemusBytesAndRefusesWhatQemuRefuses) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string ours = dir.File("ours.qcow"), theirs = dir.File("theirs.qcow");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(dir.File("b.qcow")) + " 1M").exit_code, 0);
  for (const std::string args :
       {"3M", "1000", "100G", "-o encryption=off 2M", "-b b.qcow -F qcow", "-u -b nosuch.img -F raw 20M"}) {
    SCOPED_TRACE(args);
    auto q = RunCommand("qemu-img create -q -f qcow " + Quote(theirs) + " " + args);
    auto v = RunCommand(Vimgfs() + " create -q -f qcow " + Quote(ours) + " " + args);
    ASSERT_EQ(q.exit_code, 0) << q.err;
    ASSERT_EQ(v.exit_code, 0) << v.err;
    // qemu paths are the same relative names; only the file differs.
    EXPECT_EQ(test::ReadWholeFile(ours), test::ReadWholeFile(theirs));
  }
  struct Bad {
    const char* args;
    const char* message;
  };
  for (const Bad& b :
       {Bad{"0", "Image size is too small, cannot be zero length"},
        Bad{"-o encryption=on 1M", "Parameter 'encrypt.key-secret' is required for cipher"},
        Bad{"-o encrypt.format=aes 1M", "Parameter 'encrypt.key-secret' is required for cipher"},
        Bad{"-o encrypt.format=luks 1M", "Unsupported encryption format"},
        Bad{"-o cluster_size=4096 1M", "Invalid parameter 'cluster_size'"},
        Bad{"-u -b b.qcow -F nosuchfmt 1M", "unrecognized backing format 'nosuchfmt'"}}) {
    SCOPED_TRACE(b.args);
    auto v = RunCommand(Vimgfs() + " create -q -f qcow " + Quote(ours) + " " + b.args);
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_NE(v.err.find(b.message), std::string::npos) << v.err;
  }
  auto help = RunCommand(Vimgfs() + " create -f qcow -o help");
  auto qhelp = RunCommand("qemu-img create -f qcow -o help");
  EXPECT_EQ(help.out, qhelp.out);
}

TEST(Qcow1Oracle, CheckResizeAndRebaseRefusedAsQemuRefusesThem) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("a.qcow");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(image) + " 1M").exit_code, 0);
  const auto before = test::ReadWholeFile(image);
  for (const std::string cmd : {"check", "resize", "rebase -u -F qcow -b x.qcow"}) {
    SCOPED_TRACE(cmd);
    std::string args = cmd == "resize" ? Quote(image) + " 2M" : Quote(image);
    auto q = RunCommand("qemu-img " + cmd + " " + args);
    auto v = RunCommand(Vimgfs() + " " + cmd + " " + args);
    EXPECT_EQ(v.exit_code, q.exit_code);
    EXPECT_NE(q.exit_code, 0);
    // The same words after the program name.
    EXPECT_EQ(v.err.substr(v.err.find(':')), q.err.substr(q.err.find(':')));
  }
  EXPECT_EQ(test::ReadWholeFile(image), before);
}

TEST(Qcow1Oracle, CommitEmptiesTheOverlayAsQemuDoes) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // Names of one length: the overlays store them, and their length moves the L1 table.
  for (const std::string tool : {"qemu", "ours"}) {
    const std::string base = dir.File(tool + "-base.qcow"), top = dir.File(tool + "-top.qcow");
    ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(base) + " 4M").exit_code, 0);
    QemuIo(base, {"write -P 0x01 0 4M"});
    ASSERT_EQ(RunCommand("qemu-img create -q -f qcow -b " + Quote(base) + " -F qcow " + Quote(top)).exit_code,
              0);
    QemuIo(top, {"write -P 0x02 1M 5k"});
  }
  auto r = RunCommand("qemu-img commit -q " + Quote(dir.File("qemu-top.qcow")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCommand(Vimgfs() + " commit -q " + Quote(dir.File("ours-top.qcow")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(std::filesystem::file_size(dir.File("ours-top.qcow")),
            std::filesystem::file_size(dir.File("qemu-top.qcow")));
  EXPECT_EQ(QemuRaw(dir, dir.File("ours-base.qcow")), QemuRaw(dir, dir.File("qemu-base.qcow")));
  EXPECT_EQ(QemuRaw(dir, dir.File("ours-top.qcow")), QemuRaw(dir, dir.File("qemu-base.qcow")));
}

TEST(Qcow1Oracle, CommitKeepsARawBaseRaw) {
  // qcow stores no backing format, so a raw base is probed: a commit that would write
  // another format's header into its first sector is refused, as qemu refuses it.
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.img"), top = dir.File("top.qcow"), q2 = dir.File("x.qcow2");
  test::WriteWholeFile(base, std::vector<uint8_t>(kMiB));
  ASSERT_EQ(RunCommand(Vimgfs() + " create -q -f qcow -u -b base.img -F raw " + Quote(top) + " 1M").exit_code,
            0);
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + Quote(q2) + " 1M").exit_code, 0);
  auto r = RunCommand("qemu-img convert -n -f raw -O qcow " + Quote(q2) + " " + Quote(top));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCommand(Vimgfs() + " commit " + Quote(top));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("Block job failed: Operation not permitted"), std::string::npos) << r.err;
  EXPECT_EQ(test::ReadWholeFile(base), std::vector<uint8_t>(kMiB));
}

TEST(Qcow1Oracle, UntrustedRefusesABackingFileOutsideTheFolder) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::filesystem::create_directory(dir.File("sub"));
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow " + Quote(dir.File("a.qcow")) + " 1M").exit_code, 0);
  const std::string top = dir.File("sub/t.qcow");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow -b ../a.qcow -F qcow " + Quote(top)).exit_code, 0);
  EXPECT_EQ(RunCommand(Vimgfs() + " convert -O raw " + Quote(top) + " " + Quote(dir.File("o.raw"))).exit_code,
            0);
  auto r =
      RunCommand(Vimgfs() + " convert --untrusted -O raw " + Quote(top) + " " + Quote(dir.File("o.raw")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("refused with --untrusted"), std::string::npos) << r.err;
}

// Without its key an AES image opens for info only; every command that reads guest data
// says so in one line (tests/oracle/luks_test.cc reads and writes them with the key).
TEST(Qcow1Oracle, EncryptedImagesWithoutTheirKeyAreRefusedWithOneLine) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("e.qcow");
  auto r = RunCommand(
      "qemu-img create -q -f qcow --object secret,id=s0,data=pw -o encrypt.format=aes,"
      "encrypt.key-secret=s0 " +
      Quote(image) + " 1M");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCommand(Vimgfs() + " info " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("encrypted: yes"), std::string::npos) << r.out;
  for (const std::string cmd : {"convert -O raw", "map"}) {
    std::string args = Quote(image) + (cmd.starts_with("convert") ? " " + Quote(dir.File("o.raw")) : "");
    r = RunCommand(Vimgfs() + " " + cmd + " " + args);
    EXPECT_EQ(r.exit_code, 1) << cmd;
    EXPECT_NE(r.err.find("Parameter 'encrypt.key-secret' is required for cipher"), std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

// A qemu-made image with 4 KiB clusters, one L2 table, one data cluster and one
// compressed one, to corrupt field by field.
class Qcow1Hostile : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::HaveProgram("qemu-img")) GTEST_SKIP() << "qemu-img not installed";
    src_ = dir_.File("src.raw");
    std::vector<uint8_t> data(8 * kKiB, 0x41);
    test::WriteWholeFile(src_, data);
    image_ = dir_.File("good.qcow");
    QemuConvertCompressed("-f raw " + Quote(src_) + " " + Quote(image_));
    if (HasFatalFailure()) return;
    good_ = test::ReadWholeFile(image_);
    ASSERT_GE(good_.size(), 560u);
    l1_offset_ = LoadBE64(&good_[qcow::off::kL1Offset]);
    l2_offset_ = LoadBE64(&good_[l1_offset_]);
    ASSERT_NE(l2_offset_, 0u);
  }
  // Open and read all of `bytes` as a qcow image: the first error, or "" when it worked.
  std::string OpenAndRead(const std::vector<uint8_t>& bytes) {
    const std::string path = dir_.File("bad.qcow");
    test::WriteWholeFile(path, bytes);
    auto img = OpenQcow(path, false);
    if (!img.ok()) return img.error().message();
    std::vector<std::byte> buf((*img)->size());
    Status s = (*img)->Read(0, buf);
    return s.ok() ? "" : s.message();
  }
  void ExpectRefused(const std::vector<uint8_t>& bytes, const std::string& words) {
    const std::string msg = OpenAndRead(bytes);
    EXPECT_NE(msg.find(words), std::string::npos) << "got: '" << msg << "'";
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  test::TempDir dir_;
  std::string src_, image_;
  std::vector<uint8_t> good_;
  uint64_t l1_offset_ = 0, l2_offset_ = 0;
};

TEST_F(Qcow1Hostile, TheUncorruptedImageReads) { EXPECT_EQ(OpenAndRead(good_), ""); }

TEST_F(Qcow1Hostile, HeaderFieldsOutOfRangeAreRefused) {
  auto with = [&](size_t at, std::initializer_list<uint8_t> bytes) {
    auto v = good_;
    std::copy(bytes.begin(), bytes.end(), v.begin() + at);
    return v;
  };
  ExpectRefused(with(qcow::off::kClusterBits, {8}), "Cluster size must be between 512 and 64k");
  ExpectRefused(with(qcow::off::kClusterBits, {17}), "Cluster size must be between 512 and 64k");
  ExpectRefused(with(qcow::off::kL2Bits, {5}), "L2 table size must be between 512 and 64k");
  ExpectRefused(with(qcow::off::kL2Bits, {14}), "L2 table size must be between 512 and 64k");
  ExpectRefused(with(qcow::off::kSize, {0, 0, 0, 0, 0, 0, 0, 1}), "Image size is too small");
  // 2^63 bytes: qemu calls it too large; 2^40 needs an L1 table past the end of the file.
  ExpectRefused(with(qcow::off::kSize, {0x80, 0, 0, 0, 0, 0, 0, 0}), "too large");
  ExpectRefused(with(qcow::off::kSize, {0, 0, 1, 0, 0, 0, 0, 0}), "extends past the end of the file");
  ExpectRefused(with(qcow::off::kSize, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}), "too large");
  ExpectRefused(with(qcow::off::kCryptMethod + 3, {2}), "invalid encryption method");
  ExpectRefused(with(qcow::off::kCryptMethod + 3, {1}),
                "Parameter 'encrypt.key-secret' is required for cipher");
  ExpectRefused(with(qcow::off::kL1Offset, {0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0}),
                "L1 table (offset 0x7ffffffffffffff0");
  ExpectRefused(with(qcow::off::kL1Offset + 4, {0, 1, 0, 0}), "extends past the end of the file");
  ExpectRefused(with(qcow::off::kVersion + 3, {2}), "does not support qcow version 2");
  // The backing file name: too long by qemu's limit, or past the end of the file.
  auto named = with(qcow::off::kBackingOffset + 7, {48});
  EXPECT_EQ(OpenAndRead(with(qcow::off::kBackingSize, {0, 0, 4, 0})), "");  // offset 0: no name
  auto too_long = named;
  StoreBE32(&too_long[qcow::off::kBackingSize], 1024);
  ExpectRefused(too_long, "Backing file name too long");
  auto past = named;
  StoreBE32(&past[qcow::off::kBackingSize], 16);
  StoreBE64(&past[qcow::off::kBackingOffset], past.size() - 8);
  ExpectRefused(past, "backing file name (offset");
  ExpectRefused(std::vector<uint8_t>(good_.begin(), good_.begin() + 40), "too small for a qcow header");
}

TEST_F(Qcow1Hostile, TablesPastTheFileOrOnTheHeaderAreRefused) {
  auto l1_entry = [&](uint64_t v) {
    auto bad = good_;
    StoreBE64(&bad[l1_offset_], v);
    return bad;
  };
  ExpectRefused(l1_entry(good_.size()), "extends past the end of the file");
  ExpectRefused(l1_entry(UINT64_MAX - 8), "extends past the end of the file");
  ExpectRefused(l1_entry(8), "overlaps the header or L1 table");
  auto l2_entry = [&](uint64_t v) {
    auto bad = good_;
    StoreBE64(&bad[l2_offset_], v);
    return bad;
  };
  ExpectRefused(l2_entry(good_.size() + 4096), "bad host offset");
  ExpectRefused(l2_entry(AlignUp(good_.size(), 512)), "bad host offset");
  ExpectRefused(l2_entry(l2_offset_ + 7), "bad host offset");  // unaligned: qemu says EIO
  ExpectRefused(l2_entry(qcow::kCompressedFlag | (uint64_t{100} << 51) | (good_.size() - 10)),
                "not inside the file");
  ExpectRefused(l2_entry(qcow::kCompressedFlag | 600), "not inside the file");  // length 0
  // A bad stream inflates to an error, not garbage.
  auto garbage = good_;
  const uint64_t e = LoadBE64(&good_[l2_offset_]);
  ASSERT_TRUE(e & qcow::kCompressedFlag);
  const uint64_t host = e & ((uint64_t{1} << 51) - 1);
  std::fill(garbage.begin() + host, garbage.begin() + host + 8, 0xff);
  EXPECT_NE(OpenAndRead(garbage), "");
}

TEST_F(Qcow1Hostile, DataClusterOnTheHeaderIsMovedNotOverwritten) {
  // An L2 entry pointing into the L1 table reads it as data (as qemu does), but a write
  // gives the cluster a new home instead of writing over the table.
  auto bad = good_;
  StoreBE64(&bad[l2_offset_ + 8], 512);
  const std::string path = dir_.File("overlap.qcow");
  test::WriteWholeFile(path, bad);
  {
    auto img = OpenQcow(path, false);
    ASSERT_TRUE(img.ok()) << img.error().message();
    std::vector<uint8_t> buf(512, 0x99);
    ASSERT_TRUE((*img)->Write(4096 + 512, std::as_bytes(std::span(buf))).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  auto after = test::ReadWholeFile(path);
  EXPECT_TRUE(std::equal(bad.begin(), bad.begin() + 560, after.begin()));
  auto raw = QemuRaw(dir_, path);
  ASSERT_EQ(raw.size(), 8 * kKiB);
  EXPECT_TRUE(std::equal(bad.begin() + 512, bad.begin() + 1024, raw.begin() + 4096));
  EXPECT_EQ(raw[4096 + 512], 0x99);
  EXPECT_EQ(raw[4096 + 1023], 0x99);
  EXPECT_TRUE(std::equal(bad.begin() + 1536, bad.begin() + 4608, raw.begin() + 4096 + 1024));
}

TEST_F(Qcow1Hostile, DataClusterPastTheEndReadsZerosAndIsMovedOnWrite) {
  // A cluster that starts inside the file and ends past it: the tail reads as zeros (as
  // in qemu); a write moves the cluster rather than growing the file under it.
  auto bad = good_;
  const uint64_t host = AlignDown(bad.size() - 1, 512);
  StoreBE64(&bad[l2_offset_ + 8], host);
  const std::string path = dir_.File("tail.qcow");
  test::WriteWholeFile(path, bad);
  auto img = OpenQcow(path, false);
  ASSERT_TRUE(img.ok()) << img.error().message();
  auto before = ReadAll(**img);
  EXPECT_EQ(before, QemuRaw(dir_, path));
  std::vector<uint8_t> buf(512, 0x99);
  ASSERT_TRUE((*img)->Write(4096, std::as_bytes(std::span(buf))).ok());
  ASSERT_TRUE((*img)->Close().ok());
  std::copy(buf.begin(), buf.end(), before.begin() + 4096);
  EXPECT_EQ(QemuRaw(dir_, path), before);
}

TEST(Qcow1Probe, VersionTellsQcowFromQcow2) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  for (const std::string fmt : {"qcow", "qcow2"}) {
    const std::string image = dir.File("x." + fmt);
    ASSERT_EQ(RunCommand("qemu-img create -q -f " + fmt + " " + Quote(image) + " 1M").exit_code, 0);
    OpenOptions o;
    o.read_only = true;
    auto img = Image::Open(image, o);
    ASSERT_TRUE(img.ok()) << img.error().message();
    EXPECT_EQ((*img)->format(), fmt);
  }
  auto r = RunCommand(Vimgfs() + " info -f qcow " + Quote(dir.File("x.qcow2")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("does not support qcow version 3"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace vimgfs

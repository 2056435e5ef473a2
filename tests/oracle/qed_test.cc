// QED against qemu-img 7.2: images qemu makes (cluster and table sizes, backing files,
// zero clusters) read byte-for-byte like `qemu-img convert -O raw`, and info, map and check
// print what qemu-img prints; what vimgfs creates, writes (from several threads, zeroes,
// over a backing file), converts, resizes and rebases, qemu-img reads back identically and
// checks clean; the need-check mark is set while writing and cleared on close, and a dirty
// image is repaired by a read-write open; hostile headers and tables fail with one line.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "formats/qed/qed_internal.h"
#include "support/test_util.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kKiB = 1024, kMiB = 1 << 20;

std::string Vimgfs() { return Quote(test::VimgfsBinary()); }

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool ro) {
  OpenOptions o;
  o.read_only = ro;
  o.format = "qed";
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

void Sh(const std::string& cmd) {
  auto r = RunCommand(cmd);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.out << r.err;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds, const std::string& fmt = "qed") {
  std::string line = "qemu-io -f " + fmt;
  for (const auto& c : cmds) line += " -c " + Quote(c);
  Sh(line + " " + Quote(image) + " >/dev/null");
}

// vimgfs's raw view of the image equals qemu-img's.
void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string ours = dir.File("ours.raw"), theirs = dir.File("qemu.raw");
  Sh("qemu-img convert -f qed -O raw " + Quote(image) + " " + Quote(theirs));
  Sh(Vimgfs() + " convert -f qed -O raw " + Quote(image) + " " + Quote(ours));
  EXPECT_EQ(test::Sha256OfFile(ours), test::Sha256OfFile(theirs)) << image;
  // And through the Image API, not only convert.
  auto img = OpenOrDie(image, true);
  ASSERT_NE(img, nullptr);
  std::vector<std::byte> buf(img->size());
  ASSERT_TRUE(img->Read(0, buf).ok());
  auto want = test::ReadWholeFile(theirs);
  ASSERT_EQ(want.size(), buf.size());
  EXPECT_EQ(std::memcmp(want.data(), buf.data(), buf.size()), 0) << image;
}

// The same command prints the same with both tools (stdout and exit code).
void ExpectSameOutput(const std::string& args, const std::string& where) {
  auto q = RunCommand("qemu-img " + args);
  auto v = RunCommand(Vimgfs() + " " + args);
  EXPECT_EQ(v.exit_code, q.exit_code) << where << ": " << args << "\n" << v.err << q.err;
  EXPECT_EQ(v.out, q.out) << where << ": " << args;
}

void ExpectSameJson(const std::string& args, const std::string& where) {
  auto q = RunCommand("qemu-img " + args);
  auto v = RunCommand(Vimgfs() + " " + args);
  ASSERT_EQ(v.exit_code, q.exit_code) << where << ": " << args << "\n" << v.err << q.err;
  EXPECT_EQ(nlohmann::json::parse(v.out), nlohmann::json::parse(q.out)) << where << ": " << args;
}

void ExpectQemuCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f qed " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
}

uint64_t HeaderFeatures(const std::string& image) {
  auto raw = test::ReadWholeFile(image);
  return LoadLE64(raw.data() + qed::hdr::kFeatures);
}

TEST(QedOracle, QemuMadeImagesReadByteExactAndPrintAlike) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Geometry {
    const char* cluster;
    const char* table;
  };
  for (Geometry g : {Geometry{"4k", "2"}, Geometry{"64k", "4"}, Geometry{"4k", "16"}, Geometry{"1M", "2"}}) {
    const std::string where = std::string(g.cluster) + "/" + g.table;
    SCOPED_TRACE(where);
    const std::string img = dir.File("img.qed");
    std::filesystem::remove(img);
    Sh("qemu-img create -q -f qed -o cluster_size=" + std::string(g.cluster) + ",table_size=" + g.table +
       " " + Quote(img) + " 50M");
    QemuIo(img, {"write -P 0x11 0 3k", "write -P 0x22 100k 70k", "write -z 1M 1M", "write -P 0x33 5M 1M",
                 "write -z 5M 4k", "write -P 0x44 40M 512", "write -P 0x55 49M 1M"});
    ExpectSameAsQemuRaw(dir, img);
    ExpectSameOutput("map -f qed --output=json " + Quote(img), where);
    ExpectSameOutput("map -f qed " + Quote(img), where);
    ExpectSameOutput("info -f qed " + Quote(img), where);
    ExpectSameJson("info -f qed --output=json " + Quote(img), where);
    ExpectSameOutput("check -f qed " + Quote(img), where);
    ExpectSameJson("check -f qed --output=json " + Quote(img), where);
  }
}

TEST(QedOracle, CreateMatchesQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  Sh("qemu-img create -q -f raw " + Quote(dir.File("base.raw")) + " 3M");
  for (std::string opts : {"", "-o cluster_size=4k", "-o table_size=16,cluster_size=1M", "-b base.raw -F raw",
                           "-b base.raw -F raw -o cluster_size=8k,table_size=2", "-o preallocation=full"}) {
    SCOPED_TRACE(opts);
    const std::string size = opts.find("-b") == std::string::npos ? " 10000000" : "";
    auto q = RunCommand("cd " + Quote(dir.path()) + " && qemu-img create -f qed " + opts + " q.qed" + size);
    auto v = RunCommand("cd " + Quote(dir.path()) + " && " + Vimgfs() + " create -f qed " + opts + " v.qed" +
                        size);
    ASSERT_EQ(q.exit_code, 0) << q.err;
    ASSERT_EQ(v.exit_code, 0) << v.err;
    auto qo = q.out, vo = v.out;
    qo.replace(qo.find("q.qed"), 5, "x.qed");
    vo.replace(vo.find("v.qed"), 5, "x.qed");
    EXPECT_EQ(vo, qo);
    // Byte for byte the file qemu writes.
    EXPECT_EQ(test::ReadWholeFile(dir.File("v.qed")), test::ReadWholeFile(dir.File("q.qed")));
  }
  // qemu's errors for bad options.
  for (std::string opts : {"-o cluster_size=1k", "-o table_size=3", "-o cluster_size=128M", "-o bogus=1"}) {
    SCOPED_TRACE(opts);
    auto q = RunCommand("qemu-img create -f qed " + opts + " " + Quote(dir.File("q2.qed")) + " 1M");
    auto v = RunCommand(Vimgfs() + " create -f qed " + opts + " " + Quote(dir.File("q2.qed")) + " 1M");
    EXPECT_NE(q.exit_code, 0);
    EXPECT_NE(v.exit_code, 0);
    auto tail = [](const std::string& s) { return s.substr(s.find(": ") + 1); };
    EXPECT_EQ(tail(v.err), tail(q.err));
  }
  auto help = RunCommand(Vimgfs() + " create -f qed -o help");
  EXPECT_EQ(help.out, RunCommand("qemu-img create -f qed -o help").out);
}

TEST(QedOracle, BackingFilesReadThroughAndNoProbeMeansRaw) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // A raw base that begins with a qcow2 magic: -F raw must keep it raw (QED_F_BACKING_FORMAT_NO_PROBE).
  {
    std::vector<uint8_t> base(4 * kMiB, 0x5a);
    std::memcpy(base.data(), "QFI\xfb\0\0\0\x03", 8);
    test::WriteWholeFile(dir.File("base.raw"), base);
  }
  Sh("qemu-img create -q -f qcow2 " + Quote(dir.File("base.qcow2")) + " 4M");
  QemuIo(dir.File("base.qcow2"), {"write -P 0x61 0 4M"}, "qcow2");
  for (std::string base : {"base.raw", "base.qcow2"}) {
    SCOPED_TRACE(base);
    const std::string fmt = base == "base.raw" ? "raw" : "qcow2";
    const std::string img = dir.File("over.qed");
    std::filesystem::remove(img);
    Sh("cd " + Quote(dir.path()) + " && qemu-img create -q -f qed -o cluster_size=4k -b " + base + " -F " +
       fmt + " over.qed 6M");
    QemuIo(img, {"write -P 0x71 6k 1k", "write -z 64k 64k", "write -P 0x72 3M 2M"});
    ExpectSameAsQemuRaw(dir, img);
    ExpectSameOutput("map -f qed --output=json " + Quote(img), base);
    ExpectSameJson("info -f qed --output=json " + Quote(img), base);
    EXPECT_EQ((HeaderFeatures(img) & qed::kFeatureBackingNoProbe) != 0, fmt == "raw");
    // Written through vimgfs: partial clusters copy the backing data in.
    {
      auto w = OpenOrDie(img, false);
      ASSERT_NE(w, nullptr);
      std::vector<std::byte> buf(1000, std::byte{0x7e});
      ASSERT_TRUE(w->Write(10 * kKiB + 3, buf).ok());
      ASSERT_TRUE(w->Write(4 * kMiB - 500, buf).ok());
      ASSERT_TRUE(w->WriteZeroes(1 * kMiB, 64 * kKiB, false).ok());
      ASSERT_TRUE(w->Close().ok());
    }
    ExpectQemuCheckClean(img);
    ExpectSameAsQemuRaw(dir, img);
    ExpectSameOutput("map -f qed --output=json " + Quote(img), base);
  }
}

TEST(QedOracle, UntrustedRefusesABackingFileOutsideTheFolder) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::filesystem::create_directory(dir.File("sub"));
  Sh("qemu-img create -q -f raw " + Quote(dir.File("outside.raw")) + " 1M");
  Sh("cd " + Quote(dir.File("sub")) + " && qemu-img create -q -f qed -b ../outside.raw -F raw u.qed");
  auto r = RunCommand(Vimgfs() + " convert --untrusted -O raw " + Quote(dir.File("sub/u.qed")) + " " +
                      Quote(dir.File("u.raw")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("refused with --untrusted"), std::string::npos) << r.err;
  r = RunCommand(Vimgfs() + " convert -O raw " + Quote(dir.File("sub/u.qed")) + " " +
                 Quote(dir.File("u.raw")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(QedOracle, WhatVimgfsWritesQemuReadsAndChecksClean) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("w.qed");
  Sh(Vimgfs() + " create -q -f qed -o cluster_size=4k,table_size=2 " + Quote(img) + " 20M");
  std::vector<uint8_t> model(20 * kMiB, 0);
  {
    auto w = OpenOrDie(img, false);
    ASSERT_NE(w, nullptr);
    // Four threads on disjoint stripes, sizes that cross clusters and L2 tables.
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        auto data = test::RandomBytes(300 * kKiB, 100 + t);
        for (int i = 0; i < 12; ++i) {
          const uint64_t off = t * 5 * kMiB + i * 400 * kKiB + 777 * i;
          const uint64_t len = 1000 + 25000 * i;
          std::memcpy(model.data() + off, data.data(), len);
          EXPECT_TRUE(w->Write(off, std::as_bytes(std::span(data.data(), len))).ok());
        }
      });
    }
    for (auto& t : threads) t.join();
    // The mark is set while allocating writes are not yet closed.
    EXPECT_TRUE(HeaderFeatures(img) & qed::kFeatureNeedCheck);
    ASSERT_TRUE(w->WriteZeroes(8 * kKiB, 64 * kKiB, false).ok());
    std::memset(model.data() + 8 * kKiB, 0, 64 * kKiB);
    ASSERT_TRUE(w->WriteZeroes(15 * kMiB, 2 * kMiB, true).ok());
    std::memset(model.data() + 15 * kMiB, 0, 2 * kMiB);
    ASSERT_TRUE(w->Flush().ok());
    ASSERT_TRUE(w->Close().ok());
  }
  EXPECT_FALSE(HeaderFeatures(img) & qed::kFeatureNeedCheck);
  ExpectQemuCheckClean(img);
  test::WriteWholeFile(dir.File("model.raw"), model);
  auto r = RunCommand("qemu-img compare -f qed -F raw " + Quote(img) + " " + Quote(dir.File("model.raw")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  ExpectSameOutput("map -f qed --output=json " + Quote(img), "written");
  ExpectSameJson("check -f qed --output=json " + Quote(img), "written");
}

// Threads writing to neighbouring pieces of the same clusters (allocations racing in one
// L2 table, the file growing under several writers), as a mount's O_DIRECT writers do.
TEST(QedOracle, InterleavedWritersInSharedClusters) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("i.qed");
  Sh(Vimgfs() + " create -q -f qed " + Quote(img) + " 32M");
  std::vector<uint8_t> model(32 * kMiB, 0);
  {
    auto w = OpenOrDie(img, false);
    ASSERT_NE(w, nullptr);
    constexpr uint64_t kUnit = 16 * kKiB, kUnits = 32 * kMiB / kUnit;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(300 + t);
        for (int i = 0; i < 300; ++i) {
          // Each thread owns every 4th 16 KiB unit: its bytes of the model are its own.
          const uint64_t unit = (rng() % (kUnits / 4)) * 4 + t;
          const uint64_t in = (rng() % (kUnit / 4096)) * 4096;
          const uint64_t len = (1 + rng() % ((kUnit - in) / 4096)) * 4096;
          auto data = test::RandomBytes(len, rng());
          if (i % 17 == 0) std::fill(data.begin(), data.end(), 0);
          const uint64_t off = unit * kUnit + in;
          std::memcpy(model.data() + off, data.data(), len);
          EXPECT_TRUE(w->Write(off, std::as_bytes(std::span(data.data(), len))).ok());
          if (i % 50 == 0) {
            EXPECT_TRUE(w->Flush().ok());
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    std::vector<std::byte> now(model.size());
    ASSERT_TRUE(w->Read(0, now).ok());
    EXPECT_EQ(std::memcmp(now.data(), model.data(), model.size()), 0) << "read back through the same image";
    ASSERT_TRUE(w->Close().ok());
  }
  ExpectQemuCheckClean(img);
  test::WriteWholeFile(dir.File("model.raw"), model);
  auto r = RunCommand("qemu-img compare -f qed -F raw " + Quote(img) + " " + Quote(dir.File("model.raw")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST(QedOracle, ConvertToAndFromQed) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string src = dir.File("src.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(src) + " 9M");
  QemuIo(src, {"write -P 0x81 0 1M", "write -P 0x82 5000000 70000", "write -z 2M 1M"}, "qcow2");
  for (std::string opts : {"", "-o cluster_size=4k,table_size=1"}) {
    SCOPED_TRACE(opts);
    const std::string out = dir.File("out.qed");
    std::filesystem::remove(out);
    auto r = RunCommand(Vimgfs() + " convert -O qed " + opts + " " + Quote(src) + " " + Quote(out));
    if (opts.find("table_size=1") != std::string::npos) {
      // qemu creates one-cluster tables but cannot open them (its table offset test).
      EXPECT_NE(r.exit_code, 0);
      EXPECT_NE(r.err.find("QED table offset is invalid"), std::string::npos) << r.err;
      continue;
    }
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ExpectQemuCheckClean(out);
    r = RunCommand("qemu-img compare " + Quote(src) + " " + Quote(out));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    ExpectSameAsQemuRaw(dir, out);
    // And back.
    r = RunCommand(Vimgfs() + " convert -f qed -O qcow2 " + Quote(out) + " " + Quote(dir.File("back.qcow2")));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand("qemu-img compare " + Quote(src) + " " + Quote(dir.File("back.qcow2")));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  }
}

TEST(QedOracle, ResizeRebaseCommit) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("r.qed");
  Sh("qemu-img create -q -f qed " + Quote(img) + " 1M");
  QemuIo(img, {"write -P 0x91 0 1M"});
  Sh(Vimgfs() + " resize -f qed " + Quote(img) + " 3M");
  auto info = nlohmann::json::parse(RunCommand("qemu-img info --output=json " + Quote(img)).out);
  EXPECT_EQ(info["virtual-size"], 3 * kMiB);
  ExpectSameAsQemuRaw(dir, img);
  ExpectQemuCheckClean(img);
  // Shrinking is refused as qemu refuses it, --shrink or not.
  for (std::string flag : {"", "--shrink "}) {
    auto q = RunCommand("qemu-img resize -f qed " + flag + Quote(img) + " 2M");
    auto v = RunCommand(Vimgfs() + " resize -f qed " + flag + Quote(img) + " 2M");
    EXPECT_EQ(v.exit_code, q.exit_code);
    auto tail = [](const std::string& s) { return s.substr(s.rfind(": ") + 2); };
    EXPECT_EQ(tail(v.err), tail(q.err)) << flag;
  }

  // Rebase (safe): the overlay keeps reading what it read; commit writes it into the base.
  Sh("qemu-img create -q -f qcow2 " + Quote(dir.File("b1.qcow2")) + " 2M");
  QemuIo(dir.File("b1.qcow2"), {"write -P 0xa1 0 2M"}, "qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(dir.File("b2.qcow2")) + " 2M");
  QemuIo(dir.File("b2.qcow2"), {"write -P 0xa2 1M 1M"}, "qcow2");
  Sh("cd " + Quote(dir.path()) + " && qemu-img create -q -f qed -b b1.qcow2 -F qcow2 top.qed");
  QemuIo(dir.File("top.qed"), {"write -P 0xa3 64k 64k"});
  Sh("qemu-img convert -O raw " + Quote(dir.File("top.qed")) + " " + Quote(dir.File("before.raw")));
  Sh("cd " + Quote(dir.path()) + " && " + Vimgfs() + " rebase -f qed -b b2.qcow2 -F qcow2 top.qed");
  info = nlohmann::json::parse(RunCommand("qemu-img info --output=json " + Quote(dir.File("top.qed"))).out);
  EXPECT_EQ(info["backing-filename"], "b2.qcow2");
  auto r = RunCommand("qemu-img compare -F raw " + Quote(dir.File("top.qed")) + " " +
                      Quote(dir.File("before.raw")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  ExpectQemuCheckClean(dir.File("top.qed"));
  {
    // The same rebase by qemu-img lays the overlay out alike (runs of clusters written at once).
    Sh("cd " + Quote(dir.path()) + " && qemu-img create -q -f qed -b b1.qcow2 -F qcow2 top2.qed");
    QemuIo(dir.File("top2.qed"), {"write -P 0xa3 64k 64k"});
    Sh("cd " + Quote(dir.path()) + " && qemu-img rebase -f qed -b b2.qcow2 -F qcow2 top2.qed");
    auto q = RunCommand("qemu-img map -f qed --output=json " + Quote(dir.File("top2.qed")));
    auto v = RunCommand("qemu-img map -f qed --output=json " + Quote(dir.File("top.qed")));
    EXPECT_EQ(v.out, q.out);
  }
  Sh(Vimgfs() + " commit -f qed " + Quote(dir.File("top.qed")));
  r = RunCommand("qemu-img compare -F raw " + Quote(dir.File("b2.qcow2")) + " " +
                 Quote(dir.File("before.raw")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // rebase -u to a raw file sets the no-probe bit, as qemu does.
  Sh("qemu-img convert -O raw " + Quote(dir.File("b2.qcow2")) + " " + Quote(dir.File("b2.raw")));
  Sh("cd " + Quote(dir.path()) + " && " + Vimgfs() + " rebase -u -f qed -b b2.raw -F raw top.qed");
  EXPECT_TRUE(HeaderFeatures(dir.File("top.qed")) & qed::kFeatureBackingNoProbe);
  ExpectSameJson("info -f qed --output=json " + Quote(dir.File("top.qed")), "rebased");
}

// A byte-level edit of an image file.
void Patch64(const std::string& path, uint64_t off, uint64_t value) {
  auto raw = test::ReadWholeFile(path);
  if (raw.size() < off + 8) raw.resize(off + 8);
  StoreLE64(raw.data() + off, value);
  test::WriteWholeFile(path, raw);
}
void Patch32(const std::string& path, uint64_t off, uint32_t value) {
  auto raw = test::ReadWholeFile(path);
  StoreLE32(raw.data() + off, value);
  test::WriteWholeFile(path, raw);
}

TEST(QedOracle, CheckAndRepairLikeQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string good = dir.File("good.qed");
  // 4 KiB clusters, 2-cluster tables: L1 at 4k, data at 12k, then the L2 table at 16k.
  Sh("qemu-img create -q -f qed -o cluster_size=4k,table_size=2 " + Quote(good) + " 8M");
  QemuIo(good, {"write -P 1 0 8k", "write -P 2 1M 4k"});
  struct Case {
    const char* name;
    std::function<void(const std::string&)> damage;
  };
  const uint64_t l2 = LoadLE64(test::ReadWholeFile(good).data() + 4096);  // L1[0]
  ASSERT_NE(l2, 0u);
  std::vector<Case> cases = {
      {"leak", [](const std::string& p) { Patch64(p, std::filesystem::file_size(p) + 4096 - 8, 0); }},
      {"misaligned_data", [&](const std::string& p) { Patch64(p, l2 + 8, 12 * 1024 + 512); }},
      {"data_past_eof", [&](const std::string& p) { Patch64(p, l2 + 8, 1ull << 40); }},
      {"data_twice",
       [&](const std::string& p) { Patch64(p, l2 + 8 * 256, LoadLE64(test::ReadWholeFile(p).data() + l2)); }},
      {"l2_misaligned", [](const std::string& p) { Patch64(p, 4096 + 8, 12 * 1024 + 8); }},
      {"l2_past_eof", [](const std::string& p) { Patch64(p, 4096 + 8, 1ull << 30); }},
      {"l2_is_the_l1_table", [](const std::string& p) { Patch64(p, 4096 + 8, 4096); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    for (std::string mode : {"", "-r leaks ", "-r all "}) {
      SCOPED_TRACE(mode);
      for (std::string output : {"", "--output=json "}) {
        const std::string q = dir.File("q.qed"), v = dir.File("v.qed");
        std::filesystem::copy_file(good, q, std::filesystem::copy_options::overwrite_existing);
        c.damage(q);
        std::filesystem::copy_file(q, v, std::filesystem::copy_options::overwrite_existing);
        auto qr = RunCommand("qemu-img check -f qed " + mode + output + Quote(q));
        auto vr = RunCommand(Vimgfs() + " check -f qed " + mode + output + Quote(v));
        EXPECT_EQ(vr.exit_code, qr.exit_code) << vr.out << vr.err << "\nqemu:\n" << qr.out << qr.err;
        std::string qo = qr.out, vo = vr.out;
        if (!output.empty() && !qo.empty() && !vo.empty()) {
          auto qj = nlohmann::json::parse(qo), vj = nlohmann::json::parse(vo);
          qj.erase("filename");
          vj.erase("filename");
          EXPECT_EQ(vj, qj);
        } else {
          EXPECT_EQ(vo, qo);
        }
        EXPECT_EQ(test::ReadWholeFile(v), test::ReadWholeFile(q)) << "the repaired files differ";
      }
    }
  }
}

// qemu numbers clusters in its check by dividing by cluster_size - 1: past 4095 clusters of
// 4 KiB it skips numbers and reports them as leaks. vimgfs reports the same.
TEST(QedOracle, CheckCountsLikeQemuPastClusterSizeMinusOneClusters) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("big.qed");
  Sh("qemu-img create -q -f qed -o cluster_size=4k " + Quote(img) + " 64M");
  QemuIo(img, {"write -P 1 0 20M"});
  ExpectSameOutput("check -f qed " + Quote(img), "big");
  ExpectSameJson("check -f qed --output=json " + Quote(img), "big");
}

TEST(QedOracle, DirtyImageIsRepairedByAReadWriteOpenOnly) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("d.qed");
  Sh("qemu-img create -q -f qed -o cluster_size=4k,table_size=2 " + Quote(img) + " 8M");
  QemuIo(img, {"write -P 1 0 8k"});
  const uint64_t l2 = LoadLE64(test::ReadWholeFile(img).data() + 4096);
  // A crash left an entry naming a cluster past the end and the need-check mark.
  Patch64(img, l2 + 8 * 5, 1ull << 30);
  Patch64(img, qed::hdr::kFeatures, qed::kFeatureNeedCheck);
  const auto dirty = test::ReadWholeFile(img);
  ExpectSameJson("info -f qed --output=json " + Quote(img), "dirty");
  ExpectSameOutput("info -f qed " + Quote(img), "dirty");
  {
    auto ro = OpenOrDie(img, true);
    ASSERT_NE(ro, nullptr);
    ASSERT_TRUE(ro->Close().ok());
  }
  EXPECT_EQ(test::ReadWholeFile(img), dirty) << "a read-only open changed the image";
  const std::string q = dir.File("q.qed");
  std::filesystem::copy_file(img, q);
  {
    auto rw = OpenOrDie(img, false);
    ASSERT_NE(rw, nullptr);
    std::vector<std::byte> buf(4096);
    EXPECT_TRUE(rw->Read(5 * 4096, buf).ok());
    ASSERT_TRUE(rw->Close().ok());
  }
  // qemu repairs the same way when it opens the image for writing.
  QemuIo(q, {"read 0 4k"});
  EXPECT_EQ(test::ReadWholeFile(img), test::ReadWholeFile(q));
  EXPECT_FALSE(HeaderFeatures(img) & qed::kFeatureNeedCheck);
  ExpectQemuCheckClean(img);
}

TEST(QedOracle, HostileHeadersAndTablesFailWithOneLine) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string good = dir.File("good.qed");
  Sh("qemu-img create -q -f qed -o cluster_size=4k,table_size=2 " + Quote(good) + " 8M");
  QemuIo(good, {"write -P 1 0 8k"});
  struct Case {
    const char* name;
    std::function<void(const std::string&)> damage;
  };
  using qed::hdr::kClusterSize, qed::hdr::kTableSize, qed::hdr::kImageSize, qed::hdr::kL1TableOffset;
  std::vector<Case> cases = {
      {"cluster_size", [](const std::string& p) { Patch32(p, kClusterSize, 1000); }},
      {"cluster_size_huge", [](const std::string& p) { Patch32(p, kClusterSize, 1u << 31); }},
      {"table_size", [](const std::string& p) { Patch32(p, kTableSize, 3); }},
      {"table_size_zero", [](const std::string& p) { Patch32(p, kTableSize, 0); }},
      {"image_size_odd", [](const std::string& p) { Patch64(p, kImageSize, 1000001); }},
      {"image_size_huge", [](const std::string& p) { Patch64(p, kImageSize, 1ull << 62); }},
      {"l1_misaligned", [](const std::string& p) { Patch64(p, kL1TableOffset, 4096 + 512); }},
      {"l1_past_eof", [](const std::string& p) { Patch64(p, kL1TableOffset, 1ull << 40); }},
      {"l1_overflow", [](const std::string& p) { Patch64(p, kL1TableOffset, ~uint64_t{4095}); }},
      {"l1_in_header", [](const std::string& p) { Patch64(p, kL1TableOffset, 0); }},
      {"header_size_huge", [](const std::string& p) { Patch32(p, qed::hdr::kHeaderSize, 0x80000000u); }},
      {"features", [](const std::string& p) { Patch64(p, qed::hdr::kFeatures, 0x100); }},
      {"backing_name_outside",
       [](const std::string& p) {
         Patch64(p, qed::hdr::kFeatures, qed::kFeatureBackingFile);
         Patch32(p, qed::hdr::kBackingNameOffset, 4000);
         Patch32(p, qed::hdr::kBackingNameSize, 200);
       }},
      {"truncated", [](const std::string& p) { std::filesystem::resize_file(p, 6000); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string img = dir.File("h.qed");
    std::filesystem::copy_file(good, img, std::filesystem::copy_options::overwrite_existing);
    c.damage(img);
    auto q = RunCommand("qemu-img info -f qed " + Quote(img));
    auto v = RunCommand(Vimgfs() + " info -f qed " + Quote(img));
    EXPECT_NE(q.exit_code, 0);
    EXPECT_NE(v.exit_code, 0);
    EXPECT_EQ(std::count(v.err.begin(), v.err.end(), '\n'), 1) << v.err;
    // qemu's cause, in qemu's words, after the file name.
    const std::string cause = q.err.substr(q.err.rfind(": ") + 2);
    EXPECT_NE(v.err.find(cause.substr(0, cause.size() - 1)), std::string::npos) << v.err << " vs " << q.err;
  }
  // Tables that name clusters outside the file: reads fail cleanly, as in qemu.
  const std::string img = dir.File("t.qed");
  std::filesystem::copy_file(good, img, std::filesystem::copy_options::overwrite_existing);
  Patch64(img, 4096 + 8, 1ull << 40);  // L1[1]: an L2 table past the end
  const uint64_t l2 = LoadLE64(test::ReadWholeFile(img).data() + 4096);
  Patch64(img, l2 + 8 * 3, 12345);  // a misaligned data cluster
  auto ro = OpenOrDie(img, true);
  ASSERT_NE(ro, nullptr);
  std::vector<std::byte> buf(4096);
  EXPECT_TRUE(ro->Read(0, buf).ok());
  EXPECT_FALSE(ro->Read(3 * 4096, buf).ok());
  EXPECT_FALSE(ro->Read(4 * kMiB + 4096, buf).ok());
  auto r = RunCommand(Vimgfs() + " convert -f qed -O raw " + Quote(img) + " " + Quote(dir.File("x.raw")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

}  // namespace
}  // namespace vimgfs

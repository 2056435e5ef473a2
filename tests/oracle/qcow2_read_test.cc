// qcow2 read path against qemu-img 7.2: images made by qemu-img / qemu-io in every layout
// (compat 0.10/1.1, cluster sizes, refcount widths, zlib/zstd compression, extended L2,
// backing chains, zero clusters, discards, snapshots, preallocation, odd sizes, a 16 TiB
// sparse disk, an external data file) read through vimgfs::Image exactly like
// `qemu-img convert -O raw`, and Image::Map agrees with `qemu-img map` on where data is.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;

void Sh(const std::string& cmd) {
  auto r = RunCommand(cmd);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.out << r.err;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f qcow2";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  Sh(line + " " + Quote(image));
}

std::unique_ptr<Image> OpenRO(const std::string& path, const std::string& snapshot = "") {
  OpenOptions o;
  o.read_only = true;
  o.snapshot = snapshot;
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

// Compares the image's whole disk with qemu's raw conversion, 1 MiB at a time.
void ExpectSameAsQemu(const test::TempDir& dir, const std::string& image, const std::string& snapshot = "") {
  const std::string raw = dir.File("qemu.raw");
  std::filesystem::remove(raw);
  std::string snap = snapshot.empty() ? "" : " -l snapshot.name=" + Quote(snapshot);
  Sh("qemu-img convert -f qcow2" + snap + " -O raw " + Quote(image) + " " + Quote(raw));
  auto img = OpenRO(image, snapshot);
  ASSERT_NE(img, nullptr);
  ASSERT_EQ(img->size(), std::filesystem::file_size(raw)) << image;
  std::ifstream in(raw, std::ios::binary);
  std::vector<std::byte> ours(1 << 20), theirs(1 << 20);
  for (uint64_t off = 0; off < img->size(); off += ours.size()) {
    size_t n = std::min<uint64_t>(ours.size(), img->size() - off);
    Status s = img->Read(off, std::span(ours).first(n));
    ASSERT_TRUE(s.ok()) << s.message();
    in.read(reinterpret_cast<char*>(theirs.data()), n);
    ASSERT_EQ(std::memcmp(ours.data(), theirs.data(), n), 0) << image << " differs in MiB at " << off;
  }
}

// Data-bearing guest ranges, merged: {start, end}.
using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
void AddRange(Ranges* r, uint64_t s, uint64_t e) {
  if (!r->empty() && r->back().second == s)
    r->back().second = e;
  else
    r->push_back({s, e});
}

void ExpectMapAgrees(const std::string& image) {
  auto r = RunCommand("qemu-img map -f qcow2 --output=json " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Ranges qemu_data, qemu_present;
  for (const auto& e : nlohmann::json::parse(r.out)) {
    uint64_t s = e["start"], l = e["length"];
    if (e["data"].get<bool>()) AddRange(&qemu_data, s, s + l);
    if (e["present"].get<bool>()) AddRange(&qemu_present, s, s + l);
  }
  auto img = OpenRO(image);
  ASSERT_NE(img, nullptr);
  auto map = img->Map(0, img->size());
  ASSERT_TRUE(map.ok()) << map.error().message();
  Ranges ours_data, ours_present;
  for (const BlockStatus& b : *map) {
    if (b.data) AddRange(&ours_data, b.offset, b.offset + b.length);
    if (b.present) AddRange(&ours_present, b.offset, b.offset + b.length);
  }
  EXPECT_EQ(ours_data, qemu_data) << image << "\n" << r.out;
  EXPECT_EQ(ours_present, qemu_present) << image << "\n" << r.out;
}

// A workload that touches cluster and L2 boundaries, zero clusters and discards.
std::vector<std::string> Workload(uint64_t cluster) {
  std::vector<std::string> w = {
      "write -P 0x11 0 4k",
      "write -P 0x22 " + std::to_string(cluster - 512) + " 1k",
      "write -P 0x33 " + std::to_string(3 * cluster) + " " + std::to_string(2 * cluster),
      "write -P 0x44 1M 300k",
      "write -z " + std::to_string(8 * cluster) + " " + std::to_string(2 * cluster),
      "write -P 0x55 3M 256k",
      "discard 3M 128k",
      "write -P 0x66 5000k 7k",
  };
  return w;
}

TEST(Qcow2ReadOracle, LayoutsMatchQemu) {
  REQUIRE_QEMU_IMG();
  struct Case {
    const char* opts;
    uint64_t cluster;
  };
  const Case cases[] = {
      {"compat=1.1", 65536},
      {"compat=0.10", 65536},
      {"cluster_size=512", 512},
      {"cluster_size=4k", 4096},
      {"cluster_size=2M", 2 << 20},
      {"refcount_bits=1", 65536},
      {"refcount_bits=2,cluster_size=4k", 4096},
      {"refcount_bits=4", 65536},
      {"refcount_bits=8,cluster_size=1k", 1024},
      {"refcount_bits=32", 65536},
      {"refcount_bits=64,cluster_size=512", 512},
      {"extended_l2=on", 65536},
      {"extended_l2=on,cluster_size=16k", 16384},
      {"lazy_refcounts=on", 65536},
      {"compression_type=zstd", 65536},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.opts);
    test::TempDir dir;
    std::string img = dir.File("a.qcow2");
    uint64_t size = std::max<uint64_t>(8 << 20, 16 * c.cluster);
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + c.opts + " " + Quote(img) + " " +
       std::to_string(size));
    QemuIo(img, Workload(c.cluster));
    ExpectSameAsQemu(dir, img);
    ExpectMapAgrees(img);
  }
}

TEST(Qcow2ReadOracle, CompressedZlibAndZstd) {
  REQUIRE_QEMU_IMG();
  for (const char* type : {"zlib", "zstd"}) {
    for (const char* cs : {"4k", "64k", "2M"}) {
      SCOPED_TRACE(std::string(type) + " " + cs);
      test::TempDir dir;
      std::string src = dir.File("src.raw"), img = dir.File("c.qcow2");
      // Compressible patterns next to incompressible random data (stored uncompressed).
      std::vector<uint8_t> raw(6 << 20, 0);
      std::fill(raw.begin(), raw.begin() + (1 << 20), 0x5a);
      auto rnd = test::RandomBytes(200000, 7);
      std::copy(rnd.begin(), rnd.end(), raw.begin() + (2 << 20));
      std::fill(raw.begin() + (5 << 20), raw.begin() + (5 << 20) + 12288, 0x99);
      test::WriteWholeFile(src, raw);
      Sh("qemu-img convert -c -f raw -O qcow2 -o compression_type=" + std::string(type) +
         ",cluster_size=" + cs + " " + Quote(src) + " " + Quote(img));
      ExpectSameAsQemu(dir, img);
      ExpectMapAgrees(img);
      // Overwrite part of a compressed cluster with qemu, then read again.
      QemuIo(img, {"write -P 0x42 1000 3000"});
      ExpectSameAsQemu(dir, img);
    }
  }
}

TEST(Qcow2ReadOracle, BackingChainOfThree) {
  REQUIRE_QEMU_IMG();
  for (const char* opts : {"compat=1.1", "compat=0.10", "extended_l2=on"}) {
    SCOPED_TRACE(opts);
    test::TempDir dir;
    std::string base = dir.File("base.qcow2"), mid = dir.File("mid.qcow2"), top = dir.File("top.qcow2");
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + opts + " " + Quote(base) + " 4M");
    QemuIo(base, {"write -P 0x01 0 4M"});
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + opts + " -b base.qcow2 -F qcow2 " + Quote(mid) +
       " 6M");
    QemuIo(mid, {"write -P 0x02 64k 100k", "write -P 0x03 4M 1M"});
    if (std::string(opts) != "compat=0.10") QemuIo(mid, {"write -z 1M 128k"});
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + opts + " -b mid.qcow2 -F qcow2 " + Quote(top) +
       " 6M");
    QemuIo(top, {"write -P 0x04 70k 3k", "write -P 0x05 3M 64k", "write -P 0x06 5M 4k"});
    ExpectSameAsQemu(dir, top);
    ExpectMapAgrees(top);
  }
}

TEST(Qcow2ReadOracle, Snapshots) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("s.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(img) + " 4M");
  QemuIo(img, {"write -P 0x10 0 1M"});
  Sh("qemu-img snapshot -c first " + Quote(img));
  QemuIo(img, {"write -P 0x20 512k 1M"});
  Sh("qemu-img snapshot -c second " + Quote(img));
  QemuIo(img, {"write -P 0x30 0 64k", "discard 1M 64k"});
  ExpectSameAsQemu(dir, img);
  ExpectSameAsQemu(dir, img, "first");
  ExpectSameAsQemu(dir, img, "second");
  auto i = OpenRO(img);
  ASSERT_NE(i, nullptr);
  FormatInfo fi = i->Info();
  ASSERT_EQ(fi.snapshots.size(), 2u);
  EXPECT_EQ(fi.snapshots[0].name, "first");
  EXPECT_EQ(fi.snapshots[1].name, "second");
  EXPECT_EQ(fi.snapshots[1].id, "2");
  OpenOptions o;
  o.snapshot = "nope";
  o.read_only = true;
  EXPECT_FALSE(Image::Open(img, o).ok());
}

TEST(Qcow2ReadOracle, PreallocationModesAndOddSizes) {
  REQUIRE_QEMU_IMG();
  for (const char* p : {"metadata", "falloc", "full"}) {
    SCOPED_TRACE(p);
    test::TempDir dir;
    std::string img = dir.File("p.qcow2");
    Sh(std::string("qemu-img create -q -f qcow2 -o preallocation=") + p + " " + Quote(img) + " 3M");
    QemuIo(img, {"write -P 0x77 100k 50k"});
    ExpectSameAsQemu(dir, img);
  }
  for (const char* size : {"12345678", "1000000", "513"}) {
    SCOPED_TRACE(size);
    test::TempDir dir;
    std::string img = dir.File("o.qcow2");
    Sh("qemu-img create -q -f qcow2 " + Quote(img) + " " + size);
    auto sz = OpenRO(img)->size();
    QemuIo(img, {"write -P 0x31 0 512", "write -P 0x32 " + std::to_string(sz - 512) + " 512"});
    ExpectSameAsQemu(dir, img);
    ExpectMapAgrees(img);
  }
}

TEST(Qcow2ReadOracle, ExternalDataFile) {
  REQUIRE_QEMU_IMG();
  for (const char* raw : {"off", "on"}) {
    SCOPED_TRACE(raw);
    test::TempDir dir;
    std::string img = dir.File("d.qcow2");
    Sh(std::string("qemu-img create -q -f qcow2 -o data_file=") + dir.File("d.data") +
       ",data_file_raw=" + raw + " " + Quote(img) + " 4M");
    QemuIo(img, {"write -P 0x61 0 100k", "write -P 0x62 2M 64k"});
    ExpectSameAsQemu(dir, img);
    auto i = OpenRO(img);
    ASSERT_NE(i, nullptr);
    EXPECT_EQ(i->host_files().size(), 1u);
    // --untrusted follows the data file inside the image's folder, never through a symlink.
    OpenOptions o;
    o.read_only = true;
    o.untrusted = true;
    EXPECT_TRUE(Image::Open(img, o).ok()) << "the data file is beside the image";
    ASSERT_EQ(rename(dir.File("d.data").c_str(), dir.File("real.data").c_str()), 0);
    ASSERT_EQ(symlink("real.data", dir.File("d.data").c_str()), 0);
    EXPECT_FALSE(Image::Open(img, o).ok()) << "--untrusted must refuse a symlinked data file";
    o.untrusted = false;
    EXPECT_TRUE(Image::Open(img, o).ok()) << "a trusted image may use a symlink";
  }
}

TEST(Qcow2ReadOracle, SixteenTiBSparse) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("big.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(img) + " 16T");
  const uint64_t tib = 1ull << 40;
  QemuIo(img, {"write -P 0x01 0 64k", "write -P 0x02 " + std::to_string(5 * tib + 12345) + " 70000",
               "write -P 0x03 " + std::to_string(16 * tib - 4096) + " 4096"});
  ExpectMapAgrees(img);
  auto i = OpenRO(img);
  ASSERT_NE(i, nullptr);
  EXPECT_EQ(i->size(), 16 * tib);
  struct Probe {
    uint64_t off, len;
    uint8_t v;
  };
  for (Probe p : {Probe{0, 65536, 1}, Probe{5 * tib + 12345, 70000, 2}, Probe{16 * tib - 4096, 4096, 3},
                  Probe{5 * tib + 12345 - 100, 100, 0}, Probe{8 * tib, 1 << 20, 0}}) {
    std::vector<std::byte> buf(p.len);
    ASSERT_TRUE(i->Read(p.off, buf).ok());
    for (std::byte b : buf) ASSERT_EQ(static_cast<uint8_t>(b), p.v) << p.off;
  }
}

TEST(Qcow2ReadOracle, BitmapsAreListedAndCounted) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("bm.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(img) + " 16M");
  Sh("qemu-img bitmap --add " + Quote(img) + " b1");
  Sh("qemu-img bitmap --add -g 128k --disable " + Quote(img) + " b2");
  QemuIo(img, {"write -P 0x12 0 1M"});
  ExpectSameAsQemu(dir, img);
  auto i = OpenRO(img);
  ASSERT_NE(i, nullptr);
  FormatInfo fi = i->Info();
  const auto& bitmaps = std::get<Qcow2Details>(fi.format_specific).bitmaps;
  ASSERT_EQ(bitmaps.size(), 2u);
  EXPECT_EQ(bitmaps[0].name, "b1");
  EXPECT_TRUE(bitmaps[0].auto_enabled);
  EXPECT_FALSE(bitmaps[0].in_use);
  EXPECT_EQ(bitmaps[1].granularity, 131072u);
  // Bitmap clusters are references: check finds neither leaks nor corruptions.
  auto rep = i->Check(RepairMode::kNone);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->leaks, 0);
  EXPECT_EQ(rep->corruptions, 0);
}

}  // namespace
}  // namespace vimgfs

// qcow2 write path against qemu-img 7.2: images created by vimgfs and by qemu-img get
// seeded random writes (1 byte to several MiB, unaligned, across cluster and L2
// boundaries, over backing data and compressed clusters) and zeroing through
// vimgfs::Image from 4 threads; the same operations go to a raw file. Afterwards
// `qemu-img check` finds the image clean and `qemu-img compare` finds it equal to the raw.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

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

void ExpectCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f qcow2 " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("No errors were found"), std::string::npos) << r.out << r.err;
}

void ExpectCompareEqual(const std::string& image, const std::string& raw) {
  auto r = RunCommand("qemu-img compare -f qcow2 -F raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// Applies the same seeded operations to the image (from 4 threads) and to the raw file.
// Each thread owns the stripes i % 4 == t of an unaligned stripe pattern, so threads
// share clusters and L2 tables but never bytes.
// `beside`, when given, is called over and over on this thread while the writers run.
void RandomWorkload(const std::string& image, const std::string& raw, uint64_t seed, int ops_per_thread,
                    const std::function<void(Image&)>& beside = nullptr) {
  OpenOptions o;
  o.cache_bytes = 1 << 20;  // small caches: eviction is part of the test
  auto opened = Image::Open(image, o);
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  std::unique_ptr<Image> img = std::move(opened).value();
  const uint64_t size = img->size();
  const uint64_t stripe = 3 * (1 << 20) + 12345;
  struct Op {
    uint64_t off, len;
    int kind;  // 0 write, 1 zero, 2 zero+unmap
    uint64_t seed;
  };
  std::vector<std::vector<Op>> plans(4);
  std::mt19937_64 rng(seed);
  for (int t = 0; t < 4; t++) {
    for (int i = 0; i < ops_per_thread; i++) {
      uint64_t nstripes = (size + stripe - 1) / stripe;
      uint64_t s = (rng() % ((nstripes + 3 - t) / 4)) * 4 + t;
      if (s >= nstripes) s = t < static_cast<int>(nstripes) ? t : 0;
      if (s % 4 != static_cast<uint64_t>(t)) continue;
      uint64_t s_start = s * stripe, s_end = std::min(size, s_start + stripe);
      uint64_t len;
      switch (rng() % 4) {
        case 0:
          len = 1 + rng() % 16;
          break;
        case 1:
          len = 1 + rng() % 70000;
          break;
        case 2:
          len = 1 + rng() % (600 << 10);
          break;
        default:
          len = 1 + rng() % (3 << 20);
          break;
      }
      len = std::min(len, s_end - s_start);
      uint64_t off = s_start + rng() % (s_end - s_start - len + 1);
      int kind = rng() % 10 == 0 ? 1 + static_cast<int>(rng() % 2) : 0;
      plans[t].push_back({off, len, kind, rng()});
    }
  }
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  std::atomic<int> running{4};
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      struct Finished {
        std::atomic<int>& n;
        ~Finished() { n--; }
      } finished{running};
      for (const Op& op : plans[t]) {
        Status s;
        if (op.kind == 0) {
          auto bytes = test::RandomBytes(op.len, op.seed);
          s = img->Write(op.off, std::as_bytes(std::span(bytes)));
        } else {
          s = img->WriteZeroes(op.off, op.len, op.kind == 2);
        }
        if (!s.ok()) {
          errors[t] = s.message();
          return;
        }
      }
    });
  }
  while (beside && running > 0) beside(*img);
  for (auto& th : threads) th.join();
  for (const auto& e : errors) ASSERT_EQ(e, "");
  ASSERT_TRUE(img->Close().ok());
  std::fstream f(raw, std::ios::in | std::ios::out | std::ios::binary);
  for (int t = 0; t < 4; t++) {
    for (const Op& op : plans[t]) {
      std::vector<uint8_t> bytes =
          op.kind == 0 ? test::RandomBytes(op.len, op.seed) : std::vector<uint8_t>(op.len, 0);
      f.seekp(op.off);
      f.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    }
  }
}

Status CreateWithVimgfs(const std::string& path, uint64_t size, std::map<std::string, std::string> opts,
                        std::optional<BackingRef> backing = std::nullopt) {
  CreateContext ctx;
  ctx.path = path;
  ctx.size = size;
  ctx.options = std::move(opts);
  ctx.backing = std::move(backing);
  return Image::Create("qcow2", ctx);
}

TEST(Qcow2WriteOracle, VimgfsCreatedImagesAreCleanAfterRandomWrites) {
  REQUIRE_QEMU_IMG();
  const std::vector<std::map<std::string, std::string>> variants = {
      {},
      {{"compat", "0.10"}},
      {{"cluster_size", "512"}, {"refcount_bits", "64"}},
      {{"cluster_size", "4k"}, {"refcount_bits", "1"}},
      {{"cluster_size", "2M"}},
      {{"extended_l2", "on"}},
      {{"lazy_refcounts", "on"}, {"refcount_bits", "8"}},
      {{"compression_type", "zstd"}, {"preallocation", "metadata"}},
  };
  uint64_t seed = 1;
  for (const auto& opts : variants) {
    std::string label;
    for (auto& [k, v] : opts) label += k + "=" + v + " ";
    SCOPED_TRACE(label);
    test::TempDir dir;
    std::string img = dir.File("w.qcow2"), raw = dir.File("w.raw");
    const uint64_t size = 40 * (1 << 20) + 4096 + 512;
    Status s = CreateWithVimgfs(img, size, opts);
    ASSERT_TRUE(s.ok()) << s.message();
    ExpectCheckClean(img);
    Sh("truncate -s " + std::to_string(size) + " " + Quote(raw));
    RandomWorkload(img, raw, seed++, 40);
    ExpectCheckClean(img);
    ExpectCompareEqual(img, raw);
  }
}

// Threads writing 4 KiB pieces into the quarters of shared clusters: allocations race at
// the end of the file, and a fresh cluster whose tail reads zeros grows the file by a
// truncate (Image::GrowFileTo) that must never cut off what another thread just wrote past
// the size it read.
TEST(Qcow2WriteOracle, InterleavedWritersGrowingTheFileLoseNothing) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("i.qcow2"), raw = dir.File("i.raw");
  const uint64_t size = 64ull << 20, quarter = 16 << 10;
  ASSERT_TRUE(CreateWithVimgfs(img, size, {}).ok());
  std::vector<uint8_t> model(size, 0);
  {
    auto opened = Image::Open(img, OpenOptions{});
    ASSERT_TRUE(opened.ok()) << opened.error().message();
    std::unique_ptr<Image> w = std::move(opened).value();
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(500 + t);
        for (int i = 0; i < 400; ++i) {
          // Thread t owns quarter t of every cluster; a write is one 4 KiB piece of it.
          const uint64_t at =
              (rng() % (size / (4 * quarter))) * 4 * quarter + t * quarter + (rng() % 4) * 4096;
          auto data = test::RandomBytes(4096, rng());
          std::memcpy(model.data() + at, data.data(), data.size());
          EXPECT_TRUE(w->Write(at, std::as_bytes(std::span(data))).ok());
        }
      });
    }
    for (auto& th : threads) th.join();
    std::vector<std::byte> now(size);
    ASSERT_TRUE(w->Read(0, now).ok());
    EXPECT_EQ(std::memcmp(now.data(), model.data(), size), 0) << "read back through the same image";
    ASSERT_TRUE(w->Close().ok());
  }
  ExpectCheckClean(img);
  test::WriteWholeFile(raw, model);
  ExpectCompareEqual(img, raw);
}

// Whole-image changes through Image (snapshots, check) wait for the writers on other
// threads and they for them: the image ends clean, with the writes and every snapshot.
TEST(Qcow2WriteOracle, SnapshotsAndChecksBesideWriters) {
  test::TempDir dir;
  std::string img = dir.File("s.qcow2"), raw = dir.File("s.raw");
  Sh("qemu-img create -q -f qcow2 -o cluster_size=4096 " + Quote(img) + " 48M");
  Sh("truncate -s 48M " + Quote(raw));
  int snapshots = 0, deleted = 0;
  std::string failure;
  RandomWorkload(img, raw, 77, 40, [&](Image& image) {
    if (!failure.empty()) return;
    Status s = image.SnapshotCreate("s" + std::to_string(snapshots));
    if (!s.ok()) failure = "create: " + s.message();
    snapshots++;
    if (snapshots % 3 == 0) {
      s = image.SnapshotDelete("s" + std::to_string(snapshots - 2));
      if (!s.ok()) failure = "delete: " + s.message();
      deleted++;
    }
    auto report = image.Check(RepairMode::kNone);
    if (!report.ok())
      failure = "check: " + report.error().message();
    else if (report->corruptions || report->check_errors)
      failure = "check found " + std::to_string(report->corruptions) + " corruptions";
  });
  EXPECT_EQ(failure, "");
  EXPECT_GT(snapshots, 1);
  ExpectCheckClean(img);
  ExpectCompareEqual(img, raw);
  auto r = RunCommand("qemu-img snapshot -l " + Quote(img));
  EXPECT_NE(r.out.find(" s0 "), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), snapshots - deleted + 2) << r.out;
}

// Reads that hit cached L2 tables share the metadata lock (ClusterMap::LookupCached); with
// a cache of four tables, readers and a writer evict each other's tables all the time. The
// readers stay in the lower half, which qemu wrote and nobody changes, so every read has
// one right answer; the writer's upper half must end as it wrote it.
TEST(Qcow2WriteOracle, ReadersBesideAWriterWithATinyCache) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("r.qcow2"), raw = dir.File("r.raw");
  const uint64_t size = 64 << 20, half = size / 2;
  std::vector<uint8_t> content = test::RandomBytes(size, 5);
  for (uint64_t off = 0; off < size; off += 3 << 20)  // holes too: unallocated clusters
    std::fill_n(content.begin() + off, 1 << 20, 0);
  {
    std::ofstream f(raw, std::ios::binary);
    f.write(reinterpret_cast<const char*>(content.data()), content.size());
  }
  Sh("qemu-img convert -f raw -O qcow2 -o cluster_size=4096 " + Quote(raw) + " " + Quote(img));
  OpenOptions o;
  o.cache_bytes = 1;  // the minimum: four L2 tables of 2 MiB each, for 32 in use
  auto opened = Image::Open(img, o);
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  std::unique_ptr<Image> image = std::move(opened).value();
  std::atomic<bool> stop{false};
  std::vector<std::string> errors(5);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<std::byte> buf;
      for (int i = 0; i < 1500 && errors[t].empty(); i++) {
        uint64_t len = 1 + rng() % (i % 3 == 0 ? 300000 : 9000);
        uint64_t off = rng() % (half - len);
        buf.resize(len);
        Status s = image->Read(off, buf);
        if (!s.ok())
          errors[t] = s.message();
        else if (std::memcmp(buf.data(), content.data() + off, len) != 0)
          errors[t] = "wrong data at " + std::to_string(off) + "+" + std::to_string(len);
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(7);
    while (!stop && errors[4].empty()) {
      uint64_t len = 1 + rng() % 200000;
      uint64_t off = half + rng() % (half - len);
      std::vector<uint8_t> bytes = test::RandomBytes(len, rng());
      Status s = image->Write(off, std::as_bytes(std::span(bytes)));
      if (!s.ok()) errors[4] = s.message();
      std::copy(bytes.begin(), bytes.end(), content.begin() + off);
    }
  });
  for (int t = 0; t < 4; t++) threads[t].join();
  stop = true;
  threads[4].join();
  for (const auto& e : errors) EXPECT_EQ(e, "");
  ASSERT_TRUE(image->Close().ok());
  {
    std::ofstream f(raw, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(content.data()), content.size());
  }
  ExpectCheckClean(img);
  ExpectCompareEqual(img, raw);
}

TEST(Qcow2WriteOracle, QemuImagesWithBackingAndCompressedClusters) {
  REQUIRE_QEMU_IMG();
  for (const char* opts : {"compat=1.1", "compat=0.10", "extended_l2=on"}) {
    SCOPED_TRACE(opts);
    test::TempDir dir;
    std::string base = dir.File("base.qcow2"), top = dir.File("top.qcow2"), raw = dir.File("top.raw");
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + opts + " " + Quote(base) + " 24M");
    Sh("qemu-io -f qcow2 -c 'write -P 0x3c 0 24M' " + Quote(base));
    Sh(std::string("qemu-img create -q -f qcow2 -o ") + opts + " -b base.qcow2 -F qcow2 " + Quote(top) +
       " 30M");
    Sh("qemu-io -f qcow2 -c 'write -P 0x7e 1M 3M' " + Quote(top));
    Sh("qemu-img convert -f qcow2 -O raw " + Quote(top) + " " + Quote(raw));
    RandomWorkload(top, raw, 100, 30);
    ExpectCheckClean(top);
    ExpectCheckClean(base);
    ExpectCompareEqual(top, raw);
  }
  for (const char* type : {"zlib", "zstd"}) {
    SCOPED_TRACE(type);
    test::TempDir dir;
    std::string src = dir.File("src.raw"), img = dir.File("c.qcow2"), raw = dir.File("c.raw");
    std::vector<uint8_t> data(20 << 20);
    for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<uint8_t>((i / 4096) * 7 + (i % 13 == 0));
    test::WriteWholeFile(src, data);
    Sh("qemu-img convert -c -f raw -O qcow2 -o compression_type=" + std::string(type) + " " + Quote(src) +
       " " + Quote(img));
    Sh("cp " + Quote(src) + " " + Quote(raw));
    RandomWorkload(img, raw, 200, 30);
    ExpectCheckClean(img);
    ExpectCompareEqual(img, raw);
  }
}

TEST(Qcow2WriteOracle, QemuReadsWhatVimgfsWrote) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("q.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(img) + " 10M");
  {
    auto opened = Image::Open(img, OpenOptions{});
    ASSERT_TRUE(opened.ok()) << opened.error().message();
    auto& i = *opened;
    std::vector<std::byte> a5(100000, std::byte{0xa5}), ones(1 << 20, std::byte{0x11});
    ASSERT_TRUE(i->Write(0, ones).ok());
    ASSERT_TRUE(i->Write((2 << 20) + 3, ones).ok());
    ASSERT_TRUE(i->Write((5 << 20) + 1000, a5).ok());
    ASSERT_TRUE(i->WriteZeroes(1 << 20, 2 << 20, false).ok());
    ASSERT_TRUE(i->Discard(0, 1 << 20).ok());
    ASSERT_TRUE(i->Close().ok());
  }
  auto r = RunCommand("qemu-io -f qcow2 -c 'read -P 0 0 3M' -c 'read -P 0x11 3M 3' -c 'read -P 0 " +
                      std::to_string((3 << 20) + 3) + " 100' -c 'read -P 0xa5 " +
                      std::to_string((5 << 20) + 1000) + " 100000' " + Quote(img));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  ExpectCheckClean(img);
}

TEST(Qcow2WriteOracle, ExternalDataFile) {
  REQUIRE_QEMU_IMG();
  for (const char* raw_bit : {"off", "on"}) {
    SCOPED_TRACE(raw_bit);
    test::TempDir dir;
    std::string img = dir.File("d.qcow2"), raw = dir.File("d.raw");
    const uint64_t size = 20 << 20;
    Status s = CreateWithVimgfs(img, size, {{"data_file", dir.File("d.data")}, {"data_file_raw", raw_bit}});
    ASSERT_TRUE(s.ok()) << s.message();
    Sh("truncate -s " + std::to_string(size) + " " + Quote(raw));
    RandomWorkload(img, raw, 300, 20);
    ExpectCheckClean(img);
    ExpectCompareEqual(img, raw);
    if (std::string(raw_bit) == "on") {
      // The data file itself is the disk.
      auto r = RunCommand("cmp " + Quote(dir.File("d.data")) + " " + Quote(raw));
      EXPECT_EQ(r.exit_code, 0) << r.out;
    }
  }
}

TEST(Qcow2WriteOracle, ResizeBackingAndSnapshotsStayClean) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string img = dir.File("r.qcow2"), base = dir.File("b.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(base) + " 8M");
  Sh("qemu-io -f qcow2 -c 'write -P 0x0b 0 8M' " + Quote(base));
  ASSERT_TRUE(CreateWithVimgfs(img, 4 << 20, {{"cluster_size", "4k"}}).ok());
  auto open = [&] {
    auto r = Image::Open(img, OpenOptions{});
    EXPECT_TRUE(r.ok()) << r.error().message();
    return std::move(r).value();
  };
  std::vector<std::byte> a(300000, std::byte{0xa1}), b(300000, std::byte{0xb2});
  {
    auto i = open();
    ASSERT_TRUE(i->Write(100, a).ok());
    // 4 KiB clusters: 8 GiB needs a larger L1 table than 4 MiB had.
    ASSERT_TRUE(i->Resize(8ull << 30, false).ok());
    ASSERT_TRUE(i->Close().ok());
  }
  ExpectCheckClean(img);
  {
    auto i = open();
    EXPECT_EQ(i->size(), 8ull << 30);
    ASSERT_TRUE(i->Write((8ull << 30) - 5000, std::span(b).first(5000)).ok());
    ASSERT_TRUE(i->Write((6ull << 30) + 7, b).ok());
    ASSERT_TRUE(i->SnapshotCreate("one").ok());
    ASSERT_TRUE(i->Write(200, b).ok());
    ASSERT_TRUE(i->SnapshotCreate("two").ok());
    ASSERT_TRUE(i->Write(0, a).ok());
    ASSERT_TRUE(i->Close().ok());
  }
  ExpectCheckClean(img);
  auto r = RunCommand("qemu-img snapshot -l " + Quote(img));
  EXPECT_NE(r.out.find("one"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("two"), std::string::npos) << r.out;
  // qemu sees snapshot "one" as vimgfs wrote it.
  r = RunCommand("qemu-img convert -l snapshot.name=one -O raw " + Quote(img) + " " +
                 Quote(dir.File("one.raw")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCommand("qemu-io -f raw -c 'read -P 0 0 100' -c 'read -P 0xa1 100 300000' -c 'read -P 0xb2 " +
                 std::to_string((6ull << 30) + 7) + " 300000' " + Quote(dir.File("one.raw")));
  EXPECT_EQ(r.out.find("verification failed"), std::string::npos) << r.out;
  {
    auto i = open();
    ASSERT_TRUE(i->SnapshotApply("one").ok());
    ASSERT_TRUE(i->SnapshotDelete("two").ok());
    ASSERT_TRUE(i->Close().ok());
  }
  ExpectCheckClean(img);
  r = RunCommand("qemu-io -f qcow2 -c 'read -P 0xa1 100 300000' " + Quote(img));
  EXPECT_EQ(r.out.find("verification failed"), std::string::npos) << r.out;
  {
    auto i = open();
    ASSERT_TRUE(i->SnapshotDelete("one").ok());
    // Shrink: needs allow_shrink, frees what lies past the end.
    EXPECT_FALSE(i->Resize(1 << 20, false).ok());
    ASSERT_TRUE(i->Resize(1 << 20, true).ok());
    ASSERT_TRUE(i->SetBacking(BackingRef{"b.qcow2", "qcow2"}).ok());
    ASSERT_TRUE(i->Close().ok());
  }
  ExpectCheckClean(img);
  r = RunCommand("qemu-img info --output=json " + Quote(img));
  EXPECT_NE(r.out.find("\"backing-filename\": \"b.qcow2\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"virtual-size\": 1048576"), std::string::npos) << r.out;
  {
    auto i = open();
    ASSERT_TRUE(i->SetBacking(std::nullopt).ok());
    ASSERT_TRUE(i->Close().ok());
  }
  r = RunCommand("qemu-img info --output=json " + Quote(img));
  EXPECT_EQ(r.out.find("backing-filename"), std::string::npos) << r.out;
  ExpectCheckClean(img);
}

TEST(Qcow2WriteOracle, GrowOverLargerBackingMatchesQemuResize) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string base = dir.File("b.qcow2"), ours = dir.File("o.qcow2"), theirs = dir.File("t.qcow2");
  Sh("qemu-img create -q -f qcow2 " + Quote(base) + " 10M");
  Sh("qemu-io -f qcow2 -c 'write -P 7 0 10M' " + Quote(base));
  Sh("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 " + Quote(ours) + " 5M");
  Sh("cp " + Quote(ours) + " " + Quote(theirs));
  Sh("qemu-img resize -q " + Quote(theirs) + " 10M");
  {
    auto r = Image::Open(ours, OpenOptions{});
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE((*r)->Resize(10 << 20, false).ok());
    ASSERT_TRUE((*r)->Close().ok());
  }
  ExpectCheckClean(ours);
  auto r = RunCommand("qemu-img compare " + Quote(ours) + " " + Quote(theirs));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

}  // namespace
}  // namespace vimgfs

// VMDK against qemu-img 7.2: images qemu makes (all five subformats, zeroed grains,
// compat6, a parent link, a 5 GiB twoGbMaxExtentSparse disk written across extents) read
// byte-for-byte like `qemu-img convert -O raw`; images vimgfs creates and writes pass
// `qemu-img check` and `qemu-img compare` equal to the same writes on a raw file and
// have qemu's structure; the real VMDKs of the corpus read with the recorded sha256 and
// the bad ones are refused.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "formats/vmdk/stream_writer.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1ull << 30;

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool ro) {
  OpenOptions o;
  o.read_only = ro;
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << path << ": " << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

// Compares the virtual disk of `image` (read through vimgfs) with the raw file `raw`,
// chunk by chunk (no whole-disk buffers: some disks are GiBs).
void ExpectSameAs(const std::string& image, const std::string& raw) {
  auto img = OpenOrDie(image, true);
  ASSERT_NE(img, nullptr);
  ASSERT_EQ(img->size(), std::filesystem::file_size(raw)) << image;
  std::ifstream in(raw, std::ios::binary);
  constexpr size_t kChunk = 4 * kMiB;
  std::vector<std::byte> ours(kChunk);
  std::vector<char> theirs(kChunk);
  for (uint64_t off = 0; off < img->size(); off += kChunk) {
    size_t n = std::min<uint64_t>(kChunk, img->size() - off);
    Status s = img->Read(off, std::span(ours.data(), n));
    ASSERT_TRUE(s.ok()) << image << ": " << s.message();
    in.read(theirs.data(), n);
    ASSERT_EQ(std::memcmp(ours.data(), theirs.data(), n), 0) << image << " differs in chunk at " << off;
  }
}

void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string theirs = dir.File("qemu.raw");
  auto r = RunCommand("qemu-img convert -f vmdk -O raw " + Quote(image) + " " + Quote(theirs));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSameAs(image, theirs);
  std::filesystem::remove(theirs);
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f vmdk";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
}

void QemuCreate(const std::string& image, const std::string& opts, const std::string& size) {
  auto r = RunCommand("qemu-img create -q -f vmdk " + (opts.empty() ? "" : "-o " + opts + " ") +
                      Quote(image) + " " + size);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

void ExpectQemuCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f vmdk " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out << r.err;
}

void ExpectQemuCompareEqual(const std::string& image, const std::string& raw) {
  auto r = RunCommand("qemu-img compare -f vmdk -F raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
}

nlohmann::json QemuInfo(const std::string& image) {
  auto r = RunCommand("qemu-img info --output=json " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
}

TEST(VmdkOracle, QemuMadeImagesReadByteExact) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    const char* opts;
  };
  const Case cases[] = {
      {"sparse", "subformat=monolithicSparse"},
      {"flat", "subformat=monolithicFlat"},
      {"split-sparse", "subformat=twoGbMaxExtentSparse"},
      {"split-flat", "subformat=twoGbMaxExtentFlat"},
      {"zeroed", "zeroed_grain=on"},
      {"compat6", "compat6=on,adapter_type=lsilogic"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string image = dir.File(std::string(c.name) + ".vmdk");
    QemuCreate(image, c.opts, "67M");
    QemuIo(image, {"write -P 0x11 0 64k", "write -P 0x22 100k 300k", "write -P 0x33 33M 1M",
                   "write -P 0x44 67070k 512", "write -z 36k 8k", "write -z 33M 64k"});
    ExpectSameAsQemuRaw(dir, image);
    auto img = OpenOrDie(image, true);
    ASSERT_NE(img, nullptr);
    EXPECT_EQ(std::get<VmdkDetails>(img->Info().format_specific).create_type,
              QemuInfo(image)["format-specific"]["data"]["create-type"].get<std::string>());
  }
}

TEST(VmdkOracle, StreamOptimizedFromQemuReadsByteExactAndRefusesWrites) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string raw = dir.File("src.raw"), image = dir.File("stream.vmdk");
  auto data = test::RandomBytes(3 * kMiB, 7);
  std::memset(data.data() + kMiB, 0, kMiB);           // a zero run: no grains stored
  std::memset(data.data() + 2 * kMiB, 0x5a, 100000);  // compressible
  test::WriteWholeFile(raw, data);
  auto r = RunCommand("truncate -s 10M " + Quote(raw) +
                      " && qemu-img convert -O vmdk -o "
                      "subformat=streamOptimized " +
                      Quote(raw) + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSameAs(image, raw);

  auto img = OpenOrDie(image, false);
  ASSERT_NE(img, nullptr);
  EXPECT_TRUE(img->read_only());
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(img->Write(0, buf).ok());
  FormatInfo fi = img->Info();
  const auto& d = std::get<VmdkDetails>(fi.format_specific);
  EXPECT_EQ(d.create_type, "streamOptimized");
  ASSERT_FALSE(d.extents.empty());
  EXPECT_TRUE(d.extents[0].compressed);
}

TEST(VmdkOracle, ParentLinkReadsThroughToTheParent) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vmdk"), child = dir.File("child.vmdk");
  QemuCreate(base, "", "8M");
  QemuIo(base, {"write -P 0xaa 0 8M"});
  auto r = RunCommand("qemu-img create -q -f vmdk -b base.vmdk -F vmdk " + Quote(child));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  QemuIo(child, {"write -P 0xbb 1M 100k", "write -P 0xcc 7M 4k"});
  ExpectSameAsQemuRaw(dir, child);
  auto img = OpenOrDie(child, true);
  ASSERT_NE(img, nullptr);
  ASSERT_TRUE(img->backing_ref().has_value());
  EXPECT_EQ(img->backing_ref()->name, "base.vmdk");
  EXPECT_EQ(img->backing_ref()->format, "vmdk");
  ASSERT_NE(img->backing(), nullptr);
  EXPECT_EQ(std::get<VmdkDetails>(img->Info().format_specific).parent_cid,
            QemuInfo(child)["format-specific"]["data"]["parent-cid"].get<uint32_t>());
}

// Writing to a parent gives it a new CID; its children then no longer read through to it
// (qemu fails such reads with EINVAL), while their own grains still read.
TEST(VmdkOracle, ChangedParentIsNotReadThrough) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vmdk"), child = dir.File("child.vmdk");
  QemuCreate(base, "", "4M");
  QemuIo(base, {"write -P 0xaa 0 4M"});
  ASSERT_EQ(RunCommand("qemu-img create -q -f vmdk -b base.vmdk -F vmdk " + Quote(child)).exit_code, 0);
  QemuIo(child, {"write -P 0xbb 0 64k"});
  QemuIo(base, {"write -P 0xcc 1M 4k"});  // the parent changes: new CID
  auto q = RunCommand("qemu-img convert -O raw " + Quote(child) + " " + Quote(dir.File("x.raw")));
  EXPECT_NE(q.exit_code, 0);
  auto img = OpenOrDie(child, true);
  ASSERT_NE(img, nullptr);
  std::vector<std::byte> buf(65536);
  ASSERT_TRUE(img->Read(0, buf).ok());
  EXPECT_EQ(buf[100], std::byte{0xbb});
  Status s = img->Read(2 << 20, buf);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err(), EINVAL);
  EXPECT_NE(s.message().find("has changed"), std::string::npos) << s.message();
}

TEST(VmdkOracle, FiveGiBTwoGbMaxExtentSparseWrittenAcrossExtents) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("big.vmdk");
  QemuCreate(image, "subformat=twoGbMaxExtentSparse", "5G");
  QemuIo(image, {"write -P 0x01 0 64k", "write -P 0x02 2047M 2M", "write -P 0x03 4095M 2M",
                 "write -P 0x04 5119M 1M"});
  ExpectSameAsQemuRaw(dir, image);
  auto img = OpenOrDie(image, true);
  ASSERT_NE(img, nullptr);
  EXPECT_EQ(img->size(), 5 * kGiB);
  EXPECT_EQ(std::get<VmdkDetails>(img->Info().format_specific).extents.size(), 3u);
}

// Random writes through vimgfs::Image on an image vimgfs created; the same writes on a
// raw file; qemu must find the image clean and equal.
void WriteWorkload(const std::string& image, const std::string& raw, uint64_t size, uint64_t seed,
                   bool zeroes) {
  auto img = OpenOrDie(image, false);
  ASSERT_NE(img, nullptr);
  ASSERT_FALSE(img->read_only());
  std::vector<uint8_t> shadow;
  std::mt19937_64 rng(seed);
  std::FILE* f = std::fopen(raw.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  for (int i = 0; i < 60; i++) {
    uint64_t len = 1 + rng() % (200 * 1024);
    uint64_t off = rng() % (size - len);
    if (i % 10 == 9) off = size - len;  // the tail
    std::vector<uint8_t> data;
    bool z = zeroes && i % 4 == 3;
    if (z) {
      data.assign(len, 0);
      Status s = img->WriteZeroes(off, len, i % 8 == 7);
      ASSERT_TRUE(s.ok()) << s.message();
    } else {
      data = test::RandomBytes(len, seed * 1000 + i);
      Status s = img->Write(off, std::as_bytes(std::span(data)));
      ASSERT_TRUE(s.ok()) << s.message();
    }
    std::fseek(f, static_cast<long>(off), SEEK_SET);
    std::fwrite(data.data(), 1, len, f);
    if (i == 30) {
      ASSERT_TRUE(img->Flush().ok());
    }
  }
  std::fclose(f);
  ASSERT_TRUE(img->Close().ok());
}

TEST(VmdkOracle, VimgfsCreatedAndWrittenImagesPassQemuCheckAndCompare) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    std::map<std::string, std::string> opts;
    uint64_t size;
    bool zeroes;
  };
  const Case cases[] = {
      {"sparse", {}, 64 * kMiB, false},
      {"zeroed", {{"zeroed_grain", "on"}}, 64 * kMiB, true},
      {"flat", {{"subformat", "monolithicFlat"}}, 64 * kMiB, true},
      {"split-sparse", {{"subformat", "twoGbMaxExtentSparse"}}, 2 * kGiB + 40 * kMiB, true},
      {"split-flat", {{"subformat", "twoGbMaxExtentFlat"}}, 2 * kGiB + 40 * kMiB, false},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string image = dir.File(std::string(c.name) + ".vmdk");
    const std::string raw = dir.File(std::string(c.name) + ".raw");
    CreateContext ctx;
    ctx.path = image;
    ctx.size = c.size;
    ctx.options = c.opts;
    Status s = Image::Create("vmdk", ctx);
    ASSERT_TRUE(s.ok()) << s.message();
    ExpectQemuCheckClean(image);
    ASSERT_EQ(RunCommand("truncate -s " + std::to_string(c.size) + " " + Quote(raw)).exit_code, 0);
    WriteWorkload(image, raw, c.size, seed++, c.zeroes);
    ExpectQemuCheckClean(image);
    ExpectQemuCompareEqual(image, raw);
    ExpectSameAs(image, raw);
  }
}

TEST(VmdkOracle, WritesOverAParentKeepTheParentAndMatchQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vmdk"), child = dir.File("child.vmdk");
  QemuCreate(base, "", "4M");
  QemuIo(base, {"write -P 0x77 0 4M"});
  const std::string base_sha = test::Sha256OfFile(base);
  CreateContext ctx;
  ctx.path = child;
  ctx.backing = BackingRef{"base.vmdk", "vmdk"};
  ASSERT_TRUE(Image::Create("vmdk", ctx).ok());
  const auto cid_before = QemuInfo(child)["format-specific"]["data"]["cid"];
  {
    auto img = OpenOrDie(child, false);
    ASSERT_NE(img, nullptr);
    EXPECT_EQ(img->size(), 4 * kMiB);
    std::vector<std::byte> data(5000, std::byte{0x12});
    ASSERT_TRUE(img->Write(70000, data).ok());  // copy-on-write of a partial grain
    ASSERT_TRUE(img->Close().ok());
  }
  EXPECT_EQ(test::Sha256OfFile(base), base_sha);
  ExpectQemuCheckClean(child);
  ExpectSameAsQemuRaw(dir, child);
  auto info = QemuInfo(child);
  EXPECT_EQ(info["backing-filename"], "base.vmdk");
  // Like qemu, the first write gives the image a new CID; the parent link is kept.
  EXPECT_NE(info["format-specific"]["data"]["cid"], cid_before);
  EXPECT_EQ(info["format-specific"]["data"]["parent-cid"], QemuInfo(base)["format-specific"]["data"]["cid"]);
}

// Four threads writing disjoint random ranges at once (allocations interleave between
// PrepareWrite and CommitWrite); qemu then finds the image clean and equal to the raw file.
TEST(VmdkOracle, ConcurrentWritersLeaveACleanEqualImage) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("mt.vmdk"), raw = dir.File("mt.raw");
  const uint64_t size = 96 * kMiB;
  CreateContext ctx;
  ctx.path = image;
  ctx.size = size;
  ctx.options = {{"subformat", "twoGbMaxExtentSparse"}};
  ASSERT_TRUE(Image::Create("vmdk", ctx).ok());
  std::vector<uint8_t> expect(size, 0);
  auto img = OpenOrDie(image, false);
  ASSERT_NE(img, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; t++) {
    // Thread t owns the 1 MiB stripes i with i % 4 == t; writes are unaligned inside them.
    std::mt19937_64 rng(t + 10);
    std::vector<std::tuple<uint64_t, std::vector<uint8_t>>> ops;
    for (int i = 0; i < 40; i++) {
      uint64_t stripe = (rng() % (size / kMiB / 4)) * 4 + t;
      uint64_t len = 1 + rng() % (kMiB - 1);
      uint64_t off = stripe * kMiB + rng() % (kMiB - len + 1);
      auto data = test::RandomBytes(len, t * 1000 + i);
      std::memcpy(expect.data() + off, data.data(), len);
      ops.emplace_back(off, std::move(data));
    }
    threads.emplace_back([&img, &failures, ops = std::move(ops)] {
      for (const auto& [off, data] : ops)
        if (!img->Write(off, std::as_bytes(std::span(data))).ok()) failures++;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_TRUE(img->Close().ok());
  test::WriteWholeFile(raw, expect);
  ExpectQemuCheckClean(image);
  ExpectQemuCompareEqual(image, raw);
}

// ESX sparse (COWD) extents, built by hand (qemu-img cannot create them), read like qemu
// reads them: alone and through a vmfsSparse descriptor.
TEST(VmdkOracle, CowdSparseExtentReadsLikeQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string cowd = dir.File("c.vmdk"), desc = dir.File("d.vmdk");
  // 1 MiB disk, 4 KiB grains; GD at sector 4 (1 entry) -> GT at sector 5 (4096 entries,
  // 32 sectors) -> grains from sector 37.
  std::vector<uint8_t> b(37 * 512 + 3 * 4096, 0);
  auto put32 = [&](size_t off, uint32_t v) { std::memcpy(b.data() + off, &v, 4); };
  std::memcpy(b.data(), "COWD", 4);
  put32(4, 1);      // version
  put32(8, 3);      // flags
  put32(12, 2048);  // sectors
  put32(16, 8);     // grain sectors
  put32(20, 4);     // GD sector
  put32(24, 1);     // GD entries
  put32(28, 37 + 24);
  put32(4 * 512, 5);
  put32(5 * 512 + 4 * 1, 37);    // grain 1
  put32(5 * 512 + 4 * 200, 45);  // grain 200
  put32(5 * 512 + 4 * 255, 53);  // last grain
  for (size_t i = 0; i < 3 * 4096; i++) b[37 * 512 + i] = static_cast<uint8_t>(i * 7 + 3);
  test::WriteWholeFile(cowd, b);
  const std::string text =
      "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
      "createType=\"vmfsSparse\"\nRW 2048 VMFSSPARSE \"c.vmdk\"\n";
  test::WriteWholeFile(desc, std::vector<uint8_t>(text.begin(), text.end()));
  // qemu opens COWD through a descriptor only (a bare sparse file needs a CID for it).
  ExpectSameAsQemuRaw(dir, desc);
  auto r = RunCommand("qemu-img convert -f vmdk -O raw " + Quote(desc) + " " + Quote(dir.File("c.raw")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSameAs(cowd, dir.File("c.raw"));
  auto img = OpenOrDie(cowd, false);
  ASSERT_NE(img, nullptr);
  EXPECT_TRUE(img->read_only());  // COWD is read-only here
}

// vimgfs create and qemu-img create give the same structure: same files, same sizes, the
// same descriptor apart from the random CID, and the same `qemu-img info`.
TEST(VmdkOracle, CreateMatchesQemuImgCreate) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const char* opts[] = {"subformat=monolithicSparse",
                        "subformat=monolithicFlat",
                        "subformat=twoGbMaxExtentSparse",
                        "subformat=twoGbMaxExtentFlat",
                        "subformat=streamOptimized",
                        "zeroed_grain=on,adapter_type=lsilogic",
                        "compat6=on",
                        "hwversion=7,adapter_type=buslogic,toolsversion=123"};
  int n = 0;
  for (const char* o : opts) {
    SCOPED_TRACE(o);
    std::filesystem::create_directories(dir.File("q" + std::to_string(n)));
    std::filesystem::create_directories(dir.File("v" + std::to_string(n)));
    const std::string q = dir.File("q" + std::to_string(n) + "/d.vmdk");
    const std::string v = dir.File("v" + std::to_string(n) + "/d.vmdk");
    n++;
    QemuCreate(q, o, "4100M");
    CreateContext ctx;
    ctx.path = v;
    ctx.size = 4100 * kMiB;
    std::stringstream ss(o);
    std::string kv;
    while (std::getline(ss, kv, ',')) ctx.options[kv.substr(0, kv.find('='))] = kv.substr(kv.find('=') + 1);
    Status s = Image::Create("vmdk", ctx);
    ASSERT_TRUE(s.ok()) << s.message();
    // Same files with the same sizes.
    std::vector<std::pair<std::string, uint64_t>> qf, vf;
    for (auto& e : std::filesystem::directory_iterator(std::filesystem::path(q).parent_path()))
      qf.emplace_back(e.path().filename(), e.file_size());
    for (auto& e : std::filesystem::directory_iterator(std::filesystem::path(v).parent_path()))
      vf.emplace_back(e.path().filename(), e.file_size());
    std::sort(qf.begin(), qf.end());
    std::sort(vf.begin(), vf.end());
    // A text descriptor's length varies with the CID (printed without leading zeros).
    auto q_head = test::ReadWholeFile(q);
    const bool text_desc = q_head.size() < 4 || std::memcmp(q_head.data(), "KDMV", 4) != 0;
    for (auto* l : {&qf, &vf})
      for (auto& [name, size] : *l)
        if (text_desc && name == "d.vmdk") size = 0;
    EXPECT_EQ(qf, vf);
    auto qi = QemuInfo(q), vi = QemuInfo(v);
    for (auto* j : {&qi, &vi}) {
      j->erase("actual-size");
      j->erase("filename");
      (*j)["format-specific"]["data"].erase("cid");
      for (auto& e : (*j)["format-specific"]["data"]["extents"]) e.erase("filename");
    }
    EXPECT_EQ(qi, vi);
    ExpectQemuCheckClean(v);
    // The sparse file or descriptor bytes are equal once the CID line is masked (its
    // length varies: the CID is printed without leading zeros).
    auto qb = test::ReadWholeFile(q), vb = test::ReadWholeFile(v);
    if (!text_desc) {
      ASSERT_EQ(qb.size(), vb.size());
    }
    std::string qs(qb.begin(), qb.end()), vs(vb.begin(), vb.end());
    const bool sparse = qs.rfind("KDMV", 0) == 0;
    auto text = [&](const std::string& t) {
      std::string d = sparse ? t.substr(512, 20 * 512) : t;
      d = d.substr(0, d.find('\0'));
      auto p = d.find("\nCID=");
      if (p != std::string::npos) d.replace(p, d.find('\n', p + 1) - p, "\nCID=x");
      return d;
    };
    EXPECT_EQ(text(qs), text(vs));
    if (sparse) {
      EXPECT_TRUE(qs.substr(0, 512) == vs.substr(0, 512)) << "headers differ";
      EXPECT_TRUE(qs.substr(21 * 512) == vs.substr(21 * 512)) << "grain directories/tables differ";
    }
  }
}

TEST(VmdkOracle, StreamOptimizedWriterOutputPassesQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("w.vmdk"), raw = dir.File("w.raw");
  const uint64_t size = 5 * kMiB + 1000 * 512;
  auto data = test::RandomBytes(size, 99);
  std::memset(data.data() + kMiB, 0, 2 * kMiB);
  std::memset(data.data() + 3 * kMiB, 0x42, kMiB);
  test::WriteWholeFile(raw, data);
  auto w = StreamOptimizedWriter::Open(*Env::Default(), image, size);
  ASSERT_TRUE(w.ok()) << w.error().message();
  const uint64_t g = (*w)->grain_size();
  for (uint64_t off = 0, i = 0; off < size; off += g, i++) {
    size_t n = std::min<uint64_t>(g, size - off);
    ASSERT_TRUE((*w)->WriteGrain(i, std::as_bytes(std::span(data.data() + off, n))).ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
  ExpectQemuCheckClean(image);
  ExpectQemuCompareEqual(image, raw);
  ExpectSameAs(image, raw);
  EXPECT_EQ(QemuInfo(image)["format-specific"]["data"]["create-type"], "streamOptimized");
}

TEST(VmdkOracle, CheckFindsGrainsPastTheEndLikeQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string image = dir.File("c.vmdk");
  QemuCreate(image, "", "100M");
  // The first entry of the first grain table (primary at sector 39) points far past EOF.
  auto b = test::ReadWholeFile(image);
  b[39 * 512 + 2] = 0x10;
  test::WriteWholeFile(image, b);
  auto q = RunCommand("qemu-img check " + Quote(image));
  EXPECT_EQ(q.exit_code, 1);
  auto img = OpenOrDie(image, true);
  ASSERT_NE(img, nullptr);
  auto report = img->Check(RepairMode::kNone);
  ASSERT_FALSE(report.ok());
  EXPECT_NE(q.err.find(report.error().message().substr(0, report.error().message().find('\n'))),
            std::string::npos)
      << q.err << " vs " << report.error().message();
  // The command prints what qemu-img prints, and exits 1 like it.
  auto v = RunCommand(Quote(test::VimgfsBinary()) + " check " + Quote(image));
  EXPECT_EQ(v.exit_code, 1);
  auto strip = [](std::string s) {
    for (const char* tool : {"qemu-img: ", "vimgfs: "})
      for (size_t p; (p = s.find(tool)) != std::string::npos;) s.erase(p, std::strlen(tool));
    return s;
  };
  EXPECT_EQ(strip(v.err), strip(q.err));
  // A clean image checks clean.
  QemuCreate(dir.File("ok.vmdk"), "", "100M");
  auto ok = OpenOrDie(dir.File("ok.vmdk"), true);
  ASSERT_NE(ok, nullptr);
  auto r2 = ok->Check(RepairMode::kNone);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->corruptions, 0);
}

// --untrusted: an extent outside the descriptor's folder is never opened; `info` (which
// opens no chain) shows its name, everything else refuses the image naming it.
TEST(VmdkOracle, UntrustedRefusesExtentsOutsideTheFolder) {
  test::TempDir dir;
  std::filesystem::create_directories(dir.File("in"));
  test::WriteWholeFile(dir.File("outside-flat.vmdk"), std::vector<uint8_t>(4096, 0x61));
  test::WriteWholeFile(dir.File("in/inside-flat.vmdk"), std::vector<uint8_t>(4096, 0x62));
  const std::string text =
      "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
      "createType=\"twoGbMaxExtentFlat\"\n"
      "RW 8 FLAT \"inside-flat.vmdk\" 0\nRW 8 FLAT \"../outside-flat.vmdk\" 0\n";
  test::WriteWholeFile(dir.File("in/d.vmdk"), std::vector<uint8_t>(text.begin(), text.end()));
  OpenOptions o;
  o.read_only = true;
  o.untrusted = true;
  auto refused = Image::Open(dir.File("in/d.vmdk"), o);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message().find("../outside-flat.vmdk"), std::string::npos)
      << refused.error().message();
  o.open_backing = false;  // what `info` does
  auto info = Image::Open(dir.File("in/d.vmdk"), o);
  ASSERT_TRUE(info.ok()) << info.error().message();
  auto fi = (*info)->Info();
  const auto& extents = std::get<VmdkDetails>(fi.format_specific).extents;
  ASSERT_EQ(extents.size(), 2u);
  EXPECT_EQ(extents[1].filename, "../outside-flat.vmdk");
  std::vector<std::byte> buf(512);
  EXPECT_TRUE((*info)->Read(0, buf).ok());
  EXPECT_EQ(buf[0], std::byte{0x62});
  EXPECT_FALSE((*info)->Read(4096, buf).ok());
  o.untrusted = false;
  o.open_backing = true;
  auto trusted = Image::Open(dir.File("in/d.vmdk"), o);
  ASSERT_TRUE(trusted.ok());
  ASSERT_TRUE((*trusted)->Read(4096, buf).ok());
  EXPECT_EQ(buf[0], std::byte{0x61});
}

// SHA-256 of the whole virtual disk, streamed through openssl (several times faster than
// sha256sum here; disks up to 16 GiB) or sha256sum.
std::string Sha256OfDisk(Image& img) {
  test::TempDir dir;
  const std::string out = dir.File("sum");
  const std::string tool = test::HaveProgram("openssl") ? "openssl dgst -sha256 -r" : "sha256sum";
  std::FILE* p = popen((tool + " > " + Quote(out)).c_str(), "w");
  if (!p) return "";
  std::vector<std::byte> buf(8 * kMiB);
  for (uint64_t off = 0; off < img.size(); off += buf.size()) {
    size_t n = std::min<uint64_t>(buf.size(), img.size() - off);
    if (!img.Read(off, std::span(buf.data(), n)).ok()) {
      pclose(p);
      return "read error";
    }
    std::fwrite(buf.data(), 1, n, p);
  }
  pclose(p);
  auto sum = test::ReadWholeFile(out);
  return std::string(sum.begin(), sum.begin() + std::min<size_t>(64, sum.size()));
}

TEST(VmdkOracle, CorpusImagesReadWithRecordedSha256AndBadOnesAreRefused) {
  const std::string corpus = test::CorpusDir();
  if (corpus.empty()) GTEST_SKIP() << "corpus not found";
  int good = 0, bad = 0;
  for (const auto& row : test::CorpusManifest(corpus)) {
    if (row[4] != "vmdk") continue;
    const std::string path = corpus + "/" + row[0];
    SCOPED_TRACE(path);
    OpenOptions o;
    o.read_only = true;
    o.format = "vmdk";
    auto img = Image::Open(path, o);
    if (row[0].rfind("good/", 0) == 0) {
      ++good;
      ASSERT_TRUE(img.ok()) << img.error().message();
      EXPECT_EQ(std::to_string((*img)->size()), row[5]);
      EXPECT_EQ(Sha256OfDisk(**img), row[6]);
      auto report = (*img)->Check(RepairMode::kNone);
      EXPECT_TRUE(report.ok()) << report.error().message();
    } else if (row[0].rfind("bad/", 0) == 0) {
      ++bad;
      if (img.ok()) {
        // Opening may succeed only if reading then fails; it must not crash.
        std::vector<std::byte> buf(kMiB);
        bool failed = false;
        for (uint64_t off = 0; off < (*img)->size() && !failed; off += buf.size())
          failed =
              !(*img)
                   ->Read(off, std::span(buf.data(), std::min<uint64_t>(buf.size(), (*img)->size() - off)))
                   .ok();
        EXPECT_TRUE(failed) << "bad image opened and read without error";
      } else {
        EXPECT_EQ(img.error().message().find('\n'), std::string::npos);
        EXPECT_NE(img.error().message().find(row[0].substr(row[0].rfind('/') + 1)), std::string::npos)
            << img.error().message();
      }
    }
  }
  EXPECT_GE(good, 6);
  EXPECT_GE(bad, 3);
}

}  // namespace
}  // namespace vimgfs

// VHD ("vpc") against qemu-img 7.2: images qemu makes (dynamic, fixed, force_size, odd
// sizes) read byte-for-byte like `qemu-img convert -O raw` and map like `qemu-img map`;
// images vimgfs creates and writes (also from 4 threads) read back identically in qemu;
// a differencing disk reads absent sectors from its parent and is written without losing
// them; the real VHDs of the corpus read with the recorded sha256 and the broken ones are
// refused with one line; containers without a driver are refused, never read as raw.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "formats/vpc/vpc_internal.h"
#include "support/test_util.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kKiB = 1024, kMiB = 1 << 20;

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool ro, const std::string& format = "") {
  OpenOptions o;
  o.read_only = ro;
  o.format = format;
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

std::vector<std::byte> ReadAll(Image& img) {
  std::vector<std::byte> buf(img.size());
  Status s = img.Read(0, buf);
  EXPECT_TRUE(s.ok()) << s.message();
  return buf;
}

void ReadAllTo(const std::string& path, const std::string& out, const std::string& format = "") {
  auto img = OpenOrDie(path, true, format);
  ASSERT_NE(img, nullptr);
  auto buf = ReadAll(*img);
  std::ofstream(out, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), buf.size());
}

void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string ours = dir.File("ours.raw"), theirs = dir.File("qemu.raw");
  auto r = RunCommand("qemu-img convert -f vpc -O raw " + Quote(image) + " " + Quote(theirs));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ReadAllTo(image, ours, "vpc");
  EXPECT_EQ(std::filesystem::file_size(ours), std::filesystem::file_size(theirs)) << image;
  EXPECT_EQ(test::Sha256OfFile(ours), test::Sha256OfFile(theirs)) << image;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f vpc";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

std::string Vimgfs() { return Quote(test::VimgfsBinary()); }

TEST(VpcOracle, QemuMadeImagesReadByteExactAndMapAlike) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    const char* opts;
    const char* size;
  } cases[] = {{"dyn.vhd", "", "20M"},
               {"fixed.vhd", "-o subformat=fixed", "8M"},
               {"forced.vhd", "-o force_size=on", "10M"},
               {"odd.vhd", "", "5000001"},
               {"fixed_forced.vhd", "-o subformat=fixed,force_size=on", "5M"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string img = dir.File(c.name);
    auto r = RunCommand(std::string("qemu-img create -q -f vpc ") + c.opts + " " + Quote(img) + " " + c.size);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto opened = OpenOrDie(img, true, "vpc");
    ASSERT_NE(opened, nullptr);
    const uint64_t size = opened->size();
    auto info = nlohmann::json::parse(RunCommand("qemu-img info -f vpc --output=json " + Quote(img)).out);
    EXPECT_EQ(size, info["virtual-size"].get<uint64_t>());
    QemuIo(img, {"write -P 0x11 0 4k", "write -P 0x22 3M 1M", "write -P 0x33 1536k 700k",
                 fmt::format("write -P 0x44 {} 512", size - 512)});
    ExpectSameAsQemuRaw(dir, img);
    for (const char* output : {"json", "human"}) {
      auto ours = RunCommand(Vimgfs() + " map -f vpc --output=" + output + " " + Quote(img));
      auto theirs = RunCommand(std::string("qemu-img map -f vpc --output=") + output + " " + Quote(img));
      EXPECT_EQ(ours.out, theirs.out) << output;
    }
    auto ours = RunCommand(Vimgfs() + " info -f vpc " + Quote(img));
    auto theirs = RunCommand("qemu-img info -f vpc " + Quote(img));
    // "disk size" may differ by the host's allocation; the rest is the same text.
    auto strip = [](std::string s) {
      std::istringstream in(s);
      std::string line, out;
      while (std::getline(in, line))
        if (line.rfind("disk size:", 0) != 0) out += line + "\n";
      return out;
    };
    EXPECT_EQ(strip(ours.out), strip(theirs.out));
  }
  // A fixed VHD has no magic at its start: probed as raw, as qemu does.
  auto r = RunCommand(Vimgfs() + " info --output=json " + Quote(dir.File("fixed.vhd")));
  EXPECT_EQ(nlohmann::json::parse(r.out)["format"], "raw");
}

// The same seeded writes go to a vimgfs image and to a raw model.
void RandomWrites(Image& img, std::vector<uint8_t>* model, uint64_t seed, int n, uint64_t max_len) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const uint64_t len = 1 + rng() % max_len;
    const uint64_t off = rng() % (img.size() - len);
    auto bytes = test::RandomBytes(len, seed * 1000 + i);
    Status s = img.Write(off, std::as_bytes(std::span(bytes)));
    ASSERT_TRUE(s.ok()) << s.message();
    std::memcpy(model->data() + off, bytes.data(), len);
  }
}

void ExpectQemuSees(const test::TempDir& dir, const std::string& img, const std::vector<uint8_t>& model) {
  const std::string raw = dir.File("model.raw");
  test::WriteWholeFile(raw, model);
  auto r = RunCommand("qemu-img compare -f vpc -F raw " + Quote(img) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST(VpcOracle, VimgfsWrittenImagesReadBackInQemu) {
  REQUIRE_QEMU_IMG();
  struct Case {
    const char* name;
    std::map<std::string, std::string> options;
    uint64_t size;
  } cases[] = {{"dynamic", {}, 24 * kMiB + 3 * 512},
               {"fixed", {{"subformat", "fixed"}}, 16 * kMiB},
               {"forced", {{"force_size", "on"}}, 20 * kMiB}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    test::TempDir dir;
    const std::string path = dir.File("w.vhd");
    CreateContext ctx;
    ctx.path = path;
    ctx.size = c.size;
    ctx.options = c.options;
    ASSERT_TRUE(Image::Create("vpc", ctx).ok());
    // The size qemu gives the same request.
    auto q = RunCommand("qemu-img create -q -f vpc " + Quote(dir.File("q.vhd")) + " " +
                        std::to_string(c.size) + (c.options.count("force_size") ? " -o force_size=on" : ""));
    ASSERT_EQ(q.exit_code, 0) << q.err;
    auto qinfo = nlohmann::json::parse(
        RunCommand("qemu-img info -f vpc --output=json " + Quote(dir.File("q.vhd"))).out);
    std::vector<uint8_t> model;
    {
      auto img = OpenOrDie(path, false, "vpc");
      ASSERT_NE(img, nullptr);
      EXPECT_EQ(img->size(), qinfo["virtual-size"].get<uint64_t>());
      model.assign(img->size(), 0);
      RandomWrites(*img, &model, 3, 40, 3 * kMiB);
      ASSERT_TRUE(img->Flush().ok());
      RandomWrites(*img, &model, 4, 20, 64 * kKiB);
      auto report = img->Check(RepairMode::kNone);
      ASSERT_TRUE(report.ok());
      EXPECT_EQ(report->corruptions, 0) << fmt::format("{}", fmt::join(report->messages, "\n"));
      ASSERT_TRUE(img->Close().ok());
    }
    ExpectQemuSees(dir, path, model);
    ExpectSameAsQemuRaw(dir, path);
    // The file ends in the footer, the same as the copy at the start (dynamic).
    auto bytes = test::ReadWholeFile(path);
    ASSERT_GE(bytes.size(), 1024u);
    EXPECT_EQ(std::memcmp(bytes.data() + bytes.size() - 512, "conectix", 8), 0);
    if (c.name != std::string("fixed")) {
      EXPECT_EQ(std::memcmp(bytes.data(), bytes.data() + bytes.size() - 512, 512), 0);
    } else {
      EXPECT_EQ(bytes.size(), model.size() + 512);
    }
    auto info = nlohmann::json::parse(RunCommand("qemu-img info --output=json " + Quote(path)).out);
    EXPECT_EQ(info["format"], c.name == std::string("fixed") ? "raw" : "vpc");
  }
}

TEST(VpcOracle, FourThreadsWritingTheSameBlocks) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string path = dir.File("t.vhd");
  CreateContext ctx;
  ctx.path = path;
  ctx.size = 16 * kMiB;
  ctx.options["force_size"] = "on";
  ASSERT_TRUE(Image::Create("vpc", ctx).ok());
  std::vector<uint8_t> model(ctx.size);
  {
    auto img = OpenOrDie(path, false);
    ASSERT_NE(img, nullptr);
    constexpr uint64_t kChunk = 64 * kKiB;  // chunk i belongs to thread i % 4
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (uint64_t chunk = t; chunk * kChunk < ctx.size; chunk += 4) {
          auto bytes = test::RandomBytes(kChunk, chunk + 77);
          if (!img->Write(chunk * kChunk, std::as_bytes(std::span(bytes))).ok()) failures++;
          std::memcpy(model.data() + chunk * kChunk, bytes.data(), kChunk);
          if (chunk % 16 == 0 && !img->Flush().ok()) failures++;
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    ASSERT_TRUE(img->Close().ok());
  }
  ExpectQemuSees(dir, path, model);
  // Every block allocated exactly once: 8 blocks of 2 MiB + bitmaps + metadata + footer.
  EXPECT_EQ(std::filesystem::file_size(path), 1536 + 512 + 8 * (2 * kMiB + 512) + 512);
}

TEST(VpcOracle, CreatedLayoutIsQemus) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  for (const char* opts : {"", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"}) {
    SCOPED_TRACE(opts);
    const std::string ours = dir.File("o.vhd"), theirs = dir.File("q.vhd");
    std::string o = *opts ? std::string(" -o ") + opts : "";
    ASSERT_EQ(RunCommand(Vimgfs() + " create -q -f vpc" + o + " " + Quote(ours) + " 100000000").exit_code, 0);
    ASSERT_EQ(RunCommand("qemu-img create -q -f vpc" + o + " " + Quote(theirs) + " 100000000").exit_code, 0);
    auto a = test::ReadWholeFile(ours), b = test::ReadWholeFile(theirs);
    ASSERT_EQ(a.size(), b.size());
    // Equal but for the timestamp, the unique id and the checksum over them.
    for (size_t base = 0; base < a.size(); base += 512) {
      if (std::memcmp(b.data() + base, "conectix", 8) != 0) {
        EXPECT_EQ(std::memcmp(a.data() + base, b.data() + base, std::min<size_t>(512, a.size() - base)), 0)
            << base;
        continue;
      }
      for (size_t i = 0; i < 512; ++i) {
        const bool varies = (i >= vpc::foot::kTimestamp && i < vpc::foot::kTimestamp + 4) ||
                            (i >= vpc::foot::kChecksum && i < vpc::foot::kUniqueId + 16);
        if (!varies) {
          EXPECT_EQ(a[base + i], b[base + i]) << "footer at " << base << " byte " << i;
        }
      }
    }
    EXPECT_EQ(RunCommand("qemu-img compare -f vpc -F vpc " + Quote(ours) + " " + Quote(theirs)).exit_code, 0);
  }
  // Sizes qemu refuses, refused alike.
  auto r = RunCommand(Vimgfs() + " create -q -f vpc " + Quote(dir.File("big.vhd")) + " 3T");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("The image size is too large for file format 'vpc'"), std::string::npos) << r.err;
  r = RunCommand(Vimgfs() + " create -q -f vpc -o subformat=foo " + Quote(dir.File("x.vhd")) + " 1M");
  EXPECT_NE(r.err.find("Parameter 'subformat' does not accept value 'foo'"), std::string::npos) << r.err;
}

// A differencing disk crafted by hand (qemu cannot make one): 4 MiB in blocks of 512 KiB,
// block 1 present with sectors 0-7 and 9 in its bitmap, over a parent made by qemu.
struct Differencing {
  static constexpr uint64_t kSize = 4 * kMiB, kBlock = 512 * kKiB;
  std::string parent, child;
  std::vector<uint8_t> expected;

  explicit Differencing(const test::TempDir& dir)
      : parent(dir.File("base.vhd")), child(dir.File("child.vhd")) {
    auto r = RunCommand("qemu-img create -q -f vpc -o force_size=on " + Quote(parent) + " 4M");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    QemuIo(parent, {"write -P 0xb0 0 4M"});
    std::vector<uint8_t> f(4096 + 512 + kBlock + 512, 0);
    auto footer = [&](uint8_t* p) {
      std::memcpy(p, "conectix", 8);
      StoreBE32(p + vpc::foot::kVersion, 0x00010000);
      StoreBE64(p + vpc::foot::kDataOffset, 512);
      std::memcpy(p + vpc::foot::kCreatorApp, "win ", 4);
      StoreBE64(p + vpc::foot::kCurrentSize, kSize);
      StoreBE16(p + vpc::foot::kCylinders, 120);
      p[vpc::foot::kHeads] = 16;
      p[vpc::foot::kSectorsPerTrack] = 63;
      StoreBE32(p + vpc::foot::kDiskType, vpc::kTypeDifferencing);
      StoreBE32(p + vpc::foot::kChecksum,
                vpc::Checksum(std::as_bytes(std::span(p, 512)), vpc::foot::kChecksum));
    };
    footer(f.data());
    uint8_t* h = f.data() + 512;
    std::memcpy(h, "cxsparse", 8);
    StoreBE64(h + vpc::dyn::kDataOffset, ~0ull);
    StoreBE64(h + vpc::dyn::kTableOffset, 1536);
    StoreBE32(h + vpc::dyn::kVersion, 0x00010000);
    StoreBE32(h + vpc::dyn::kMaxTableEntries, kSize / kBlock);
    StoreBE32(h + vpc::dyn::kBlockSize, kBlock);
    // Locator 0: relative Windows path ".\base.vhd" in UTF-16LE at 2048.
    const std::string rel = ".\\base.vhd";
    uint8_t* loc = h + vpc::dyn::kParentLocators;
    std::memcpy(loc, "W2ru", 4);
    StoreBE32(loc + 4, 512);
    StoreBE32(loc + 8, rel.size() * 2);
    StoreBE64(loc + 16, 2048);
    for (size_t i = 0; i < rel.size(); ++i) f[2048 + 2 * i] = rel[i];
    StoreBE32(h + vpc::dyn::kChecksum, vpc::Checksum(std::as_bytes(std::span(h, 1024)), vpc::dyn::kChecksum));
    std::memset(f.data() + 1536, 0xff, 512);
    StoreBE32(f.data() + 1536 + 4, 4096 / 512);  // block 1 at 4096
    f[4096] = 0xff;                              // sectors 0-7
    f[4097] = 0x40;                              // sector 9
    std::memset(f.data() + 4096 + 512, 0xc1, kBlock);
    footer(f.data() + f.size() - 512);
    test::WriteWholeFile(child, f);
    expected.assign(kSize, 0xb0);
    std::memset(expected.data() + kBlock, 0xc1, 8 * 512);
    std::memset(expected.data() + kBlock + 9 * 512, 0xc1, 512);
  }
};

TEST(VpcOracle, DifferencingDiskReadsAbsentSectorsFromItsParent) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  Differencing d(dir);
  {
    auto img = OpenOrDie(d.child, true);
    ASSERT_NE(img, nullptr);
    EXPECT_EQ(img->format(), "vpc");
    auto data = ReadAll(*img);
    EXPECT_EQ(std::memcmp(data.data(), d.expected.data(), d.expected.size()), 0);
  }
  // Writes: one sector into the partly present block, one into an absent block. The
  // sectors around them keep reading from the parent, also after a reopen.
  {
    auto img = OpenOrDie(d.child, false);
    ASSERT_NE(img, nullptr);
    std::vector<uint8_t> a(512, 0xa1), b(4096, 0xa2);
    ASSERT_TRUE(img->Write(d.kBlock + 20 * 512, std::as_bytes(std::span(a))).ok());
    ASSERT_TRUE(img->Write(3 * d.kBlock + 1000, std::as_bytes(std::span(b))).ok());
    std::memcpy(d.expected.data() + d.kBlock + 20 * 512, a.data(), a.size());
    std::memcpy(d.expected.data() + 3 * d.kBlock + 1000, b.data(), b.size());
    auto data = ReadAll(*img);
    EXPECT_EQ(std::memcmp(data.data(), d.expected.data(), d.expected.size()), 0);
    ASSERT_TRUE(img->Close().ok());
  }
  {
    auto img = OpenOrDie(d.child, true);
    ASSERT_NE(img, nullptr);
    auto data = ReadAll(*img);
    EXPECT_EQ(std::memcmp(data.data(), d.expected.data(), d.expected.size()), 0);
    auto report = img->Check(RepairMode::kNone);
    ASSERT_TRUE(report.ok());
    EXPECT_EQ(report->corruptions, 0) << fmt::format("{}", fmt::join(report->messages, "\n"));
  }
  // Both written blocks are now whole: qemu, which ignores the parent and the bitmaps,
  // sees the same bytes in them.
  auto r = RunCommand("qemu-io -f vpc -c 'read -P 0xa1 " + std::to_string(d.kBlock + 20 * 512) +
                      " 512' -c 'read -P 0xb0 " + std::to_string(d.kBlock + 21 * 512) +
                      " 512' -c 'read -P 0xb0 " + std::to_string(3 * d.kBlock) + " 1000' " + Quote(d.child));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  // info shows the parent as the backing file.
  auto info = RunCommand(Vimgfs() + " info --output=json " + Quote(d.child));
  EXPECT_EQ(nlohmann::json::parse(info.out)["backing-filename"], "base.vhd") << info.out;
}

TEST(VpcOracle, DifferencingParentOutsideTheFolderIsRefusedWhenUntrusted) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  Differencing d(dir);
  std::filesystem::create_directory(dir.File("sub"));
  std::filesystem::rename(d.child, dir.File("sub/child.vhd"));
  OpenOptions o;
  o.read_only = true;
  // The relative locator now names sub/base.vhd, which does not exist.
  EXPECT_FALSE(Image::Open(dir.File("sub/child.vhd"), o).ok());
  std::filesystem::create_symlink(d.parent, dir.File("sub/base.vhd"));
  EXPECT_TRUE(Image::Open(dir.File("sub/child.vhd"), o).ok());
  o.untrusted = true;  // a symlink to outside the folder: refused
  EXPECT_FALSE(Image::Open(dir.File("sub/child.vhd"), o).ok());
}

TEST(VpcOracle, CorpusVhdsReadWithRecordedSha256) {
  const std::string corpus = test::CorpusDir();
  if (corpus.empty()) GTEST_SKIP() << "../shared/corpus not found: the third-party images are not here";
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  int good = 0, bad = 0;
  for (const auto& row : test::CorpusManifest(corpus)) {
    if (row[4] != "vpc") continue;
    SCOPED_TRACE(row[0]);
    std::string path = corpus + "/" + row[0];
    if (path.ends_with(".bz2") || path.ends_with(".gz")) {
      const std::string out = dir.File("unpacked.vhd");
      ASSERT_EQ(RunCommand((path.ends_with(".gz") ? "zcat " : "bzcat ") + Quote(path) + " > " + Quote(out))
                    .exit_code,
                0);
      path = out;
    }
    if (row[0].rfind("bad/", 0) == 0) {
      ++bad;
      OpenOptions o;
      o.read_only = true;
      o.format = "vpc";
      auto img = Image::Open(path, o);
      ASSERT_FALSE(img.ok());
      EXPECT_EQ(img.error().message().find('\n'), std::string::npos) << img.error().message();
      EXPECT_NE(img.error().message().find(path), std::string::npos) << img.error().message();
      continue;
    }
    ++good;
    // Size: the geometry or current_size, as qemu picks by creator (the manifest's
    // virtual_size is qemu's default reading; its note gives the other one).
    auto img = OpenOrDie(path, true, "vpc");
    ASSERT_NE(img, nullptr);
    EXPECT_EQ(std::to_string(img->size()), row[5]);
    auto report = img->Check(RepairMode::kNone);
    ASSERT_TRUE(report.ok());
    EXPECT_EQ(report->corruptions, 0) << fmt::format("{}", fmt::join(report->messages, "\n"));
    if (img->size() <= 4ull << 30) {
      ReadAllTo(path, dir.File("out.raw"), "vpc");
      EXPECT_EQ(test::Sha256OfFile(dir.File("out.raw")), row[6]);
    } else {
      // Too large to hash here: where data lives must be what qemu says, and what is not
      // data reads as zeros (the recorded sha256 is of an empty disk for these).
      auto ours = RunCommand(Vimgfs() + " map -f vpc --output=json " + Quote(path));
      auto theirs = RunCommand("qemu-img map -f vpc --output=json " + Quote(path));
      EXPECT_EQ(ours.out, theirs.out);
    }
  }
  EXPECT_GE(good, 5);
  EXPECT_GE(bad, 2);
}

TEST(VpcOracle, MalformedImagesGiveOneClearError) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vhd");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vpc " + Quote(base) + " 8M").exit_code, 0);
  QemuIo(base, {"write -P 0x5a 0 1M"});
  const auto good = test::ReadWholeFile(base);
  auto refix_footer = [](std::vector<uint8_t>& f, size_t at) {
    StoreBE32(&f[at + vpc::foot::kChecksum],
              vpc::Checksum(std::as_bytes(std::span(f.data() + at, 512)), vpc::foot::kChecksum));
  };
  struct Mutation {
    const char* name;
    std::function<void(std::vector<uint8_t>&)> apply;
    const char* expect;
  } mutations[] = {
      {"bad footer checksum", [](auto& f) { f[40] ^= 1; }, "checksum"},
      {"bat past eof", [&](auto& f) { StoreBE64(&f[512 + vpc::dyn::kTableOffset], 1ull << 40); },
       "outside the file"},
      {"huge table", [&](auto& f) { StoreBE32(&f[512 + vpc::dyn::kMaxTableEntries], 0x40000001); },
       "Max Table Entries"},
      {"block size 3000", [&](auto& f) { StoreBE32(&f[512 + vpc::dyn::kBlockSize], 3000); },
       "Invalid block size"},
      {"header past eof",
       [&](auto& f) {
         StoreBE64(&f[vpc::foot::kDataOffset], 1ull << 50);
         refix_footer(f, 0);
       },
       "outside the file"},
      {"header cut short by the end of the file",  // as qemu's afl5 sample: zeros past the end
       [&](auto& f) {
         StoreBE32(&f[512 + vpc::dyn::kMaxTableEntries], 0x40000001);
         f.resize(1028);
       },
       "Max Table Entries too large (1073741825)"},
      {"absurd size",
       [&](auto& f) {
         std::memcpy(&f[vpc::foot::kCreatorApp], "win ", 4);
         StoreBE64(&f[vpc::foot::kCurrentSize], 1ull << 60);
         refix_footer(f, 0);
       },
       "2040 GiB"},
      {"truncated", [](auto& f) { f.resize(1024 * 1024); }, "truncated"},
  };
  for (const auto& m : mutations) {
    SCOPED_TRACE(m.name);
    auto f = good;
    m.apply(f);
    const std::string path = dir.File("bad.vhd");
    test::WriteWholeFile(path, f);
    OpenOptions o;
    o.format = "vpc";
    auto img = Image::Open(path, o);
    if (std::string(m.name) == "truncated") {
      // qemu refuses it; vimgfs reads what is there but writes nothing into it.
      ASSERT_TRUE(img.ok()) << img.error().message();
      std::vector<std::byte> buf(512);
      Status s = (*img)->Write(6 * kMiB, buf);
      ASSERT_FALSE(s.ok());
      EXPECT_NE(s.message().find(m.expect), std::string::npos) << s.message();
      continue;
    }
    ASSERT_FALSE(img.ok());
    EXPECT_NE(img.error().message().find(m.expect), std::string::npos) << img.error().message();
    EXPECT_NE(img.error().message().find(path), std::string::npos) << img.error().message();
    EXPECT_EQ(img.error().message().find('\n'), std::string::npos);
  }
  // A block overlapping the BAT: readable, never written into.
  auto f = good;
  StoreBE32(&f[1536 + 4], 1536 / 512);
  test::WriteWholeFile(dir.File("overlap.vhd"), f);
  auto img = OpenOrDie(dir.File("overlap.vhd"), false, "vpc");
  ASSERT_NE(img, nullptr);
  std::vector<std::byte> buf(4096);
  EXPECT_TRUE(img->Read(0, buf).ok());
  Status s = img->Write(0, buf);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("overlaps"), std::string::npos) << s.message();
  EXPECT_EQ(test::ReadWholeFile(dir.File("overlap.vhd")), f);
}

}  // namespace
}  // namespace vimgfs

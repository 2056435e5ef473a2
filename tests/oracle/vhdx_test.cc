// VHDX against qemu-img 7.2: images qemu makes (dynamic, fixed, block sizes 1/8/32 MiB,
// 4096-byte logical sectors, odd sizes, a 2 TiB sparse disk) read like `qemu-img convert -O
// raw`; images vimgfs makes and writes (also from 4 threads) pass `qemu-img check` and
// `qemu-img compare` equal to the same writes on a raw file; a log entry crafted here is
// replayed as qemu replays it (in memory for a read-only open); a differencing image reads
// through its parent; malformed images are refused with one line; the corpus images read
// with the recorded sha256.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "oracle/cli_test_helpers.h"
#include "support/test_util.h"
#include "util/checked.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
constexpr uint64_t kMiB = 1 << 20;

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool ro) {
  OpenOptions o;
  o.read_only = ro;
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

void ReadAllTo(const std::string& path, const std::string& out) {
  auto img = OpenOrDie(path, true);
  ASSERT_NE(img, nullptr);
  std::ofstream o(out, std::ios::binary | std::ios::trunc);
  std::vector<std::byte> buf(16 * kMiB);
  for (uint64_t off = 0; off < img->size(); off += buf.size()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), img->size() - off);
    Status s = img->Read(off, std::span(buf.data(), n));
    ASSERT_TRUE(s.ok()) << s.message();
    o.write(reinterpret_cast<const char*>(buf.data()), n);
  }
}

void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string ours = dir.File("ours.raw"), theirs = dir.File("qemu.raw");
  auto r = RunCommand("qemu-img convert -f vhdx -O raw " + Quote(image) + " " + Quote(theirs));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ReadAllTo(image, ours);
  EXPECT_EQ(std::filesystem::file_size(ours), std::filesystem::file_size(theirs)) << image;
  EXPECT_EQ(test::Sha256OfFile(ours), test::Sha256OfFile(theirs)) << image;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f vhdx";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

void ExpectQemuCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f vhdx " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out << r.err;
}

void ExpectQemuCompareEqual(const std::string& image, const std::string& raw) {
  auto r = RunCommand("qemu-img compare -f vhdx -F raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

void Patch(const std::string& path, uint64_t off, const void* data, size_t n) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(off);
  f.write(static_cast<const char*>(data), n);
}
void Patch32(const std::string& path, uint64_t off, uint32_t v) {
  char b[4];
  StoreLE32(b, v);
  Patch(path, off, b, 4);
}
void Patch64(const std::string& path, uint64_t off, uint64_t v) {
  char b[8];
  StoreLE64(b, v);
  Patch(path, off, b, 8);
}

// The region offsets of a VHDX file, from region table 1 (BAT GUID starts 66 77 c2 2d).
struct Regions {
  uint64_t bat = 0, metadata = 0;
};
Regions ReadRegions(const std::string& path) {
  std::vector<uint8_t> table(64 * 1024);
  std::ifstream f(path, std::ios::binary);
  f.seekg(192 * 1024);
  f.read(reinterpret_cast<char*>(table.data()), table.size());
  Regions r;
  const uint32_t n = std::min<uint32_t>(LoadLE32(&table[8]), 2047);
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* e = &table[16 + i * 32];
    if (e[0] == 0x66 && e[1] == 0x77) r.bat = LoadLE64(e + 16);
    if (e[0] == 0x06 && e[1] == 0xa2) r.metadata = LoadLE64(e + 16);
  }
  return r;
}

// An independent bitwise CRC-32C for crafting structures.
uint32_t Crc32c(const uint8_t* p, size_t n) {
  uint32_t crc = ~0u;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
  }
  return ~crc;
}

TEST(VhdxOracle, QemuMadeImagesReadByteExact) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    const char* opts;
    const char* size;
  } cases[] = {{"dyn1m.vhdx", "-o block_size=1M", "20M"},
               {"dyn8m.vhdx", "-o block_size=8M", "40M"},
               {"dyn32m.vhdx", "-o block_size=32M", "100M"},
               {"fixed.vhdx", "-o subformat=fixed,block_size=1M", "12M"},
               {"fixedz.vhdx", "-o subformat=fixed,block_state_zero=off", "9M"},
               {"nozero.vhdx", "-o block_state_zero=off,log_size=2M", "17M"},
               {"odd.vhdx", "", "5000001"}};
  for (const Case& c : cases) {
    const std::string img = dir.File(c.name);
    auto r =
        RunCommand(std::string("qemu-img create -q -f vhdx ") + c.opts + " " + Quote(img) + " " + c.size);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ExpectSameAsQemuRaw(dir, img);  // empty
    auto v = OpenOrDie(img, true);
    ASSERT_NE(v, nullptr);
    const uint64_t size = v->size();
    v.reset();
    QemuIo(img, {"write -P 0xab 0 64k", "write -P 0x22 3M 1M", "write -P 0x33 1536k 700k",
                 fmt::format("write -P 0x44 {} 512", size - 512), "write -z 2M 512"});
    ExpectSameAsQemuRaw(dir, img);
    auto info = OpenOrDie(img, true)->Info();
    EXPECT_EQ(info.format, "vhdx");
  }
}

// 4096-byte logical sectors. qemu 7.2 reads VHDX with 512-byte logical sectors only (it
// fails the open with ENOTSUP, "Operation not supported", for 4096) and creates 512 only, so
// it cannot be the reader here. The honest oracle: qemu writes the data into a 512-byte
// image and converts it to raw; the test then relabels the image as 4096 and lays its BAT
// out as the spec does for 4096 (a sector bitmap entry after every 2^23 * 4096 / block_size
// payload entries, not 2^23 * 512 / block_size), and vimgfs must read qemu's bytes. A
// 4096-byte physical sector changes nothing on disk: qemu reads that one, and so must we.
void SetSectorSizes(const std::string& img, uint32_t logical, uint32_t physical) {
  const Regions rg = ReadRegions(img);
  // qemu's metadata items: file parameters at +0x10000, ..., logical sector size at
  // +0x10020, physical at +0x10024 (the test would read garbage otherwise: check them).
  auto bytes = test::ReadWholeFile(img);
  ASSERT_EQ(LoadLE32(&bytes[rg.metadata + 32 + 3 * 32 + 16]), 0x10020u);
  ASSERT_EQ(LoadLE32(&bytes[rg.metadata + 32 + 4 * 32 + 16]), 0x10024u);
  Patch32(img, rg.metadata + 0x10020, logical);
  Patch32(img, rg.metadata + 0x10024, physical);
}

// Rewrites a non-differencing BAT from the 512-byte-sector interleave to the 4096 one.
void RelayBatFor4096(const std::string& img, uint64_t block_size, uint64_t disk_size) {
  const Regions rg = ReadRegions(img);
  auto bytes = test::ReadWholeFile(img);
  const uint64_t blocks = (disk_size + block_size - 1) / block_size;
  const uint64_t r512 = (8ull << 20) * 512 / block_size, r4k = (8ull << 20) * 4096 / block_size;
  const uint64_t old_entries = blocks + (blocks - 1) / r512;
  std::vector<uint8_t> bat(old_entries * 8, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    StoreLE64(&bat[(b + b / r4k) * 8], LoadLE64(&bytes[rg.bat + (b + b / r512) * 8]));
  }
  Patch(img, rg.bat, bat.data(), bat.size());
}

TEST(VhdxOracle, LogicalSector4096) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // Physical 4096: qemu reads it; both read what qemu wrote.
  const std::string p4k = dir.File("p4k.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(p4k) + " 16M").exit_code, 0);
  SetSectorSizes(p4k, 512, 4096);
  QemuIo(p4k, {"write -P 0x5a 4096 8192", "write -P 0x6b 5M 1M"});
  ExpectSameAsQemuRaw(dir, p4k);

  // Logical 4096, one chunk (16 MiB of 1 MiB blocks: the BAT is the same for 512 and 4096).
  const std::string l4k = dir.File("l4k.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(l4k) + " 16M").exit_code, 0);
  QemuIo(l4k, {"write -P 0x5a 4096 8192", "write -P 0x6b 5M 1M", "write -P 0x7c 15M 12k"});
  ASSERT_EQ(RunCommand("qemu-img convert -f vhdx -O raw " + Quote(l4k) + " " + Quote(dir.File("l4k.raw")))
                .exit_code,
            0);
  SetSectorSizes(l4k, 4096, 4096);
  auto q = RunCommand("qemu-img info -f vhdx " + Quote(l4k));
  EXPECT_NE(q.exit_code, 0) << "qemu now opens 4096-byte logical sectors: compare with it directly";
  EXPECT_NE(q.err.find("Operation not supported"), std::string::npos) << q.err;
  ReadAllTo(l4k, dir.File("ours.raw"));
  EXPECT_EQ(test::Sha256OfFile(dir.File("ours.raw")), test::Sha256OfFile(dir.File("l4k.raw")));

  // Logical 4096 over several chunks: 6 GiB of 1 MiB blocks is two chunks at 512 (a
  // bitmap entry after block 4095) and one at 4096, so a wrong chunk ratio reads the
  // blocks past 4 GiB from their neighbours' entries.
  const std::string big = dir.File("big.vhdx");
  const uint64_t big_size = 6ull << 30;
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M,block_state_zero=off " + Quote(big) +
                       " " + std::to_string(big_size))
                .exit_code,
            0);
  const uint64_t offs[] = {(4ull << 30) - 4096, 4ull << 30, (5ull << 30) + 3 * kMiB + 512, big_size - 8192};
  std::vector<std::string> cmds;
  for (size_t i = 0; i < std::size(offs); ++i)
    cmds.push_back(fmt::format("write -P 0x{:x} {} 8192", 0x21 + i, offs[i]));
  QemuIo(big, cmds);
  RelayBatFor4096(big, kMiB, big_size);
  SetSectorSizes(big, 4096, 512);
  auto v = OpenOrDie(big, true);
  ASSERT_NE(v, nullptr);
  ASSERT_EQ(v->size(), big_size);
  for (size_t i = 0; i < std::size(offs); ++i) {
    const uint64_t at = offs[i] - 4096;
    std::vector<std::byte> buf(std::min<uint64_t>(16384, big_size - at));
    Status rs = v->Read(at, buf);
    ASSERT_TRUE(rs.ok()) << rs.message();
    for (uint64_t k = 0; k < buf.size(); ++k) {
      const uint64_t g = at + k;
      uint8_t want = 0;
      for (size_t j = 0; j < std::size(offs); ++j)
        if (g >= offs[j] && g < offs[j] + 8192) want = static_cast<uint8_t>(0x21 + j);
      if (static_cast<uint8_t>(buf[k]) != want) {
        ADD_FAILURE() << "offset " << g << " reads " << int(buf[k]) << ", want " << int(want);
        break;
      }
    }
  }
  // vimgfs writes into the 4096 image and reads its writes back.
  v.reset();
  {
    auto w = OpenOrDie(big, false);
    ASSERT_NE(w, nullptr);
    std::vector<std::byte> pat(3 * kMiB, std::byte{0x99});
    ASSERT_TRUE(w->Write((4ull << 30) - kMiB, pat).ok());
    ASSERT_TRUE(w->Close().ok());
  }
  auto r = OpenOrDie(big, true);
  ASSERT_NE(r, nullptr);
  std::vector<std::byte> back(5 * kMiB);
  ASSERT_TRUE(r->Read((4ull << 30) - 2 * kMiB, back).ok());
  EXPECT_EQ(static_cast<int>(back[kMiB - 1]), 0);
  EXPECT_EQ(static_cast<int>(back[kMiB]), 0x99);
  EXPECT_EQ(static_cast<int>(back[4 * kMiB - 1]), 0x99);
  EXPECT_EQ(static_cast<int>(back[4 * kMiB]), 0);
}

// A 2 TiB disk of 1 MiB blocks: 512 chunks, each followed by its sector bitmap entry in
// the BAT; qemu's writes around chunk boundaries read back, and vimgfs's writes there read
// back in qemu.
TEST(VhdxOracle, TwoTiBSparse) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("big.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(img) + " 2T").exit_code, 0);
  // 1 MiB blocks: a chunk is 4 GiB, so these land in different chunks around the
  // sector-bitmap entries of the BAT.
  const uint64_t offs[] = {0, (4ull << 30) - 4096, 4ull << 30, (1ull << 40) + 12345 * 512,
                           (2ull << 40) - 8192};
  std::vector<std::string> cmds;
  for (size_t i = 0; i < std::size(offs); ++i)
    cmds.push_back(fmt::format("write -P 0x{:x} {} 8192", 0x10 + i, offs[i]));
  QemuIo(img, cmds);
  auto v = OpenOrDie(img, true);
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->size(), 2ull << 40);
  for (size_t i = 0; i < std::size(offs); ++i) {
    // 4 KiB either side of each write, inside the disk (the last write ends 8 KiB before it).
    const uint64_t at = offs[i] >= 4096 ? offs[i] - 4096 : 0;
    std::vector<std::byte> buf(std::min<uint64_t>(16384, v->size() - at));
    Status rs = v->Read(at, buf);
    ASSERT_TRUE(rs.ok()) << rs.message();
    for (uint64_t k = 0; k < buf.size(); ++k) {
      const uint64_t g = at + k;
      // The last write's neighbours may be overwritten by the one before (4G-4096 + 8192).
      uint8_t want = 0;
      for (size_t j = 0; j < std::size(offs); ++j)
        if (g >= offs[j] && g < offs[j] + 8192) want = static_cast<uint8_t>(0x10 + j);
      if (static_cast<uint8_t>(buf[k]) != want) {
        ADD_FAILURE() << "offset " << g << " reads " << int(buf[k]) << ", want " << int(want);
        break;
      }
    }
  }
  v.reset();
  // vimgfs writes across the last chunk boundaries and at the end; qemu reads them back.
  const uint64_t ours[] = {(8ull << 30) - 4096, (1ull << 40) - 512, (2ull << 40) - 4096};
  {
    auto w = OpenOrDie(img, false);
    ASSERT_NE(w, nullptr);
    for (size_t i = 0; i < std::size(ours); ++i) {
      std::vector<std::byte> pat(i + 1 < std::size(ours) ? 8192 : 4096, std::byte(0x60 + i));
      Status ws = w->Write(ours[i], pat);
      ASSERT_TRUE(ws.ok()) << ws.message();
    }
    ASSERT_TRUE(w->Close().ok());
  }
  std::vector<std::string> reads;
  for (size_t i = 0; i < std::size(ours); ++i)
    reads.push_back(
        fmt::format("read -P 0x{:x} {} {}", 0x60 + i, ours[i], i + 1 < std::size(ours) ? 8192 : 4096));
  reads.push_back(fmt::format("read -P 0x11 {} 4096", offs[1]));  // qemu's own write survives
  reads.push_back(fmt::format("read -P 0 {} 4096", (8ull << 30) + 4096));
  std::string line = "qemu-io -r -f vhdx";
  for (const auto& c : reads) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(img));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  ExpectQemuCheckClean(img);
}

// 64 TiB, the VHDX maximum, in 1 MiB blocks: a 512 MiB BAT, which qemu opens (vimgfs
// refused it once, by the generic 256 MiB map cap). Both directions: qemu's write read by
// vimgfs; vimgfs's create is sparse and its write at the last block passes qemu's check.
TEST(VhdxOracle, SixtyFourTiBOfSmallBlocks) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string q = dir.File("q64.vhdx");
  const uint64_t size = 64ull << 40;
  ASSERT_EQ(
      RunCommand("qemu-img create -q -f vhdx -o block_size=1M,block_state_zero=off " + Quote(q) + " 64T")
          .exit_code,
      0);
  QemuIo(q, {fmt::format("write -P 0x3c {} 4096", size - 4096)});
  {
    auto v = OpenOrDie(q, true);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->size(), size);
    std::vector<std::byte> buf(8192);
    ASSERT_TRUE(v->Read(size - 8192, buf).ok());
    EXPECT_EQ(static_cast<int>(buf[4095]), 0);
    EXPECT_EQ(static_cast<int>(buf[4096]), 0x3c);
    EXPECT_EQ(static_cast<int>(buf[8191]), 0x3c);
  }
  const std::string ours = dir.File("o64.vhdx");
  CreateContext ctx;
  ctx.path = ours;
  ctx.size = size;
  ctx.options = {{"block_size", "1M"}, {"block_state_zero", "off"}};
  Status cs = Image::Create("vhdx", ctx);
  ASSERT_TRUE(cs.ok()) << cs.message();
  struct stat st {};
  ASSERT_EQ(stat(ours.c_str(), &st), 0);
  EXPECT_LT(uint64_t(st.st_blocks) * 512, 8 * kMiB) << "the BAT of zeros should stay a hole";
  {
    auto w = OpenOrDie(ours, false);
    ASSERT_NE(w, nullptr);
    std::vector<std::byte> pat(4096, std::byte{0x4d});
    ASSERT_TRUE(w->Write(size - 4096, pat).ok());
    ASSERT_TRUE(w->Close().ok());
  }
  auto r = RunCommand("qemu-io -r -f vhdx -c " + Quote(fmt::format("read -P 0x4d {} 4096", size - 4096)) +
                      " " + Quote(ours));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  ExpectQemuCheckClean(ours);
}

void RandomWrites(Image& img, const std::string& raw_path, uint64_t seed, int n, uint64_t max_len) {
  std::mt19937_64 rng(seed);
  std::fstream raw(raw_path, std::ios::in | std::ios::out | std::ios::binary);
  for (int i = 0; i < n; ++i) {
    uint64_t len = 1 + rng() % max_len;
    uint64_t off = rng() % (img.size() - len);
    auto bytes = test::RandomBytes(len, seed * 1000 + i);
    Status s = img.Write(off, std::as_bytes(std::span(bytes)));
    ASSERT_TRUE(s.ok()) << s.message();
    raw.seekp(off);
    raw.write(reinterpret_cast<const char*>(bytes.data()), len);
  }
}

TEST(VhdxOracle, VimgfsWrittenImagesPassQemuCheckAndCompare) {
  REQUIRE_QEMU_IMG();
  struct Case {
    std::map<std::string, std::string> opts;
    uint64_t size;
  } cases[] = {{{}, 24 * kMiB + 3 * 512},
               {{{"block_size", "1M"}}, 30 * kMiB},
               {{{"subformat", "fixed"}, {"block_size", "1M"}}, 10 * kMiB},
               {{{"subformat", "fixed"}, {"block_state_zero", "off"}, {"block_size", "2M"}}, 9 * kMiB},
               {{{"block_state_zero", "off"}, {"log_size", "2M"}}, 20 * kMiB}};
  int seed = 1;
  for (const Case& c : cases) {
    test::TempDir dir;
    const std::string img_path = dir.File("w.vhdx"), raw_path = dir.File("w.raw");
    CreateContext ctx;
    ctx.path = img_path;
    ctx.size = c.size;
    ctx.options = c.opts;
    Status cs = Image::Create("vhdx", ctx);
    ASSERT_TRUE(cs.ok()) << cs.message();
    ExpectQemuCheckClean(img_path);
    ASSERT_EQ(RunCommand("qemu-img create -q -f raw " + Quote(raw_path) + " " +
                         std::to_string(AlignUp(c.size, 512)))
                  .exit_code,
              0);
    ExpectQemuCompareEqual(img_path, raw_path);
    {
      auto img = OpenOrDie(img_path, false);
      ASSERT_NE(img, nullptr);
      RandomWrites(*img, raw_path, seed++, 40, 3 * kMiB);
      ASSERT_TRUE(img->Flush().ok());
      RandomWrites(*img, raw_path, seed++, 10, 100000);
      ASSERT_TRUE(img->Close().ok());
    }
    ExpectQemuCheckClean(img_path);
    ExpectQemuCompareEqual(img_path, raw_path);
    ExpectSameAsQemuRaw(dir, img_path);
    auto info = RunCommand("qemu-img info --output=json " + Quote(img_path));
    auto js = nlohmann::json::parse(info.out);
    EXPECT_EQ(js["format"], "vhdx");
    EXPECT_EQ(js["virtual-size"].get<uint64_t>(), AlignUp(c.size, 512));
    // Writes after qemu wrote: both ways.
    QemuIo(img_path, {"write -P 0x77 100k 3M"});
    {
      std::fstream raw(raw_path, std::ios::in | std::ios::out | std::ios::binary);
      std::vector<char> p(3 * kMiB, 0x77);
      raw.seekp(100 * 1024);
      raw.write(p.data(), p.size());
    }
    {
      auto img = OpenOrDie(img_path, false);
      ASSERT_NE(img, nullptr);
      RandomWrites(*img, raw_path, seed++, 10, 2 * kMiB);
      ASSERT_TRUE(img->Close().ok());
    }
    ExpectQemuCheckClean(img_path);
    ExpectQemuCompareEqual(img_path, raw_path);
  }
}

TEST(VhdxOracle, FourThreadsWritingTheSameBlocks) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img_path = dir.File("t.vhdx"), raw_path = dir.File("t.raw");
  const uint64_t size = 16 * kMiB;
  CreateContext ctx;
  ctx.path = img_path;
  ctx.size = size;
  ctx.options["block_size"] = "1M";
  ASSERT_TRUE(Image::Create("vhdx", ctx).ok());
  std::vector<uint8_t> model(size);
  {
    auto img = OpenOrDie(img_path, false);
    ASSERT_NE(img, nullptr);
    constexpr uint64_t kChunk = 64 * 1024;
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::vector<uint64_t> mine;
        for (uint64_t c = t; c < size / kChunk; c += 4) mine.push_back(c);
        std::shuffle(mine.begin(), mine.end(), std::mt19937_64(t));
        for (uint64_t c : mine) {
          auto bytes = test::RandomBytes(kChunk, c);
          if (!img->Write(c * kChunk, std::as_bytes(std::span(bytes))).ok()) ++failures;
          std::memcpy(model.data() + c * kChunk, bytes.data(), kChunk);
          if (c % 37 == 0 && !img->Flush().ok()) ++failures;
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    ASSERT_TRUE(img->Close().ok());
  }
  test::WriteWholeFile(raw_path, model);
  ExpectQemuCheckClean(img_path);
  ExpectQemuCompareEqual(img_path, raw_path);
}

// Writes one log entry into the image's log that sets BAT sector `bat_sector_off` to
// `sector` (4 KiB), and a header naming the log with a higher sequence number.
void CraftLog(const std::string& path, uint64_t target_off, const std::vector<uint8_t>& sector,
              uint64_t file_size) {
  auto bytes = test::ReadWholeFile(path);
  // Current header: the higher valid sequence.
  const uint64_t h1 = 64 * 1024, h2 = 128 * 1024;
  const uint64_t cur = LoadLE64(&bytes[h2 + 8]) > LoadLE64(&bytes[h1 + 8]) ? h2 : h1;
  std::vector<uint8_t> hdr(bytes.begin() + cur, bytes.begin() + cur + 4096);
  const uint64_t log_offset = LoadLE64(&hdr[72]);
  uint8_t guid[16];
  for (int i = 0; i < 16; ++i) guid[i] = static_cast<uint8_t>(0x31 + i);
  std::memcpy(&hdr[48], guid, 16);
  StoreLE64(&hdr[8], LoadLE64(&hdr[8]) + 1);
  StoreLE32(&hdr[4], 0);
  StoreLE32(&hdr[4], Crc32c(hdr.data(), hdr.size()));
  const uint64_t seq = 0x100000007ull;
  std::vector<uint8_t> e(8192);
  std::memcpy(&e[0], "loge", 4);
  StoreLE32(&e[8], 8192);
  StoreLE32(&e[12], 0);  // tail: itself, at the start of the log
  StoreLE64(&e[16], seq);
  StoreLE32(&e[24], 1);
  std::memcpy(&e[32], guid, 16);
  StoreLE64(&e[48], file_size);
  StoreLE64(&e[56], file_size);
  uint8_t* d = &e[64];
  std::memcpy(d, "desc", 4);
  std::memcpy(d + 4, &sector[4092], 4);
  std::memcpy(d + 8, &sector[0], 8);
  StoreLE64(d + 16, target_off);
  StoreLE64(d + 24, seq);
  uint8_t* s = &e[4096];
  std::memcpy(s, "data", 4);
  StoreLE32(s + 4, static_cast<uint32_t>(seq >> 32));
  std::memcpy(s + 8, &sector[8], 4084);
  StoreLE32(s + 4092, static_cast<uint32_t>(seq));
  StoreLE32(&e[4], Crc32c(e.data(), e.size()));
  Patch(path, log_offset, e.data(), e.size());
  Patch(path, cur == h1 ? h2 : h1, hdr.data(), hdr.size());
}

TEST(VhdxOracle, LogIsReplayed) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(base) + " 8M").exit_code, 0);
  QemuIo(base, {"write -P 0xab 0 1M", "write -P 0xcd 2M 1M"});
  const Regions rg = ReadRegions(base);
  // The logged BAT sector: block 5 names block 0's data, block 2 is made ZERO.
  std::vector<uint8_t> sector(4096);
  {
    std::ifstream f(base, std::ios::binary);
    f.seekg(rg.bat);
    f.read(reinterpret_cast<char*>(sector.data()), 4096);
  }
  StoreLE64(&sector[5 * 8], LoadLE64(&sector[0]));
  StoreLE64(&sector[2 * 8], 2);
  const std::string logged = dir.File("logged.vhdx");
  std::filesystem::copy_file(base, logged);
  CraftLog(logged, rg.bat, sector, std::filesystem::file_size(base));
  const std::string before = test::Sha256OfFile(logged);

  // qemu refuses a read-only open of it; `check -r all` replays the log in a copy.
  const std::string qcopy = dir.File("qcopy.vhdx");
  std::filesystem::copy_file(logged, qcopy);
  auto r = RunCommand("qemu-img check -r all -f vhdx " + Quote(qcopy));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_EQ(RunCommand("qemu-img convert -f vhdx -O raw " + Quote(qcopy) + " " + Quote(dir.File("q.raw")))
                .exit_code,
            0);
  const std::string want = test::Sha256OfFile(dir.File("q.raw"));
  {
    auto raw = test::ReadWholeFile(dir.File("q.raw"));
    EXPECT_EQ(raw[5 * kMiB], 0xab);  // the log took effect in qemu's view
    EXPECT_EQ(raw[2 * kMiB], 0x00);
  }

  // Read-only: replayed in memory, the file untouched.
  ReadAllTo(logged, dir.File("ro.raw"));
  EXPECT_EQ(test::Sha256OfFile(dir.File("ro.raw")), want);
  EXPECT_EQ(test::Sha256OfFile(logged), before);

  // Read-write: replayed into the file, then qemu reads it without replay.
  {
    auto img = OpenOrDie(logged, false);
    ASSERT_NE(img, nullptr);
    ASSERT_TRUE(img->Close().ok());
  }
  EXPECT_NE(test::Sha256OfFile(logged), before);
  ExpectQemuCheckClean(logged);
  ExpectSameAsQemuRaw(dir, logged);
  EXPECT_EQ(test::Sha256OfFile(dir.File("qemu.raw")), want);
}

TEST(VhdxOracle, VimgfsLogEntriesReplayInQemu) {
  REQUIRE_QEMU_IMG();
  // A flush leaves the BAT update in the log (cleared only at Close): a copy taken then,
  // as a crash would leave it, is replayed by qemu to the same content.
  test::TempDir dir;
  const std::string img_path = dir.File("l.vhdx");
  CreateContext ctx;
  ctx.path = img_path;
  ctx.size = 8 * kMiB;
  ctx.options["block_size"] = "1M";
  ASSERT_TRUE(Image::Create("vhdx", ctx).ok());
  auto img = OpenOrDie(img_path, false);
  ASSERT_NE(img, nullptr);
  std::vector<std::byte> pat(3 * kMiB, std::byte{0x5e});
  ASSERT_TRUE(img->Write(kMiB / 2, pat).ok());
  ASSERT_TRUE(img->Flush().ok());
  const std::string crash = dir.File("crash.vhdx");
  std::filesystem::copy_file(img_path, crash);
  ASSERT_TRUE(img->Close().ok());
  // Not yet replayed in the copy: qemu needs -r all; afterwards it reads the pattern.
  auto r = RunCommand("qemu-img check -r all -f vhdx " + Quote(crash));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  ExpectSameAsQemuRaw(dir, crash);
  ExpectSameAsQemuRaw(dir, img_path);
  EXPECT_EQ(test::Sha256OfFile(dir.File("qemu.raw")), test::Sha256OfFile(dir.File("ours.raw")));
  auto raw = test::ReadWholeFile(dir.File("qemu.raw"));
  EXPECT_EQ(raw[kMiB / 2], 0x5e);
  EXPECT_EQ(raw[kMiB / 2 - 1], 0);
}

// Builds a differencing image: a qemu-made VHDX (block_state_zero=off) turned into a child
// of `parent_name` by the has-parent flag and a parent locator item.
void MakeChild(const std::string& path, const std::string& parent_name, uint64_t size) {
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M,block_state_zero=off " + Quote(path) +
                       " " + std::to_string(size))
                .exit_code,
            0);
  const Regions rg = ReadRegions(path);
  const uint64_t md = rg.metadata;
  Patch32(path, md + 0x10000 + 4, 2);  // has parent
  // Locator at metadata offset 0x20000.
  std::vector<std::pair<std::string, std::string>> kv = {
      {"parent_linkage", "{00000000-0000-0000-0000-000000000000}"}, {"relative_path", ".\\" + parent_name}};
  std::vector<uint8_t> loc(20 + kv.size() * 12);
  const uint8_t type_guid[16] = {0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a,
                                 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13};
  std::memcpy(loc.data(), type_guid, 16);
  StoreLE16(&loc[18], static_cast<uint16_t>(kv.size()));
  auto utf16 = [](const std::string& s) {
    std::vector<uint8_t> o;
    for (char ch : s) o.push_back(static_cast<uint8_t>(ch)), o.push_back(0);
    return o;
  };
  for (size_t i = 0; i < kv.size(); ++i) {
    auto k = utf16(kv[i].first), v = utf16(kv[i].second);
    StoreLE32(&loc[20 + i * 12], static_cast<uint32_t>(loc.size()));
    StoreLE16(&loc[20 + i * 12 + 8], static_cast<uint16_t>(k.size()));
    loc.insert(loc.end(), k.begin(), k.end());
    StoreLE32(&loc[20 + i * 12 + 4], static_cast<uint32_t>(loc.size()));
    StoreLE16(&loc[20 + i * 12 + 10], static_cast<uint16_t>(v.size()));
    loc.insert(loc.end(), v.begin(), v.end());
  }
  Patch(path, md + 0x20000, loc.data(), loc.size());
  uint8_t entry[32] = {0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45,
                       0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c};
  StoreLE32(entry + 16, 0x20000);
  StoreLE32(entry + 20, static_cast<uint32_t>(loc.size()));
  StoreLE32(entry + 24, 6);
  std::ifstream f(path, std::ios::binary);
  f.seekg(md + 10);
  char cnt[2];
  f.read(cnt, 2);
  const uint16_t n = LoadLE16(cnt);
  f.close();
  Patch(path, md + 32 + n * 32, entry, 32);
  char nb[2];
  StoreLE16(nb, static_cast<uint16_t>(n + 1));
  Patch(path, md + 10, nb, 2);
}

TEST(VhdxOracle, DifferencingReadsThroughParentAndSectorBitmap) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string parent = dir.File("parent.vhdx"), child = dir.File("child.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(parent) + " 8M").exit_code, 0);
  QemuIo(parent, {"write -P 0x11 0 8M"});
  MakeChild(child, "parent.vhdx", 8 * kMiB);
  // Block 1 partially present: data block and sector bitmap appended to the file.
  const Regions rg = ReadRegions(child);
  const uint64_t end = AlignUp(std::filesystem::file_size(child), kMiB);
  std::vector<uint8_t> data(kMiB, 0x22), bitmap(kMiB, 0);
  // Block 1 is sectors 2048..4095 of chunk 0: mark sectors 2048..2055 (4 KiB) and 3000.
  for (int s = 2048; s < 2056; ++s) bitmap[s / 8] |= 1 << (s % 8);
  bitmap[3000 / 8] |= 1 << (3000 % 8);
  Patch(child, end, data.data(), data.size());
  Patch(child, end + kMiB, bitmap.data(), bitmap.size());
  Patch64(child, rg.bat + 1 * 8, end | 7);
  Patch64(child, rg.bat + 4096 * 8, (end + kMiB) | 6);  // chunk_ratio 4096 for 1 MiB blocks
  Patch64(child, rg.bat + 3 * 8, 2);                    // block 3: ZERO over the parent
  auto img = OpenOrDie(child, true);
  ASSERT_NE(img, nullptr);
  ASSERT_TRUE(img->backing_ref().has_value());
  EXPECT_EQ(img->backing_ref()->name, "parent.vhdx");
  EXPECT_NE(img->backing(), nullptr);
  std::vector<std::byte> buf(8 * kMiB);
  ASSERT_TRUE(img->Read(0, buf).ok());
  auto at = [&](uint64_t off) { return static_cast<int>(buf[off]); };
  EXPECT_EQ(at(0), 0x11);
  EXPECT_EQ(at(kMiB), 0x22);
  EXPECT_EQ(at(kMiB + 4095), 0x22);
  EXPECT_EQ(at(kMiB + 4096), 0x11);
  EXPECT_EQ(at((3000) * 512), 0x22);
  EXPECT_EQ(at((3000) * 512 + 512), 0x11);
  EXPECT_EQ(at(3 * kMiB), 0);
  EXPECT_EQ(at(5 * kMiB), 0x11);
}

TEST(VhdxOracle, MalformedImagesGiveOneLineErrors) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vhdx");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx -o block_size=1M " + Quote(base) + " 8M").exit_code, 0);
  QemuIo(base, {"write -P 0xab 0 64k"});
  const Regions rg = ReadRegions(base);
  auto expect_refused = [&](const std::string& img, const char* what, const char* needle) {
    OpenOptions o;
    o.read_only = true;
    auto v = Image::Open(img, o);
    ASSERT_FALSE(v.ok()) << what;
    const std::string m = v.error().message();
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    EXPECT_NE(m.find(needle), std::string::npos) << what << ": " << m;
  };
  const std::string img = dir.File("bad.vhdx");
  auto fresh = [&] {
    std::filesystem::copy_file(base, img, std::filesystem::copy_options::overwrite_existing);
  };

  fresh();
  Patch32(img, 64 * 1024 + 4, 0x12345678);
  Patch32(img, 128 * 1024 + 4, 0x12345678);
  expect_refused(img, "both header checksums", "no valid VHDX header");

  fresh();
  Patch32(img, 64 * 1024 + 4, 0x12345678);  // one bad header: the other one is used
  EXPECT_NE(OpenOrDie(img, true), nullptr);

  fresh();
  Patch64(img, rg.bat, (64ull << 30) | 6);  // block 0 at 64 GiB
  expect_refused(img, "BAT entry past EOF", "past the end of the file");
  {
    OpenOptions o;
    o.read_only = true;
    o.for_check = true;
    auto v = Image::Open(img, o);
    ASSERT_TRUE(v.ok()) << v.error().message();
    auto rep = (*v)->Check(RepairMode::kNone);
    ASSERT_TRUE(rep.ok());
    EXPECT_EQ(rep->corruptions, 1);
    auto r = RunCommand("qemu-img check -f vhdx --output=json " + Quote(img));
    auto js = nlohmann::json::parse(r.out);
    EXPECT_EQ(js.value("corruptions", 0), 1) << r.out << r.err;
  }

  fresh();
  Patch64(img, rg.metadata + 0x10000 + 8, 1ull << 62);
  expect_refused(img, "absurd virtual size", "virtual disk size");

  fresh();
  Patch32(img, rg.metadata + 0x10000, 3 * kMiB);
  expect_refused(img, "block size", "block size");

  fresh();
  Patch64(img, rg.bat, (2ull << 20) | 6);  // block 0 on the BAT
  expect_refused(img, "BAT entry on metadata", "overlaps");

  // A differencing image naming itself, and two naming each other.
  const std::string self = dir.File("self.vhdx");
  MakeChild(self, "self.vhdx", 8 * kMiB);
  expect_refused(self, "parent loop", "");
  const std::string a = dir.File("a.vhdx"), b = dir.File("b.vhdx");
  MakeChild(a, "b.vhdx", 8 * kMiB);
  MakeChild(b, "a.vhdx", 8 * kMiB);
  expect_refused(a, "parent loop a-b", "");
}

// `create -f vhdx` lays the file out as qemu-img does: same size, region tables, metadata
// (but the random page 83 id) and BAT, for each subformat, block size, log size and zero
// state.
TEST(VhdxOracle, CreateLayoutMatchesQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const char* opts[] = {"",
                        "subformat=fixed",
                        "subformat=fixed,block_state_zero=off,block_size=1M",
                        "block_size=2M,block_state_zero=off",
                        "log_size=3M,block_size=4M",
                        "subformat=fixed,block_size=32M,block_state_zero=off"};
  const char* sizes[] = {"4M", "5000001", "20M", "3G"};
  auto read_at = [](const std::string& path, uint64_t off, uint64_t len) {
    std::vector<char> b(len);
    std::ifstream f(path, std::ios::binary);
    f.seekg(off);
    f.read(b.data(), len);
    return b;
  };
  for (const char* o : opts) {
    for (const char* size : sizes) {
      if (std::string(size) == "3G" && std::string(o).find("fixed") != std::string::npos) continue;
      SCOPED_TRACE(std::string(o) + " " + size);
      const std::string q = dir.File("q.vhdx"), v = dir.File("v.vhdx");
      std::filesystem::remove(q);
      std::filesystem::remove(v);
      const std::string opt = *o ? std::string("-o ") + o + " " : "";
      ASSERT_EQ(RunCommand("qemu-img create -q -f vhdx " + opt + Quote(q) + " " + size).exit_code, 0);
      auto r = RunCommand(Quote(test::VimgfsBinary()) + " create -q -f vhdx " + opt + Quote(v) + " " + size);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      ASSERT_EQ(std::filesystem::file_size(v), std::filesystem::file_size(q));
      auto same = [&](uint64_t off, uint64_t len, const char* what) {
        ASSERT_LE(off + len, std::filesystem::file_size(q)) << what;
        EXPECT_TRUE(read_at(q, off, len) == read_at(v, off, len)) << what;
      };
      same(192 * 1024, 128 * 1024, "region tables");
      const Regions rg = ReadRegions(q);
      same(rg.metadata, 64 * 1024, "metadata table");
      same(rg.metadata + 0x10000, 16, "file parameters, disk size");
      same(rg.metadata + 0x10020, 8, "sector sizes");
      same(rg.bat, rg.metadata - rg.bat, "BAT");
      same(64 * 1024 + 64, 16, "header versions, log length and offset");
    }
  }
}

// `map` and `check` print what qemu-img prints (vimgfs run under the name qemu-img).
// qemu's vhdx driver answers no block status, so map shows one run of data without an
// offset (human output refuses it); check reports a pending log on a read-only open and
// counts its replay as one corruption fixed with -r.
class VhdxCli : public test::CliTwinTest {};

TEST_F(VhdxCli, MapAndCheckAsQemu) {
  InBoth(
      "qemu-img create -q -f vhdx -o block_size=1M dyn.vhdx 20M && "
      "qemu-io -f vhdx -c 'write -P 1 1M 64k' -c 'write -z 3M 1M' -c 'write -P 2 15M 3M' dyn.vhdx "
      ">/dev/null");
  InBoth("qemu-img create -q -f vhdx -o subformat=fixed fixed.vhdx 9M");
  InBoth("qemu-img create -q -f vhdx empty.vhdx 0");
  InBoth(
      "qemu-img create -q -f qcow2 -b dyn.vhdx -F vhdx over.qcow2 24M && "
      "qemu-io -f qcow2 -c 'write -P 3 0 512k' over.qcow2 >/dev/null");
  for (const char* img : {"dyn.vhdx", "fixed.vhdx", "empty.vhdx", "over.qcow2"}) {
    for (const char* args :
         {"", "--output=json", "--output=json --start-offset=1M --max-length=5M", "--start-offset=2M"}) {
      ExpectSame(std::string("map ") + args + " " + img);
    }
  }
  // Human map of a VHDX fails as qemu-img's does, after its header line.
  auto m = V("map " + Quote(F("v/dyn.vhdx")));
  EXPECT_EQ(m.exit_code, 1);
  EXPECT_NE(m.err.find("File contains external, encrypted or compressed clusters."), std::string::npos);
  for (const char* img : {"dyn.vhdx", "fixed.vhdx"}) {
    ExpectSame(std::string("check ") + img);
    ExpectSame(std::string("check --output=json ") + img);
    ExpectSame(std::string("check -r all ") + img);
  }
  // A pending log (a logged BAT sector making block 2 ZERO): refused without -r, replayed
  // and counted with it; afterwards the image is clean and reads the logged state.
  const Regions rg = ReadRegions(F("q/dyn.vhdx"));
  std::vector<uint8_t> sector(4096);
  {
    std::ifstream f(F("q/dyn.vhdx"), std::ios::binary);
    f.seekg(rg.bat);
    f.read(reinterpret_cast<char*>(sector.data()), 4096);
  }
  StoreLE64(&sector[15 * 8], 2);  // block 15 (data, 0x02) becomes ZERO
  for (const char* d : {"q", "v"}) {
    const std::string p = F(std::string(d) + "/dyn.vhdx");
    CraftLog(p, rg.bat, sector, std::filesystem::file_size(p));
  }
  InBoth("cp dyn.vhdx dirty.vhdx");
  for (const char* args : {"check dyn.vhdx", "check --output=json dyn.vhdx", "check -r leaks dyn.vhdx",
                           "check dyn.vhdx", "map --output=json dyn.vhdx"}) {
    ExpectSame(args);
  }
  ExpectSame("check -r all --output=json dirty.vhdx");
  ExpectSame("check dirty.vhdx");
  auto r = Sh("qemu-io -r -f vhdx -c 'read -P 0 15M 1M' -c 'read -P 2 16M 2M' v/dyn.vhdx");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
}

TEST(VhdxOracle, CorpusImagesReadWithRecordedSha256) {
  const std::string corpus = test::CorpusDir();
  if (corpus.empty())
    GTEST_SKIP() << "corpus not found (/work/shared/corpus, see VIMGFS_CORPUS in tests/CMakeLists.txt)";
  test::TempDir dir;
  int seen = 0;
  for (const auto& row : test::CorpusManifest(corpus)) {
    if (row[4] != "vhdx") continue;
    std::string path = corpus + "/" + row[0];
    if (row[0].ends_with(".bz2") || row[0].ends_with(".gz")) {
      const std::string out = dir.File("c.vhdx");
      const char* tool = row[0].ends_with(".bz2") ? "bzip2 -dc " : "gzip -dc ";
      auto r = RunCommand(tool + Quote(path) + " > " + Quote(out));
      ASSERT_EQ(r.exit_code, 0) << r.err;
      path = out;
    }
    if (row[0].starts_with("bad/")) continue;
    ++seen;
    auto img = OpenOrDie(path, true);
    ASSERT_NE(img, nullptr) << row[0];
    EXPECT_EQ(std::to_string(img->size()), row[5]) << row[0];
    ReadAllTo(path, dir.File("out.raw"));
    EXPECT_EQ(test::Sha256OfFile(dir.File("out.raw")), row[6]) << row[0];
    auto report = img->Check(RepairMode::kNone);
    ASSERT_TRUE(report.ok());
    EXPECT_EQ(report->corruptions, 0) << row[0];
  }
  EXPECT_GE(seen, 5);
}

}  // namespace
}  // namespace vimgfs

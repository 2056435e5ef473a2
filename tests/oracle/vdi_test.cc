// VDI against qemu-img 7.2: images qemu makes read byte-for-byte like `qemu-img convert -O
// raw`; images vimgfs makes and writes (also from 4 threads) pass `qemu-img check` and
// `qemu-img compare` equal to the same writes on a raw file; check findings and header
// errors match qemu's; the real VirtualBox images of the corpus read with the recorded
// sha256.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

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

// Writes the whole virtual disk of path (read through vimgfs) to out.
void ReadAllTo(const std::string& path, const std::string& out) {
  auto img = OpenOrDie(path, true);
  ASSERT_NE(img, nullptr);
  std::vector<std::byte> buf(img->size());
  Status s = img->Read(0, buf);
  ASSERT_TRUE(s.ok()) << s.message();
  std::ofstream(out, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), buf.size());
}

void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string ours = dir.File("ours.raw"), theirs = dir.File("qemu.raw");
  auto r = RunCommand("qemu-img convert -f vdi -O raw " + Quote(image) + " " + Quote(theirs));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ReadAllTo(image, ours);
  EXPECT_EQ(std::filesystem::file_size(ours), std::filesystem::file_size(theirs)) << image;
  EXPECT_EQ(test::Sha256OfFile(ours), test::Sha256OfFile(theirs)) << image;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f vdi";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

void ExpectQemuCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f vdi " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out;
}

void ExpectQemuCompareEqual(const std::string& image, const std::string& raw) {
  auto r = RunCommand("qemu-img compare -f vdi -F raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST(VdiOracle, QemuMadeImagesReadByteExact) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    const char* opts;
    const char* size;
  } cases[] = {{"dyn.vdi", "", "20M"}, {"static.vdi", "-o static=on", "8M"}, {"odd.vdi", "", "5000000"}};
  for (const Case& c : cases) {
    const std::string img = dir.File(c.name);
    auto r = RunCommand(std::string("qemu-img create -q -f vdi ") + c.opts + " " + Quote(img) + " " + c.size);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto size = OpenOrDie(img, true)->size();
    QemuIo(img, {"write -P 0x11 0 4k", "write -P 0x22 3M 1M", "write -P 0x33 1536k 700k",
                 fmt::format("write -P 0x44 {} 512", size - 512), "write -z 2M 512"});
    ExpectSameAsQemuRaw(dir, img);
    // Map agrees with qemu-img map on what is data.
    auto img_v = OpenOrDie(img, true);
    auto runs = img_v->Map(0, img_v->size());
    ASSERT_TRUE(runs.ok());
    uint64_t data_bytes = 0;
    for (const auto& b : *runs) data_bytes += b.data ? b.length : 0;
    r = RunCommand("qemu-img map -f vdi --output=json " + Quote(img));
    ASSERT_EQ(r.exit_code, 0);
    uint64_t qemu_data = 0;
    auto js = nlohmann::json::parse(r.out);
    for (const auto& e : js) qemu_data += e["data"].get<bool>() ? e["length"].get<uint64_t>() : 0;
    EXPECT_EQ(data_bytes, qemu_data) << c.name;
    // The command line prints what qemu-img map prints (static images aside: qemu also
    // looks for holes in the host file there).
    if (std::string(c.name) != "static.vdi" && std::filesystem::exists(test::VimgfsBinary())) {
      for (const char* output : {"json", "human"}) {
        auto ours = RunCommand(Quote(test::VimgfsBinary()) + " map --output=" + output + " " + Quote(img));
        auto theirs = RunCommand(std::string("qemu-img map --output=") + output + " " + Quote(img));
        EXPECT_EQ(ours.out, theirs.out) << c.name;
      }
    }
  }
}

// The same seeded writes go to a vimgfs image and to a raw file.
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

TEST(VdiOracle, VimgfsWrittenImagesPassQemuCheckAndCompare) {
  REQUIRE_QEMU_IMG();
  for (const bool is_static : {false, true}) {
    test::TempDir dir;
    const std::string img_path = dir.File("w.vdi"), raw_path = dir.File("w.raw");
    const uint64_t size = 24 * kMiB + 3 * 512;
    CreateContext ctx;
    ctx.path = img_path;
    ctx.size = size;
    if (is_static) ctx.options["static"] = "on";
    ASSERT_TRUE(Image::Create("vdi", ctx).ok());
    auto r =
        RunCommand("qemu-img create -q -f raw " + Quote(raw_path) + " " + std::to_string(AlignUp(size, 512)));
    ASSERT_EQ(r.exit_code, 0);
    {
      auto img = OpenOrDie(img_path, false);
      ASSERT_NE(img, nullptr);
      RandomWrites(*img, raw_path, is_static ? 7 : 3, 40, 3 * kMiB);
      // Zeroing and discarding whole and partial blocks.
      ASSERT_TRUE(img->WriteZeroes(2 * kMiB + 100, 3 * kMiB, true).ok());
      ASSERT_TRUE(img->Discard(20 * kMiB, 2 * kMiB).ok());  // whole blocks read as zeros
      {
        std::fstream raw(raw_path, std::ios::in | std::ios::out | std::ios::binary);
        std::vector<char> z(3 * kMiB);
        raw.seekp(2 * kMiB + 100);
        raw.write(z.data(), 3 * kMiB);
        raw.seekp(20 * kMiB);
        raw.write(z.data(), 2 * kMiB);
      }
      RandomWrites(*img, raw_path, is_static ? 8 : 4, 20, 2 * kMiB);
      ASSERT_TRUE(img->Close().ok());
    }
    ExpectQemuCheckClean(img_path);
    ExpectQemuCompareEqual(img_path, raw_path);
    ExpectSameAsQemuRaw(dir, img_path);
    // Structure like qemu's own: header size, type, offsets.
    auto head = test::ReadWholeFile(img_path);
    EXPECT_EQ(LoadLE32(&head[0x4c]), is_static ? 2u : 1u);
    EXPECT_EQ(LoadLE32(&head[0x154]), 0x200u);
    auto info = RunCommand("qemu-img info --output=json " + Quote(img_path));
    auto js = nlohmann::json::parse(info.out);
    EXPECT_EQ(js["format"], "vdi");
    EXPECT_EQ(js["virtual-size"].get<uint64_t>(), AlignUp(size, 512));
    EXPECT_EQ(js["cluster-size"].get<uint64_t>(), kMiB);
  }
}

TEST(VdiOracle, FourThreadsWritingTheSameBlocks) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img_path = dir.File("t.vdi"), raw_path = dir.File("t.raw");
  const uint64_t size = 16 * kMiB;
  CreateContext ctx;
  ctx.path = img_path;
  ctx.size = size;
  ASSERT_TRUE(Image::Create("vdi", ctx).ok());
  std::vector<uint8_t> model(size);
  {
    auto img = OpenOrDie(img_path, false);
    ASSERT_NE(img, nullptr);
    // 64 KiB chunks, chunk i owned by thread i % 4: every block is allocated by whichever
    // thread gets there first while the others write into it.
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

// Parses "corruptions" from qemu-img check --output=json (absent: 0).
int QemuCorruptions(const std::string& image, std::string* messages) {
  auto r = RunCommand("qemu-img check -f vdi --output=json " + Quote(image));
  *messages = r.err;
  auto js = nlohmann::json::parse(r.out);
  return js.contains("corruptions") ? js["corruptions"].get<int>() : 0;
}

TEST(VdiOracle, CheckFindsWhatQemuFinds) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vdi");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vdi " + Quote(base) + " 6M").exit_code, 0);
  QemuIo(base, {"write 0 4k", "write 3M 4k", "write 1M 512"});
  struct Damage {
    uint64_t off;
    uint32_t value;
  } damages[] = {{0x210, 1},            // block 4 shares data block 1 with block 3
                 {0x210, 9},            // block 4 points past blocks_in_image
                 {0x210, 4},            // past blocks_allocated, below blocks_in_image
                 {0x184, 7},            // blocks_allocated too large
                 {0x184, 1},            // too small
                 {0x200, 0xfffffffe}};  // an allocated block turned into a zero block
  for (const Damage& d : damages) {
    const std::string img = dir.File("damaged.vdi");
    std::filesystem::copy_file(base, img, std::filesystem::copy_options::overwrite_existing);
    {
      std::fstream f(img, std::ios::in | std::ios::out | std::ios::binary);
      char b[4];
      StoreLE32(b, d.value);
      f.seekp(d.off);
      f.write(b, 4);
    }
    std::string qemu_messages;
    const int expected = QemuCorruptions(img, &qemu_messages);
    auto vimg = OpenOrDie(img, true);
    ASSERT_NE(vimg, nullptr);
    auto report = vimg->Check(RepairMode::kNone);
    ASSERT_TRUE(report.ok());
    EXPECT_EQ(report->corruptions, expected) << d.off << "=" << d.value;
    EXPECT_GT(expected, 0);
    for (const std::string& m : report->messages) {
      EXPECT_NE(qemu_messages.find(m), std::string::npos) << m << " not in\n" << qemu_messages;
    }
    // And through the command line, when it is built.
    if (std::filesystem::exists(test::VimgfsBinary())) {
      auto r = RunCommand(Quote(test::VimgfsBinary()) + " check " + Quote(img));
      EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    }
  }
}

TEST(VdiOracle, HeaderErrorsMatchQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.vdi");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vdi " + Quote(base) + " 4M").exit_code, 0);
  struct Damage {
    uint64_t off;
    uint32_t value;
  } damages[] = {
      {0x44, 0x00020001}, {0x154, 0x210}, {0x158, 0x410},    {0x168, 1024},     {0x180, 2},
      {0x1a8, 5},         {0x1b8, 5},     {0x178, 2 * kMiB}, {0x180, 536870785}};  // one block past qemu's
                                                                                   // VDI_BLOCKS_IN_IMAGE_MAX
  for (const Damage& d : damages) {
    const std::string img = dir.File("bad.vdi");
    std::filesystem::copy_file(base, img, std::filesystem::copy_options::overwrite_existing);
    {
      std::fstream f(img, std::ios::in | std::ios::out | std::ios::binary);
      char b[4];
      StoreLE32(b, d.value);
      f.seekp(d.off);
      f.write(b, 4);
    }
    auto r = RunCommand("qemu-img info -f vdi " + Quote(img));
    ASSERT_NE(r.exit_code, 0);
    // "qemu-img: Could not open 'x': <cause>"
    const std::string cause = r.err.substr(r.err.find("': ") + 3);
    OpenOptions o;
    o.format = "vdi";
    auto v = Image::Open(img, o);
    ASSERT_FALSE(v.ok());
    EXPECT_NE(v.error().message().find(cause.substr(0, cause.find('\n'))), std::string::npos)
        << v.error().message() << " vs " << r.err;
  }
}

// A block map larger than the pages vimgfs keeps (20 TiB: an 80 MiB map; clean pages are
// dropped past 64 MiB): a map of the whole disk pages through all of it, writes at both
// ends and in the middle land where qemu reads them, and qemu's check finds the map and
// the count right.
TEST(VdiOracle, BlockMapLargerThanItsPageCacheReadsAndWritesAsQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string img = dir.File("big.vdi");
  ASSERT_EQ(RunCommand("qemu-img create -q -f vdi " + Quote(img) + " 20T").exit_code, 0);
  const uint64_t size = 20ull << 40;
  const uint64_t offsets[] = {0, size / 2 + 3 * kMiB, size - kMiB};
  {
    auto v = OpenOrDie(img, false);
    ASSERT_NE(v, nullptr);
    auto m = v->Map(0, size);
    ASSERT_TRUE(m.ok()) << m.error().message();
    uint64_t covered = 0;
    for (const BlockStatus& b : *m) covered += b.length;
    EXPECT_EQ(covered, size);
    for (size_t i = 0; i < std::size(offsets); i++) {
      std::vector<std::byte> data(64 << 10, std::byte(0x30 + i));
      ASSERT_TRUE(v->Write(offsets[i], data).ok());
    }
    ASSERT_TRUE(v->Close().ok());
  }
  ExpectQemuCheckClean(img);
  for (size_t i = 0; i < std::size(offsets); i++) {
    QemuIo(img, {"read -P " + std::to_string(0x30 + i) + " " + std::to_string(offsets[i]) + " 64k",
                 "read -P 0 " + std::to_string(offsets[i] + (64 << 10)) + " 64k"});
  }
}

TEST(VdiOracle, CorpusVirtualBoxImagesReadWithRecordedSha256) {
  const std::string corpus = test::CorpusDir();
  if (corpus.empty()) GTEST_SKIP() << "corpus not found";
  test::TempDir dir;
  int seen = 0;
  for (const auto& row : test::CorpusManifest(corpus)) {
    if (row[4] != "vdi") continue;
    const std::string path = corpus + "/" + row[0];
    if (row[0].rfind("good/", 0) == 0) {
      ++seen;
      auto img = OpenOrDie(path, true);
      ASSERT_NE(img, nullptr) << path;
      EXPECT_EQ(img->format(), "vdi");
      EXPECT_EQ(std::to_string(img->size()), row[5]) << path;
      ReadAllTo(path, dir.File("out.raw"));
      EXPECT_EQ(test::Sha256OfFile(dir.File("out.raw")), row[6]) << path;
      auto report = img->Check(RepairMode::kNone);
      ASSERT_TRUE(report.ok());
      EXPECT_EQ(report->corruptions, 0) << path;
    } else {
      OpenOptions o;
      o.read_only = true;
      o.format = "vdi";
      EXPECT_FALSE(Image::Open(path, o).ok()) << path;
    }
  }
  EXPECT_GE(seen, 5);

  // Writing into a VirtualBox layout (block map at 1 MiB, data at 2 MiB) keeps it valid.
  for (const auto& row : test::CorpusManifest(corpus)) {
    if (row[4] != "vdi" || row[0].rfind("good/", 0) != 0) continue;
    const std::string copy = dir.File("vbox.vdi"), raw = dir.File("vbox.raw");
    std::filesystem::copy_file(corpus + "/" + row[0], copy,
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::remove(raw);
    if (test::HaveProgram("qemu-img")) {
      ASSERT_EQ(RunCommand("qemu-img convert -f vdi -O raw " + Quote(copy) + " " + Quote(raw)).exit_code, 0);
    } else {
      ReadAllTo(copy, raw);
    }
    {
      auto img = OpenOrDie(copy, false);
      ASSERT_NE(img, nullptr);
      RandomWrites(*img, raw, 11, 12, 700 * 1024);
      ASSERT_TRUE(img->Close().ok());
    }
    if (test::HaveProgram("qemu-img")) {
      ExpectQemuCheckClean(copy);
      ExpectQemuCompareEqual(copy, raw);
    }
    auto check = OpenOrDie(copy, true)->Check(RepairMode::kNone);
    ASSERT_TRUE(check.ok());
    EXPECT_EQ(check->corruptions, 0) << row[0];
  }
  // No bad file is a VDI: opened as VDI each is refused with one line.
  for (const auto& e : std::filesystem::directory_iterator(corpus + "/bad")) {
    OpenOptions o;
    o.read_only = true;
    o.format = "vdi";
    auto img = Image::Open(e.path().string(), o);
    ASSERT_FALSE(img.ok()) << e.path();
    EXPECT_EQ(img.error().message().find('\n'), std::string::npos);
  }
}

}  // namespace
}  // namespace vimgfs

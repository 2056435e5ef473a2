// bochs and cloop without qemu: the mappings the drivers hand the engine (sector runs of a
// Bochs extent by its bitmap, one compressed unit per cloop block), read-only opens, the
// probe on short files, and hostile tables that must not make vimgfs allocate what the
// file does not hold. qemu-img's view of the same images: tests/oracle/bochs_cloop_test.cc.
#include <gtest/gtest.h>

#include <chrono>

#include "support/bochs_cloop_builder.h"
#include "support/image_internals.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::BochsBuilder;
using test::CloopBuilder;

std::vector<uint8_t> Sector(uint8_t v) { return std::vector<uint8_t>(512, v); }

Result<std::unique_ptr<Image>> OpenRo(const std::string& path, const std::string& format = "") {
  OpenOptions o;
  o.read_only = true;
  o.format = format;
  return Image::Open(path, o);
}

std::vector<Mapping> LookupAll(Image& img) {
  std::vector<Mapping> out;
  Status s = ImageInternals::Map(img).Lookup(0, img.size(), &out);
  EXPECT_TRUE(s.ok()) << s.message();
  return out;
}

TEST(BochsTest, ExtentsMapAsSectorRunsByTheirBitmap) {
  test::TempDir dir;
  BochsBuilder b(64 * 1024, 4096, 1);  // 16 extents of 8 sectors
  b.WriteSector(0, Sector(1), 3);      // extent 0 -> block 3
  b.WriteSector(1, Sector(2));
  b.WriteSector(3, Sector(3));
  b.WriteSector(9, Sector(4), 0);  // extent 1 -> block 0
  b.Write(dir.File("a.bochs"));
  auto img = OpenRo(dir.File("a.bochs"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->format(), "bochs");
  EXPECT_EQ((*img)->size(), 64u * 1024);
  EXPECT_EQ((*img)->cluster_size(), 4096u);
  const uint64_t data = 512 + 16 * 4, block = 512 + 4096;  // one bitmap sector per block
  const std::vector<Mapping> m = LookupAll(**img);
  ASSERT_GE(m.size(), 6u);
  EXPECT_EQ(m[0].kind, Mapping::Kind::kData);  // sectors 0-1
  EXPECT_EQ(m[0].length, 1024u);
  EXPECT_EQ(m[0].host_offset, data + 3 * block + 512);
  EXPECT_EQ(m[1].kind, Mapping::Kind::kUnallocated);  // sector 2
  EXPECT_EQ(m[1].length, 512u);
  EXPECT_EQ(m[2].kind, Mapping::Kind::kData);  // sector 3
  EXPECT_EQ(m[2].host_offset, data + 3 * block + 512 + 3 * 512);
  EXPECT_EQ(m[3].kind, Mapping::Kind::kUnallocated);  // sectors 4-8
  EXPECT_EQ(m[3].length, 5u * 512);
  EXPECT_EQ(m[4].kind, Mapping::Kind::kData);  // sector 9
  EXPECT_EQ(m[4].host_offset, data + 0 * block + 512 + 512);
  EXPECT_EQ(m[5].kind, Mapping::Kind::kUnallocated);
  uint64_t total = 0;
  for (const Mapping& x : m) total += x.length;
  EXPECT_EQ(total, 64u * 1024);

  std::vector<std::byte> buf(64 * 1024);
  ASSERT_TRUE((*img)->Read(0, buf).ok());
  EXPECT_TRUE(std::memcmp(buf.data(), b.Expected().data(), buf.size()) == 0);
  FormatInfo info = (*img)->Info();
  EXPECT_EQ(info.format, "bochs");
  EXPECT_EQ(info.cluster_size, 0u) << "qemu's bochs driver reports no cluster size";
}

TEST(BochsTest, ReadWriteOpenRefusedAsQemuRefusesIt) {
  test::TempDir dir;
  BochsBuilder b(64 * 1024, 4096, 1);
  b.Write(dir.File("a.bochs"));
  OpenOptions o;
  auto img = Image::Open(dir.File("a.bochs"), o);
  ASSERT_FALSE(img.ok());
  EXPECT_TRUE(IsReadOnlyFormat(img.error()));
  EXPECT_EQ(img.error().message(), "'" + dir.File("a.bochs") + "': Image is read-only");
  // Even a corrupt one: qemu refuses the read-write open before reading the header.
  b.extent_size = 0;
  b.Write(dir.File("b.bochs"));
  o.format = "bochs";
  img = Image::Open(dir.File("b.bochs"), o);
  ASSERT_FALSE(img.ok());
  EXPECT_TRUE(IsReadOnlyFormat(img.error()));
  EXPECT_FALSE(FindFormat("bochs")->traits().reports_dirty_flag);
  EXPECT_FALSE(FindFormat("bochs")->traits().block_status);
}

TEST(BochsTest, ProbeFollowsQemusStringTests) {
  test::TempDir dir;
  // A file shorter than the header still probes (qemu pads its probe buffer with zeros):
  // then its zero extent size is refused.
  const std::string magic = "Bochs Virtual HD Image";
  std::vector<uint8_t> head(100, 0);
  std::memcpy(head.data(), magic.data(), magic.size());
  std::memcpy(head.data() + 32, "Redolog", 7);
  std::memcpy(head.data() + 48, "Growing", 7);
  head[66] = 2;  // version 0x00020000
  test::WriteWholeFile(dir.File("short"), head);
  auto probed = Image::Probe(*Env::Default(), dir.File("short"));
  ASSERT_TRUE(probed.ok());
  EXPECT_EQ(*probed, "bochs");
  auto img = OpenRo(dir.File("short"));
  ASSERT_FALSE(img.ok());
  EXPECT_NE(img.error().message().find("Extent size must be at least 512"), std::string::npos);
  // The magic must end at its NUL, as strcmp reads it.
  head[magic.size()] = '!';
  test::WriteWholeFile(dir.File("not"), head);
  probed = Image::Probe(*Env::Default(), dir.File("not"));
  ASSERT_TRUE(probed.ok());
  EXPECT_EQ(*probed, "raw");
}

TEST(BochsTest, DataOffsetWrapsLikeQemus) {
  test::TempDir dir;
  // header 0xFFFFFF00 + 4 * 0x40 catalog entries = 2^32: qemu's uint32 data offset is 0.
  // The catalog (past the end of the file) reads as zeros, so every extent is block 0, at
  // offset 0: its bitmap is the header's first byte ('B' = 0x42: sectors 1 and 6 written),
  // its data the sectors after it.
  BochsBuilder b(8 * 1024, 4096, 1, 0x40);
  b.header_size = 0xFFFFFF00u;
  b.write_catalog = false;
  b.Write(dir.File("w.bochs"));
  auto img = OpenRo(dir.File("w.bochs"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  const std::vector<Mapping> m = LookupAll(**img);
  ASSERT_GE(m.size(), 4u);
  EXPECT_EQ(m[0].kind, Mapping::Kind::kUnallocated);
  EXPECT_EQ(m[0].length, 512u);
  EXPECT_EQ(m[1].kind, Mapping::Kind::kData);
  EXPECT_EQ(m[1].length, 512u);
  EXPECT_EQ(m[1].host_offset, 1024u) << "sector 1 after one bitmap sector at offset 0";
  EXPECT_EQ(m[2].kind, Mapping::Kind::kUnallocated);
  EXPECT_EQ(m[3].kind, Mapping::Kind::kData);
  EXPECT_EQ(m[3].host_offset, 512u + 6 * 512);
}

TEST(CloopTest, BlocksAreCompressedUnitsTheEngineInflates) {
  test::TempDir dir;
  CloopBuilder c(1536);  // not a power of two
  for (int i = 0; i < 5; ++i) c.AddBlock(test::RandomBytes(1536, i), i == 2 ? 0 : 6);
  c.Write(dir.File("c.cloop"));
  auto img = OpenRo(dir.File("c.cloop"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->format(), "cloop");
  EXPECT_EQ((*img)->size(), 5u * 1536);
  EXPECT_EQ((*img)->cluster_size(), 512u) << "the largest power of two dividing the block";
  const std::vector<Mapping> m = LookupAll(**img);
  ASSERT_EQ(m.size(), 5u);
  const std::vector<uint64_t> offsets = c.Offsets();
  for (size_t i = 0; i < m.size(); ++i) {
    EXPECT_EQ(m[i].kind, Mapping::Kind::kCompressed);
    EXPECT_EQ(m[i].codec, Codec::kZlib);
    EXPECT_TRUE(m[i].stream_ends_unit);
    EXPECT_EQ(m[i].host_offset, offsets[i]);
    EXPECT_EQ(m[i].compressed_length, offsets[i + 1] - offsets[i]);
    EXPECT_EQ(m[i].unit_guest_offset, i * 1536);
    EXPECT_EQ(m[i].unit_size, 1536u);
  }
  std::vector<std::byte> buf(5 * 1536);
  ASSERT_TRUE((*img)->Read(0, buf).ok());
  EXPECT_TRUE(std::memcmp(buf.data(), c.Expected().data(), buf.size()) == 0);
  // Across a block boundary, at odd offsets.
  std::vector<std::byte> part(1000);
  ASSERT_TRUE((*img)->Read(1000, part).ok());
  EXPECT_TRUE(std::memcmp(part.data(), c.Expected().data() + 1000, part.size()) == 0);
}

TEST(CloopTest, AnEmptyBlockIsNotTheNextOneFromTheCache) {
  test::TempDir dir;
  // Block 0 is empty and starts where block 1 does: a thread that inflated block 1 must
  // not hand its data out for block 0 (qemu fails the read of block 0).
  CloopBuilder c(4096);
  c.AddRawBlock({}, std::nullopt);
  c.AddBlock(test::RandomBytes(4096, 1));
  c.Write(dir.File("c.cloop"));
  auto img = OpenRo(dir.File("c.cloop"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  std::vector<std::byte> buf(4096);
  ASSERT_TRUE((*img)->Read(4096, buf).ok());
  EXPECT_FALSE((*img)->Read(0, buf).ok());
  EXPECT_FALSE((*img)->Read(100, std::span(buf.data(), 10)).ok());
}

TEST(CloopTest, HugeTablesBeyondTheFileCostNothing) {
  test::TempDir dir;
  // 60M blocks: a 480 MB table in qemu's memory, all of it past the end of this file (it
  // reads as zeros). vimgfs keeps the entries in the file only.
  CloopBuilder c(512);
  c.block_count = 60000000;
  c.offsets = std::vector<uint64_t>{0, 0};
  c.Write(dir.File("c.cloop"));
  const auto start = std::chrono::steady_clock::now();
  auto img = OpenRo(dir.File("c.cloop"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_EQ((*img)->size(), 60000000ull * 512);
  std::vector<std::byte> buf(512);
  EXPECT_FALSE((*img)->Read(0, buf).ok()) << "a block of no bytes does not inflate";
}

TEST(CloopTest, ReadWriteOpenRefused) {
  test::TempDir dir;
  CloopBuilder c(4096);
  c.AddBlock(test::RandomBytes(4096, 1));
  c.Write(dir.File("c.cloop"));
  auto img = Image::Open(dir.File("c.cloop"), OpenOptions{});
  ASSERT_FALSE(img.ok());
  EXPECT_TRUE(IsReadOnlyFormat(img.error()));
  auto probed = Image::Probe(*Env::Default(), dir.File("c.cloop"));
  ASSERT_TRUE(probed.ok());
  EXPECT_EQ(*probed, "cloop");
}

}  // namespace
}  // namespace vimgfs

// bochs and cloop against qemu-img 7.2. qemu-img cannot create either format, so the tests
// build images byte by byte (support/bochs_cloop_builder.h: header, catalog, bitmaps and
// extents; script header, offsets table and zlib blocks), each with the content it must read
// as; qemu-img convert must read them so, and vimgfs must read them identically (library
// reads, and `vimgfs convert` under the name qemu-img with the same output and exit code).
// qemu's sample images (empty.bochs, simple-pattern.cloop) read as qemu reads them. Hostile
// variants (catalog past the end of the file, wrapping offsets, huge tables, bad extent and
// block sizes, broken streams) are refused with qemu-img's words (iotests 075 and 078), or
// read exactly as qemu reads them. Both formats are read-only: info, map, compare, convert
// from, and check's refusal, as qemu-img; every command that would write is refused as
// qemu-img refuses it.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "oracle/cli_test_helpers.h"
#include "support/bochs_cloop_builder.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::BochsBuilder;
using test::CloopBuilder;
using test::Quote;
using test::RandomBytes;

constexpr uint64_t kKiB = 1024, kMiB = 1 << 20;
constexpr uint32_t kV1 = 0x00010000;

// The image read through the library (the mount's path), or the error.
Result<std::vector<uint8_t>> ReadWithVimgfs(const std::string& path, const std::string& format) {
  OpenOptions o;
  o.read_only = true;
  o.format = format;
  ASSIGN_OR_RETURN(auto img, Image::Open(path, o));
  std::vector<uint8_t> out(img->size());
  // In odd-sized pieces, so that requests straddle sectors, extents and blocks.
  for (uint64_t off = 0; off < out.size();) {
    const uint64_t n = std::min<uint64_t>(out.size() - off, 200 * kKiB + 123);
    RETURN_IF_ERROR(img->Read(off, std::as_writable_bytes(std::span(out.data() + off, n))));
    off += n;
  }
  return out;
}

class ReadOnlyFormats : public test::CliTwinTest {
 protected:
  // Puts the file at `path` into both folders as t.img.
  void Place(const std::string& path) {
    if (path != F("t.img")) MustSh("cp " + Quote(path) + " t.img");
    InBoth("cp ../t.img t.img");
  }
  void Place(const BochsBuilder& b) {
    b.Write(F("t.img"));
    InBoth("cp --sparse=always ../t.img t.img");
  }
  void Place(const CloopBuilder& c) {
    c.Write(F("t.img"));
    InBoth("cp --sparse=always ../t.img t.img");
  }
  std::vector<uint8_t> Out(const std::string& side) { return test::ReadWholeFile(F(side + "/out.raw")); }

  // t.img reads as `expected` in qemu-img convert, in vimgfs's convert (same output and
  // status) and through the library; info and map print the same.
  void ExpectReads(const std::string& fmt, const std::vector<uint8_t>& expected) {
    ExpectSame("info -f " + fmt + " --output=json t.img");
    ExpectSame("info t.img");
    ExpectSame("map -f " + fmt + " --output=json t.img");
    const auto qr = Sh("cd q && qemu-img convert -f " + fmt + " -O raw t.img out.raw");
    ASSERT_EQ(qr.exit_code, 0) << qr.err;
    ExpectSame("convert -f " + fmt + " -O raw t.img out.raw");
    const std::vector<uint8_t> q = Out("q");
    ASSERT_EQ(q.size(), expected.size());
    EXPECT_TRUE(q == expected) << "qemu-img does not read the image as built";
    EXPECT_TRUE(Out("v") == expected) << "vimgfs convert differs from qemu-img";
    auto lib = ReadWithVimgfs(F("t.img"), fmt);
    ASSERT_TRUE(lib.ok()) << lib.error().message();
    EXPECT_TRUE(*lib == expected) << "vimgfs reads differ";
    // compare against the raw copy, both ways.
    ExpectSame("compare -f " + fmt + " -F raw t.img out.raw");
  }
  // `qemu-img convert` of t.img in both folders: the same exit status; the same output
  // when it succeeds, one error line from each when it fails (qemu-img says "error while
  // reading at byte N: Input/output error"; vimgfs says what it could not read). Returns
  // whether qemu-img succeeded.
  bool ExpectSameConvert(const std::string& fmt) {
    const std::string args = "convert -f " + fmt + " -O raw t.img out.raw";
    auto q = Sh("cd q && qemu-img " + args), v = Sh("cd v && ../bin/qemu-img " + args);
    EXPECT_EQ(v.exit_code, q.exit_code) << q.err << v.err;
    if (q.exit_code == 0) {
      EXPECT_EQ(v.err, q.err);
      EXPECT_EQ(v.out, q.out);
    } else {
      EXPECT_EQ(q.err, "qemu-img: error while reading at byte 0: Input/output error\n");
      EXPECT_TRUE(v.err.starts_with("qemu-img: ") && v.err.find('\n') == v.err.size() - 1) << v.err;
    }
    return q.exit_code == 0;
  }
  // t.img reads the same in qemu and vimgfs (no expectation of our own: what qemu reads
  // out of a hostile layout), or fails in both.
  void ExpectReadsAsQemu(const std::string& fmt) {
    ExpectSame("info -f " + fmt + " --output=json t.img");
    const bool ok = ExpectSameConvert(fmt);
    auto lib = ReadWithVimgfs(F("t.img"), fmt);
    EXPECT_EQ(lib.ok(), ok) << (lib.ok() ? "" : lib.error().message());
    if (!ok) return;
    EXPECT_TRUE(Out("v") == Out("q")) << "vimgfs convert differs from qemu-img";
    if (lib.ok()) {
      EXPECT_TRUE(*lib == Out("q")) << "vimgfs reads differ from qemu-img";
    }
  }
  // Opening t.img fails in both with the same words; returns qemu-img's stderr.
  std::string ExpectRefused(const std::string& fmt) {
    ExpectSame("info t.img");
    ExpectSame("info -f " + fmt + " t.img");
    ExpectSame("convert -f " + fmt + " -O raw t.img out.raw");
    auto r = Sh("cd q && qemu-img info -f " + fmt + " t.img");
    EXPECT_NE(r.exit_code, 0);
    return r.err;
  }
  // Every command that writes, or would, is refused as qemu-img refuses it.
  void ExpectReadOnlyEverywhere(const std::string& fmt) {
    ExpectSame("check t.img");
    ExpectSame("check --output=json t.img");
    ExpectSame("check -r leaks t.img");
    ExpectSame("check -r all t.img");
    ExpectSame("resize t.img +1M");
    ExpectSame("snapshot -c s1 t.img");
    ExpectSame("snapshot -l t.img");
    ExpectSame("rebase -u -b other.img -F raw t.img");
    ExpectSame("map t.img");
    ExpectSame("create -f " + fmt + " new.img 1M");
    ExpectSame("create -f " + fmt + " -o help new.img");
    ExpectSame("convert -O " + fmt + " t.img new.img");
    ExpectSameFiles();
    // An overlay over it reads through it (qemu opens the chain read-only).
    ExpectSame("create -q -f qcow2 -b t.img -F " + fmt + " ov.qcow2");
    ExpectSame("info --backing-chain ov.qcow2 | grep -v 'disk size'");
    ExpectSame("map --output=json ov.qcow2");
    ExpectSame("compare ov.qcow2 t.img");
    EXPECT_EQ(Sh("cd v && ../bin/qemu-img commit ov.qcow2").exit_code, 1) << "the base cannot be written";
  }
};

// ---------------------------------------------------------------------------------------
// bochs

std::vector<uint8_t> Pattern(uint64_t sector, uint64_t seed) {
  std::vector<uint8_t> s = RandomBytes(512, seed * 1000003 + sector);
  s[0] = static_cast<uint8_t>(sector);  // never all zeros
  s[1] = 0xb0;
  return s;
}

// Writes `count` random sectors into blocks allocated in a shuffled order; clears a few.
void Scatter(BochsBuilder* b, uint64_t seed, int count) {
  std::mt19937_64 rng(seed);
  const uint64_t sectors = b->disk_size / 512, per_extent = b->extent_size / 512;
  const uint64_t extents = (sectors + per_extent - 1) / per_extent;
  std::vector<uint32_t> order(extents);
  for (uint32_t i = 0; i < extents; ++i) order[i] = static_cast<uint32_t>(extents - 1 - i);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<uint64_t> written;
  for (int i = 0; i < count && sectors > 0; ++i) {
    const uint64_t s = rng() % sectors;
    b->WriteSector(s, Pattern(s, seed), order[s / per_extent]);
    written.push_back(s);
  }
  if (sectors > 0) b->WriteSector(sectors - 1, Pattern(sectors - 1, seed), order[(sectors - 1) / per_extent]);
  for (size_t i = 0; i < written.size(); i += 7) b->ClearBit(written[i]);
  // An extent allocated with no sector written reads as zeros too.
  for (uint64_t e = 0; e < extents; e += 5) b->AllocateExtent(e, order[e]);
}

TEST_F(ReadOnlyFormats, BochsSampleImage) {
  std::string sample;
  REQUIRE_QEMU_SAMPLE(sample, "empty.bochs", dir_.path());
  Place(sample);
  ExpectReads("bochs", std::vector<uint8_t>(1032192, 0));
  ExpectReadOnlyEverywhere("bochs");
}

TEST_F(ReadOnlyFormats, BochsLayoutsReadAsBuilt) {
  struct Case {
    const char* name;
    uint32_t version;
    uint64_t disk;
    uint32_t extent, bitmap, catalog, header;
  } cases[] = {
      {"v2 4k extents (bximage's smallest)", 0x00020000, 1 * kMiB, 4096, 1, 0, 512},
      {"v1 header", kV1, 1 * kMiB, 4096, 1, 0, 512},
      {"512-byte extents", 0x00020000, 256 * kKiB, 512, 1, 0, 512},
      {"64k extents, 16-byte bitmap", 0x00020000, 3 * kMiB, 64 * kKiB, 16, 0, 512},
      {"bitmap over a sector", 0x00020000, 2 * kMiB, 32 * kKiB, 600, 0, 512},
      {"8 MiB extents", 0x00020000, 20 * kMiB, 8 * kMiB, 2048, 0, 512},
      {"catalog larger than the disk", 0x00020000, 1 * kMiB + 1536, 16 * kKiB, 4, 1024, 512},
      {"catalog after a long header", 0x00020000, 1 * kMiB, 4096, 1, 300, 4096},
      {"size not a sector multiple", 0x00020000, 1 * kMiB + 700, 4096, 1, 0, 512},
      {"empty disk", 0x00020000, 0, 4096, 1, 0, 512},
      {"zero bitmap size: blocks of 4 GiB of bitmap (sparse)", 0x00020000, 64 * kKiB, 4096, 0, 0, 512},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    BochsBuilder b(c.disk, c.extent, c.bitmap, c.catalog, c.version);
    b.header_size = c.header;
    Scatter(&b, seed++, c.bitmap == 0 ? 3 : 40);
    Place(b);
    ExpectReads("bochs", b.Expected());
  }
}

TEST_F(ReadOnlyFormats, BochsV1ReadsTheSizeAtItsOwnPlace) {
  BochsBuilder b(512 * kKiB, 4096, 1, 0, kV1);
  Scatter(&b, 7, 10);
  b.patches[92] = {0, 0, 0, 0x40};  // the top of where v2 keeps the size: must be ignored
  Place(b);
  ExpectReads("bochs", b.Expected());
}

TEST_F(ReadOnlyFormats, BochsHostileLayoutsReadAsQemuReadsThem) {
  {
    SCOPED_TRACE("catalog past the end of the file: every extent names block 0, itself past it");
    BochsBuilder b(1 * kMiB, 4096, 1);
    b.header_size = 64 * kMiB;
    b.write_catalog = false;
    Place(b);
    ExpectReads("bochs", std::vector<uint8_t>(1 * kMiB, 0));
  }
  {
    SCOPED_TRACE("catalog entries far past the end of the file");
    BochsBuilder b(1 * kMiB, 4096, 1);
    Scatter(&b, 3, 20);
    b.catalog[0] = 0x7ffffff0;
    b.catalog[1] = 0xfffffffe;
    Place(b);
    ExpectReadsAsQemu("bochs");
  }
  {
    SCOPED_TRACE("the data offset wraps at 4 GiB: blocks start over the header");
    BochsBuilder b(64 * kKiB, 4096, 1, 1024);
    b.header_size = 0xFFFFF000u;  // + 4 * 1024 wraps to 0; the catalog reads as zeros
    b.write_catalog = false;
    b.patches[512] = RandomBytes(8 * kKiB, 5);
    Place(b);
    ExpectReadsAsQemu("bochs");
  }
  {
    SCOPED_TRACE("a block beyond the largest file offset: an I/O error, as in qemu");
    BochsBuilder b(64 * kKiB, 4096, 0);  // 8M bitmap sectors per block
    Scatter(&b, 4, 4);
    b.catalog[2] = 0x80000000u;  // 512 * 2^31 * (2^23 + 8) > 2^63
    Place(b);
    ExpectReadsAsQemu("bochs");
  }
  {
    SCOPED_TRACE("a bitmap smaller than the extent needs: bits read from the data, as in qemu");
    BochsBuilder b(8 * kMiB, 8 * kMiB, 1);
    for (uint64_t s = 0; s < 16384; s += 997) b.WriteSector(s, Pattern(s, 9));
    Place(b);
    ExpectReadsAsQemu("bochs");
  }
  {
    SCOPED_TRACE("the largest catalog qemu accepts, past the end of the file");
    BochsBuilder b(1 * kMiB, 4096, 1);
    b.catalog_entries = 0x100000;
    b.write_catalog = false;
    Place(b);
    ExpectReadsAsQemu("bochs");
  }
  {
    SCOPED_TRACE("a header cut short by the end of the file");
    test::WriteWholeFile(F("short"),
                         std::vector<uint8_t>({'B', 'o', 'c', 'h', 's', ' ', 'V', 'i', 'r', 't', 'u', 'a',
                                               'l', ' ', 'H', 'D', ' ', 'I', 'm', 'a', 'g', 'e', 0}));
    Place(F("short"));
    ExpectSame("info t.img");
  }
}

// A block whose offset, as qemu sums it in 64 bits, wraps to just below 2^64: the bitmap
// bytes of its first 32 sectors lie past the largest file offset (EIO in qemu), those of
// the others wrap around to the start of the file (the header's bytes), and so does their
// data. vimgfs reads each sector as qemu does.
TEST_F(ReadOnlyFormats, BochsBlockAtTheEndOfTheOffsetSpace) {
  BochsBuilder b(1 * kMiB, 64 * kKiB, 0);  // a zero bitmap size: 8M bitmap sectors per block
  b.header_size = 0xFFFFFFBCu;             // + 16 * 4: data offset 0xFFFFFFFC
  b.catalog[0] = 0xFFFF0000u;              // 512 * entry * (128 + 2^23) = 2^64 - 2^32
  // Block 0 starts at 2^64 - 4. Sector 33's bit is bit 1 of the file's byte 0 ('B', 0x42);
  // its data sits at 2^64 - 4 + 512 * (2^23 + 33), that is 2^32 - 4 + 512 * 33.
  b.patches[(1ull << 32) - 4 + 512 * 33] = std::vector<uint8_t>(512, 0xab);
  b.Write(F("t.img"));
  auto qio = [&](const std::string& cmd) { return Sh("qemu-io -r -f bochs -c " + Quote(cmd) + " t.img"); };
  EXPECT_NE(qio("read 0 512").out.find("Input/output error"), std::string::npos);
  EXPECT_NE(qio("read 15872 512").out.find("Input/output error"), std::string::npos);
  const std::string good = qio("read -P 0xab 16896 512").out + qio("read -P 0 16384 512").out;
  EXPECT_EQ(good.find("error"), std::string::npos) << good;
  EXPECT_EQ(good.find("failed"), std::string::npos) << good;
  // Sectors 32-127 (qemu-img dd's count includes the skipped blocks).
  ASSERT_EQ(Sh("qemu-img dd -f bochs -O raw bs=512 skip=32 count=128 if=t.img of=q.raw").exit_code, 0);

  OpenOptions o;
  o.read_only = true;
  auto img = Image::Open(F("t.img"), o);
  ASSERT_TRUE(img.ok()) << img.error().message();
  std::vector<std::byte> buf(512);
  EXPECT_EQ((*img)->Read(0, buf).kind(), ErrorKind::kIo);
  EXPECT_EQ((*img)->Read(15872, buf).kind(), ErrorKind::kIo);
  std::vector<std::byte> rest(96 * 512);
  ASSERT_TRUE((*img)->Read(32 * 512, rest).ok());
  const std::vector<uint8_t> q = test::ReadWholeFile(F("q.raw"));
  ASSERT_EQ(q.size(), rest.size());
  EXPECT_TRUE(std::memcmp(q.data(), rest.data(), q.size()) == 0);
  EXPECT_EQ(static_cast<uint8_t>(rest[512]), 0xab) << "sector 33 reads the data past the wrap";
}

TEST_F(ReadOnlyFormats, BochsBadHeadersRefusedWithQemusWords) {
  struct Case {
    const char* name;
    void (*edit)(BochsBuilder*);
    const char* message;  // qemu-img's, after "Could not open 't.img': "
  } cases[] = {
      {"catalog of 2^32-1 (iotest 078)", [](BochsBuilder* b) { b->catalog_entries = 0xffffffff; },
       "Catalog size is too large"},
      {"catalog * 4 overflows (iotest 078)", [](BochsBuilder* b) { b->catalog_entries = 0x40000000; },
       "Catalog size is too large"},
      {"catalog one above qemu's limit", [](BochsBuilder* b) { b->catalog_entries = 0x100001; },
       "Catalog size is too large"},
      {"disk larger than the catalog covers (iotest 078)",
       [](BochsBuilder* b) { b->disk_size = 0x7f000000000fc000ull; },
       "Catalog size is too small for this disk size"},
      {"catalog too small by one sector", [](BochsBuilder* b) { b->disk_size += 512; },
       "Catalog size is too small for this disk size"},
      {"extent 2^31 (iotest 078)", [](BochsBuilder* b) { b->extent_size = 0x80000000u; },
       "Extent size 2147483648 is too large"},
      {"zero extent (iotest 078)", [](BochsBuilder* b) { b->extent_size = 0; },
       "Extent size must be at least 512"},
      {"extent 511", [](BochsBuilder* b) { b->extent_size = 511; }, "Extent size must be at least 512"},
      {"extent 768", [](BochsBuilder* b) { b->extent_size = 768; }, "Extent size 768 is not a power of two"},
      {"extent 16 MiB", [](BochsBuilder* b) { b->extent_size = 16 << 20; },
       "Extent size 16777216 is too large"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    BochsBuilder b(1 * kMiB, 4096, 1);
    c.edit(&b);
    Place(b);
    const std::string err = ExpectRefused("bochs");
    EXPECT_EQ(err, std::string("qemu-img: Could not open 't.img': ") + c.message + "\n");
  }
  // Not a Bochs growing image: probed as raw; forced, refused.
  for (auto edit : std::vector<void (*)(BochsBuilder*)>{
           [](BochsBuilder* b) { b->magic = "Bochs Virtual HD Image!"; },
           [](BochsBuilder* b) { b->type = "Undoable"; }, [](BochsBuilder* b) { b->subtype = "Volatile"; },
           [](BochsBuilder* b) { b->version = 0x00030000; }}) {
    BochsBuilder b(1 * kMiB, 4096, 1);
    edit(&b);
    Place(b);
    ExpectSame("info t.img");
    ExpectSame("info -f bochs t.img");
    EXPECT_EQ(Sh("cd q && qemu-img info -f bochs t.img").err,
              "qemu-img: Could not open 't.img': Image not in Bochs format\n");
  }
}

TEST_F(ReadOnlyFormats, BochsReadOnlyEverywhere) {
  BochsBuilder b(2 * kMiB, 4096, 1);
  Scatter(&b, 11, 30);
  Place(b);
  InBoth("qemu-img create -q -f raw other.img 1M");
  ExpectReadOnlyEverywhere("bochs");
}

// ---------------------------------------------------------------------------------------
// cloop

std::vector<uint8_t> BlockData(uint32_t size, int kind, uint64_t seed) {
  switch (kind % 4) {
    case 0:
      return std::vector<uint8_t>(size, 0);
    case 1:
      return RandomBytes(size, seed);  // incompressible
    case 2: {
      std::vector<uint8_t> v(size);
      for (uint32_t i = 0; i < size; ++i) v[i] = static_cast<uint8_t>((i / 512) ^ seed);
      return v;
    }
    default: {
      std::vector<uint8_t> v = RandomBytes(size, seed);
      std::fill(v.begin(), v.begin() + size / 2, uint8_t{0x5a});
      return v;
    }
  }
}

TEST_F(ReadOnlyFormats, CloopSampleImage) {
  std::string sample;
  REQUIRE_QEMU_SAMPLE(sample, "simple-pattern.cloop", dir_.path());
  Place(sample);
  // Its first 64 KiB read as zeros, the next as 0x01... (qemu's 075 reads both ends).
  ExpectReadsAsQemu("cloop");
  ExpectSame("info t.img");
  ExpectSame("map --output=json t.img");
  ExpectReadOnlyEverywhere("cloop");
}

TEST_F(ReadOnlyFormats, CloopLayoutsReadAsBuilt) {
  struct Case {
    const char* name;
    uint32_t block_size;
    int blocks;
    int level;
  } cases[] = {
      {"64 KiB blocks", 64 * 1024, 9, 6},
      {"512-byte blocks", 512, 40, 9},
      {"1536-byte blocks (not a power of two)", 1536, 30, 6},
      {"256 KiB blocks, stored (larger than the block)", 256 * 1024, 4, 0},
      {"1 MiB blocks, fastest level", 1 << 20, 3, 1},
      {"one block", 4096, 1, 6},
      {"no blocks", 4096, 0, 6},
  };
  uint64_t seed = 100;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    CloopBuilder cb(c.block_size);
    for (int i = 0; i < c.blocks; ++i) cb.AddBlock(BlockData(c.block_size, i, seed++), c.level);
    Place(cb);
    ExpectReads("cloop", cb.Expected());
  }
  {
    SCOPED_TRACE("trailing bytes after each stream (qemu ignores them)");
    CloopBuilder cb(4096);
    for (int i = 0; i < 5; ++i) {
      std::vector<uint8_t> data = BlockData(4096, i, seed++);
      std::vector<uint8_t> s = test::ZlibCompress(data, 6);
      s.insert(s.end(), {0xde, 0xad, 0xbe, 0xef});
      cb.AddRawBlock(s, data);
    }
    Place(cb);
    ExpectReads("cloop", cb.Expected());
  }
}

TEST_F(ReadOnlyFormats, CloopVirtualSizeWrapsAsQemuCountsIt) {
  // 32769 blocks of 64 MiB are 2^32 + 2^17 sectors: qemu's 32-bit count wraps to one block.
  CloopBuilder cb(64 << 20);
  cb.AddBlock(BlockData(64 << 20, 2, 77), 1);
  cb.block_count = 32769;
  std::vector<uint64_t> table = cb.Offsets(32770);
  table.resize(32770, table.back());
  cb.offsets = table;
  Place(cb);
  ExpectSame("info t.img");
  ExpectReads("cloop", cb.Expected());
}

TEST_F(ReadOnlyFormats, CloopBrokenBlocksFailAsInQemu) {
  const uint32_t bs = 4096;
  struct Case {
    const char* name;
    std::vector<uint8_t> stream;
  };
  const std::vector<uint8_t> data = BlockData(bs, 3, 5);
  std::vector<uint8_t> longer = BlockData(2 * bs, 1, 6);
  std::vector<uint8_t> good = test::ZlibCompress(data, 6);
  std::vector<uint8_t> bad_check = good;
  bad_check.back() ^= 1;
  const Case cases[] = {
      {"a stream inflating past the block", test::ZlibCompress(longer, 6)},
      {"a stream inflating short of the block", test::ZlibCompress(std::vector<uint8_t>(bs - 512, 7), 6)},
      {"a stream cut short", std::vector<uint8_t>(good.begin(), good.end() - 6)},
      {"a wrong adler32", bad_check},
      {"raw deflate, no zlib header", std::vector<uint8_t>(good.begin() + 2, good.end())},
      {"an empty block", {}},
      {"garbage", RandomBytes(300, 8)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    CloopBuilder cb(bs);
    cb.AddBlock(BlockData(bs, 1, 1));
    cb.AddRawBlock(c.stream, std::nullopt);
    cb.AddBlock(BlockData(bs, 2, 2));
    Place(cb);
    // Opens (the table is fine), and reading the broken block fails in both.
    ExpectSame("info t.img");
    EXPECT_FALSE(ExpectSameConvert("cloop"));
    EXPECT_FALSE(ReadWithVimgfs(F("t.img"), "cloop").ok());
    // The blocks around it read.
    OpenOptions o;
    o.read_only = true;
    auto img = Image::Open(F("t.img"), o);
    ASSERT_TRUE(img.ok()) << img.error().message();
    std::vector<std::byte> first(bs), third(bs);
    ASSERT_TRUE((*img)->Read(0, first).ok());
    ASSERT_TRUE((*img)->Read(2 * bs, third).ok());
    EXPECT_TRUE(std::memcmp(first.data(), cb.Expected().data(), bs) == 0);
    EXPECT_TRUE(std::memcmp(third.data(), cb.Expected().data() + 2 * bs, bs) == 0);
  }
}

TEST_F(ReadOnlyFormats, CloopHostileTablesReadAsQemuReadsThem) {
  {
    SCOPED_TRACE("a block past the end of the file: opens, reading it fails");
    CloopBuilder cb(4096);
    for (int i = 0; i < 3; ++i) cb.AddBlock(BlockData(4096, i, 20 + i));
    std::vector<uint64_t> t = cb.Offsets();
    t[2] += 100 * kMiB;
    t[3] += 100 * kMiB;
    cb.offsets = t;
    Place(cb);
    ExpectReadsAsQemu("cloop");
  }
  {
    SCOPED_TRACE("a block beyond the largest file offset");
    CloopBuilder cb(4096);
    for (int i = 0; i < 2; ++i) cb.AddBlock(BlockData(4096, i, 30 + i));
    std::vector<uint64_t> t = cb.Offsets();
    t[0] = 0x7fffffffc0000000ull;  // qemu's BDRV_MAX_LENGTH: nothing can be read there
    t[1] = t[0] + 0x10;
    t[2] = t[1] + 0x10;
    cb.offsets = t;
    Place(cb);
    ExpectReadsAsQemu("cloop");
  }
  {
    SCOPED_TRACE("the table cut by the end of the file: zeros follow its last offset");
    CloopBuilder cb(4096);
    for (int i = 0; i < 4; ++i) cb.AddBlock(BlockData(4096, 0, 0));
    cb.truncate_at = 136 + 8 * 2 + 3;
    Place(cb);
    const std::string err = ExpectRefused("cloop");
    EXPECT_EQ(
        err,
        "qemu-img: Could not open 't.img': offsets not monotonically increasing at index 2, image file is "
        "corrupt\n");
  }
  {
    SCOPED_TRACE("a huge block count in a small file: the table past it is zeros");
    CloopBuilder cb(512);
    cb.block_count = 20000000;
    cb.offsets = std::vector<uint64_t>{0, 0, 0};
    Place(cb);
    ExpectSame("info t.img");
    ExpectSame("info --output=json t.img");
  }
  {
    SCOPED_TRACE("an empty file with the script alone");
    CloopBuilder cb(4096);
    cb.truncate_at = 128;
    Place(cb);
    ExpectRefused("cloop");
  }
}

TEST_F(ReadOnlyFormats, CloopBadHeadersRefusedWithQemusWords) {
  struct Case {
    const char* name;
    void (*edit)(CloopBuilder*);
    const char* message;
  } cases[] = {
      {"block size 513 (iotest 075)", [](CloopBuilder* c) { c->block_size = 513; },
       "block_size 513 must be a multiple of 512"},
      {"block size 0 (iotest 075)", [](CloopBuilder* c) { c->block_size = 0; }, "block_size cannot be zero"},
      {"huge block size (iotest 075)", [](CloopBuilder* c) { c->block_size = 0xfffffe00u; },
       "block_size 4294966784 must be 64 MB or less"},
      {"block size just over 64 MiB", [](CloopBuilder* c) { c->block_size = (64 << 20) + 512; },
       "block_size 67109376 must be 64 MB or less"},
      {"n_blocks 2^32-1 (iotest 075)", [](CloopBuilder* c) { c->block_count = 0xffffffffu; },
       "n_blocks 4294967295 must be 536870911 or less"},
      {"too many offsets (iotest 075)", [](CloopBuilder* c) { c->block_count = 0x04000001u; },
       "image requires too many offsets, try increasing block size"},
      {"the table size wraps to 0 in qemu", [](CloopBuilder* c) { c->block_count = 536870911u; },
       "Could not allocate offsets table"},
      {"offsets decreasing (iotest 075)",
       [](CloopBuilder* c) {
         std::vector<uint64_t> t = c->Offsets();
         t[0] = 0xffffffff;
         t[1] = 0xfffe0000;
         c->offsets = t;
       },
       "offsets not monotonically increasing at index 1, image file is corrupt"},
      {"compressed block of 2^64-1 (iotest 075)",
       [](CloopBuilder* c) {
         std::vector<uint64_t> t = c->Offsets();
         t[0] = 0;
         t[1] = ~0ull;
         c->offsets = t;
       },
       "invalid compressed block size at index 1, image file is corrupt"},
      {"compressed block one byte over 128 MiB",
       [](CloopBuilder* c) {
         std::vector<uint64_t> t = c->Offsets();
         for (size_t i = 2; i < t.size(); ++i) t[i] = t[1] + (128 << 20) + 1;
         c->offsets = t;
       },
       "invalid compressed block size at index 2, image file is corrupt"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    CloopBuilder cb(4096);
    for (int i = 0; i < 3; ++i) cb.AddBlock(BlockData(4096, i, 40 + i));
    c.edit(&cb);
    Place(cb);
    const std::string err = ExpectRefused("cloop");
    EXPECT_EQ(err, std::string("qemu-img: Could not open 't.img': ") + c.message + "\n");
  }
  {
    SCOPED_TRACE("compressed block of exactly 128 MiB: accepted");
    CloopBuilder cb(4096);
    for (int i = 0; i < 3; ++i) cb.AddBlock(BlockData(4096, i, 50 + i));
    std::vector<uint64_t> t = cb.Offsets();
    t[3] = t[2] + (128 << 20);
    cb.offsets = t;
    Place(cb);
    ExpectSame("info t.img");
  }
  {
    SCOPED_TRACE("another script: not probed as cloop; forced, read by its fields");
    CloopBuilder cb(4096);
    cb.AddBlock(BlockData(4096, 1, 60));
    cb.script = "#!/bin/sh\n#V3.0 Format\n";
    Place(cb);
    ExpectSame("info t.img");
    ExpectReads("cloop", cb.Expected());
  }
}

TEST_F(ReadOnlyFormats, CloopReadOnlyEverywhere) {
  CloopBuilder cb(64 * 1024);
  for (int i = 0; i < 6; ++i) cb.AddBlock(BlockData(64 * 1024, i, 70 + i));
  Place(cb);
  InBoth("qemu-img create -q -f raw other.img 1M");
  ExpectReadOnlyEverywhere("cloop");
}

// Many threads reading a cloop image at once (each keeps its own inflated block) read what
// one thread reads.
TEST_F(ReadOnlyFormats, CloopConcurrentReads) {
  CloopBuilder cb(96 * 1024);
  for (int i = 0; i < 24; ++i) cb.AddBlock(BlockData(96 * 1024, i, 90 + i));
  cb.Write(F("c.img"));
  const std::vector<uint8_t> expected = cb.Expected();
  OpenOptions o;
  o.read_only = true;
  auto img = Image::Open(F("c.img"), o);
  ASSERT_TRUE(img.ok()) << img.error().message();
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> buf(70000);
      for (int i = 0; i < 300; ++i) {
        const uint64_t n = 1 + rng() % buf.size();
        const uint64_t off = rng() % (expected.size() - n);
        if (!(*img)->Read(off, std::span(buf.data(), n)).ok() ||
            std::memcmp(buf.data(), expected.data() + off, n) != 0)
          ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

}  // namespace
}  // namespace vimgfs

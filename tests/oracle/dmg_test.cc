// dmg (Apple UDIF) against qemu-img 7.2: qemu's sample image and images this test builds
// itself (a small generator writing raw, zero, ignore, zlib and bzip2 chunks, the mish
// tables, an XML property list or a resource fork, and the koly trailer) read
// byte-for-byte like `qemu-img convert -f dmg -O raw` and like what the generator wrote;
// info, map, check and the read-only refusals match qemu-img; chunks qemu cannot read
// (lzfse, ADC, gaps) fail only where read, with one line naming the file and the type;
// hostile trailers and tables are refused with one line.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "engine/codec.h"
#include "formats/dmg/dmg_internal.h"
#include "support/test_util.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;
using Bytes = std::vector<uint8_t>;

std::string Vimgfs() { return Quote(test::VimgfsBinary()); }

// qemu-img without noise: Debian's qemu-img names its missing dmg modules on stderr.
test::CommandResult Qemu(const std::string& args) {
  auto r = RunCommand("qemu-img " + args);
  std::string err;
  size_t pos = 0;
  while (pos < r.err.size()) {
    size_t nl = r.err.find('\n', pos);
    std::string line = r.err.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos + 1);
    if (line.find("qemu: module ") != 0) err += line;
    pos = nl == std::string::npos ? r.err.size() : nl + 1;
  }
  r.err = err;
  return r;
}

// Data that compresses some: runs of a few values with random bytes between.
Bytes Content(size_t n, uint64_t seed) {
  Bytes random = test::RandomBytes(n, seed);
  Bytes out(n);
  for (size_t i = 0; i < n; i++)
    out[i] = (i / 64) % 3 == 0 ? random[i] : static_cast<uint8_t>((i / 512 + seed) & 0xff);
  return out;
}

std::string Base64(const Bytes& in) {
  static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < in.size(); i += 3) {
    uint32_t v = uint32_t{in[i]} << 16;
    if (i + 1 < in.size()) v |= uint32_t{in[i + 1]} << 8;
    if (i + 2 < in.size()) v |= in[i + 2];
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += i + 1 < in.size() ? kAlphabet[(v >> 6) & 63] : '=';
    out += i + 2 < in.size() ? kAlphabet[v & 63] : '=';
  }
  return out;
}

void PutBE32(Bytes& b, size_t at, uint32_t v) { StoreBE32(&b[at], v); }
void PutBE64(Bytes& b, size_t at, uint64_t v) { StoreBE64(&b[at], v); }

struct GenChunk {
  uint32_t type;
  uint64_t sectors;
  uint64_t seed = 1;
};

// Writes a UDIF image: a prefix before the data fork, each partition's chunks, then the
// block tables (property list or resource fork) and the trailer. `expected` is the disk.
class DmgGenerator {
 public:
  explicit DmgGenerator(const test::TempDir& dir) : dir_(dir) {}

  bool resource_fork = false;
  uint64_t prefix = 1000;     // bytes before the data fork: the trailer's data fork offset
  size_t tiny_resources = 0;  // 1-byte resources before the block tables (resource fork)
  std::vector<std::vector<GenChunk>> partitions;
  // Applied to each mish table before it is stored (hostile variants).
  std::function<void(Bytes& mish, size_t partition)> patch_mish;
  // Replaces the property list's text.
  std::function<void(std::string& plist)> patch_plist;

  Bytes file, expected;
  size_t trailer_at = 0;

  void Build() {
    built_ = true;
    file.assign(prefix, 'P');
    expected.clear();
    std::vector<Bytes> tables;
    uint64_t disk_sector = 0;
    for (size_t p = 0; p < partitions.size(); p++) {
      const uint64_t part_start = file.size();
      Bytes entries;
      auto entry = [&](uint32_t type, uint64_t sector, uint64_t count, uint64_t off, uint64_t len) {
        Bytes e(dmg::mish::kEntrySize);
        PutBE32(e, 0, type);
        PutBE64(e, 8, sector);
        PutBE64(e, 16, count);
        PutBE64(e, 24, off);
        PutBE64(e, 32, len);
        entries.insert(entries.end(), e.begin(), e.end());
      };
      entry(dmg::kChunkComment, 0, 0, 0, 0);  // comments are skipped
      uint64_t local = 0;
      for (const GenChunk& c : partitions[p]) {
        const uint64_t bytes = c.sectors * 512;
        Bytes data = Content(bytes, c.seed);
        Bytes stored;
        if (c.type == dmg::kChunkRaw) stored = data;
        if (c.type == dmg::kChunkZlib) stored = Zlib(data);
        if (c.type == dmg::kChunkBzip2) stored = Bzip2(data);
        if (c.type == dmg::kChunkLzfse || c.type == dmg::kChunkAdc) stored = Bytes(100, 0x5a);
        if (c.type == dmg::kChunkZero || c.type == dmg::kChunkIgnore) data.assign(bytes, 0);
        entry(c.type, local, c.sectors, file.size() - part_start, stored.size());
        file.insert(file.end(), stored.begin(), stored.end());
        expected.insert(expected.end(), data.begin(), data.end());
        local += c.sectors;
      }
      entry(dmg::kChunkLast, local, 0, 0, 0);
      Bytes mish(dmg::mish::kHeaderSize);
      std::memcpy(mish.data(), "mish", 4);
      PutBE32(mish, 4, 1);
      PutBE64(mish, 8, disk_sector);
      PutBE64(mish, 16, local);
      PutBE64(mish, 24, part_start - prefix);  // relative to the data fork
      PutBE32(mish, 200, static_cast<uint32_t>(entries.size() / dmg::mish::kEntrySize));
      mish.insert(mish.end(), entries.begin(), entries.end());
      if (patch_mish) patch_mish(mish, p);
      tables.push_back(std::move(mish));
      disk_sector += local;
    }
    const uint64_t data_fork_length = file.size() - prefix;
    const uint64_t tables_at = file.size();
    if (resource_fork) {
      // Resource fork header (data offset, map offset, data length, map length), the data
      // area of length-prefixed resources, and a token map.
      Bytes fork(256);
      Bytes data;
      // A resource that is not a block table comes first: skipped.
      Bytes other(300, 0x11);
      for (const Bytes* r : {&other}) {
        Bytes len(4);
        PutBE32(len, 0, static_cast<uint32_t>(r->size()));
        data.insert(data.end(), len.begin(), len.end());
        data.insert(data.end(), r->begin(), r->end());
      }
      for (size_t i = 0; i < tiny_resources; i++) data.insert(data.end(), {0, 0, 0, 1, 0x22});
      for (const Bytes& t : tables) {
        Bytes len(4);
        PutBE32(len, 0, static_cast<uint32_t>(t.size()));
        data.insert(data.end(), len.begin(), len.end());
        data.insert(data.end(), t.begin(), t.end());
      }
      PutBE32(fork, 0, 256);
      PutBE32(fork, 4, static_cast<uint32_t>(256 + data.size()));
      PutBE32(fork, 8, static_cast<uint32_t>(data.size()));
      PutBE32(fork, 12, 30);
      fork.insert(fork.end(), data.begin(), data.end());
      fork.resize(fork.size() + 30, 0);
      file.insert(file.end(), fork.begin(), fork.end());
    } else {
      std::string plist =
          "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n"
          "\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n";
      for (size_t i = 0; i < tables.size(); i++) {
        std::string b64 = Base64(tables[i]);
        plist += "\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n";
        for (size_t at = 0; at < b64.size(); at += 52) plist += "\t\t\t\t" + b64.substr(at, 52) + "\n";
        plist += "\t\t\t\t</data>\n\t\t\t\t<key>Name</key>\n\t\t\t\t<string>part " + std::to_string(i) +
                 "</string>\n\t\t\t</dict>\n";
      }
      // A <data> element that is not a block table: skipped.
      plist += "\t\t</array>\n\t\t<key>plst</key>\n\t\t<array><dict><key>Data</key><data>" +
               Base64(Bytes(50, 7)) + "</data></dict></array>\n\t</dict>\n</dict>\n</plist>\n";
      if (patch_plist) patch_plist(plist);
      file.insert(file.end(), plist.begin(), plist.end());
    }
    const uint64_t tables_length = file.size() - tables_at;
    trailer_at = file.size();
    Bytes k(512);
    std::memcpy(k.data(), "koly", 4);
    PutBE32(k, 4, 4);
    PutBE32(k, 8, 512);
    PutBE32(k, 12, 1);
    PutBE64(k, 0x18, prefix);
    PutBE64(k, 0x20, data_fork_length);
    PutBE64(k, resource_fork ? 0x28 : 0xd8, tables_at);
    PutBE64(k, resource_fork ? 0x30 : 0xe0, tables_length);
    PutBE32(k, 0x1e8, 1);
    PutBE64(k, 0x1ec, disk_sector);
    file.insert(file.end(), k.begin(), k.end());
  }

  std::string Write(const std::string& name) {
    if (!built_) Build();
    std::string path = dir_.File(name);
    test::WriteWholeFile(path, file);
    return path;
  }
  std::string WriteExpected(const std::string& name) {
    std::string path = dir_.File(name);
    test::WriteWholeFile(path, expected);
    return path;
  }

 private:
  static Bytes Zlib(const Bytes& in) {
    auto out = Compress(Codec::kZlib, std::as_bytes(std::span(in)), in.size() * 2 + 1024);
    EXPECT_TRUE(out.ok() && !out->empty());
    Bytes b(out->size());
    std::memcpy(b.data(), out->data(), b.size());
    return b;
  }
  Bytes Bzip2(const Bytes& in) const {
    const std::string plain = dir_.File("bz.in"), packed = dir_.File("bz.out");
    test::WriteWholeFile(plain, in);
    auto r = RunCommand("bzip2 -c -9 " + Quote(plain) + " > " + Quote(packed));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return test::ReadWholeFile(packed);
  }

  const test::TempDir& dir_;
  bool built_ = false;
};

Result<std::unique_ptr<Image>> OpenRo(const std::string& path, const std::string& format = "") {
  OpenOptions o;
  o.read_only = true;
  o.format = format;
  return Image::Open(path, o);
}

Bytes ReadWhole(const std::string& path) {
  auto img = OpenRo(path);
  EXPECT_TRUE(img.ok()) << img.error().message();
  if (!img.ok()) return {};
  Bytes buf((*img)->size());
  Status s = (*img)->Read(0, std::as_writable_bytes(std::span(buf)));
  EXPECT_TRUE(s.ok()) << s.message();
  return buf;
}

// qemu-img convert, vimgfs reads (whole and in odd pieces) and vimgfs convert all give
// `expected`; vimgfs compare agrees.
void ExpectReadsLikeQemu(const test::TempDir& dir, const std::string& image, const Bytes& expected) {
  SCOPED_TRACE(image);
  const std::string theirs = dir.File("qemu.raw"), ours = dir.File("ours.raw");
  auto r = Qemu("convert -f dmg -O raw " + Quote(image) + " " + Quote(theirs));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(test::ReadWholeFile(theirs), expected);
  EXPECT_EQ(ReadWhole(image), expected);
  auto img = OpenRo(image);
  ASSERT_TRUE(img.ok()) << img.error().message();
  Bytes pieces(expected.size());
  for (uint64_t off = 0, step = 777; off < pieces.size(); off += step, step = step * 3 % 70001 + 1) {
    uint64_t n = std::min<uint64_t>(step, pieces.size() - off);
    Status s = (*img)->Read(off, std::as_writable_bytes(std::span(pieces).subspan(off, n)));
    ASSERT_TRUE(s.ok()) << s.message();
  }
  EXPECT_EQ(pieces, expected);
  r = RunCommand(Vimgfs() + " convert -O raw " + Quote(image) + " " + Quote(ours));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(test::ReadWholeFile(ours), expected);
  r = RunCommand(Vimgfs() + " compare " + Quote(image) + " " + Quote(theirs));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out, "Images are identical.\n");
}

TEST(DmgOracle, QemuSampleReadsInfosAndMapsLikeQemuImg) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string sample;
  REQUIRE_QEMU_SAMPLE(sample, "simple-dmg.dmg", dir.path());
  auto q = Qemu("convert -f dmg -O raw " + Quote(sample) + " " + Quote(dir.File("qemu.raw")));
  ASSERT_EQ(q.exit_code, 0) << q.err;
  Bytes theirs = test::ReadWholeFile(dir.File("qemu.raw"));
  ASSERT_EQ(theirs.size(), 1799168u);
  ExpectReadsLikeQemu(dir, sample, theirs);
  for (const char* args : {"info --output=json", "info", "map --output=json", "map"}) {
    SCOPED_TRACE(args);
    q = Qemu(std::string(args) + " " + Quote(sample));
    auto v = RunCommand(Vimgfs() + " " + args + " " + Quote(sample));
    // Human map: qemu-img fails, the driver giving no offsets ("external ... clusters").
    ASSERT_EQ(v.exit_code, q.exit_code) << v.err << q.err;
    EXPECT_EQ(v.err, q.err.empty() ? "" : "vimgfs" + q.err.substr(q.err.find(':')));
    if (std::string(args).find("json") != std::string::npos) {
      EXPECT_EQ(nlohmann::json::parse(v.out), nlohmann::json::parse(q.out));
    } else {
      EXPECT_EQ(v.out, q.out);
    }
  }
  // qemu's dmg driver has no check.
  q = Qemu("check " + Quote(sample));
  auto v = RunCommand(Vimgfs() + " check " + Quote(sample));
  EXPECT_EQ(q.exit_code, 63);
  EXPECT_EQ(v.exit_code, q.exit_code);
  EXPECT_EQ(v.err, "vimgfs" + q.err.substr(q.err.find(':'))) << v.err;
}

TEST(DmgOracle, GeneratedImagesReadLikeQemuImg) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  for (bool rsrc : {false, true}) {
    SCOPED_TRACE(rsrc ? "resource fork" : "property list");
    DmgGenerator g(dir);
    g.resource_fork = rsrc;
    g.partitions = {
        {{dmg::kChunkRaw, 3, 1}, {dmg::kChunkZlib, 2048, 2}, {dmg::kChunkZero, 5000}, {dmg::kChunkRaw, 1, 3}},
        {{dmg::kChunkIgnore, 7}, {dmg::kChunkZlib, 1, 4}, {dmg::kChunkRaw, 100, 5}, {dmg::kChunkZlib, 33, 6}},
        {{dmg::kChunkZero, 1}},
    };
    ExpectReadsLikeQemu(dir, g.Write(rsrc ? "rsrc.dmg" : "plist.dmg"), g.expected);
  }
  {
    // A chunk that inflates to 16 MiB (the engine's units were 2 MiB at most before dmg),
    // and a data fork at offset 0.
    DmgGenerator g(dir);
    g.prefix = 0;
    g.partitions = {{{dmg::kChunkZlib, 32768, 7}, {dmg::kChunkRaw, 2, 8}}};
    ExpectReadsLikeQemu(dir, g.Write("big.dmg"), g.expected);
  }
  {
    // Bytes after the trailer (fewer than a sector) move it off the end: qemu still finds it.
    DmgGenerator g(dir);
    g.partitions = {{{dmg::kChunkRaw, 4, 9}, {dmg::kChunkZlib, 4, 10}}};
    g.Build();
    g.file.resize(g.file.size() + 300, 0xee);
    ExpectReadsLikeQemu(dir, g.Write("tail.dmg"), g.expected);
  }
}

TEST(DmgOracle, Bzip2ChunksReadAsWritten) {
  if (!test::HaveProgram("bzip2")) GTEST_SKIP() << "bzip2 not installed";
  test::TempDir dir;
  DmgGenerator g(dir);
  g.partitions = {{{dmg::kChunkBzip2, 2048, 11}, {dmg::kChunkRaw, 8, 12}, {dmg::kChunkBzip2, 3, 13}}};
  const std::string image = g.Write("bz.dmg");
  EXPECT_EQ(ReadWhole(image), g.expected);
  auto r = RunCommand(Vimgfs() + " convert -O raw " + Quote(image) + " " + Quote(dir.File("ours.raw")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(test::ReadWholeFile(dir.File("ours.raw")), g.expected);
  if (test::HaveProgram("qemu-img")) {
    // Debian's qemu-img lacks the dmg-bz2 module and fails the read; one with it must agree.
    auto q = Qemu("convert -f dmg -O raw " + Quote(image) + " " + Quote(dir.File("qemu.raw")));
    if (q.exit_code == 0) {
      EXPECT_EQ(test::ReadWholeFile(dir.File("qemu.raw")), g.expected);
    } else {
      EXPECT_NE(q.err.find("bzip2"), std::string::npos) << q.err;
    }
  }
  // A damaged stream is a read error, not a crash or short data.
  g.file[g.prefix + 20] ^= 0x55;
  auto img = OpenRo(g.Write("bad-bz.dmg"));
  ASSERT_TRUE(img.ok()) << img.error().message();
  Bytes buf(512);
  Status s = (*img)->Read(0, std::as_writable_bytes(std::span(buf)));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("bzip2"), std::string::npos) << s.message();
}

TEST(DmgOracle, ChunksQemuCannotReadFailOnlyWhereRead) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* name;
    uint32_t type;
    const char* expect;
  };
  for (const Case& c : {Case{"lzfse.dmg", dmg::kChunkLzfse, "lzfse"}, Case{"adc.dmg", dmg::kChunkAdc, "ADC"},
                        Case{"unknown.dmg", 0x1234, "unknown type 1234"}}) {
    SCOPED_TRACE(c.name);
    DmgGenerator g(dir);
    g.partitions = {{{dmg::kChunkRaw, 4, 1}, {c.type, 8}, {dmg::kChunkZlib, 4, 2}}};
    const std::string image = g.Write(c.name);
    // Both open it (info works) and fail the conversion.
    auto q = Qemu("info " + Quote(image));
    auto v = RunCommand(Vimgfs() + " info " + Quote(image));
    EXPECT_EQ(q.exit_code, 0) << q.err;
    EXPECT_EQ(v.exit_code, 0) << v.err;
    EXPECT_EQ(v.out, q.out);
    q = Qemu("convert -f dmg -O raw " + Quote(image) + " " + Quote(dir.File("q.raw")));
    EXPECT_EQ(q.exit_code, 1);
    v = RunCommand(Vimgfs() + " convert -O raw " + Quote(image) + " " + Quote(dir.File("v.raw")));
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_NE(v.err.find(c.expect), std::string::npos) << v.err;
    EXPECT_NE(v.err.find(image), std::string::npos) << v.err;
    EXPECT_EQ(std::count(v.err.begin(), v.err.end(), '\n'), 1) << v.err;
    // The sectors around it read.
    auto img = OpenRo(image);
    ASSERT_TRUE(img.ok()) << img.error().message();
    Bytes buf(4 * 512);
    ASSERT_TRUE((*img)->Read(0, std::as_writable_bytes(std::span(buf))).ok());
    EXPECT_TRUE(std::equal(buf.begin(), buf.end(), g.expected.begin()));
    ASSERT_TRUE((*img)->Read(12 * 512, std::as_writable_bytes(std::span(buf))).ok());
    EXPECT_TRUE(std::equal(buf.begin(), buf.end(), g.expected.begin() + 12 * 512));
    Status s = (*img)->Read(5 * 512, std::as_writable_bytes(std::span(buf).first(512)));
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find(c.expect), std::string::npos) << s.message();
  }
  // Sectors no chunk covers (the trailer counts more than the tables hold).
  DmgGenerator g(dir);
  g.partitions = {{{dmg::kChunkRaw, 4, 1}}};
  g.Build();
  PutBE64(g.file, g.trailer_at + 0x1ec, 8);
  const std::string image = g.Write("gap.dmg");
  auto q = Qemu("convert -f dmg -O raw " + Quote(image) + " " + Quote(dir.File("q.raw")));
  EXPECT_EQ(q.exit_code, 1);
  auto img = OpenRo(image);
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->size(), 8u * 512);
  Bytes buf(512);
  Status s = (*img)->Read(6 * 512, std::as_writable_bytes(std::span(buf)));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("no chunk"), std::string::npos) << s.message();
}

TEST(DmgOracle, HostileTrailersAndTablesAreRefusedWithOneLine) {
  test::TempDir dir;
  const bool have_qemu = test::HaveProgram("qemu-img");
  struct Case {
    std::string name;
    std::function<void(DmgGenerator&)> setup;   // before Build
    std::function<void(DmgGenerator&)> damage;  // after Build
    std::string expect;
    bool qemu_refuses;  // qemu-img refuses it too (some vimgfs refuses alone)
  };
  auto patch_entry = [](size_t entry, size_t field, uint64_t value) {
    return [=](DmgGenerator& g) {
      g.patch_mish = [=](Bytes& m, size_t p) {
        if (p == 0) PutBE64(m, dmg::mish::kHeaderSize + entry * dmg::mish::kEntrySize + field, value);
      };
    };
  };
  const size_t kFirstChunk = 1;  // entry 0 is the comment
  std::vector<Case> cases = {
      {"empty.dmg", nullptr, [](DmgGenerator& g) { g.file.clear(); }, "at least 512 bytes", true},
      {"nokoly.dmg", nullptr, [](DmgGenerator& g) { g.file[g.trailer_at] = 'K'; },
       "Could not locate UDIF trailer", true},
      {"fork-past.dmg", nullptr,
       [](DmgGenerator& g) { PutBE64(g.file, g.trailer_at + 0x18, g.trailer_at + 1); }, "data fork offset",
       true},
      {"plist-past.dmg", nullptr, [](DmgGenerator& g) { PutBE64(g.file, g.trailer_at + 0xe0, g.trailer_at); },
       "property list", true},
      {"plist-wrap.dmg", nullptr,
       [](DmgGenerator& g) { PutBE64(g.file, g.trailer_at + 0xd8, UINT64_MAX - 10); }, "property list", true},
      {"rsrc-past.dmg", nullptr,
       [](DmgGenerator& g) {
         PutBE64(g.file, g.trailer_at + 0x28, 10);
         PutBE64(g.file, g.trailer_at + 0x30, g.trailer_at);
       },
       "resource fork", true},
      {"no-tables.dmg", nullptr, [](DmgGenerator& g) { PutBE64(g.file, g.trailer_at + 0xe0, 0); },
       "no block tables", true},
      {"rsrc-data.dmg", [](DmgGenerator& g) { g.resource_fork = true; },
       [](DmgGenerator& g) {  // the data length (at the fork's start + 8) overruns the fork
         const uint64_t fork_at = LoadBE64(&g.file[g.trailer_at + 0x28]);
         PutBE32(g.file, fork_at + 8, 0x7fffffff);
       },
       "resource data", true},
      {"huge-disk.dmg", nullptr, [](DmgGenerator& g) { PutBE64(g.file, g.trailer_at + 0x1ec, UINT64_MAX); },
       "too large", true},
      {"count-max.dmg", patch_entry(kFirstChunk + 1, dmg::mish::kEntrySectorCount, 131073), nullptr,
       "is larger than max (131072)", true},
      {"length-max.dmg", patch_entry(kFirstChunk, dmg::mish::kEntryLength, (64ull << 20) + 1), nullptr,
       "is larger than max (67108864)", true},
      {"overlap.dmg", patch_entry(kFirstChunk + 1, dmg::mish::kEntrySector, 1), nullptr, "overlaps", false},
      {"past-disk.dmg", patch_entry(kFirstChunk + 2, dmg::mish::kEntrySector, 1000), nullptr, "past the end",
       false},
      {"sector-wrap.dmg", patch_entry(kFirstChunk + 1, dmg::mish::kEntrySector, UINT64_MAX), nullptr,
       "overflows", false},
      {"offset-wrap.dmg", patch_entry(kFirstChunk + 1, dmg::mish::kEntryOffset, UINT64_MAX - 5), nullptr,
       "overflows", false},
      {"raw-short.dmg", patch_entry(kFirstChunk, dmg::mish::kEntryLength, 1000), nullptr, "stores 1000 bytes",
       false},
      {"bad-base64.dmg",
       [](DmgGenerator& g) { g.patch_plist = [](std::string& p) { p.insert(p.find("<data>") + 20, "*"); }; },
       nullptr, "not valid base64", false},
      {"no-close.dmg",
       [](DmgGenerator& g) { g.patch_plist = [](std::string& p) { p.erase(p.rfind("</data>"), 7); }; },
       nullptr, "has no </data>", true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    DmgGenerator g(dir);
    g.partitions = {{{dmg::kChunkRaw, 2, 1}, {dmg::kChunkZlib, 8, 2}, {dmg::kChunkZero, 4}}};
    if (c.setup) c.setup(g);
    g.Build();
    if (c.damage) c.damage(g);
    const std::string path = g.Write(c.name);
    auto img = OpenRo(path, "dmg");  // an empty file would probe as raw
    ASSERT_FALSE(img.ok());
    const std::string& msg = img.error().message();
    EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    auto v = RunCommand(Vimgfs() + " info -f dmg " + Quote(path));
    EXPECT_EQ(v.exit_code, 1);
    EXPECT_EQ(std::count(v.err.begin(), v.err.end(), '\n'), 1) << v.err;
    if (have_qemu && c.qemu_refuses) {
      EXPECT_EQ(Qemu("info -f dmg " + Quote(path)).exit_code, 1);
    }
  }
  // Millions of tiny resources cost no read each: the image opens at once.
  {
    DmgGenerator g(dir);
    g.resource_fork = true;
    g.tiny_resources = 3'000'000;
    g.partitions = {{{dmg::kChunkRaw, 2, 1}}};
    const std::string path = g.Write("tiny-resources.dmg");
    auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(ReadWhole(path), g.expected);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  }
  // Damaged zlib data: the image opens; reading the chunk fails, as in qemu.
  DmgGenerator g(dir);
  g.partitions = {{{dmg::kChunkZlib, 8, 2}}};
  g.Build();
  for (size_t i = 10; i < 40; i++) g.file[g.prefix + i] ^= 0xa5;
  const std::string path = g.Write("bad-zlib.dmg");
  auto img = OpenRo(path);
  ASSERT_TRUE(img.ok()) << img.error().message();
  Bytes buf(512);
  EXPECT_FALSE((*img)->Read(0, std::as_writable_bytes(std::span(buf))).ok());
  if (have_qemu) {
    EXPECT_EQ(Qemu("convert -f dmg -O raw " + Quote(path) + " " + Quote(dir.File("q.raw"))).exit_code, 1);
  }
}

TEST(DmgOracle, ProbedByNameAloneAndOpenedReadOnlyOnly) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  DmgGenerator g(dir);
  g.partitions = {{{dmg::kChunkRaw, 4, 1}, {dmg::kChunkZlib, 4, 2}}};
  const std::string image = g.Write("x.dmg");
  // Under another name it is raw, for qemu too; -f dmg reads it.
  const std::string other = dir.File("x.img");
  std::filesystem::copy_file(image, other);
  auto q = Qemu("info --output=json " + Quote(other));
  auto v = RunCommand(Vimgfs() + " info --output=json " + Quote(other));
  ASSERT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(nlohmann::json::parse(v.out)["format"], "raw");
  EXPECT_EQ(nlohmann::json::parse(q.out)["format"], "raw");
  auto img = OpenRo(other, "dmg");
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->size(), 8u * 512);
  // An empty file is raw to qemu whatever its name.
  test::WriteWholeFile(dir.File("empty.dmg"), {});
  q = Qemu("info " + Quote(dir.File("empty.dmg")));
  v = RunCommand(Vimgfs() + " info " + Quote(dir.File("empty.dmg")));
  EXPECT_EQ(q.exit_code, 0);
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_EQ(v.out, q.out);
  // Commands that open read-write are refused as qemu-img refuses them.
  for (std::string args :
       {"resize " + Quote(image) + " 1M", "snapshot -c s " + Quote(image), "check -r all " + Quote(image),
        "rebase -u -b y " + Quote(image), "create -f dmg " + Quote(dir.File("new.dmg")) + " 1M"}) {
    SCOPED_TRACE(args);
    q = Qemu(args);
    v = RunCommand(Vimgfs() + " " + args);
    EXPECT_EQ(v.exit_code, q.exit_code);
    EXPECT_EQ(v.err, "vimgfs" + q.err.substr(q.err.find(':'))) << v.err;
  }
  EXPECT_EQ(test::ReadWholeFile(image), g.file);
  // Read-write opens through the API too.
  OpenOptions o;
  auto rw = Image::Open(image, o);
  ASSERT_FALSE(rw.ok());
  EXPECT_NE(rw.error().message().find("read-only"), std::string::npos);
}

}  // namespace
}  // namespace vimgfs

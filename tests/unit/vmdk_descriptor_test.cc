// VMDK descriptors and sparse headers, in memory: parsing what qemu and VMware write,
// formatting what qemu-img create writes, and one clear error (never a crash, hang or huge
// allocation) for each kind of hostile descriptor or header.
#include <gtest/gtest.h>

#include <cstring>

#include "support/image_internals.h"
#include "formats/drivers.h"
#include "formats/vmdk/vmdk_internal.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::vmdk {
namespace {

constexpr const char* kQemuDescriptor =
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID=cd656e06\n"
    "parentCID=ffffffff\n"
    "createType=\"twoGbMaxExtentSparse\"\n"
    "\n"
    "# Extent description\n"
    "RW 4194304 SPARSE \"big-s001.vmdk\"\n"
    "RW 2097152 SPARSE \"big-s002.vmdk\"\n"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    "ddb.virtualHWVersion = \"4\"\n"
    "ddb.geometry.cylinders = \"6241\"\n"
    "ddb.geometry.heads = \"16\"\n"
    "ddb.geometry.sectors = \"63\"\n"
    "ddb.adapterType = \"ide\"\n"
    "ddb.toolsVersion = \"2147483647\"\n";

TEST(VmdkDescriptor, ParsesWhatQemuWrites) {
  auto d = ParseDescriptor(kQemuDescriptor, "d.vmdk");
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->version, 1u);
  EXPECT_EQ(d->cid, 0xcd656e06u);
  EXPECT_EQ(d->parent_cid, 0xffffffffu);
  EXPECT_EQ(d->create_type, "twoGbMaxExtentSparse");
  EXPECT_FALSE(d->parent_hint.has_value());
  ASSERT_EQ(d->extents.size(), 2u);
  EXPECT_EQ(d->extents[0].access, Access::kRW);
  EXPECT_EQ(d->extents[0].sectors, 4194304u);
  EXPECT_EQ(d->extents[0].type, "SPARSE");
  EXPECT_EQ(d->extents[0].file, "big-s001.vmdk");
  EXPECT_EQ(d->extents[1].sectors, 2097152u);
  ASSERT_EQ(d->ddb.size(), 6u);
  EXPECT_EQ(d->ddb[4].first, "ddb.adapterType");
  EXPECT_EQ(d->ddb[4].second, "ide");
}

TEST(VmdkDescriptor, ParsesVmwareStyleLinesAllAccessModesAndKinds) {
  const char* text =
      "# Disk DescriptorFile\r\n"
      "version=1\r\n"
      "encoding=\"windows-1252\"\r\n"
      "CID=0000abcd\r\n"
      "parentCID=12345678\r\n"
      "isNativeSnapshot=\"no\"\r\n"
      "createType=\"custom\"\r\n"
      "parentFileNameHint=\"../base dir/parent.vmdk\"\r\n"
      "  RW 100 FLAT \"a b-flat.vmdk\" 7\r\n"
      "RDONLY 200 SPARSE \"s.vmdk\"\r\n"
      "NOACCESS 300 FLAT \"n.vmdk\" 0\r\n"
      "RW 400 ZERO\r\n"
      "RW 500 VMFS \"v.vmdk\"\r\n"
      "RW 600 VMFSSPARSE \"c.vmdk\"\r\n"
      "\0garbage after the NUL is ignored\nRW 1 FLAT";
  auto d = ParseDescriptor(std::string_view(text, std::strlen(text) + 40), "d.vmdk");
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->cid, 0xabcdu);
  EXPECT_EQ(d->parent_cid, 0x12345678u);
  EXPECT_EQ(d->create_type, "custom");
  ASSERT_TRUE(d->parent_hint.has_value());
  EXPECT_EQ(*d->parent_hint, "../base dir/parent.vmdk");
  ASSERT_EQ(d->extents.size(), 6u);
  EXPECT_EQ(d->extents[0].file, "a b-flat.vmdk");
  EXPECT_EQ(d->extents[0].offset, 7u);
  EXPECT_EQ(d->extents[1].access, Access::kRdOnly);
  EXPECT_EQ(d->extents[2].access, Access::kNoAccess);
  EXPECT_EQ(d->extents[3].type, "ZERO");
  EXPECT_EQ(d->extents[3].file, "");
  EXPECT_EQ(d->extents[4].type, "VMFS");
  EXPECT_EQ(d->extents[5].type, "VMFSSPARSE");
}

TEST(VmdkDescriptor, MalformedExtentLinesAreOneClearError) {
  const char* bad[] = {
      "RW 100 FLAT \"x.vmdk\"",                // FLAT needs an offset
      "RW abc SPARSE \"x.vmdk\"",              // size not a number
      "RW 0 SPARSE \"x.vmdk\"",                // zero size
      "RW 99999999999999999999 FLAT \"x\" 0",  // overflows
      "RW 4611686018427387904 FLAT \"x\" 0",   // 2^62 sectors: absurd
      "RW 100 BOGUS \"x.vmdk\"",               // unknown kind
      "RW 100 SPARSE x.vmdk",                  // unquoted name
      "RW 100 SPARSE \"x.vmdk",                // unterminated name
      "RW 100 SPARSE \"x.vmdk\" 5",            // offset on a sparse extent
      "RW 100 FLAT \"x.vmdk\" 0 extra",        // trailing text
      "RW 100 FLAT \"\" 0",                    // empty name
      "RW 100 VMFS \"x.vmdk\" 1",              // VMFS takes no offset (qemu)
  };
  for (const char* line : bad) {
    std::string text = std::string("version=1\ncreateType=\"monolithicFlat\"\n") + line + "\n";
    auto d = ParseDescriptor(text, "bad.vmdk");
    ASSERT_FALSE(d.ok()) << line;
    // qemu-img's words, quoting the line; opening the file adds "Could not open 'FILE'".
    EXPECT_EQ(d.error().message(), std::string("Invalid extent line: ") + line);
  }
}

TEST(VmdkDescriptor, HostileSizesAndCountsAreRefused) {
  std::string huge(limits::kMaxDescriptorBytes + 1, '#');
  EXPECT_FALSE(ParseDescriptor(huge, "h.vmdk").ok());
  std::string many = "version=1\n";
  for (size_t i = 0; i <= kMaxExtents; i++) many += "RW 1 ZERO\n";
  auto d = ParseDescriptor(many, "m.vmdk");
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.error().message().find("extents"), std::string::npos);
  std::string longname = "version=1\nparentFileNameHint=\"" + std::string(5000, 'a') + "\"\n";
  EXPECT_FALSE(ParseDescriptor(longname, "p.vmdk").ok());
  EXPECT_FALSE(ParseDescriptor("version=9\n", "v.vmdk").ok());
}

TEST(VmdkDescriptor, ProbeLooksForVersionLineAfterComments) {
  EXPECT_TRUE(LooksLikeDescriptor("# Disk DescriptorFile\nversion=1\nCID=1\n"));
  EXPECT_TRUE(LooksLikeDescriptor("\n  # c\r\nversion=3\r\n"));
  EXPECT_FALSE(LooksLikeDescriptor("# Disk DescriptorFile\nCID=1\nversion=1\n"));
  EXPECT_FALSE(LooksLikeDescriptor("version=4\n"));
  EXPECT_FALSE(LooksLikeDescriptor("# only a comment"));
  EXPECT_FALSE(LooksLikeDescriptor(""));
}

TEST(VmdkDescriptor, FormatMatchesQemuAndRoundTrips) {
  DescriptorText t;
  t.cid = 0xcd656e06;
  t.create_type = "twoGbMaxExtentSparse";
  t.size = 3ull << 30;
  t.extents = {{Access::kRW, 4194304, "SPARSE", "big-s001.vmdk", 0},
               {Access::kRW, 2097152, "SPARSE", "big-s002.vmdk", 0}};
  std::string text = FormatDescriptor(t);
  EXPECT_EQ(text, kQemuDescriptor);
  t.parent_hint = "base.vmdk";
  t.parent_cid = 0x1234;
  auto d = ParseDescriptor(FormatDescriptor(t), "x");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d->parent_hint, "base.vmdk");
  EXPECT_EQ(d->parent_cid, 0x1234u);
  EXPECT_EQ(d->extents.size(), 2u);
}

TEST(VmdkSparseHeader, EncodeDecodeRoundTrip) {
  SparseLayout l = PlanSparseExtent(100 << 20, true, false);
  // qemu-img create -f vmdk -o zeroed_grain=on 100M: the layout it writes.
  EXPECT_EQ(l.header.version, 2u);
  EXPECT_EQ(l.header.flags, 7u);
  EXPECT_EQ(l.header.capacity, 204800u);
  EXPECT_EQ(l.header.rgd_offset, 21u);
  EXPECT_EQ(l.header.gd_offset, 38u);
  EXPECT_EQ(l.header.overhead, 128u);
  std::byte raw[512];
  EncodeSparseHeader(l.header, raw);
  EXPECT_EQ(std::memcmp(raw, "KDMV", 4), 0);
  SparseHeader h = DecodeSparseHeader(raw);
  EXPECT_EQ(h.capacity, l.header.capacity);
  EXPECT_EQ(h.gd_offset, l.header.gd_offset);
  EXPECT_EQ(h.flags, l.header.flags);
  EXPECT_EQ(static_cast<char>(raw[73]), '\n');
}

// ---- whole images in a MemEnv ----

class VmdkMemTest : public ::testing::Test {
 protected:
  std::unique_ptr<Env> env = NewMemEnv();

  std::vector<std::byte> MakeSparse(uint64_t size, bool zeroed = false, bool stream = false) {
    CreateContext ctx;
    ctx.env = env.get();
    ctx.path = "tmp.vmdk";
    ctx.size = size;
    if (zeroed) ctx.options["zeroed_grain"] = "on";
    if (stream) ctx.options["subformat"] = "streamOptimized";
    EXPECT_TRUE(Image::Create("vmdk", ctx).ok());
    return Slurp("tmp.vmdk");
  }
  std::vector<std::byte> Slurp(const std::string& path) {
    auto f = env->Open(path, OpenMode::kReadOnly);
    EXPECT_TRUE(f.ok());
    std::vector<std::byte> b(*(*f)->Size());
    EXPECT_TRUE((*f)->PRead(0, b).ok());
    return b;
  }
  void Put(const std::string& path, std::span<const std::byte> bytes) {
    auto f = env->Create(path);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->PWrite(0, bytes).ok());
  }
  void PutText(const std::string& path, const std::string& text) {
    Put(path, std::as_bytes(std::span(text)));
  }
  Result<std::unique_ptr<Image>> Open(const std::string& path, bool ro = true) {
    OpenOptions o;
    o.env = env.get();
    o.read_only = ro;
    return Image::Open(path, o);
  }
  // Opens `path` and expects one clear error line naming the file and containing `what`.
  void ExpectRefused(const std::string& path, const std::string& what) {
    auto img = Open(path);
    ASSERT_FALSE(img.ok()) << path << " opened";
    const std::string& m = img.error().message();
    EXPECT_NE(m.find(what), std::string::npos) << m;
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
};

TEST_F(VmdkMemTest, HostileSparseHeadersGiveOneClearError) {
  auto good = MakeSparse(100 << 20);
  struct Case {
    const char* name;
    size_t field;
    uint64_t value;
    int width;
    const char* what;
  };
  const Case cases[] = {
      {"gtes.vmdk", 44, 513, 4, "L2 table size too big"},
      {"grain0.vmdk", 20, 0, 8, "L1 entry size is invalid"},
      {"gran.vmdk", 20, 0x400000, 8, "Invalid granularity"},
      {"l1.vmdk", 12, 0x1efffffc1b000001ull, 8, "L1 size too big"},
      {"grain-odd.vmdk", 20, 100, 8, "grain size"},
      {"version.vmdk", 4, 4, 4, "Unsupported VMDK version 4"},
      {"gd-past.vmdk", 56, 1ull << 40, 8, "past the end"},
      {"rgd-past.vmdk", 48, 100000, 8, "past the end"},
      {"overhead.vmdk", 64, 1ull << 50, 8, "File truncated"},
      {"footer.vmdk", 56, kGdAtEnd, 8, "Invalid footer"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto b = good;
    if (c.width == 4)
      StoreLE32(b.data() + c.field, static_cast<uint32_t>(c.value));
    else
      StoreLE64(b.data() + c.field, c.value);
    Put(c.name, b);
    ExpectRefused(c.name, c.what);
  }
  // A grain directory entry naming a table past the end of the file.
  auto b = good;
  StoreLE32(b.data() + 38 * 512, 0x7fffffff);
  Put("gt-past.vmdk", b);
  ExpectRefused("gt-past.vmdk", "grain table");
  // Truncated files.
  Put("short.vmdk", std::span(good.data(), 300));
  ExpectRefused("short.vmdk", "truncated");
  Put("trunc.vmdk", std::span(good.data(), 20000));
  ExpectRefused("trunc.vmdk", "File truncated");
}

TEST_F(VmdkMemTest, DescriptorLoopsAndBadExtentsAreRefused) {
  // A descriptor naming itself as its sparse extent.
  PutText("self.vmdk",
          "# Disk DescriptorFile\nversion=1\ncreateType=\"twoGbMaxExtentSparse\"\n"
          "RW 100 SPARSE \"self.vmdk\"\n");
  ExpectRefused("self.vmdk", "self.vmdk");
  // A capacity-0 sparse container whose embedded descriptor names the container itself.
  SparseHeader h;
  h.desc_offset = 1;
  h.desc_size = 2;
  h.grain_size = 128;
  std::vector<std::byte> c(3 * 512);
  EncodeSparseHeader(h, c.data());
  std::string text =
      "# Disk DescriptorFile\nversion=1\ncreateType=\"twoGbMaxExtentSparse\"\n"
      "RW 100 SPARSE \"box.vmdk\"\n";
  std::memcpy(c.data() + 512, text.data(), text.size());
  Put("box.vmdk", c);
  ExpectRefused("box.vmdk", "descriptor");
  PutText("missing.vmdk", "version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"nope.vmdk\" 0\n");
  ExpectRefused("missing.vmdk", "nope.vmdk");
  PutText("notype.vmdk", "version=1\nRW 100 ZERO\n");
  ExpectRefused("notype.vmdk", "createType");
  PutText("weird.vmdk", "version=1\ncreateType=\"hyperspace\"\nRW 100 ZERO\n");
  ExpectRefused("weird.vmdk", "Unsupported image type");
  PutText("none.vmdk", "version=1\ncreateType=\"monolithicFlat\"\n");
  ExpectRefused("none.vmdk", "no extents");
  PutText("proto.vmdk", "version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"nbd:host:1\" 0\n");
  ExpectRefused("proto.vmdk", "nbd:host:1");
  // Absurd total size.
  PutText("huge.vmdk",
          "version=1\ncreateType=\"monolithicFlat\"\nRW 4503599627370496 ZERO\n"
          "RW 4503599627370496 ZERO\n");
  ExpectRefused("huge.vmdk", "extents add up");
}

TEST_F(VmdkMemTest, MultiExtentFlatAndZeroDiskReadsInGuestOrder) {
  std::vector<std::byte> a(4096), b(8192);
  for (size_t i = 0; i < a.size(); i++) a[i] = std::byte(i % 251);
  for (size_t i = 0; i < b.size(); i++) b[i] = std::byte(0x80 | (i % 7));
  Put("a-flat.vmdk", a);
  Put("b-flat.vmdk", b);
  PutText("multi.vmdk",
          "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
          "createType=\"twoGbMaxExtentFlat\"\n"
          "RW 8 FLAT \"a-flat.vmdk\" 0\n"
          "RW 2 ZERO\n"
          "RW 4 FLAT \"b-flat.vmdk\" 8\n");
  auto img = Open("multi.vmdk", false);
  ASSERT_TRUE(img.ok()) << img.error().message();
  ASSERT_EQ((*img)->size(), 14u * 512);
  std::vector<std::byte> out(14 * 512);
  ASSERT_TRUE((*img)->Read(0, out).ok());
  EXPECT_EQ(std::memcmp(out.data(), a.data(), 4096), 0);
  for (size_t i = 4096; i < 5120; i++) ASSERT_EQ(out[i], std::byte{0});
  EXPECT_EQ(std::memcmp(out.data() + 5120, b.data() + 4096, 2048), 0);
  // In-place write across the flat/zero/flat boundaries lands in the right files.
  std::vector<std::byte> w(512 * 12, std::byte{0x5c});
  Status s = (*img)->Write(512, w);
  // The ZERO extent cannot hold data: refused, never silently dropped.
  EXPECT_FALSE(s.ok());
  std::vector<std::byte> w2(1024, std::byte{0x5d});
  ASSERT_TRUE((*img)->Write(5120 + 512, w2).ok());
  ASSERT_TRUE((*img)->Close().ok());
  auto bb = Slurp("b-flat.vmdk");
  EXPECT_EQ(bb[4096 + 512], std::byte{0x5d});
  EXPECT_EQ(bb[4096 + 511], b[4096 + 511]);
  auto info = Open("multi.vmdk");
  ASSERT_TRUE(info.ok());
  auto fi = (*info)->Info();
  EXPECT_EQ(fi.cluster_size, 0u);
  const auto& d = std::get<VmdkDetails>(fi.format_specific);
  ASSERT_EQ(d.extents.size(), 3u);
  EXPECT_EQ(d.extents[1].format, "ZERO");
}

TEST_F(VmdkMemTest, SparseWritesUpdateBothGrainTablesAndSurviveReopen) {
  MakeSparse(64 << 20, /*zeroed=*/true);
  auto img = Open("tmp.vmdk", false);
  ASSERT_TRUE(img.ok()) << img.error().message();
  std::vector<std::byte> data(100000);
  for (size_t i = 0; i < data.size(); i++) data[i] = std::byte(i * 7);
  ASSERT_TRUE((*img)->Write(33 << 20, data).ok());
  ASSERT_TRUE((*img)->WriteZeroes(0, 1 << 20, false).ok());
  ASSERT_TRUE((*img)->Close().ok());

  auto raw = Slurp("tmp.vmdk");
  SparseHeader h = DecodeSparseHeader(raw.data());
  uint32_t gt = LoadLE32(raw.data() + h.gd_offset * 512 + 4 * ((33 << 20) / (32 << 20)));
  uint32_t rgt = LoadLE32(raw.data() + h.rgd_offset * 512 + 4 * 1);
  uint64_t idx = ((33 << 20) / 65536) % 512;
  uint32_t e = LoadLE32(raw.data() + uint64_t{gt} * 512 + 4 * idx);
  EXPECT_NE(e, 0u);
  EXPECT_EQ(e, LoadLE32(raw.data() + uint64_t{rgt} * 512 + 4 * idx));
  uint32_t gt0 = LoadLE32(raw.data() + h.gd_offset * 512);
  EXPECT_EQ(LoadLE32(raw.data() + uint64_t{gt0} * 512), kGteZeroed);  // zeroed grain

  auto again = Open("tmp.vmdk");
  ASSERT_TRUE(again.ok());
  std::vector<std::byte> out(data.size());
  ASSERT_TRUE((*again)->Read(33 << 20, out).ok());
  EXPECT_EQ(out, data);
  std::vector<Mapping> maps;
  ASSERT_TRUE((*again)->Lookup(0, 65536, &maps).ok());
  ASSERT_EQ(maps.size(), 1u);
  EXPECT_EQ(maps[0].kind, Mapping::Kind::kZero);
}

TEST_F(VmdkMemTest, StreamOptimizedIsReadOnlyWithAPointerToOverlayOrConvert) {
  MakeSparse(8 << 20, false, /*stream=*/true);
  auto img = Open("tmp.vmdk", false);
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_TRUE((*img)->read_only());
  auto plan = ImageInternals::Map(**img).PrepareWrite(0, 512);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.error().message().find("--overlay"), std::string::npos) << plan.error().message();
  EXPECT_NE(plan.error().message().find("convert"), std::string::npos);
}

TEST_F(VmdkMemTest, CreateOptionsAreCheckedLikeQemu) {
  auto create = [&](std::map<std::string, std::string> opts, std::optional<BackingRef> b = {}) {
    CreateContext ctx;
    ctx.env = env.get();
    ctx.path = "c.vmdk";
    ctx.size = 1 << 20;
    ctx.options = std::move(opts);
    ctx.backing = b;
    return VmdkDriver()->Create(ctx);
  };
  EXPECT_TRUE(create({{"adapter_type", "lsilogic"}, {"hwversion", "7"}}).ok());
  Status s = create({{"compat6", "on"}, {"hwversion", "7"}});
  EXPECT_NE(s.message().find("compat6 cannot be enabled with hwversion set"), std::string::npos);
  s = create({{"subformat", "monolithicFlat"}, {"zeroed_grain", "on"}});
  EXPECT_NE(s.message().find("Flat image can't enable zeroed grain"), std::string::npos);
  s = create({{"subformat", "monolithicFlat"}}, BackingRef{"b.vmdk", "vmdk"});
  EXPECT_NE(s.message().find("Flat image can't have backing file"), std::string::npos);
  s = create({}, BackingRef{"b.qcow2", "qcow2"});
  EXPECT_NE(s.message().find("backing_file must be a vmdk image"), std::string::npos);
  EXPECT_FALSE(create({{"adapter_type", "scsi"}}).ok());
  EXPECT_FALSE(create({{"subformat", "sparse"}}).ok());
  EXPECT_FALSE(create({{"bogus", "1"}}).ok());
}

}  // namespace
}  // namespace vimgfs::vmdk

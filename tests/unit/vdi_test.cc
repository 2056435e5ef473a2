// VDI driver on MemEnv: created layout, reads and writes through the engine, zeroing and
// discarding, check, resize, crash-safe metadata order, and one clear error for each kind
// of hostile header.
#include <gtest/gtest.h>

#include <chrono>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <set>

#include "support/image_internals.h"
#include "formats/vdi/vdi_internal.h"
#include "io/forwarding_file.h"
#include "support/fault_env.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class VdiTest : public ::testing::Test {
 public:
  void SetUp() override { env_ = NewMemEnv(); }

  void Create(const std::string& path, uint64_t size, std::map<std::string, std::string> opts = {}) {
    CreateContext ctx;
    ctx.env = env_.get();
    ctx.path = path;
    ctx.size = size;
    ctx.options = std::move(opts);
    Status s = Image::Create("vdi", ctx);
    ASSERT_TRUE(s.ok()) << s.message();
  }
  Result<std::unique_ptr<Image>> Open(const std::string& path, bool ro = false,
                                      const std::string& fmt = "vdi") {
    OpenOptions o;
    o.env = env_.get();
    o.read_only = ro;
    o.format = fmt;
    return Image::Open(path, o);
  }
  std::vector<std::byte> ReadFile(const std::string& path) {
    auto f = env_->Open(path, OpenMode::kReadOnly);
    EXPECT_TRUE(f.ok());
    uint64_t size = *(*f)->Size();
    std::vector<std::byte> data(size);
    EXPECT_TRUE((*f)->PRead(0, data).ok());
    return data;
  }
  uint64_t FileSize(const std::string& path) { return ReadFile(path).size(); }
  void Poke32(const std::string& path, uint64_t off, uint32_t v) {
    auto f = env_->Open(path, OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok());
    std::byte b[4];
    StoreLE32(b, v);
    ASSERT_TRUE((*f)->PWrite(off, b).ok());
  }
  void Poke64(const std::string& path, uint64_t off, uint64_t v) {
    auto f = env_->Open(path, OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok());
    std::byte b[8];
    StoreLE64(b, v);
    ASSERT_TRUE((*f)->PWrite(off, b).ok());
  }
  uint32_t Peek32(const std::string& path, uint64_t off) { return LoadLE32(ReadFile(path).data() + off); }
  CheckReport Check(const std::string& path) {
    auto img = Open(path, true);
    EXPECT_TRUE(img.ok()) << img.error().message();
    auto r = (*img)->Check(RepairMode::kNone);
    EXPECT_TRUE(r.ok());
    return *r;
  }
  static std::vector<std::byte> Pattern(size_t n, uint8_t seed) {
    std::vector<std::byte> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(seed + i * 7));
    return v;
  }

  std::unique_ptr<Env> env_;
};

TEST_F(VdiTest, CreateDynamicMatchesQemuLayout) {
  Create("d.vdi", 10 * kMiB);
  auto f = ReadFile("d.vdi");
  ASSERT_EQ(f.size(), 1024u);
  EXPECT_EQ(0, std::memcmp(f.data(), "<<< QEMU VM Virtual Disk Image >>>\n", 35));
  EXPECT_EQ(LoadLE32(&f[0x40]), vdi::kSignature);
  EXPECT_EQ(LoadLE32(&f[0x44]), 0x00010001u);
  EXPECT_EQ(LoadLE32(&f[0x48]), 0x190u);
  EXPECT_EQ(LoadLE32(&f[0x4c]), 1u);
  EXPECT_EQ(LoadLE32(&f[0x154]), 0x200u);
  EXPECT_EQ(LoadLE32(&f[0x158]), 0x400u);
  EXPECT_EQ(LoadLE32(&f[0x168]), 512u);
  EXPECT_EQ(LoadLE64(&f[0x170]), 10 * kMiB);
  EXPECT_EQ(LoadLE32(&f[0x178]), kMiB);
  EXPECT_EQ(LoadLE32(&f[0x180]), 10u);
  EXPECT_EQ(LoadLE32(&f[0x184]), 0u);
  EXPECT_NE(0, std::memcmp(&f[0x188], &f[0x198], 16));  // two random UUIDs
  EXPECT_EQ(static_cast<uint8_t>(f[0x18f]) >> 4, 4);    // version 4
  for (int b = 0; b < 10; ++b) EXPECT_EQ(LoadLE32(&f[0x200 + 4 * b]), vdi::kBlockFree);

  auto img = Open("d.vdi");
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->size(), 10 * kMiB);
  FormatInfo info = (*img)->Info();
  EXPECT_EQ(info.format, "vdi");
  EXPECT_EQ(info.cluster_size, kMiB);
  EXPECT_TRUE(std::holds_alternative<std::monostate>(info.format_specific));
  std::vector<std::byte> buf(4096, std::byte{1});
  ASSERT_TRUE((*img)->Read(5 * kMiB, buf).ok());
  EXPECT_EQ(buf, std::vector<std::byte>(4096));
}

TEST_F(VdiTest, CreateStaticAllocatesEveryBlock) {
  Create("s.vdi", 3 * kMiB, {{"static", "on"}});
  EXPECT_EQ(FileSize("s.vdi"), 0x400 + 3 * kMiB);
  EXPECT_EQ(Peek32("s.vdi", 0x4c), vdi::kTypeStatic);
  EXPECT_EQ(Peek32("s.vdi", 0x184), 3u);
  for (uint32_t b = 0; b < 3; ++b) EXPECT_EQ(Peek32("s.vdi", 0x200 + 4 * b), b);
  auto img = Open("s.vdi");
  ASSERT_TRUE(img.ok());
  auto data = Pattern(3000, 9);
  ASSERT_TRUE((*img)->Write(kMiB + 100, data).ok());
  ASSERT_TRUE((*img)->Close().ok());
  auto f = ReadFile("s.vdi");
  EXPECT_EQ(0, std::memcmp(&f[0x400 + kMiB + 100], data.data(), data.size()));  // in place
  EXPECT_EQ(Check("s.vdi").corruptions, 0);
}

TEST_F(VdiTest, CreateRejectsBadOptions) {
  CreateContext ctx;
  ctx.env = env_.get();
  ctx.path = "x.vdi";
  ctx.size = kMiB;
  ctx.options = {{"static", "maybe"}};
  Status s = Image::Create("vdi", ctx);
  EXPECT_EQ(s.kind(), ErrorKind::kInvalidArgument);
  EXPECT_NE(s.message().find("expects 'on' or 'off'"), std::string::npos);
  ctx.options = {{"cluster_size", "65536"}};
  s = Image::Create("vdi", ctx);
  EXPECT_NE(s.message().find("Invalid parameter 'cluster_size'"), std::string::npos);
  ctx.options = {};
  ctx.size = 1ull << 51;
  s = Image::Create("vdi", ctx);
  EXPECT_NE(s.message().find("Unsupported VDI image size"), std::string::npos) << s.message();
}

TEST_F(VdiTest, OddSizeRoundsUpToSector) {
  Create("o.vdi", 1000000);
  EXPECT_EQ(Peek32("o.vdi", 0x170), 1000448u);
  // A VBoxManage-style odd size stored in the header reads rounded up, like qemu.
  Poke64("o.vdi", 0x170, 999999);
  auto img = Open("o.vdi");
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->size(), 1000448u);
  auto data = Pattern(1000, 3);
  ASSERT_TRUE((*img)->Write(1000448 - 1000, data).ok());
  std::vector<std::byte> back(1000);
  ASSERT_TRUE((*img)->Read(1000448 - 1000, back).ok());
  EXPECT_EQ(back, data);
}

TEST_F(VdiTest, RandomWritesMatchModelAndReopen) {
  const uint64_t size = 7 * kMiB + 512;  // partial last block
  Create("w.vdi", size);
  std::vector<std::byte> model(size);
  std::set<uint64_t> touched;
  {
    auto img = Open("w.vdi");
    ASSERT_TRUE(img.ok());
    std::mt19937_64 rng(42);
    for (int i = 0; i < 60; ++i) {
      uint64_t len = 1 + rng() % (300 * 1024);
      uint64_t off = rng() % (size - len);
      for (uint64_t b = off / kMiB; b <= (off + len - 1) / kMiB; ++b) touched.insert(b);
      auto data = Pattern(len, static_cast<uint8_t>(i));
      ASSERT_TRUE((*img)->Write(off, data).ok());
      std::memcpy(model.data() + off, data.data(), len);
    }
    std::vector<std::byte> back(size);
    ASSERT_TRUE((*img)->Read(0, back).ok());
    EXPECT_EQ(back, model);
  }
  auto img = Open("w.vdi", true);
  ASSERT_TRUE(img.ok());
  std::vector<std::byte> back(size);
  ASSERT_TRUE((*img)->Read(0, back).ok());
  EXPECT_EQ(back, model);
  auto* map = dynamic_cast<vdi::VdiMap*>(&ImageInternals::Map(**img));
  ASSERT_NE(map, nullptr);
  EXPECT_EQ(map->header().blocks_allocated, touched.size());
  EXPECT_EQ(FileSize("w.vdi"), 0x400 + touched.size() * kMiB);  // whole blocks, like qemu
  EXPECT_EQ(Check("w.vdi").corruptions, 0);
}

TEST_F(VdiTest, ZeroingTopBlockFreesIt) {
  Create("z.vdi", 4 * kMiB);
  auto data = Pattern(kMiB, 5);
  {
    auto img = Open("z.vdi");
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(0, data).ok());
    ASSERT_TRUE((*img)->Write(2 * kMiB, data).ok());
    ASSERT_TRUE((*img)->Flush().ok());
    EXPECT_EQ(Peek32("z.vdi", 0x184), 2u);
    // Block 0 is data block 0, not the top one: it stays allocated, zeroed in place.
    ASSERT_TRUE((*img)->WriteZeroes(0, kMiB, true).ok());
    // Block 2 is data block 1, the top one: given back.
    ASSERT_TRUE((*img)->WriteZeroes(2 * kMiB, kMiB, true).ok());
    std::vector<std::byte> back(4 * kMiB, std::byte{1});
    ASSERT_TRUE((*img)->Read(0, back).ok());
    EXPECT_EQ(back, std::vector<std::byte>(4 * kMiB));
  }
  EXPECT_EQ(Peek32("z.vdi", 0x200 + 8), vdi::kBlockZero);
  EXPECT_EQ(Peek32("z.vdi", 0x200), 0u);
  EXPECT_EQ(Peek32("z.vdi", 0x184), 1u);
  EXPECT_EQ(FileSize("z.vdi"), 0x400 + kMiB);
  EXPECT_EQ(Check("z.vdi").corruptions, 0);
}

TEST_F(VdiTest, StaticImageZeroesInPlace) {
  Create("sz.vdi", 3 * kMiB, {{"static", "on"}});
  {
    auto img = Open("sz.vdi");
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(0, Pattern(3 * kMiB, 6)).ok());
    ASSERT_TRUE((*img)->WriteZeroes(2 * kMiB, kMiB, false).ok());  // the top block
    ASSERT_TRUE((*img)->Discard(kMiB, kMiB).ok());
    std::vector<std::byte> back(2 * kMiB, std::byte{1});
    ASSERT_TRUE((*img)->Read(kMiB, back).ok());
    EXPECT_EQ(back, std::vector<std::byte>(2 * kMiB));
  }
  // Still static: every block stays allocated where it was.
  for (uint32_t b = 0; b < 3; ++b) EXPECT_EQ(Peek32("sz.vdi", 0x200 + 4 * b), b);
  EXPECT_EQ(Peek32("sz.vdi", 0x184), 3u);
  EXPECT_EQ(FileSize("sz.vdi"), 0x400 + 3 * kMiB);
  EXPECT_EQ(Check("sz.vdi").corruptions, 0);
}

TEST_F(VdiTest, DiscardThenWriteReusesIndexSafely) {
  Create("r.vdi", 4 * kMiB);
  auto a = Pattern(kMiB, 1), b = Pattern(kMiB, 2), c = Pattern(kMiB, 3);
  {
    auto img = Open("r.vdi");
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(0, a).ok());
    ASSERT_TRUE((*img)->Write(kMiB, b).ok());
    ASSERT_TRUE((*img)->Flush().ok());
    ASSERT_TRUE((*img)->Discard(kMiB, kMiB).ok());
    // The next allocation must not reuse data block 1 before the cleared entry is durable.
    ASSERT_TRUE((*img)->Write(3 * kMiB, c).ok());
    std::vector<std::byte> back(kMiB);
    ASSERT_TRUE((*img)->Read(3 * kMiB, back).ok());
    EXPECT_EQ(back, c);
    ASSERT_TRUE((*img)->Read(kMiB, back).ok());
    EXPECT_EQ(back, std::vector<std::byte>(kMiB));
  }
  EXPECT_EQ(Peek32("r.vdi", 0x204), vdi::kBlockFree);
  EXPECT_EQ(Peek32("r.vdi", 0x20c), 1u);
  EXPECT_EQ(Peek32("r.vdi", 0x184), 2u);
  EXPECT_EQ(Check("r.vdi").corruptions, 0);
}

TEST_F(VdiTest, FlushDuringAnAllocationCountsOnlyLinkedBlocks) {
  // A flush (another thread's fsync) between PrepareWrite and CommitWrite must not
  // count the reserved block: a kill right after it would leave a count naming a block
  // no entry uses, which qemu-img check reports as corruption.
  Create("p.vdi", 4 * kMiB);
  auto img = Open("p.vdi");
  ASSERT_TRUE(img.ok());
  ASSERT_TRUE((*img)->Write(0, Pattern(kMiB, 1)).ok());
  ASSERT_TRUE((*img)->Flush().ok());
  ClusterMap& map = ImageInternals::Map(**img);
  auto plan = map.PrepareWrite(2 * kMiB, kMiB);
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(map.Flush().ok());
  EXPECT_EQ(Peek32("p.vdi", 0x184), 1u);
  EXPECT_EQ(Check("p.vdi").corruptions, 0);  // what a kill here would leave
  auto data = Pattern(kMiB, 2);
  ASSERT_TRUE(plan->file->PWrite(plan->host_offset, data, IoTag::kData).ok());
  ASSERT_TRUE(map.CommitWrite(*plan).ok());
  ASSERT_TRUE(map.Flush().ok());
  EXPECT_EQ(Peek32("p.vdi", 0x184), 2u);
  EXPECT_EQ(Check("p.vdi").corruptions, 0);
  std::vector<std::byte> back(kMiB);
  ASSERT_TRUE((*img)->Read(2 * kMiB, back).ok());
  EXPECT_EQ(back, data);
}

TEST_F(VdiTest, FailedDataWriteLeavesConsistentImage) {
  test::FaultEnv fenv(env_.get());
  Create("f.vdi", 4 * kMiB);
  OpenOptions o;
  o.env = &fenv;
  o.format = "vdi";
  auto img = Image::Open("f.vdi", o);
  ASSERT_TRUE(img.ok());
  auto a = Pattern(kMiB, 1), b = Pattern(kMiB, 2);
  ASSERT_TRUE((*img)->Write(0, a).ok());
  ASSERT_TRUE((*img)->Write(kMiB, a).ok());
  test::FaultRule rule;
  rule.tag = IoTag::kData;
  fenv.SetRule(rule);
  Status s = (*img)->Write(2 * kMiB, b);
  EXPECT_FALSE(s.ok());
  fenv.ClearRule();
  ASSERT_TRUE((*img)->Write(3 * kMiB, b).ok());
  ASSERT_TRUE((*img)->Close().ok());
  EXPECT_EQ(Check("f.vdi").corruptions, 0);
  EXPECT_EQ(Peek32("f.vdi", 0x184), 3u);
}

// Records the order of writes and syncs to check the metadata ordering.
class RecordingEnv : public Env {
 public:
  explicit RecordingEnv(Env* base) : base_(base) {}
  std::vector<std::string> log;
  Result<std::unique_ptr<File>> Open(const std::string& p, OpenMode m) override {
    ASSIGN_OR_RETURN(auto f, base_->Open(p, m));
    return std::unique_ptr<File>(new Rec(this, std::move(f)));
  }
  Result<std::unique_ptr<File>> Create(const std::string& p, bool ex) override {
    return base_->Create(p, ex);
  }
  Status Remove(const std::string& p) override { return base_->Remove(p); }
  Result<FileStat> Stat(const std::string& p) override { return base_->Stat(p); }

 private:
  class Rec : public ForwardingFile {
   public:
    Rec(RecordingEnv* e, std::unique_ptr<File> f) : ForwardingFile(std::move(f)), e_(e) {}
    Status PWrite(uint64_t o, std::span<const std::byte> b, IoTag t) override {
      e_->log.push_back(t == IoTag::kHeader ? "H" : t == IoTag::kBlockMap ? "M" : "D");
      return ForwardingFile::PWrite(o, b, t);
    }
    Status Sync(bool d) override {
      e_->log.push_back("S");
      return ForwardingFile::Sync(d);
    }

   private:
    RecordingEnv* e_;
  };
  Env* base_;
};

TEST_F(VdiTest, MetadataOrderIsCrashSafe) {
  Create("o.vdi", 4 * kMiB);
  RecordingEnv renv(env_.get());
  OpenOptions o;
  o.env = &renv;
  o.format = "vdi";
  auto img = Image::Open("o.vdi", o);
  ASSERT_TRUE(img.ok());
  ASSERT_TRUE((*img)->Write(0, Pattern(4096, 1)).ok());
  ASSERT_TRUE((*img)->Write(2 * kMiB, Pattern(4096, 2)).ok());
  EXPECT_EQ(std::count(renv.log.begin(), renv.log.end(), "M"), 0);  // nothing linked yet
  ASSERT_TRUE((*img)->Flush().ok());
  // Data, a sync, then the raised count and the new entries in one write (the map follows
  // the header: a killed process can't leave one without the other), then a sync.
  std::string seq;
  for (auto& e : renv.log) seq += e;
  EXPECT_EQ(seq, "DDSMS");
  // Freeing the top block: the cleared entry and the lowered count, again in one write,
  // synced at once (the block is given back only once no entry can name it), then the
  // flush's own sync of the file (data written meanwhile, outside the map's lock).
  renv.log.clear();
  ASSERT_TRUE((*img)->WriteZeroes(2 * kMiB, kMiB, true).ok());
  ASSERT_TRUE((*img)->Flush().ok());
  seq.clear();
  for (auto& e : renv.log) seq += e;
  EXPECT_EQ(seq, "SMSS");
  // In-place writes need no metadata: the flush is one sync.
  renv.log.clear();
  ASSERT_TRUE((*img)->Write(0, Pattern(4096, 3)).ok());
  ASSERT_TRUE((*img)->Flush().ok());
  seq.clear();
  for (auto& e : renv.log) seq += e;
  EXPECT_EQ(seq, "DS");
  EXPECT_EQ(Check("o.vdi").corruptions, 0);
}

TEST_F(VdiTest, CheckReportsLikeQemu) {
  Create("c.vdi", 5 * kMiB);
  {
    auto img = Open("c.vdi");
    ASSERT_TRUE(img.ok());
    for (uint64_t blk : {0, 3, 1}) ASSERT_TRUE((*img)->Write(blk * kMiB, Pattern(512, 1)).ok());
  }
  EXPECT_EQ(Check("c.vdi").corruptions, 0);
  Poke32("c.vdi", 0x210, 1);  // block 4 -> data block 1, already used by block 3
  CheckReport r = Check("c.vdi");
  EXPECT_EQ(r.corruptions, 2);
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[0], "ERROR: block index 1 also used by 1");
  EXPECT_EQ(r.messages[1], "ERROR: allocated blocks mismatch, is 4, should be 3");
  Poke32("c.vdi", 0x210, 9);  // past blocks_in_image
  r = Check("c.vdi");
  EXPECT_EQ(r.corruptions, 1);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(r.messages[0], "ERROR: block index 4 too large, is 9");

  // Reading still works; allocating in an inconsistent image is refused.
  auto img = Open("c.vdi");
  ASSERT_TRUE(img.ok());
  std::vector<std::byte> buf(512);
  EXPECT_TRUE((*img)->Read(0, buf).ok());
  Status s = (*img)->Write(2 * kMiB, buf);
  EXPECT_EQ(s.kind(), ErrorKind::kCorrupt);
  EXPECT_NE(s.message().find("c.vdi"), std::string::npos);
  auto repair = (*img)->Check(RepairMode::kAll);
  EXPECT_EQ(repair.status().kind(), ErrorKind::kUnsupported);
}

TEST_F(VdiTest, ResizeGrowsWithinBlockMapRoom) {
  Create("g.vdi", 10 * kMiB);
  {
    auto img = Open("g.vdi");
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(9 * kMiB, Pattern(kMiB, 4)).ok());
    ASSERT_TRUE((*img)->Resize(100 * kMiB + 512, false).ok());
    Status s = (*img)->Resize(200 * kMiB, false);  // 128 entries of room
    EXPECT_EQ(s.kind(), ErrorKind::kUnsupported);
    EXPECT_EQ((*img)->Resize(kMiB, true).kind(), ErrorKind::kUnsupported);
  }
  auto img = Open("g.vdi");
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->size(), 100 * kMiB + 512);
  std::vector<std::byte> back(kMiB);
  ASSERT_TRUE((*img)->Read(9 * kMiB, back).ok());
  EXPECT_EQ(back, Pattern(kMiB, 4));
  ASSERT_TRUE((*img)->Read(99 * kMiB, back).ok());
  EXPECT_EQ(back, std::vector<std::byte>(kMiB));
  EXPECT_EQ(Check("g.vdi").corruptions, 0);

  Create("gs.vdi", 2 * kMiB, {{"static", "on"}});
  {
    auto s = Open("gs.vdi");
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->Resize(5 * kMiB, false).ok());
  }
  EXPECT_EQ(FileSize("gs.vdi"), 0x400 + 5 * kMiB);
  EXPECT_EQ(Peek32("gs.vdi", 0x184), 5u);
  EXPECT_EQ(Peek32("gs.vdi", 0x200 + 16), 4u);
  EXPECT_EQ(Check("gs.vdi").corruptions, 0);
}

TEST_F(VdiTest, ProbeFindsSignature) {
  Create("p.vdi", kMiB);
  OpenOptions o;
  o.env = env_.get();
  auto img = Image::Open("p.vdi", o);
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->format(), "vdi");
  EXPECT_EQ(vdi::ProbeVdi({}), 0);
}

TEST_F(VdiTest, ReadsVersion0Layout) {
  // Version 0: no header size field, the block map right after the 348-byte header.
  std::vector<std::byte> f(420 + 8 + 2 * kMiB);
  StoreLE32(&f[0x40], vdi::kSignature);
  StoreLE32(&f[0x44], 0);
  StoreLE32(&f[0x48], 1);          // dynamic
  StoreLE64(&f[0x160], 2 * kMiB);  // disk size
  StoreLE32(&f[0x168], kMiB);      // block size
  StoreLE32(&f[0x16c], 2);         // blocks
  StoreLE32(&f[0x170], 1);         // allocated
  StoreLE32(&f[420], vdi::kBlockFree);
  StoreLE32(&f[424], 0);  // block 1 -> data block 0 at 428
  auto data = Pattern(kMiB, 8);
  std::memcpy(&f[428], data.data(), kMiB);
  {
    auto file = env_->Create("v0.vdi");
    ASSERT_TRUE(file.ok());
    ASSERT_TRUE((*file)->PWrite(0, f).ok());
  }
  auto img = Open("v0.vdi");
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_TRUE((*img)->read_only());
  std::vector<std::byte> back(kMiB);
  ASSERT_TRUE((*img)->Read(kMiB, back).ok());
  EXPECT_EQ(back, data);
  ASSERT_TRUE((*img)->Read(0, back).ok());
  EXPECT_EQ(back, std::vector<std::byte>(kMiB));
}

// Hostile headers: each mutation of a valid image gives one error naming the file.
struct Mutation {
  const char* name;
  std::function<void(VdiTest*, const std::string&)> apply;
  const char* expect;  // substring of the message
};

class VdiHostileTest : public VdiTest {
 public:
  void Expect(const Mutation& m) {
    const std::string path = std::string("h-") + m.name + ".vdi";
    Create(path, 10 * kMiB);
    m.apply(this, path);
    auto img = Open(path);
    ASSERT_FALSE(img.ok()) << m.name;
    const std::string& msg = img.error().message();
    EXPECT_NE(msg.find(path), std::string::npos) << m.name << ": " << msg;
    EXPECT_NE(msg.find(m.expect), std::string::npos) << m.name << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << m.name << ": " << msg;
  }
  void Truncate(const std::string& path, uint64_t size) {
    auto f = env_->Open(path, OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(size).ok());
  }
  void Grow(const std::string& path, uint64_t size) { Truncate(path, size); }
};

TEST_F(VdiHostileTest, EachBadHeaderGivesOneClearError) {
  auto p32 = [](uint64_t off, uint32_t v) {
    return [=](VdiTest* t, const std::string& p) { t->Poke32(p, off, v); };
  };
  const std::vector<Mutation> cases = {
      {"truncated",
       [](VdiTest* t, const std::string& p) { static_cast<VdiHostileTest*>(t)->Truncate(p, 300); },
       "truncated VDI header"},
      {"tiny", [](VdiTest* t, const std::string& p) { static_cast<VdiHostileTest*>(t)->Truncate(p, 10); },
       "too small"},
      {"signature", p32(0x40, 0x12345678), "bad signature 12345678"},
      {"version", p32(0x44, 0x00020000), "version 2.0"},
      {"header-size", p32(0x48, 12), "header size 12"},
      {"type", p32(0x4c, 9), "image type 9"},
      {"bmap-unaligned", p32(0x154, 0x201), "unaligned block map offset 0x201"},
      {"data-unaligned", p32(0x158, 0x401), "unaligned data offset 0x401"},
      {"sector-size", p32(0x168, 4096), "sector size 4096"},
      {"block-size-0", p32(0x178, 0), "block size 0 is not 1048576"},
      {"block-size-odd", p32(0x178, 3 * kMiB), "block size 3145728"},
      {"block-size-huge", p32(0x178, 0x80000000u), "block size 2147483648"},
      {"block-size-2m", p32(0x178, 2 * kMiB), "block size 2097152 is not 1048576"},  // qemu reads 1 MiB only
      {"block-extra", p32(0x17c, 512), "block_extra 512"},
      {"blocks-too-few", p32(0x180, 3), "image bitmap has room for 3145728"},
      {"blocks-too-many", p32(0x180, 0x40000000), "too many blocks"},
      // qemu's limit: a block map just under 2 GiB.
      {"blocks-past-qemus-limit", p32(0x180, vdi::kMaxBlocks + 1),
       "(too many blocks 536870785, max is 536870784)"},
      {"bmap-in-header", p32(0x154, 0), "inside the header"},
      {"data-in-bmap", p32(0x158, 0x200), "inside the block map"},
      {"disk-size-huge", [](VdiTest* t, const std::string& p) { t->Poke64(p, 0x170, ~0ull); },
       "Unsupported VDI image size"},
      {"link-uuid", p32(0x1a8, 1), "non-NULL link UUID"},
      {"parent-uuid", p32(0x1b8, 1), "non-NULL parent UUID"},
  };
  for (const Mutation& m : cases) Expect(m);
}

// A small seeded fuzzer: random header and block map damage never crashes (ASan/UBSan
// builds catch the rest); whatever opens can be read, written, checked and closed.
TEST_F(VdiHostileTest, RandomDamageNeverCrashes) {
  Create("seed.vdi", 3 * kMiB + 512);
  {
    auto img = Open("seed.vdi");
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(kMiB, Pattern(kMiB + 512, 1)).ok());
  }
  const auto pristine = ReadFile("seed.vdi");
  std::mt19937_64 rng(1234);
  int opened = 0;
  for (int iter = 0; iter < 400; ++iter) {
    auto bytes = pristine;
    const int flips = 1 + rng() % 4;
    for (int i = 0; i < flips; ++i) {
      // Mostly the fields from 0x40 to the block map entries.
      const uint64_t pos = 0x40 + rng() % (0x220 - 0x40);
      bytes[pos] = std::byte(static_cast<uint8_t>(rng()));
    }
    {
      auto f = env_->Create("fz.vdi");
      ASSERT_TRUE(f.ok());
      ASSERT_TRUE((*f)->PWrite(0, bytes).ok());
    }
    auto img = Open("fz.vdi");
    if (!img.ok()) {
      EXPECT_NE(img.error().message().find("fz.vdi"), std::string::npos) << img.error().message();
      continue;
    }
    ++opened;
    Image& im = **img;
    std::vector<std::byte> buf(std::min<uint64_t>(im.size(), 2 * kMiB));
    (void)im.Read(0, buf);
    if (im.size() > 4096) {
      std::vector<std::byte> tail(4096);
      (void)im.Read(im.size() - 4096, tail);
      (void)im.Write(im.size() - 4096, Pattern(4096, 2));
      (void)im.Write(0, Pattern(1000, 3));
      (void)im.WriteZeroes(0, std::min<uint64_t>(im.size(), 2 * kMiB), true);
    }
    (void)im.Check(RepairMode::kNone);
    (void)im.Close();
  }
  EXPECT_GT(opened, 0);
}

// A header may claim a block map far larger than the file (qemu's limit is just under
// 2 GiB): the map is paged in as used, so opening costs no huge allocation; past the end
// of the file it reads as zeros, as qemu reads it (every entry names data block 0). That
// is no map to allocate in: a writable open refuses writes, as a check would find.
TEST_F(VdiHostileTest, BlockMapPastTheFileIsPagedInAndReadsAsZeros) {
  Create("big.vdi", 64 * kMiB);
  Poke32("big.vdi", 0x180, vdi::kMaxBlocks);
  Poke64("big.vdi", 0x170, uint64_t{vdi::kMaxBlocks} * kMiB);
  Truncate("big.vdi", 1024);
  {
    auto ro = Open("big.vdi", /*ro=*/true);
    ASSERT_TRUE(ro.ok()) << ro.error().message();
    EXPECT_EQ((*ro)->size(), uint64_t{vdi::kMaxBlocks} * kMiB);
    std::vector<std::byte> buf(4096);
    EXPECT_TRUE((*ro)->Read((*ro)->size() - buf.size(), buf).ok());
  }
  // check counts what qemu's would (every entry past the end names data block 0), at
  // once and listing a bounded number of them.
  {
    const auto start = std::chrono::steady_clock::now();
    CheckReport r = Check("big.vdi");
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
    const int64_t named_zero = int64_t{vdi::kMaxBlocks} - 64;  // all but the 64 free entries written
    EXPECT_EQ(r.corruptions, named_zero - 1 + 1);              // duplicates + the count mismatch
    EXPECT_LE(r.messages.size(), 10001u);
    EXPECT_EQ(r.messages.back(),
              fmt::format("ERROR: allocated blocks mismatch, is {}, should be 0", named_zero));
  }
  Grow("big.vdi", 0x400 + kMiB);  // room for the data offset to sit past the header
  Poke32("big.vdi", 0x158, 0x400);
  auto rw = Open("big.vdi", /*ro=*/false);
  ASSERT_FALSE(rw.ok());  // the data area overlaps the (claimed) map: no writes there
  EXPECT_NE(rw.error().message().find("inside the block map"), std::string::npos) << rw.error().message();
}

}  // namespace
}  // namespace vimgfs

// Engine tests on MemEnv with a small in-test format ("toy"): 4 KiB clusters allocated at
// the end of the file, an in-memory table, optional backing image and zero clusters. The
// engine's splitting, copy-on-write, zeroing and locking are checked against a plain
// byte vector.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "engine/codec.h"
#include "support/fault_env.h"
#include "vimgfs/copy.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

constexpr uint64_t kCluster = 4096;

struct ToyState {
  std::map<uint64_t, uint64_t> table;  // guest cluster -> host offset
  std::map<uint64_t, bool> zero;       // guest cluster -> zero flag
  std::optional<BackingRef> backing;
  uint64_t size = 0;
  int commits = 0;
  bool no_zero_clusters = false;  // ZeroRange unsupported: the engine writes zeros
};

// Every toy image's state lives here, keyed by path (the "file" only holds data).
std::map<std::string, ToyState>& ToyStates() {
  static std::map<std::string, ToyState> states;
  return states;
}

class ToyMap final : public ClusterMap {
 public:
  ToyMap(std::unique_ptr<File> f, ToyState* st, bool ro) : file_(std::move(f)), st_(st), ro_(ro) {}
  uint64_t virtual_size() const override { return st_->size; }
  uint64_t cluster_size() const override { return kCluster; }
  bool read_only() const override { return ro_; }
  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    while (len) {
      uint64_t c = off / kCluster, in = off % kCluster;
      uint64_t n = std::min(len, kCluster - in);
      Mapping m;
      m.length = n;
      if (auto it = st_->table.find(c); it != st_->table.end()) {
        m.kind = Mapping::Kind::kData;
        m.file = file_.get();
        m.host_offset = it->second + in;
        m.writable = true;
      } else if (st_->zero.count(c)) {
        m.kind = Mapping::Kind::kZero;
      }
      out->push_back(m);
      off += n;
      len -= n;
    }
    return Status::Ok();
  }
  Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) override {
    ASSIGN_OR_RETURN(uint64_t end, file_->Size());
    uint64_t first = off / kCluster;
    uint64_t last = (off + len - 1) / kCluster;
    uint64_t n = 1;  // as many unallocated clusters in a row as the request covers
    while (first + n <= last && !st_->table.count(first + n)) n++;
    WritePlan p;
    p.guest_offset = first * kCluster;
    p.length = n * kCluster;
    p.file = file_.get();
    p.host_offset = std::max<uint64_t>(end, reserved_);
    reserved_ = p.host_offset + p.length;
    return p;
  }
  Status CommitWrite(const WritePlan& p) override {
    for (uint64_t i = 0; i < p.length / kCluster; i++) {
      st_->table[p.guest_offset / kCluster + i] = p.host_offset + i * kCluster;
      st_->zero.erase(p.guest_offset / kCluster + i);
    }
    st_->commits++;
    return Status::Ok();
  }
  Status ZeroRange(uint64_t off, uint64_t len, bool) override {
    if (st_->no_zero_clusters) return Status::Unsupported("zero clusters");
    for (uint64_t c = off / kCluster; c < (off + len + kCluster - 1) / kCluster; c++) {
      st_->table.erase(c);
      st_->zero[c] = true;
    }
    return Status::Ok();
  }
  Status Discard(uint64_t off, uint64_t len) override {
    for (uint64_t c = off / kCluster; c < (off + len + kCluster - 1) / kCluster; c++) {
      st_->table.erase(c);
      st_->zero.erase(c);
    }
    return Status::Ok();
  }
  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return Status::Ok(); }
  Status Close() override { return Status::Ok(); }
  std::optional<BackingRef> backing() const override { return st_->backing; }
  FormatInfo Info() override {
    FormatInfo info;
    info.format = "toy";
    info.virtual_size = st_->size;
    info.cluster_size = kCluster;
    return info;
  }

 private:
  std::unique_ptr<File> file_;
  ToyState* st_;
  bool ro_;
  uint64_t reserved_ = 0;
};

class ToyDriver final : public FormatDriver {
 public:
  const char* name() const override { return "toy"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits;
    return kTraits;
  }
  int Probe(std::span<const std::byte>, const std::string&) const override { return 0; }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    ToyState* st = &ToyStates()[ctx.path];
    return std::unique_ptr<ClusterMap>(new ToyMap(std::move(ctx.file), st, ctx.options.read_only));
  }
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    env_ = NewMemEnv();
    ToyStates().clear();
  }
  std::unique_ptr<Image> MakeToy(const std::string& path, uint64_t size,
                                 std::optional<BackingRef> backing = std::nullopt) {
    auto f = env_->Create(path);
    EXPECT_TRUE(f.ok());
    ToyStates()[path] = ToyState{{}, {}, backing, size, 0};
    OpenOptions o;
    o.env = env_.get();
    o.driver = &driver_;
    auto img = Image::Open(path, o);
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    return std::move(img).value();
  }
  std::unique_ptr<Image> MakeRaw(const std::string& path, const std::vector<std::byte>& content) {
    auto f = env_->Create(path);
    EXPECT_TRUE((*f)->PWrite(0, content).ok());
    OpenOptions o;
    o.env = env_.get();
    o.format = "raw";
    auto img = Image::Open(path, o);
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    return std::move(img).value();
  }
  static std::vector<std::byte> Bytes(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::byte> v(n);
    for (auto& b : v) b = std::byte(rng() & 0xff);
    return v;
  }
  static std::vector<std::byte> ReadAll(Image& img) {
    std::vector<std::byte> v(img.size());
    EXPECT_TRUE(img.Read(0, v).ok());
    return v;
  }

  std::unique_ptr<Env> env_;
  ToyDriver driver_;
};

TEST_F(EngineTest, UnallocatedReadsZeroWithoutBacking) {
  auto img = MakeToy("/a", 10 * kCluster + 100);
  auto v = ReadAll(*img);
  EXPECT_EQ(v, std::vector<std::byte>(10 * kCluster + 100));
}

TEST_F(EngineTest, RandomUnalignedWritesMatchReference) {
  const uint64_t size = 64 * kCluster + 1234;  // odd size: last cluster partial
  auto img = MakeToy("/a", size);
  std::vector<std::byte> ref(size);
  std::mt19937_64 rng(7);
  for (int i = 0; i < 300; i++) {
    uint64_t off = rng() % size;
    uint64_t len = 1 + rng() % std::min<uint64_t>(size - off, 3 * kCluster);
    auto data = Bytes(len, i);
    ASSERT_TRUE(img->Write(off, data).ok());
    std::memcpy(ref.data() + off, data.data(), len);
  }
  EXPECT_EQ(ReadAll(*img), ref);
}

TEST_F(EngineTest, PartialWriteCopiesBackingHeadAndTail) {
  auto base_content = Bytes(16 * kCluster, 99);
  auto base = MakeRaw("/base.raw", base_content);
  base.reset();
  auto top = MakeToy("/top", 16 * kCluster, BackingRef{"base.raw", "raw"});
  ASSERT_NE(top->backing(), nullptr);
  auto data = Bytes(100, 1);
  ASSERT_TRUE(top->Write(kCluster + 10, data).ok());
  std::vector<std::byte> expect = base_content;
  std::memcpy(expect.data() + kCluster + 10, data.data(), 100);
  EXPECT_EQ(ReadAll(*top), expect);
  // The allocated cluster holds the whole COW'd cluster, not just the written bytes.
  EXPECT_EQ(ToyStates()["/top"].table.size(), 1u);
}

TEST_F(EngineTest, BackingShorterThanImageReadsZerosPastItsEnd) {
  auto base_content = Bytes(2 * kCluster + 7, 5);
  MakeRaw("/base.raw", base_content).reset();
  auto top = MakeToy("/top", 4 * kCluster, BackingRef{"base.raw", "raw"});
  std::vector<std::byte> expect(4 * kCluster);
  std::memcpy(expect.data(), base_content.data(), base_content.size());
  EXPECT_EQ(ReadAll(*top), expect);
}

TEST_F(EngineTest, WriteZeroesUsesZeroClustersAndWritesPartialEdges) {
  auto img = MakeToy("/a", 8 * kCluster);
  auto data = Bytes(8 * kCluster, 3);
  ASSERT_TRUE(img->Write(0, data).ok());
  ASSERT_TRUE(img->WriteZeroes(kCluster / 2, 3 * kCluster, true).ok());
  std::memset(data.data() + kCluster / 2, 0, 3 * kCluster);
  EXPECT_EQ(ReadAll(*img), data);
  EXPECT_EQ(ToyStates()["/a"].zero.size(), 2u);  // clusters 1 and 2 whole
}

// NBD's fast zero (Image::WriteZeroesFast): zero clusters and written edges where the
// format has them; kUnsupported with nothing changed, edges included, where it has not.
TEST_F(EngineTest, FastZeroesOnlyWhereTheFormatMarksClustersZero) {
  auto img = MakeToy("/a", 8 * kCluster);
  auto data = Bytes(8 * kCluster, 5);
  ASSERT_TRUE(img->Write(0, data).ok());
  ASSERT_TRUE(img->WriteZeroesFast(kCluster / 2, 3 * kCluster, true).ok());
  std::memset(data.data() + kCluster / 2, 0, 3 * kCluster);
  EXPECT_EQ(ReadAll(*img), data);
  EXPECT_EQ(ToyStates()["/a"].zero.size(), 2u);

  auto slow = MakeToy("/b", 8 * kCluster);
  ToyStates()["/b"].no_zero_clusters = true;
  auto before = Bytes(8 * kCluster, 6);
  ASSERT_TRUE(slow->Write(0, before).ok());
  Status st = slow->WriteZeroesFast(kCluster / 2, 3 * kCluster, false);
  EXPECT_EQ(st.kind(), ErrorKind::kUnsupported);
  EXPECT_EQ(st.err(), ENOTSUP);
  EXPECT_EQ(ReadAll(*slow), before) << "a refused fast zero changed data";
  ASSERT_TRUE(slow->WriteZeroes(kCluster / 2, 3 * kCluster, false).ok());  // the slow way still works
  std::memset(before.data() + kCluster / 2, 0, 3 * kCluster);
  EXPECT_EQ(ReadAll(*slow), before);
}

TEST_F(EngineTest, ZeroingUnallocatedSpaceAllocatesNothing) {
  auto img = MakeToy("/a", 8 * kCluster);
  ASSERT_TRUE(img->WriteZeroes(100, 5000, false).ok());
  EXPECT_TRUE(ToyStates()["/a"].table.empty());
}

// The copy pipeline (include/vimgfs/copy.h) on toy images.
TEST_F(EngineTest, CopyLeavesZerosOfAFreshTargetUnwrittenAndCopiesTheRest) {
  auto src = MakeToy("/src", 32 * kCluster);
  auto data = Bytes(3 * kCluster, 11);
  ASSERT_TRUE(src->Write(5 * kCluster, data).ok());
  ASSERT_TRUE(src->Write(20 * kCluster, std::vector<std::byte>(kCluster)).ok());  // zero data
  auto dst = MakeToy("/dst", 32 * kCluster);
  ImageSource source(src.get());
  ASSERT_TRUE(CopyToImage(source, *dst, CopyOptions{}).ok());
  EXPECT_EQ(ReadAll(*dst), ReadAll(*src));
  // Only the three clusters of data were allocated: the zero data was found and skipped.
  EXPECT_EQ(ToyStates()["/dst"].table.size(), 3u);
}

TEST_F(EngineTest, CopyZeroesWhatTheSourceHasAsZerosInATargetThatIsNotFresh) {
  auto src = MakeToy("/src", 8 * kCluster);
  ASSERT_TRUE(src->WriteZeroes(2 * kCluster, 2 * kCluster, false).ok());  // zero clusters 2, 3
  auto dst = MakeToy("/dst", 8 * kCluster);
  ASSERT_TRUE(dst->Write(0, Bytes(8 * kCluster, 12)).ok());
  ImageSource source(src.get());
  CopyOptions o;
  o.target_fresh = false;
  o.min_sparse = 0;
  ASSERT_TRUE(CopyToImage(source, *dst, o).ok());
  // Every run of the source is written: its unallocated parts read zeros too.
  EXPECT_EQ(ReadAll(*dst), std::vector<std::byte>(8 * kCluster));
}

// A source that offers only some runs of an image (as commit offers the layers above the base).
class SomeRuns final : public CopySource {
 public:
  SomeRuns(Image& img, std::vector<BlockStatus> runs) : img_(img), runs_(std::move(runs)) {}
  uint64_t size() const override { return img_.size(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override { return img_.Read(off, buf); }
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool) override {
    std::vector<BlockStatus> out;
    for (BlockStatus r : runs_)
      if (r.offset >= off && r.offset + r.length <= off + len) out.push_back(r);
    return out;
  }

 private:
  Image& img_;
  std::vector<BlockStatus> runs_;
};

TEST_F(EngineTest, CopyWritesOnlyTheRunsTheSourceOffers) {
  auto src = MakeToy("/src", 8 * kCluster);
  ASSERT_TRUE(src->Write(0, Bytes(8 * kCluster, 13)).ok());
  auto dst = MakeToy("/dst", 8 * kCluster);
  BlockStatus run;
  run.offset = 3 * kCluster;
  run.length = 2 * kCluster;
  run.present = run.data = true;
  SomeRuns source(*src, {run});
  CopyOptions o;
  o.target_fresh = false;
  ASSERT_TRUE(CopyToImage(source, *dst, o).ok());
  auto got = ReadAll(*dst), want = std::vector<std::byte>(8 * kCluster), all = ReadAll(*src);
  std::memcpy(want.data() + 3 * kCluster, all.data() + 3 * kCluster, 2 * kCluster);
  EXPECT_EQ(got, want);
  EXPECT_EQ(ToyStates()["/dst"].table.size(), 2u);
}

// A source whose host medium fails in places: reads touching a bad sector fail with EIO,
// and so does the block status of ranges touching a bad status sector.
class FailingSectors final : public CopySource {
 public:
  FailingSectors(Image& img, std::vector<uint64_t> bad_reads, std::vector<uint64_t> bad_status)
      : img_(img), bad_reads_(std::move(bad_reads)), bad_status_(std::move(bad_status)) {}
  uint64_t size() const override { return img_.size(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    for (uint64_t b : bad_reads_)
      if (b < off + buf.size() && off < b + 512) return Status::Io("medium error");
    return img_.Read(off, buf);
  }
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool) override {
    for (uint64_t b : bad_status_)
      if (b < off + len && off < b + 512) return Status::Io("medium error");
    return img_.Map(off, len);
  }

 private:
  Image& img_;
  std::vector<uint64_t> bad_reads_, bad_status_;
};

TEST_F(EngineTest, SalvagingSourceZeroesOnlyTheSectorsThatFail) {
  auto src = MakeToy("/src", 8 * kCluster);
  const auto data = Bytes(8 * kCluster, 21);
  ASSERT_TRUE(src->Write(0, data).ok());
  const uint64_t bad_read = 2 * kCluster + 1024, bad_status = 5 * kCluster + 512;
  FailingSectors failing(*src, {bad_read}, {bad_status});
  std::vector<std::string> warnings;
  SalvagingSource salvaging(failing, [&](const std::string& w) { warnings.push_back(w); });
  auto dst = MakeToy("/dst", 8 * kCluster);
  CopyOptions o;
  // Without salvaging the copy fails; with it, one sector reads as zeros and the sector
  // whose status failed is read as data.
  EXPECT_FALSE(CopyToImage(failing, *dst, o).ok());
  ASSERT_TRUE(CopyToImage(salvaging, *dst, o).ok());
  auto want = data;
  std::memset(want.data() + bad_read, 0, 512);
  EXPECT_EQ(ReadAll(*dst), want);
  std::sort(warnings.begin(), warnings.end());  // the reader maps and reads in its own order
  EXPECT_EQ(warnings,
            (std::vector<std::string>{
                fmt::format("error while reading block status at offset {}: Input/output error", bad_status),
                fmt::format("error while reading offset {}: Input/output error", bad_read),
            }));
}

TEST_F(EngineTest, CopyUnlessSameAsWritesOnlyTheClustersThatDiffer) {
  // Source and reference agree except in clusters 1 and 6 (and the reference ends early:
  // past its end it reads zeros, which the source's cluster 7 also is).
  auto content = Bytes(8 * kCluster, 14);
  std::memset(content.data() + 7 * kCluster, 0, kCluster);
  auto src = MakeToy("/src", 8 * kCluster);
  ASSERT_TRUE(src->Write(0, content).ok());
  auto changed = content;
  changed[kCluster + 5] ^= std::byte{1};
  changed[6 * kCluster] ^= std::byte{0x80};
  changed.resize(7 * kCluster);
  auto ref = MakeRaw("/ref.raw", changed);
  auto dst = MakeToy("/dst", 8 * kCluster);
  ImageSource source(src.get()), reference(ref.get());
  CopyOptions o;
  o.target_fresh = false;
  o.min_sparse = 0;
  o.unless_same_as = &reference;
  ASSERT_TRUE(CopyToImage(source, *dst, o).ok());
  EXPECT_EQ(ToyStates()["/dst"].table.size(), 2u);
  EXPECT_TRUE(ToyStates()["/dst"].table.count(1));
  EXPECT_TRUE(ToyStates()["/dst"].table.count(6));
  auto got = ReadAll(*dst);
  EXPECT_EQ(std::memcmp(got.data() + kCluster, content.data() + kCluster, kCluster), 0);
  EXPECT_EQ(std::memcmp(got.data() + 6 * kCluster, content.data() + 6 * kCluster, kCluster), 0);
}

TEST_F(EngineTest, CopyReportsTheProgressFigureUpToAHundred) {
  auto src = MakeToy("/src", 64 * kCluster);
  ASSERT_TRUE(src->Write(0, Bytes(64 * kCluster, 15)).ok());
  auto dst = MakeToy("/dst", 64 * kCluster);
  ImageSource source(src.get());
  std::vector<double> seen;
  CopyOptions o;
  o.progress = [&](double p) { seen.push_back(p); };
  ASSERT_TRUE(CopyToImage(source, *dst, o).ok());
  ASSERT_FALSE(seen.empty());
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
  EXPECT_DOUBLE_EQ(seen.back(), 100.0);
}

TEST_F(EngineTest, RequestsPastTheEndFail) {
  auto img = MakeToy("/a", 4 * kCluster);
  std::vector<std::byte> b(10);
  EXPECT_EQ(img->Read(4 * kCluster - 5, b).kind(), ErrorKind::kOutOfRange);
  EXPECT_EQ(img->Write(4 * kCluster, b).kind(), ErrorKind::kOutOfRange);
  EXPECT_EQ(img->Write(UINT64_MAX - 3, b).kind(), ErrorKind::kOutOfRange);
}

TEST_F(EngineTest, ConcurrentWritersToOverlappingClustersMatchReference) {
  const uint64_t size = 32 * kCluster;
  auto img = MakeToy("/a", size);
  // Each thread owns interleaved 1 KiB slots, so clusters are shared between threads
  // but bytes are not: the result is deterministic.
  const uint64_t slot = 1024;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      for (uint64_t s = t; s < size / slot; s += 4) {
        std::vector<std::byte> d(slot, std::byte(s & 0xff));
        ASSERT_TRUE(img->Write(s * slot, d).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  auto v = ReadAll(*img);
  for (uint64_t s = 0; s < size / slot; s++)
    ASSERT_EQ(v[s * slot + slot / 2], std::byte(s & 0xff)) << "slot " << s;
  EXPECT_EQ(ToyStates()["/a"].table.size(), 32u);
}

TEST_F(EngineTest, MapMergesRunsAndLooksThroughBacking) {
  MakeRaw("/base.raw", Bytes(8 * kCluster, 1)).reset();
  auto top = MakeToy("/top", 8 * kCluster, BackingRef{"base.raw", "raw"});
  ASSERT_TRUE(top->Write(0, Bytes(2 * kCluster, 2)).ok());
  auto m = top->Map(0, 8 * kCluster);
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(m->size(), 2u);
  EXPECT_EQ((*m)[0].depth, 0);
  EXPECT_EQ((*m)[0].length, 2 * kCluster);
  EXPECT_TRUE((*m)[0].data);
  EXPECT_EQ((*m)[1].depth, 1);
  EXPECT_EQ((*m)[1].offset, 2 * kCluster);
}

TEST_F(EngineTest, BackingLoopIsRefused) {
  // An image naming itself as its backing file (the shortest loop).
  auto f = env_->Create("/a");
  ToyStates()["/a"] = ToyState{{}, {}, BackingRef{"a", ""}, kCluster, 0};
  OpenOptions o;
  o.env = env_.get();
  o.driver = &driver_;
  auto img = Image::Open("/a", o);
  ASSERT_FALSE(img.ok());
  EXPECT_EQ(img.error().message(), "Backing file '/a' creates an infinite loop.");
}

// --untrusted follows a backing name only inside the image's folder.
TEST_F(EngineTest, UntrustedRefusesBackingFileOutsideItsFolder) {
  MakeRaw("/base.raw", Bytes(kCluster, 1)).reset();
  MakeRaw("/img/beside.raw", Bytes(kCluster, 2)).reset();
  auto f = env_->Create("/img/top");
  OpenOptions o;
  o.env = env_.get();
  o.driver = &driver_;
  o.untrusted = true;
  for (const char* outside : {"../base.raw", "/base.raw"}) {
    ToyStates()["/img/top"] = ToyState{{}, {}, BackingRef{outside, "raw"}, kCluster, 0};
    auto img = Image::Open("/img/top", o);
    ASSERT_FALSE(img.ok()) << outside;
    EXPECT_NE(img.error().message().find("untrusted"), std::string::npos) << img.error().message();
  }
  ToyStates()["/img/top"] = ToyState{{}, {}, BackingRef{"beside.raw", "raw"}, kCluster, 0};
  auto img = Image::Open("/img/top", o);
  ASSERT_TRUE(img.ok()) << img.error().message();
  EXPECT_EQ((*img)->backing_path(), "/img/beside.raw");
}

TEST_F(EngineTest, ReadOnlyImageRefusesWrites) {
  MakeRaw("/r.raw", Bytes(kCluster, 1)).reset();
  OpenOptions o;
  o.env = env_.get();
  o.read_only = true;
  auto img = Image::Open("/r.raw", o);
  ASSERT_TRUE(img.ok());
  std::vector<std::byte> b(10);
  EXPECT_EQ((*img)->Write(0, b).kind(), ErrorKind::kReadOnly);
}

TEST_F(EngineTest, FailedDataWriteReachesCallerAndCommitsNothing) {
  auto base = env_.get();
  test::FaultEnv fenv(base);
  auto f = base->Create("/a");
  ToyStates()["/a"] = ToyState{{}, {}, std::nullopt, 8 * kCluster, 0};
  OpenOptions o;
  o.env = &fenv;
  o.driver = &driver_;
  auto img = Image::Open("/a", o);
  ASSERT_TRUE(img.ok());
  auto first = Bytes(kCluster, 1);
  ASSERT_TRUE((*img)->Write(0, first).ok());
  for (int err : {EIO, ENOSPC}) {
    fenv.SetRule({IoTag::kCowData, 1, err});
    Status s = (*img)->Write(kCluster + 1, Bytes(10, 2));
    EXPECT_EQ(s.err(), err);
    EXPECT_EQ(s.kind(), err == ENOSPC ? ErrorKind::kNoSpace : ErrorKind::kIo);
    EXPECT_TRUE(fenv.triggered());
  }
  fenv.ClearRule();
  EXPECT_EQ(ToyStates()["/a"].commits, 1);  // only the successful write linked anything
  std::vector<std::byte> back(2 * kCluster);
  ASSERT_TRUE((*img)->Read(0, back).ok());
  EXPECT_TRUE(std::equal(first.begin(), first.end(), back.begin()));
  EXPECT_EQ(back[kCluster + 1], std::byte{0});
}

TEST(ParseSizeTest, QemuSuffixes) {
  EXPECT_EQ(*ParseSize("512"), 512u);
  EXPECT_EQ(*ParseSize("64k"), 65536u);
  EXPECT_EQ(*ParseSize("1G"), 1ull << 30);
  EXPECT_EQ(*ParseSize("1.5M"), 3ull << 19);
  EXPECT_EQ(*ParseSize("16T"), 16ull << 40);
  EXPECT_FALSE(ParseSize("12Q").ok());
  EXPECT_FALSE(ParseSize("").ok());
  EXPECT_FALSE(ParseSize("-1").ok());
  // qemu_strtosz: a fraction is fine when it adds nothing or has a unit above bytes.
  EXPECT_EQ(*ParseSize("1024.0"), 1024u);
  EXPECT_EQ(*ParseSize("1024.0b"), 1024u);
  EXPECT_EQ(*ParseSize("0.5k"), 512u);
  EXPECT_EQ(*ParseSize("1.k"), 1024u);
  EXPECT_EQ(*ParseSize("0x200"), 512u);
  EXPECT_EQ(*ParseSize("1.0000000001k"), 1024u);  // a part of a byte is dropped
  EXPECT_EQ(*ParseSize("1.0005k"), 1025u);        // half a byte rounds up
  EXPECT_FALSE(ParseSize("1.5").ok());
  EXPECT_FALSE(ParseSize("1.5b").ok());
  EXPECT_FALSE(ParseSize("1e3k").ok());
  EXPECT_FALSE(ParseSize("1kB").ok());
  EXPECT_FALSE(ParseSize("1kilobyte").ok());
  EXPECT_EQ(*ParseSize("15E"), 15ull << 60);
  EXPECT_EQ(ParseSize("16E").error().kind(), ErrorKind::kOutOfRange);
  EXPECT_EQ(ParseSize("18446744073709551616").error().kind(), ErrorKind::kOutOfRange);
  EXPECT_EQ(ParseSize("18446744073709551616k").error().kind(), ErrorKind::kInvalidArgument);
}

TEST(CodecTest, RoundTripsEveryCodec) {
  std::vector<std::byte> in(65536);
  for (size_t i = 0; i < in.size(); i++) in[i] = std::byte((i / 100) & 0xff);
  for (Codec c : {Codec::kDeflateRaw, Codec::kZlib, Codec::kZstd}) {
    auto z = Compress(c, in, in.size());
    ASSERT_TRUE(z.ok());
    ASSERT_FALSE(z->empty());
    std::vector<std::byte> out(in.size());
    ASSERT_TRUE(Decompress(c, *z, out).ok());
    EXPECT_EQ(out, in);
    // Garbage must fail cleanly.
    std::vector<std::byte> junk(100, std::byte{0x5a});
    EXPECT_FALSE(Decompress(c, junk, out).ok());
  }
}

// cloop's blocks must be whole zlib streams (qemu inflates with Z_FINISH and wants
// Z_STREAM_END at exactly the block size); qcow2 and VMDK units may go on past the unit.
TEST(CodecTest, StreamMustEndAtTheUnit) {
  std::vector<std::byte> in(8192);
  for (size_t i = 0; i < in.size(); i++) in[i] = std::byte((i * 7 / 300) & 0xff);
  auto z = Compress(Codec::kZlib, in, in.size());
  ASSERT_TRUE(z.ok());
  std::vector<std::byte> half(4096), whole(8192);
  EXPECT_TRUE(Decompress(Codec::kZlib, *z, half).ok()) << "lenient: the first 4096 bytes";
  EXPECT_FALSE(Decompress(Codec::kZlib, *z, half, true).ok()) << "the stream goes on past the unit";
  EXPECT_TRUE(Decompress(Codec::kZlib, *z, whole, true).ok());
  std::vector<std::byte> trailing = *z;
  trailing.insert(trailing.end(), 16, std::byte{0xee});
  EXPECT_TRUE(Decompress(Codec::kZlib, trailing, whole, true).ok()) << "bytes after the stream are ignored";
  std::vector<std::byte> no_check(z->begin(), z->end() - 4);
  EXPECT_TRUE(Decompress(Codec::kZlib, no_check, whole).ok()) << "lenient: all bytes produced";
  EXPECT_FALSE(Decompress(Codec::kZlib, no_check, whole, true).ok()) << "no end: no adler32";
  std::vector<std::byte> bad_check = *z;
  bad_check.back() ^= std::byte{1};
  EXPECT_FALSE(Decompress(Codec::kZlib, bad_check, whole, true).ok());
  std::vector<std::byte> bigger(8192 + 512);
  EXPECT_FALSE(Decompress(Codec::kZlib, *z, bigger, true).ok()) << "ends short of the unit";
}

}  // namespace
}  // namespace vimgfs

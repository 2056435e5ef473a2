// TableCache write-back ordering: a cache that depends on another writes only after the
// other was written and synced; DependsOnFlush syncs first; eviction honours both.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/table_cache.h"

namespace vimgfs {
namespace {

// Records "W<tag>@<offset>" for writes and "S" for syncs.
class RecordingFile final : public File {
 public:
  std::vector<std::string> log;
  std::vector<std::byte> data = std::vector<std::byte>(1 << 20);
  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    std::copy_n(data.begin() + off, buf.size(), buf.begin());
    return Status::Ok();
  }
  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) override {
    log.push_back("W" + std::to_string(static_cast<int>(tag)) + "@" + std::to_string(off));
    std::copy(buf.begin(), buf.end(), data.begin() + off);
    return Status::Ok();
  }
  Status Sync(bool) override {
    log.push_back("S");
    return Status::Ok();
  }
  Result<uint64_t> Size() override { return data.size(); }
  Status Truncate(uint64_t) override { return Status::Ok(); }
  Status PunchHole(uint64_t, uint64_t) override { return Status::Ok(); }
  Status Allocate(uint64_t, uint64_t) override { return Status::Ok(); }
  Result<HostExtent> ProbeExtent(uint64_t off) override { return HostExtent{true, data.size() - off}; }
  Result<uint64_t> AllocatedSize() override { return data.size(); }
  const std::string& path() const override { return path_; }
  bool writable() const override { return true; }

 private:
  std::string path_ = "rec";
};

std::string W(IoTag t, uint64_t off) {
  return "W" + std::to_string(static_cast<int>(t)) + "@" + std::to_string(off);
}

TEST(TableCacheTest, DependencyFlushesFirstCacheBeforeWriting) {
  RecordingFile f;
  TableCache refcounts(&f, 512, 8, IoTag::kRefBlock);
  TableCache l2(&f, 512, 8, IoTag::kL2);
  {
    auto r = refcounts.GetEmpty(4096);
    ASSERT_TRUE(r.ok());
    auto t = l2.GetEmpty(8192);
    ASSERT_TRUE(t.ok());
  }
  ASSERT_TRUE(l2.SetDependency(&refcounts).ok());
  ASSERT_TRUE(l2.Flush().ok());
  std::vector<std::string> want = {W(IoTag::kRefBlock, 4096), "S", W(IoTag::kL2, 8192), "S"};
  EXPECT_EQ(f.log, want);
}

TEST(TableCacheTest, DependsOnFlushSyncsDataBeforeTable) {
  RecordingFile f;
  TableCache l2(&f, 512, 8, IoTag::kL2);
  {
    auto t = l2.GetEmpty(0);
    ASSERT_TRUE(t.ok());
  }
  l2.DependsOnFlush();
  ASSERT_TRUE(l2.WriteBack().ok());
  std::vector<std::string> want = {"S", W(IoTag::kL2, 0)};
  EXPECT_EQ(f.log, want);
}

TEST(TableCacheTest, EvictionWritesDirtyTableAfterItsDependency) {
  RecordingFile f;
  TableCache refcounts(&f, 512, 4, IoTag::kRefBlock);
  TableCache l2(&f, 512, 4, IoTag::kL2);
  { auto r = refcounts.GetEmpty(0); }
  ASSERT_TRUE(l2.SetDependency(&refcounts).ok());
  for (uint64_t i = 1; i <= 5; i++) {  // the 5th evicts the first (dirty) L2 table
    auto t = l2.GetEmpty(i * 512);
    ASSERT_TRUE(t.ok());
  }
  ASSERT_GE(f.log.size(), 3u);
  EXPECT_EQ(f.log[0], W(IoTag::kRefBlock, 0));
  EXPECT_EQ(f.log[1], "S");
  EXPECT_EQ(f.log[2], W(IoTag::kL2, 512));
}

TEST(TableCacheTest, PinnedTablesAreNotEvictedAndContentSurvives) {
  RecordingFile f;
  TableCache c(&f, 512, 4, IoTag::kL2);
  auto pinned = c.GetEmpty(0);
  ASSERT_TRUE(pinned.ok());
  pinned->data()[7] = std::byte{42};
  for (uint64_t i = 1; i <= 10; i++) ASSERT_TRUE(c.GetEmpty(i * 512).ok());
  EXPECT_EQ(pinned->data()[7], std::byte{42});
  pinned->Release();
  ASSERT_TRUE(c.Flush().ok());
  auto again = c.Get(0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data()[7], std::byte{42});
}

TEST(TableCacheTest, PeekFindsOnlyCachedTablesAndReadsNothing) {
  RecordingFile f;
  f.data[4096] = std::byte{0x5a};
  TableCache cache(&f, 512, 4, IoTag::kL2);
  EXPECT_FALSE(cache.Peek(4096));  // not cached: no read either
  ASSERT_TRUE(cache.Get(4096).ok());
  TableRef p = cache.Peek(4096);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.data()[0], std::byte{0x5a});
  EXPECT_EQ(p.offset(), 4096u);
  EXPECT_TRUE(f.log.empty());
}

TEST(TableCacheTest, PeekPinsAndGivesASecondChanceAtEviction) {
  RecordingFile f;
  TableCache cache(&f, 512, 4, IoTag::kL2);
  for (uint64_t off : {4096, 8192, 12288, 16384}) ASSERT_TRUE(cache.Get(off).ok());
  // 4096 is the least recently used. While peeked it is pinned: a new table evicts another.
  {
    TableRef pinned = cache.Peek(4096);
    ASSERT_TRUE(cache.Get(20480).ok());
    EXPECT_TRUE(cache.Peek(4096));
    EXPECT_FALSE(cache.Peek(8192));  // the next least recently used went instead
  }
  // Unpinned but peeked since eviction last passed it: passed over once more.
  ASSERT_TRUE(cache.Get(24576).ok());
  EXPECT_TRUE(cache.Peek(4096));
  EXPECT_FALSE(cache.Peek(12288));
  // Peeked again just now, but when every candidate was peeked the second pass still evicts.
  for (uint64_t off : {16384, 20480, 24576}) (void)cache.Peek(off);
  ASSERT_TRUE(cache.Get(28672).ok());
  int cached = 0;
  for (uint64_t off : {4096, 16384, 20480, 24576, 28672}) cached += cache.Peek(off) ? 1 : 0;
  EXPECT_EQ(cached, 4);
}

}  // namespace
}  // namespace vimgfs

// NewDirectIoEnv (qemu's cache.direct=on): aligned requests go around the host's page
// cache, the rest through it, and the file reads back the same either way: bytes, zeros
// past the end, and a size that is exactly what was written.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "support/test_util.h"
#include "vimgfs/env.h"

namespace vimgfs {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class DirectIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = test::DirectIoUnavailableReason(dir_.path()); !why.empty()) GTEST_SKIP() << why;
    path_ = dir_.File("f.img");
    auto f = Env::DefaultDirect()->Create(path_, true);
    ASSERT_TRUE(f.ok()) << f.error().ToString();
    file_ = std::move(*f);
  }
  // Writes through the direct file and into the model.
  void Write(uint64_t off, const std::vector<uint8_t>& data, size_t misalign = 0) {
    std::vector<std::byte> buf(data.size() + misalign);
    std::memcpy(buf.data() + misalign, data.data(), data.size());
    ASSERT_TRUE(file_->PWrite(off, std::span(buf).subspan(misalign)).ok());
    if (model_.size() < off + data.size()) model_.resize(off + data.size());
    std::memcpy(model_.data() + off, data.data(), data.size());
  }
  std::vector<uint8_t> Read(File& f, uint64_t off, size_t n, size_t misalign = 0) {
    std::vector<std::byte> buf(n + misalign);
    EXPECT_TRUE(f.PRead(off, std::span(buf).subspan(misalign)).ok());
    std::vector<uint8_t> out(n);
    std::memcpy(out.data(), buf.data() + misalign, n);
    return out;
  }
  std::vector<uint8_t> Model(uint64_t off, size_t n) const {
    std::vector<uint8_t> out(n, 0);
    for (size_t i = 0; i < n && off + i < model_.size(); i++) out[i] = model_[off + i];
    return out;
  }

  test::TempDir dir_;
  std::string path_;
  std::unique_ptr<File> file_;
  std::vector<uint8_t> model_;
};

TEST_F(DirectIoTest, AlignedAndUnalignedRequestsReadBackAlikeEitherWay) {
  Write(0, test::RandomBytes(kMiB, 1));                     // aligned, aligned buffer
  Write(kMiB, test::RandomBytes(3 * kMiB, 2), 8);           // aligned, buffer off by 8: bounced
  Write(4096 * 3 + 7, test::RandomBytes(100, 3));           // inside a block: through the cache
  Write(5 * kMiB - 512, test::RandomBytes(4096 + 512, 4));  // 512-aligned, maybe not 4 KiB
  Write(6 * kMiB + 5, test::RandomBytes(123, 5));           // an unaligned tail past the end
  ASSERT_TRUE(file_->Sync().ok());

  auto size = file_->Size();
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, 6 * kMiB + 128) << "the size is what was written, not rounded up";
  auto buffered = Env::Default()->Open(path_, OpenMode::kReadOnly);
  ASSERT_TRUE(buffered.ok());
  for (File* f : {file_.get(), buffered->get()}) {
    SCOPED_TRACE(f == file_.get() ? "direct" : "buffered");
    EXPECT_EQ(Read(*f, 0, 6 * kMiB + 128), Model(0, 6 * kMiB + 128));
    EXPECT_EQ(Read(*f, kMiB, 2 * kMiB, 3), Model(kMiB, 2 * kMiB));  // into an unaligned buffer
    EXPECT_EQ(Read(*f, 4096 * 3, 4096), Model(4096 * 3, 4096));
    // Past the end: the tail's bytes, then zeros.
    EXPECT_EQ(Read(*f, 6 * kMiB, 2 * 4096), Model(6 * kMiB, 2 * 4096));
    EXPECT_EQ(Read(*f, 7 * kMiB, 4096), std::vector<uint8_t>(4096, 0));
  }
}

// A write through the page cache and a direct read of the same block, and the reverse,
// see each other: the kernel writes dirty pages back before a direct read and drops
// cached ones after a direct write.
TEST_F(DirectIoTest, CachedAndDirectWritesOfOneBlockStayCoherent) {
  Write(0, test::RandomBytes(64 * 1024, 6));
  std::vector<uint8_t> before = Read(*file_, 0, 4096);  // now cached, maybe
  auto buffered = Env::Default()->Open(path_, OpenMode::kReadWrite);
  ASSERT_TRUE(buffered.ok());
  EXPECT_EQ(Read(**buffered, 0, 4096), before);
  Write(4096, test::RandomBytes(4096, 7));  // direct, over pages the buffered read cached
  EXPECT_EQ(Read(**buffered, 4096, 4096), Model(4096, 4096));
  Write(8192 + 10, test::RandomBytes(50, 8));              // through the cache, left dirty
  EXPECT_EQ(Read(*file_, 8192, 4096), Model(8192, 4096));  // a direct read of that block
}

// A write of a few bytes (through the cache) racing direct writes of other bytes of the
// same page, or of the whole block: whatever order they land in, the bytes only the direct
// writes cover hold the last direct write's, never the page's older bytes written back from
// the cache.
TEST_F(DirectIoTest, APartialWriteNeverPutsOldBytesBackOverADirectOne) {
  constexpr size_t kPage = 4096;
  constexpr int kPages = 8, kRounds = 300;
  // Direct writes of a whole page, and of its second KiB alone (direct where the file
  // system takes 512- or 1024-byte alignment, as ext4 on most disks does).
  for (auto [direct_off, direct_len] : {std::pair<size_t, size_t>{0, kPage}, {1024, 1024}}) {
    SCOPED_TRACE("direct writes of " + std::to_string(direct_len) + " bytes at page offset " +
                 std::to_string(direct_off));
    Write(0, std::vector<uint8_t>(kPages * kPage, 0xee));
    std::atomic<bool> failed{false};
    std::thread direct([&] {
      std::vector<std::byte> buf(direct_len);
      for (int r = 1; r <= kRounds; r++)
        for (int p = 0; p < kPages; p++) {
          std::memset(buf.data(), r & 0xff, buf.size());
          if (!file_->PWrite(p * kPage + direct_off, buf).ok()) failed = true;
        }
    });
    std::thread partial([&] {
      std::vector<std::byte> buf(100, std::byte{0x01});
      for (int r = 0; r < kRounds; r++)
        for (int p = 0; p < kPages; p++)
          if (!file_->PWrite(p * kPage + 7, buf).ok()) failed = true;
    });
    direct.join();
    partial.join();
    ASSERT_FALSE(failed);
    ASSERT_TRUE(file_->Sync().ok());
    auto buffered = Env::Default()->Open(path_, OpenMode::kReadOnly);
    ASSERT_TRUE(buffered.ok());
    std::vector<uint8_t> all = Read(**buffered, 0, kPages * kPage);
    for (int p = 0; p < kPages; p++)
      for (size_t i = direct_off; i < direct_off + direct_len; i++) {
        if (i >= 7 && i < 107) continue;  // written by both: either is right
        ASSERT_EQ(all[p * kPage + i], kRounds & 0xff) << "page " << p << " byte " << i;
      }
  }
}

// What it is for: a large aligned write leaves (almost) nothing in the host's cache.
TEST_F(DirectIoTest, AlignedWritesLeaveTheHostPageCacheAlone) {
  if (std::string why = test::PageCacheBypassUnavailableReason(dir_.path()); !why.empty())
    GTEST_SKIP() << why;
  Write(0, test::RandomBytes(16 * kMiB, 9), 1);
  Write(16 * kMiB + 3, test::RandomBytes(10, 10));  // one cached page
  ASSERT_TRUE(file_->Sync().ok());
  EXPECT_LE(test::CachedBytes(path_), 64 * 1024u);
  EXPECT_EQ(Read(*file_, 0, 16 * kMiB + 13), Model(0, 16 * kMiB + 13));
  EXPECT_LE(test::CachedBytes(path_), 64 * 1024u) << "direct reads filled the cache";
}

}  // namespace
}  // namespace vimgfs

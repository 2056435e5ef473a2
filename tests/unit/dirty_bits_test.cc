// DirtyBits: chunks allocated only where bits are set, ranges across word and chunk
// boundaries, resize masking, copies, and writers on several threads losing no bit.
#include "vimgfs/dirty_bits.h"

#include <gtest/gtest.h>

#include <bit>
#include <thread>
#include <vector>

namespace vimgfs {
namespace {

uint64_t CountSet(const DirtyBits& b) {
  uint64_t n = 0;
  b.ForEachSetWord([&](uint64_t, uint64_t v) { n += std::popcount(v); });
  return n;
}

TEST(DirtyBits, ASparseBitmapTakesMemoryOnlyWhereBitsAreSet) {
  DirtyBits b(uint64_t{1} << 32);  // a 2 TiB disk in 512-byte granules
  EXPECT_EQ(b.allocated_bytes(), 0u);
  EXPECT_EQ(b.word_count(), uint64_t{1} << 26);
  EXPECT_FALSE(b.AnyInWords(0, b.word_count()));
  b.Set(1000000000, 1000000000);
  EXPECT_EQ(b.allocated_bytes(), 8192u);
  EXPECT_TRUE(b.AnyInWords(1000000000 / 64, 1));
  EXPECT_FALSE(b.AnyInWords(0, 1000000000 / 64));
  EXPECT_EQ(b.Word(1000000000 / 64), uint64_t{1} << (1000000000 % 64));
  EXPECT_EQ(CountSet(b), 1u);
}

TEST(DirtyBits, RangesCrossWordsAndChunks) {
  DirtyBits b(200000);
  b.Set(60, 70);          // across a word
  b.Set(65530, 65545);    // across a chunk (65536 bits)
  b.Set(199990, 199999);  // to the last bit
  EXPECT_EQ(CountSet(b), 11u + 16u + 10u);
  EXPECT_EQ(b.Word(0), ~uint64_t{0} << 60);
  EXPECT_EQ(b.Word(1), (uint64_t{1} << 7) - 1);
  std::vector<uint64_t> seen;
  b.ForEachSetWord([&](uint64_t i, uint64_t) { seen.push_back(i); });
  EXPECT_EQ(seen, (std::vector<uint64_t>{0, 1, 1023, 1024, 3124}));
}

TEST(DirtyBits, ResizeDropsBitsPastTheEndAndCopiesAreDeep) {
  DirtyBits b(1000);
  b.Set(0, 999);
  DirtyBits copy = b;
  b.Resize(70);
  EXPECT_EQ(CountSet(b), 70u);
  EXPECT_EQ(b.Word(1), (uint64_t{1} << 6) - 1);
  b.Resize(5000);  // grown bits start clear
  EXPECT_EQ(CountSet(b), 70u);
  EXPECT_EQ(CountSet(copy), 1000u);
  copy.ClearAll();
  EXPECT_EQ(CountSet(copy), 0u);
  EXPECT_EQ(copy.size(), 1000u);
  DirtyBits moved = std::move(b);
  EXPECT_EQ(CountSet(moved), 70u);
  EXPECT_EQ(b.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
}

TEST(DirtyBits, WritersOnSeveralThreadsLoseNoBit) {
  for (int round = 0; round < 20; round++) {
    DirtyBits b(1 << 22);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) {
      threads.emplace_back([&b, t] {
        // Each thread sets every fourth bit of every fresh chunk: they race to install chunks.
        for (uint64_t bit = t; bit < (1u << 22); bit += 4 * 97) b.Set(bit, bit);
      });
    }
    for (auto& th : threads) th.join();
    uint64_t expected = 0;
    for (int t = 0; t < 4; t++) expected += ((1u << 22) - t + 4 * 97 - 1) / (4 * 97);
    ASSERT_EQ(CountSet(b), expected);
  }
}

}  // namespace
}  // namespace vimgfs

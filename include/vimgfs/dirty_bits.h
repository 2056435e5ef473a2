// The bits of a dirty bitmap: bit k is bit k % 64 of word k / 64. Held in chunks that are
// allocated when a bit in them is first set, so a bitmap of a large disk costs memory in
// proportion to what is dirty (a fresh 2 TiB bitmap of 512-byte granules takes nothing,
// where its dense form would take 512 MiB).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

namespace vimgfs {

class DirtyBits {
 public:
  DirtyBits() = default;
  explicit DirtyBits(uint64_t nbits);
  DirtyBits(const DirtyBits& other);
  DirtyBits& operator=(const DirtyBits& other);
  DirtyBits(DirtyBits&& other) noexcept;
  DirtyBits& operator=(DirtyBits&& other) noexcept;
  ~DirtyBits();

  uint64_t size() const { return nbits_; }  // bits
  uint64_t word_count() const { return (nbits_ + 63) / 64; }

  // Thread-safe among themselves: several writers may set bits at once.
  // Sets bits [first, last]; REQUIRES: first <= last < size().
  void Set(uint64_t first, uint64_t last);
  // Sets the bits of value in word `index`; REQUIRES: index < word_count().
  void OrWord(uint64_t index, uint64_t value);
  uint64_t Word(uint64_t index) const;
  // Whether any bit of words [first, first + count) is set (absent chunks: at once).
  bool AnyInWords(uint64_t first, uint64_t count) const;

  // Not thread-safe.
  void ClearAll();
  // Bits past the new end are dropped; new bits are clear.
  void Resize(uint64_t nbits);
  // Calls fn(index, value) for every word with a bit set, in order.
  void ForEachSetWord(const std::function<void(uint64_t, uint64_t)>& fn) const;
  // The memory the allocated chunks take.
  uint64_t allocated_bytes() const;

 private:
  static constexpr uint64_t kChunkWords = 1024;  // 8 KiB: 65536 bits
  using Chunk = std::atomic<uint64_t>;
  uint64_t chunk_count() const { return (word_count() + kChunkWords - 1) / kChunkWords; }
  Chunk* ChunkFor(uint64_t chunk);  // allocated on first use
  void Free();

  uint64_t nbits_ = 0;
  std::unique_ptr<std::atomic<Chunk*>[]> chunks_;
};

}  // namespace vimgfs

// DirtyBits: chunks allocated on first set, installed with a compare-and-swap so writers
// on several threads never lose a bit nor leak a chunk.
#include "vimgfs/dirty_bits.h"

#include <algorithm>

namespace vimgfs {

DirtyBits::DirtyBits(uint64_t nbits) : nbits_(nbits) {
  if (chunk_count()) chunks_ = std::make_unique<std::atomic<Chunk*>[]>(chunk_count());
}

DirtyBits::DirtyBits(const DirtyBits& other) : DirtyBits(other.nbits_) {
  other.ForEachSetWord([this](uint64_t i, uint64_t v) { OrWord(i, v); });
}

DirtyBits& DirtyBits::operator=(const DirtyBits& other) {
  if (this != &other) *this = DirtyBits(other);
  return *this;
}

DirtyBits::DirtyBits(DirtyBits&& other) noexcept : nbits_(other.nbits_), chunks_(std::move(other.chunks_)) {
  other.nbits_ = 0;
}

DirtyBits& DirtyBits::operator=(DirtyBits&& other) noexcept {
  if (this != &other) {
    Free();
    nbits_ = other.nbits_;
    chunks_ = std::move(other.chunks_);
    other.nbits_ = 0;
  }
  return *this;
}

DirtyBits::~DirtyBits() { Free(); }

void DirtyBits::Free() {
  if (!chunks_) return;
  for (uint64_t c = 0; c < chunk_count(); c++) delete[] chunks_[c].exchange(nullptr);
  chunks_.reset();
}

DirtyBits::Chunk* DirtyBits::ChunkFor(uint64_t chunk) {
  Chunk* have = chunks_[chunk].load(std::memory_order_acquire);
  if (have) return have;
  Chunk* fresh = new Chunk[kChunkWords]();
  if (chunks_[chunk].compare_exchange_strong(have, fresh, std::memory_order_acq_rel)) return fresh;
  delete[] fresh;  // another writer installed one first
  return have;
}

void DirtyBits::Set(uint64_t first, uint64_t last) {
  // One OR per word the range touches, with the mask of its bits in that word.
  for (uint64_t bit = first; bit <= last;) {
    const uint64_t lo = bit % 64;
    const uint64_t hi = std::min<uint64_t>(63, lo + (last - bit));
    const uint64_t mask =
        (hi == 63 ? ~uint64_t{0} : (uint64_t{1} << (hi + 1)) - 1) & ~((uint64_t{1} << lo) - 1);
    OrWord(bit / 64, mask);
    bit += hi - lo + 1;
  }
}

void DirtyBits::OrWord(uint64_t index, uint64_t value) {
  if (value == 0) return;
  ChunkFor(index / kChunkWords)[index % kChunkWords].fetch_or(value, std::memory_order_relaxed);
}

uint64_t DirtyBits::Word(uint64_t index) const {
  const Chunk* c = chunks_[index / kChunkWords].load(std::memory_order_acquire);
  return c ? c[index % kChunkWords].load(std::memory_order_relaxed) : 0;
}

bool DirtyBits::AnyInWords(uint64_t first, uint64_t count) const {
  for (uint64_t i = first; i < first + count && i < word_count();) {
    const Chunk* c = chunks_[i / kChunkWords].load(std::memory_order_acquire);
    const uint64_t chunk_end = (i / kChunkWords + 1) * kChunkWords;
    const uint64_t end = std::min({chunk_end, first + count, word_count()});
    if (c) {
      for (uint64_t j = i; j < end; j++)
        if (c[j % kChunkWords].load(std::memory_order_relaxed)) return true;
    }
    i = end;
  }
  return false;
}

void DirtyBits::ClearAll() { *this = DirtyBits(nbits_); }

void DirtyBits::Resize(uint64_t nbits) {
  DirtyBits next(nbits);
  ForEachSetWord([&](uint64_t i, uint64_t v) {
    if (i >= next.word_count()) return;
    if (i == next.word_count() - 1 && nbits % 64) v &= (uint64_t{1} << (nbits % 64)) - 1;
    next.OrWord(i, v);
  });
  *this = std::move(next);
}

void DirtyBits::ForEachSetWord(const std::function<void(uint64_t, uint64_t)>& fn) const {
  for (uint64_t c = 0; c < chunk_count(); c++) {
    const Chunk* chunk = chunks_[c].load(std::memory_order_acquire);
    if (!chunk) continue;
    const uint64_t end = std::min(kChunkWords, word_count() - c * kChunkWords);
    for (uint64_t j = 0; j < end; j++)
      if (uint64_t v = chunk[j].load(std::memory_order_relaxed)) fn(c * kChunkWords + j, v);
  }
}

uint64_t DirtyBits::allocated_bytes() const {
  uint64_t n = 0;
  for (uint64_t c = 0; c < chunk_count(); c++)
    if (chunks_[c].load(std::memory_order_relaxed)) n += kChunkWords * sizeof(uint64_t);
  return n;
}

}  // namespace vimgfs

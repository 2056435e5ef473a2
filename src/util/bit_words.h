// Bitmaps held in 64-bit words, bit k being bit k % 64 of word k / 64 (the order of qcow2's
// stored bitmaps read as little-endian words).
#pragma once

#include <algorithm>
#include <cstdint>

namespace vimgfs {

// Calls set(word_index, mask) once per word that bits [first, last] touch, with the mask
// of those bits in it.
template <typename SetFn>
void ForEachBitRangeWord(uint64_t first, uint64_t last, SetFn&& set) {
  for (uint64_t bit = first; bit <= last;) {
    const uint64_t lo = bit % 64;
    const uint64_t hi = std::min<uint64_t>(63, lo + (last - bit));
    const uint64_t mask =
        (hi == 63 ? ~uint64_t{0} : (uint64_t{1} << (hi + 1)) - 1) & ~((uint64_t{1} << lo) - 1);
    set(bit / 64, mask);
    bit += hi - lo + 1;
  }
}

}  // namespace vimgfs

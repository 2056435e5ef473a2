// Overflow-checked arithmetic and alignment for sizes read from untrusted images.
#pragma once

#include <cstdint>
#include <optional>

namespace vimgfs {

inline std::optional<uint64_t> CheckedAdd(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}
inline std::optional<uint64_t> CheckedMul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}
// REQUIRES: align is a power of two.
inline constexpr uint64_t AlignDown(uint64_t v, uint64_t align) { return v & ~(align - 1); }
inline constexpr std::optional<uint64_t> AlignUpChecked(uint64_t v, uint64_t align) {
  if (v > UINT64_MAX - (align - 1)) return std::nullopt;
  return (v + align - 1) & ~(align - 1);
}
inline constexpr uint64_t AlignUp(uint64_t v, uint64_t align) { return (v + align - 1) & ~(align - 1); }
inline constexpr bool IsAligned(uint64_t v, uint64_t align) { return (v & (align - 1)) == 0; }
inline constexpr bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }
inline constexpr uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

}  // namespace vimgfs

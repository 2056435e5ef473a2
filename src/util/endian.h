// Byte-order codecs. qcow2 is big-endian, VMDK and VDI little-endian; formats decode
// their structures through these, never with casts of raw buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace vimgfs {

template <typename T>
inline T LoadBE(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (sizeof(T) == 2)
    return static_cast<T>(__builtin_bswap16(static_cast<uint16_t>(v)));
  else if constexpr (sizeof(T) == 4)
    return static_cast<T>(__builtin_bswap32(static_cast<uint32_t>(v)));
  else if constexpr (sizeof(T) == 8)
    return static_cast<T>(__builtin_bswap64(static_cast<uint64_t>(v)));
  else
    return v;
}
template <typename T>
inline void StoreBE(void* p, T v) {
  if constexpr (sizeof(T) == 2)
    v = static_cast<T>(__builtin_bswap16(static_cast<uint16_t>(v)));
  else if constexpr (sizeof(T) == 4)
    v = static_cast<T>(__builtin_bswap32(static_cast<uint32_t>(v)));
  else if constexpr (sizeof(T) == 8)
    v = static_cast<T>(__builtin_bswap64(static_cast<uint64_t>(v)));
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline T LoadLE(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;  // x86-64 and every Debian target we build for is little-endian
}
template <typename T>
inline void StoreLE(void* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

inline uint64_t LoadBE64(const void* p) { return LoadBE<uint64_t>(p); }
inline uint32_t LoadBE32(const void* p) { return LoadBE<uint32_t>(p); }
inline uint16_t LoadBE16(const void* p) { return LoadBE<uint16_t>(p); }
inline void StoreBE64(void* p, uint64_t v) { StoreBE<uint64_t>(p, v); }
inline void StoreBE32(void* p, uint32_t v) { StoreBE<uint32_t>(p, v); }
inline void StoreBE16(void* p, uint16_t v) { StoreBE<uint16_t>(p, v); }
inline uint64_t LoadLE64(const void* p) { return LoadLE<uint64_t>(p); }
inline uint32_t LoadLE32(const void* p) { return LoadLE<uint32_t>(p); }
inline uint16_t LoadLE16(const void* p) { return LoadLE<uint16_t>(p); }
inline void StoreLE64(void* p, uint64_t v) { StoreLE<uint64_t>(p, v); }
inline void StoreLE32(void* p, uint32_t v) { StoreLE<uint32_t>(p, v); }
inline void StoreLE16(void* p, uint16_t v) { StoreLE<uint16_t>(p, v); }

}  // namespace vimgfs

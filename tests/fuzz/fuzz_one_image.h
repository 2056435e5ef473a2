#pragma once

#include <cstddef>
#include <cstdint>

namespace vimgfs {

// Opens data as an image of every format and exercises it; must never crash, hang or
// use unbounded memory, whatever the bytes.
void FuzzOneImage(const uint8_t* data, size_t size);

}  // namespace vimgfs

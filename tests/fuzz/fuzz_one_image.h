#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace vimgfs {

// Opens data as an image of every format and exercises it; must never crash, hang or
// use unbounded memory, whatever the bytes.
void FuzzOneImage(const uint8_t* data, size_t size);

// The same for one format only: `format` is forced (OpenOptions::format), so its parser
// sees the bytes even where its probe would reject them; "" probes. Returns false, doing
// nothing, when no driver of that name is registered (a format not built in yet).
bool FuzzOneImageAs(const uint8_t* data, size_t size, std::string_view format);

}  // namespace vimgfs

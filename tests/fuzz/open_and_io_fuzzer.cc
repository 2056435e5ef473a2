// libFuzzer entry point over FuzzOneImage (see fuzz_one_image.cc).
#include "fuzz/fuzz_one_image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  vimgfs::FuzzOneImage(data, size);
  return 0;
}

// One libFuzzer target per image format: this file is compiled once per format with
// -DVIMGFS_FUZZ_FORMAT="qcow2" (tests/fuzz/CMakeLists.txt). The format is forced, so the
// bytes reach its parser even when its probe would reject them. A format whose driver
// is not registered in this build makes every input a no-op (and says so once).
#include <cstdio>

#include "fuzz/fuzz_one_image.h"

#ifndef VIMGFS_FUZZ_FORMAT
#error "compile with -DVIMGFS_FUZZ_FORMAT=\"name\""
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool warned = false;
  if (!vimgfs::FuzzOneImageAs(data, size, VIMGFS_FUZZ_FORMAT) && !warned) {
    warned = true;
    std::fprintf(stderr, "format %s is not registered: nothing to fuzz\n", VIMGFS_FUZZ_FORMAT);
  }
  return 0;
}

// White-box access for tests: the format's map behind an Image, which front ends cannot
// reach (docs/ARCHITECTURE.md, "Layers").
#pragma once

#include "vimgfs/image.h"

namespace vimgfs {

struct ImageInternals {
  static ClusterMap& Map(Image& img) { return img.map(); }
};

}  // namespace vimgfs

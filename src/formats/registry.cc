// Probe order and name lookup for the built-in formats. Raw comes last: it matches
// anything, with the lowest score.
#include "formats/drivers.h"

namespace vimgfs {

const std::vector<const FormatDriver*>& AllFormats() {
  static const std::vector<const FormatDriver*> formats = {
      Qcow2Driver(),
      VmdkDriver(),
      VdiDriver(),
      RawDriver(),
  };
  return formats;
}

const FormatDriver* FindFormat(std::string_view name) {
  for (const FormatDriver* f : AllFormats()) {
    if (name == f->name()) return f;
  }
  return nullptr;
}

}  // namespace vimgfs

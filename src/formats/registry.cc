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

Result<std::unique_ptr<File>> CreateImageFile(const CreateContext& ctx, const std::string& path) {
  Env* env = ctx.env ? ctx.env : Env::Default();
  ASSIGN_OR_RETURN(auto f, env->Create(path));
  Status hints = SetFileCreateHints(*f, ctx.nocow, ctx.extent_size_hint);
  // As qemu: a hint that was not asked for may fail silently.
  if (!hints.ok() && ctx.extent_size_hint_given && ctx.warnings) ctx.warnings->push_back(hints.message());
  return f;
}

}  // namespace vimgfs

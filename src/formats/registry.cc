// Probe order and name lookup for the built-in formats. Raw comes last: it matches
// anything, with the lowest score.
#include <cstring>

#include "formats/drivers.h"
#include "io/lock.h"
#include "util/endian.h"

namespace vimgfs {

const std::vector<const FormatDriver*>& AllFormats() {
  static const std::vector<const FormatDriver*> formats = {
      Qcow2Driver(),     VmdkDriver(),  VdiDriver(),   VpcDriver(), VhdxDriver(), QcowDriver(), QedDriver(),
      ParallelsDriver(), BochsDriver(), CloopDriver(), DmgDriver(), LuksDriver(), RawDriver(),
  };
  return formats;
}

const FormatDriver* FindFormat(std::string_view name) {
  for (const FormatDriver* f : AllFormats()) {
    if (name == f->name()) return f;
  }
  return nullptr;
}

namespace {

bool StartsWith(std::span<const std::byte> head, std::string_view magic, size_t at = 0) {
  return head.size() >= at + magic.size() && std::memcmp(head.data() + at, magic.data(), magic.size()) == 0;
}

// The containers qemu-img 7.2 probes, by its own tests of the first bytes (or the name).
struct Container {
  const char* name;
  bool (*matches)(std::span<const std::byte> head, const std::string& path);
};
const Container kQemuContainers[] = {
    {"qcow", [](auto h, auto&) { return StartsWith(h, "QFI\xfb") && h.size() >= 8 && LoadBE32(&h[4]) == 1; }},
    {"qed", [](auto h, auto&) { return StartsWith(h, std::string_view("QED\0", 4)); }},
    {"vhdx", [](auto h, auto&) { return StartsWith(h, "vhdxfile"); }},
    {"vpc", [](auto h, auto&) { return StartsWith(h, "conectix"); }},
    {"parallels",
     [](auto h, auto&) {
       return (StartsWith(h, "WithoutFreeSpace") || StartsWith(h, "WithouFreSpacExt")) && h.size() >= 20 &&
              LoadLE32(&h[16]) == 2;
     }},
    {"bochs",
     [](auto h, auto&) {
       return StartsWith(h, "Bochs Virtual HD Image") && StartsWith(h, "Redolog", 32) &&
              StartsWith(h, "Growing", 48) && h.size() >= 68 &&
              (LoadLE32(&h[64]) == 0x00020000 || LoadLE32(&h[64]) == 0x00010000);
     }},
    {"cloop",
     [](auto h, auto&) {
       return StartsWith(
           h, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n");
     }},
    {"luks",
     [](auto h, auto&) {
       return StartsWith(h, std::string_view("LUKS\xba\xbe", 6)) && h.size() >= 8 &&
              (LoadBE16(&h[6]) == 1 || LoadBE16(&h[6]) == 2);
     }},
    // qemu knows a dmg only by its name (its probe scores ".dmg" above raw).
    {"dmg", [](auto, const std::string& path) { return path.size() >= 4 && path.ends_with(".dmg"); }},
};

}  // namespace

std::optional<std::string> UndrivenContainer(std::span<const std::byte> head, const std::string& path) {
  for (const Container& c : kQemuContainers) {
    if (!FindFormat(c.name) && c.matches(head, path)) return c.name;
  }
  return std::nullopt;
}

bool IsUndrivenQemuFormat(std::string_view name) {
  for (const Container& c : kQemuContainers) {
    if (name == c.name) return !FindFormat(c.name);
  }
  return false;
}

Result<std::unique_ptr<File>> CreateImageFile(const CreateContext& ctx, const std::string& path) {
  Env* env = ctx.env ? ctx.env : Env::Default();
  // An image another process has open (a VM, a mount) is not truncated under it: as qemu,
  // take its write lock first (dropped again at once: the new file is locked when opened).
  if (auto existing = env->Open(path, OpenMode::kReadOnly); existing.ok()) {
    RETURN_IF_ERROR(LockImage(**existing, /*write=*/true));
  }
  ASSIGN_OR_RETURN(auto f, env->Create(path));
  Status hints = SetFileCreateHints(*f, ctx.nocow, ctx.extent_size_hint);
  // As qemu: a hint that was not asked for may fail silently.
  if (!hints.ok() && ctx.extent_size_hint_given && ctx.warnings) ctx.warnings->push_back(hints.message());
  return f;
}

}  // namespace vimgfs

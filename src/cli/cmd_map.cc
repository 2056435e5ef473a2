// vimgfs map: qemu-img map (human and JSON).
#include <cinttypes>
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N]\n"
    "                  [-U] [--untrusted] filename\n"
    "\n"
    "Shows where the guest's data lives: human output lists the data runs and the host file\n"
    "and offset holding each; JSON lists every run with depth, present, zero, data, offset.\n"
    "A VHDX, bochs or cloop image shows as one data run without offset, as in qemu-img (no\n"
    "block status).\n"
    "  -U, --force-share  open the image even while another process writes it (no lock)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

struct Entry {
  uint64_t start = 0, length = 0;
  int depth = 0;
  bool present = false, zero = false, data = false, has_offset = false;
  uint64_t offset = 0;
  std::string filename;
};

bool Mergeable(const Entry& a, const Entry& b) {
  if (a.length == 0) return false;
  if (a.zero != b.zero || a.data != b.data || a.depth != b.depth || a.present != b.present ||
      a.has_offset != b.has_offset)
    return false;
  if (a.filename != b.filename) return false;
  if (a.has_offset && a.offset + a.length != b.offset) return false;
  return true;
}

// Prints one entry; returns false when human output cannot show it.
bool Dump(bool json, const Entry& e, Entry* next) {
  if (!json) {
    if (e.data && !e.has_offset) {
      PrintError("File contains external, encrypted or compressed clusters.");
      return false;
    }
    if (e.data && !e.zero) {
      std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e.start, e.length,
                  e.has_offset ? e.offset : 0, e.filename.c_str());
    }
    if (next && (!next->data || next->zero) && (!e.data || e.zero)) {
      next->data = false;
      next->zero = true;
    }
    return true;
  }
  std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
              ", \"depth\": %d, \"present\": %s, "
              "\"zero\": %s, \"data\": %s",
              e.start, e.length, e.depth, e.present ? "true" : "false", e.zero ? "true" : "false",
              e.data ? "true" : "false");
  if (e.has_offset) std::printf(", \"offset\": %" PRIu64, e.offset);
  std::putchar('}');
  if (next) std::puts(",");
  return true;
}

}  // namespace

int RunMap(int argc, char** argv) {
  std::string fmt, output = "human";
  bool untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  uint64_t start = 0;
  std::optional<uint64_t> max_length;
  bool force_share = false;
  auto offset_option = [](const char* what, auto* out) {
    return [what, out](const char* arg) -> std::optional<int> {
      auto v = ParseSize(arg);
      if (!v.ok()) {
        PrintError(fmt::format("Invalid {}: '{}'", what, arg));
        return 1;
      }
      *out = *v;
      return std::nullopt;
    };
  };
  OptionParser opts("map", kUsage);
  opts.Value('f', "format", &fmt)
      .Value(0, "output", &output)
      .Add(0, "start-offset", true, offset_option("start offset", &start))
      .Add(0, "max-length", true, offset_option("max length", &max_length))
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (opts.operands().size() != 1) return UsageError("map", "Expecting one image file name");
  if (!CheckOutputFormat(output)) return 1;
  std::string filename = opts.operands()[0];
  ImageOpen o;
  o.image_opts = image_opts;
  o.force_share = force_share;
  o.format = fmt;
  o.untrusted = untrusted;
  std::unique_ptr<Image> img = OpenOrReport(filename, o);
  if (!img) return 1;

  bool json = output == "json";
  uint64_t size = img->size();
  uint64_t end = size;
  if (max_length && start < size && *max_length < size - start) end = start + *max_length;
  if (json) {
    std::printf("[");
  } else {
    std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  }
  Entry curr;
  bool have = false;
  bool ok = true;
  // Walk in slices so a huge image needs bounded memory.
  constexpr uint64_t kSlice = 64ull << 30;
  for (uint64_t pos = start; pos < end && ok;) {
    uint64_t n = std::min(kSlice, end - pos);
    auto runs = img->MapAsQemu(pos, n);
    if (!runs.ok()) {
      PrintFileError(filename, runs.error());
      return 1;
    }
    for (const BlockStatus& b : *runs) {
      Entry next;
      next.start = b.offset;
      next.length = b.length;
      next.depth = b.depth;
      next.present = b.present;
      next.zero = b.zero;
      next.data = b.data;
      next.has_offset = b.has_offset;
      next.offset = b.host_offset;
      if (b.has_offset) next.filename = b.filename;
      if (have && Mergeable(curr, next)) {
        curr.length += next.length;
        continue;
      }
      if (have && curr.length > 0 && !Dump(json, curr, &next)) {
        ok = false;
        break;
      }
      curr = next;
      have = true;
    }
    pos += n;
  }
  if (ok && !have) curr.start = start;  // nothing to walk: qemu-img prints one empty run
  if (ok) ok = Dump(json, curr, nullptr);
  if (json) std::printf("]\n");
  return ok ? 0 : 1;
}

}  // namespace vimgfs::cli

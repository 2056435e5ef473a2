// vimgfs bitmap: qemu-img bitmap. Operations on a qcow2 image's persistent dirty bitmaps,
// applied in the order given; what succeeded before a failure is kept, as in qemu.
#include <algorithm>
#include <optional>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
    "                     [-b source_file [-F source_fmt]] [-g granularity] [--object OBJ]\n"
    "                     [--image-opts | -f fmt] filename bitmap\n"
    "\n"
    "Changes a persistent dirty bitmap of a qcow2 image (compat=1.1), as qemu-img bitmap does;\n"
    "the operations run in the order given.\n"
    "  --add           create the bitmap, recording writes (with --disable after it: not)\n"
    "  --remove        delete it (also an inconsistent one, left in use by a crash)\n"
    "  --clear         clear every bit\n"
    "  --enable        record writes from now on\n"
    "  --disable       stop recording writes\n"
    "  --merge SOURCE  set the bits set in bitmap SOURCE (of -b source_file, or of this image)\n"
    "  -g granularity  --add: bytes per bit, a power of two from 512 (default: the cluster\n"
    "                  size, within 4k..64k)\n"
    "  -b source_file  --merge: the image holding SOURCE (opened read-only, without its\n"
    "                  backing file)\n"
    "  -F source_fmt   the format of source_file\n"
    "  -f fmt          the image's format\n"
    "  --object secret,id=ID,data=...|file=...  a secret for an encrypted image\n"
    "  --image-opts    the image name is a key=value list (driver=qcow2,file.filename=F)\n";

using Op = Image::BitmapChange::Op;

struct Action {
  Op op;
  std::string source;  // kMerge
};

const char* OpName(Op op) {
  switch (op) {
    case Op::kAdd:
      return "add";
    case Op::kRemove:
      return "remove";
    case Op::kClear:
      return "clear";
    case Op::kEnable:
      return "enable";
    case Op::kDisable:
      return "disable";
    case Op::kMerge:
      return "merge";
  }
  return "";
}

}  // namespace

int RunBitmap(int argc, char** argv) {
  std::string fmt, source_file, source_fmt, granularity_arg;
  bool untrusted = false, image_opts = false;
  std::vector<Action> actions;
  auto action = [&actions](Op op) {
    return [&actions, op](const char* arg) -> std::optional<int> {
      actions.push_back({op, arg ? arg : ""});
      return std::nullopt;
    };
  };
  OptionParser opts("bitmap", kUsage);
  opts.Value('f', "format", &fmt)
      .Value('b', "source-file", &source_file)
      .Value('F', "source-format", &source_fmt)
      .Value('g', "granularity", &granularity_arg)
      .Add(0, "add", false, action(Op::kAdd))
      .Add(0, "remove", false, action(Op::kRemove))
      .Add(0, "clear", false, action(Op::kClear))
      .Add(0, "enable", false, action(Op::kEnable))
      .Add(0, "disable", false, action(Op::kDisable))
      .Add(0, "merge", true, action(Op::kMerge))
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;

  uint64_t granularity = 0;
  if (!granularity_arg.empty()) {
    auto g = CvtNum("granularity", granularity_arg);
    if (!g) return 1;
    // qemu passes it on as 32 bits: 4G becomes 0, which its check then refuses.
    granularity = *g & 0xffffffffu;
    if (granularity == 0) granularity = 1;
  }
  auto has = [&actions](Op op) {
    return std::any_of(actions.begin(), actions.end(), [op](const Action& a) { return a.op == op; });
  };
  if (actions.empty()) {
    PrintError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    return 1;
  }
  if (granularity && !has(Op::kAdd)) {
    PrintError("granularity only supported with --add");
    return 1;
  }
  if (!source_fmt.empty() && source_file.empty()) {
    PrintError("-F only supported with -b");
    return 1;
  }
  if (!source_file.empty() && !has(Op::kMerge)) {
    PrintError("Merge bitmap source file only supported with --merge");
    return 1;
  }
  const std::vector<std::string>& operands = opts.operands();
  if (operands.size() != 2) {
    PrintError("Expecting filename and bitmap name");
    return 1;
  }
  const std::string& bitmap = operands[1];

  // Bitmaps are the image's own: no backing file is opened (qemu's BDRV_O_NO_BACKING).
  ImageOpen o;
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  o.image_opts = image_opts;
  o.open_backing = false;
  auto img = OpenOrReport(operands[0], o);
  if (!img) return 1;
  // -b: the other image's bitmaps, read once for every --merge.
  std::optional<std::vector<DirtyBitmap>> source_maps;
  uint64_t source_size = 0;
  if (!source_file.empty()) {
    ImageOpen so;
    so.format = source_fmt;
    so.untrusted = untrusted;
    so.open_backing = false;
    auto source = OpenOrReport(source_file, so);
    if (!source) return 1;
    auto maps = source->Bitmaps();
    if (!maps.ok()) {
      PrintFileError(source->path(), maps.error());
      return 1;
    }
    source_maps = std::move(*maps);
    source_size = source->size();
    (void)source->Close();
  }

  int rc = 0;
  for (const Action& a : actions) {
    Image::BitmapChange change;
    change.op = a.op;
    change.name = bitmap;
    change.granularity = granularity;
    change.source_name = a.source;
    change.source = source_maps ? &*source_maps : nullptr;
    change.source_size = source_size;
    if (Status s = img->ChangeBitmap(change); !s.ok()) {
      PrintError(fmt::format("Operation {} on bitmap {} failed: {}", OpName(a.op), bitmap,
                             StripPathPrefix(img->path(), AsQemuWordsLocks(s))));
      rc = 1;
      break;
    }
  }
  if (Status s = img->Close(); !s.ok() && rc == 0) {
    PrintFileError(img->path(), s);
    rc = 1;
  }
  return rc;
}

}  // namespace vimgfs::cli

// vimgfs resize: qemu-img resize ([+|-]size, --shrink).
#include <algorithm>
#include <cstdio>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs resize [-f fmt] [--preallocation=MODE] [--shrink] [-q] [--untrusted]\n"
    "                     filename [+|-]size\n"
    "\n"
    "Changes the virtual size of an image. '+N' grows by N, '-N' shrinks by N (needs\n"
    "--shrink: data past the new end is lost). Suffixes k, M, G, T, P, E.\n"
    "  --preallocation=MODE  what a grown raw or qcow2 image gets for its new area: off\n"
    "                        (nothing), metadata (qcow2: clusters allocated, host file\n"
    "                        left sparse), falloc (host space reserved), full (zeros)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

// Gives the grown area [from, to) of an image its preallocation, as qemu-img resize does:
// allocated clusters reading as zeros (qcow2: over a sparse, reserved or written host
// range), or host space (raw).
Status Preallocate(Image& img, const std::string& mode, uint64_t from, uint64_t to) {
  if (mode == "off" || from >= to) return Status::Ok();
  if (img.traits().grow_preallocation == FormatTraits::GrowPreallocation::kHostFile) {
    if (mode == "falloc") return img.file().Allocate(from, to - from);
    static const std::vector<std::byte> kZeros(1 << 20);
    for (uint64_t pos = from; pos < to;) {
      uint64_t n = std::min<uint64_t>(kZeros.size(), to - pos);
      RETURN_IF_ERROR(img.Write(pos, {kZeros.data(), static_cast<size_t>(n)}));
      pos += n;
    }
    return Status::Ok();
  }
  const Image::Fill fill = mode == "full"     ? Image::Fill::kZeros
                           : mode == "falloc" ? Image::Fill::kReserved
                                              : Image::Fill::kHole;
  return img.Preallocate(from, to - from, fill);
}

}  // namespace

int RunResize(int argc, char** argv) {
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  // The size goes last and may start with '-': take it before getopt sees it.
  if (argc < 3) return UsageError("resize", "Not enough arguments");
  std::string size_text = argv[argc - 1];
  argc--;
  std::string fmt;
  bool quiet = false, shrink = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  std::string prealloc;
  OptionParser opts("resize", kUsage);
  opts.Value('f', "format", &fmt)
      .Flag('q', nullptr, &quiet)
      .Flag(0, "shrink", &shrink)
      .Value(0, "preallocation", &prealloc)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (prealloc.empty()) prealloc = "off";
  if (prealloc != "off" && prealloc != "metadata" && prealloc != "falloc" && prealloc != "full") {
    PrintError(fmt::format("Invalid preallocation mode '{}'", prealloc));
    return 1;
  }
  if (opts.operands().size() != 1) return UsageError("resize", "Expecting image file name and size");
  std::string filename = opts.operands()[0];
  if (size_text == "--") return UsageError("resize", "Expecting a size");

  int sign = 0;
  std::string digits = size_text;
  if (!digits.empty() && (digits[0] == '+' || digits[0] == '-')) {
    sign = digits[0] == '+' ? 1 : -1;
    digits = digits.substr(1);
  }
  auto delta = ParseSize(digits);
  if (!delta.ok()) {
    PrintError("Parameter 'size' expects a non-negative number below 2^64");
    std::fprintf(stderr,
                 "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                 "and exabytes, respectively.\n");
    return 1;
  }

  ImageOpen o;

  o.image_opts = image_opts;
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  // The backing chain is opened (as qemu-img does): a grow over a longer backing file must
  // hide what it holds there (Image::Resize).
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;
  uint64_t current = img->size();
  uint64_t target;
  if (sign == 0) {
    target = *delta;
  } else if (sign > 0) {
    if (*delta > UINT64_MAX / 2 - current) {
      PrintError("Image size must be less than 8 EiB!");
      return 1;
    }
    target = current + *delta;
  } else {
    if (*delta >= current) {
      PrintError("New image size must be positive");
      return 1;
    }
    target = current - *delta;
  }
  if (target == 0) {
    PrintError("New image size must be positive");
    return 1;
  }
  if (target <= current && prealloc != "off") {
    PrintError("Preallocation can only be used for growing images");
    return 1;
  }
  if (target < current && !shrink) {
    PrintError("Use the --shrink option to perform a shrink operation.");
    std::fprintf(stderr,
                 "%s: warning: Shrinking an image will delete all data beyond the shrunken "
                 "image's end. Before performing such an operation, make sure there is no "
                 "important data there.\n",
                 ProgramName().c_str());
    return 1;
  }
  const auto grow = img->traits().grow_preallocation;
  const bool supported = grow == FormatTraits::GrowPreallocation::kClusters ||
                         (grow == FormatTraits::GrowPreallocation::kHostFile && prealloc != "metadata");
  if (prealloc != "off" && !supported) {
    PrintError(fmt::format("Unsupported preallocation mode: {}", prealloc));
    return 1;
  }
  Status s = img->Resize(target, shrink, prealloc == "metadata");
  if (!s.ok()) {
    // qemu-img reports the driver's words alone ("Can't resize a v2 image which has
    // snapshots"), without the file name.
    PrintError(s.message());
    return 1;
  }
  s = img->Close();
  img.reset();
  if (s.ok() && prealloc != "off" && target > current) {
    // Opened again without the backing chain: the grown area is this image's own,
    // whatever a backing file holds there.
    o.open_backing = false;
    auto grown = OpenImage(filename, o);
    s = grown.ok() ? Preallocate(**grown, prealloc, current, target) : grown.error();
    if (grown.ok()) {
      Status c = (*grown)->Close();
      if (s.ok()) s = c;
    }
  }
  if (!s.ok()) {
    PrintFileError(filename, s);
    return 1;
  }
  if (!quiet) std::printf("Image resized.\n");
  return 0;
}

}  // namespace vimgfs::cli

// vimgfs measure: qemu-img measure, its checks, messages and output.
#include <cinttypes>
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/create_options.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs measure [--output=human|json] [-O output_fmt] [-o options]\n"
    "                      [--size N | [-f fmt] [-l snapshot_param] [-U] [--untrusted] filename]\n"
    "\n"
    "How large an image of format output_fmt (default raw) would be: for a new image of N\n"
    "bytes (--size), or for the content of an existing image (its backing chain included),\n"
    "as a conversion would make it. Prints the required size, the fully allocated size and,\n"
    "for a qcow2 version 3 target and source, the size of the source's persistent bitmaps;\n"
    "the figures are qemu-img's. qcow2 and raw targets can be measured.\n"
    "  -O fmt           target format\n"
    "  -o options       target create options (cluster_size, compat, refcount_bits,\n"
    "                   extended_l2, preallocation, backing_file, ...)\n"
    "  --size N         a new image of N bytes (k, M, G, T, P, E suffixes)\n"
    "  -f fmt           the source image's format (probed when absent)\n"
    "  -l snapshot.name=NAME  measure a qcow2 internal snapshot of the source\n"
    "  --output=FMT     'human' (default) or 'json'\n"
    "  -U, --force-share  open the source even while another process writes it (no lock)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

}  // namespace

int RunMeasure(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", output = "human", snapshot;
  std::string options;  // the -o lists, joined
  std::optional<uint64_t> size;
  bool force_share = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  OptionParser opts("measure", kUsage);
  opts.Value('f', nullptr, &fmt)
      .Value('O', nullptr, &out_fmt)
      .Add('o', nullptr, true, AccumulateOptionsInto(&options))
      .Add('l', nullptr, true, SnapshotParamInto(&snapshot))
      .Flag('U', "force-share", &force_share)
      .Add(0, "output", true,
           [&](const char* arg) -> std::optional<int> {
             output = arg;
             if (!CheckOutputFormat(output)) return 1;
             return std::nullopt;
           })
      .Add(0, "size", true,
           [&](const char* arg) -> std::optional<int> {
             size = CvtNum("image size", arg);
             if (!size) return 1;
             return std::nullopt;
           })
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  const auto& operands = opts.operands();
  if (operands.size() > 1) {
    PrintError("At most one filename argument is allowed.");
    return 1;
  }
  const std::string filename = operands.empty() ? "" : operands[0];
  if (filename.empty() && (image_opts || !fmt.empty() || !snapshot.empty())) {
    PrintError("--image-opts, -f, and -l require a filename argument.");
    return 1;
  }
  if (!filename.empty() && size) {
    PrintError("--size N cannot be used together with a filename.");
    return 1;
  }
  if (filename.empty() && !size) {
    PrintError("Either --size N or one filename must be specified.");
    return 1;
  }

  std::unique_ptr<Image> source;
  if (!filename.empty()) {
    ImageOpen o;
    o.image_opts = image_opts;
    o.format = fmt;
    o.force_share = force_share;
    o.untrusted = untrusted;
    o.snapshot = snapshot;
    source = OpenOrReport(filename, o);
    if (!source) return 1;
  }

  if (std::string err = CreateFormatError(out_fmt); !err.empty()) {
    PrintError(err);
    return 1;
  }
  OptionList list;
  if (Status s = ParseCreateOptions(out_fmt, options, &list); !s.ok()) {
    PrintError(s.message());
    PrintError(fmt::format("Invalid options for file format '{}'", out_fmt));
    return 1;
  }
  MeasureRequest req;
  for (const auto& [k, v] : list) req.options[k] = v;
  if (size) req.options["size"] = std::to_string(*size);
  req.source = source.get();
  // "file" creates through the raw driver here, but qemu measures with the file protocol's
  // driver, which cannot.
  auto result = out_fmt == "file" ? Result<MeasureResult>(Status::Unsupported(
                                        "Block driver 'file' does not support size measurement"))
                                  : CreateDriver(out_fmt)->Measure(req);
  if (!result.ok()) {
    PrintError(result.error().message());
    return 1;
  }
  const MeasureResult& m = *result;
  if (output == "json") {
    nlohmann::ordered_json j;
    if (m.bitmaps) j["bitmaps"] = *m.bitmaps;
    j["required"] = m.required;
    j["fully-allocated"] = m.fully_allocated;
    std::printf("%s\n", QemuJson(j).c_str());
  } else {
    std::printf("required size: %" PRIu64 "\n", m.required);
    std::printf("fully allocated size: %" PRIu64 "\n", m.fully_allocated);
    if (m.bitmaps) std::printf("bitmaps size: %" PRIu64 "\n", *m.bitmaps);
  }
  return 0;
}

}  // namespace vimgfs::cli

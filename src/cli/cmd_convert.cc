// vimgfs convert: qemu-img convert (any supported format to any, sparse, -c on all cores).
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/convert.h"
#include "cli/create_options.h"
#include "cli/deferred_sync_env.h"
#include "formats/vmdk/stream_writer.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs convert [-f fmt] [-O output_fmt] [-o options] [-c] [-p] [-q] [-n] [-S size]\n"
    "                      [-B backing_file [-F backing_fmt]] [-l snapshot.name=NAME] [-m N] [-W]\n"
    "                      [-t cache] [-T src_cache]\n"
    "                      [--target-is-zero] [-U] [--untrusted] filename [filename2 [...]] output\n"
    "\n"
    "Converts one or more images (concatenated) into 'output' of format output_fmt (default\n"
    "raw). Only allocated data is read; zero areas stay unallocated in the target.\n"
    "  -O fmt           output format: qcow2, vmdk, vdi, raw\n"
    "  -o options       output format options ('-o help' lists them)\n"
    "  -c               compress the output (qcow2: zlib or -o compression_type=zstd;\n"
    "                   vmdk streamOptimized is always compressed), on every core\n"
    "  -S size          zero runs of at least this many bytes are not written (default 4k;\n"
    "                   0 allocates the whole output)\n"
    "  -n               do not create the output; write into an existing image\n"
    "  --target-is-zero with -n: the existing output already reads as zeros\n"
    "  -B backing_file  the output is based on this image: copy only what differs from it\n"
    "  -F backing_fmt   format of the -B image\n"
    "  -l snapshot.name=NAME   convert a qcow2 internal snapshot\n"
    "  -p               show progress on a terminal;  -q  quiet\n"
    "  -m N             source reads in flight ahead of the writer, 1 to 16 (default 8)\n"
    "  -W               allow out-of-order writes (accepted; writes stay in order)\n"
    "  -t cache         output cache mode (default unsafe, as qemu-img: nothing is flushed;\n"
    "                   any other mode makes the output durable before exit)\n"
    "  -T src_cache     source cache mode (checked, no effect on reads)\n"
    "  -U, --force-share  read the source images even while another process writes them (no lock)\n";

Codec TargetCodec(Image& img) {
  FormatInfo fi = img.Info();
  const nlohmann::json* data = &fi.format_specific;
  if (data->is_object() && data->contains("data")) data = &(*data)["data"];
  if (data->is_object() && data->contains("compression-type") &&
      (*data)["compression-type"] == "zstd")
    return Codec::kZstd;
  return Codec::kDeflateRaw;
}

}  // namespace

int RunConvert(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", out_backing, out_backing_fmt, snapshot;
  std::vector<std::string> option_texts;
  bool compress = false, progress = false, quiet = false, no_create = false;
  bool target_is_zero = false, untrusted = false, out_of_order = false;
  uint64_t min_sparse = 4096;
  std::string out_cache = "unsafe";  // qemu-img convert's default: no flushes at all
  int requests = 8;
  bool force_share = false;
  auto stop_with = [](const std::string& msg) -> std::optional<int> {
    PrintError(msg);
    return 1;
  };
  auto cache_mode = [&](std::string* set, const char* what) {
    return [set, what, stop_with](const char* arg) -> std::optional<int> {
      if (!IsCacheMode(arg)) return stop_with(fmt::format("Invalid {}: {}", what, arg));
      *set = arg;
      return std::nullopt;
    };
  };
  std::string in_cache;
  OptionParser parser("convert", kUsage);
  parser.Value('f', nullptr, &fmt)
      .Value('O', nullptr, &out_fmt)
      .Value('B', nullptr, &out_backing)
      .Value('F', nullptr, &out_backing_fmt)
      .Flag('c', nullptr, &compress)
      .Accept('C', nullptr, false)
      .Add('o', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             option_texts.push_back(arg);
             return std::nullopt;
           })
      .Add('l', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             std::string v = arg;
             if (v.rfind("snapshot.name=", 0) == 0) {
               snapshot = v.substr(14);
             } else if (v.rfind("snapshot.id=", 0) == 0) {
               snapshot = v.substr(12);
             } else {
               snapshot = v;
             }
             return std::nullopt;
           })
      .Add('S', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             auto v = ParseSize(arg);
             if (!v.ok() || *v % 512 != 0 || *v > (16u << 20))
               return stop_with(
                   "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16M.");
             min_sparse = *v;
             return std::nullopt;
           })
      .Flag('p', nullptr, &progress)
      .Add('t', nullptr, true, cache_mode(&out_cache, "cache option"))
      .Add('T', nullptr, true, cache_mode(&in_cache, "source cache option"))
      .Add('m', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             char* end = nullptr;
             errno = 0;
             long v = std::strtol(arg, &end, 0);
             if (errno || end == arg || *end || v < 1 || v > 16)
               return stop_with("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
             requests = static_cast<int>(v);
             return std::nullopt;
           })
      .Flag('W', nullptr, &out_of_order)
      .Flag('U', "force-share", &force_share)
      .Accept('r', nullptr, true)
      .Flag('q', nullptr, &quiet)
      .Flag('n', nullptr, &no_create)
      .Flag(0, "target-is-zero", &target_is_zero)
      .Refuse("target-image-opts")
      .Refuse("bitmaps")
      .Accept(0, "salvage", false)
      .CommonImageOptions(&untrusted);
  if (auto stop = parser.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;

  OptionList opts;
  if (auto done = CollectCreateOptions(option_texts, out_fmt, &opts)) return *done;
  const FormatDriver* driver = FindFormat(out_fmt);
  const std::vector<std::string>& operands = parser.operands();
  if (operands.size() < 2) return UsageError("convert", "Must specify image file name");
  std::string out_name = operands.back();
  std::vector<std::string> sources(operands.begin(), operands.end() - 1);
  if (!driver) {
    PrintError(fmt::format("Unknown file format '{}'", out_fmt));
    return 1;
  }
  if (target_is_zero && !no_create) {
    PrintError("--target-is-zero requires use of -n flag");
    return 1;
  }
  if (!snapshot.empty() && sources.size() > 1) {
    PrintError("No support for concatenating multiple snapshot");
    return 1;
  }
  for (auto& [k, v] : opts) {
    if (k == "backing_file" && out_backing.empty()) out_backing = v;
    if (k == "backing_fmt" && out_backing_fmt.empty()) out_backing_fmt = v;
  }
  opts.erase(std::remove_if(opts.begin(), opts.end(),
                            [](const auto& p) { return p.first == "backing_file" || p.first == "backing_fmt"; }),
             opts.end());
  if (!out_backing.empty() && out_backing_fmt.empty() && !no_create) {
    PrintError("Use of backing file requires explicit backing format");
    return 1;
  }
  if (!out_backing.empty() && no_create) {
    PrintError("-B makes no sense when concatenating multiple input images with -n");  // as qemu
    return 1;
  }
  std::string unknown = UnknownCreateOption(*driver, opts);
  if (!unknown.empty()) {
    PrintError(fmt::format("{}: Invalid parameter '{}'", out_name, unknown));
    return 1;
  }
  std::string subformat;
  for (const auto& [k, v] : opts)
    if (k == "subformat") subformat = v;
  const bool stream_vmdk = out_fmt == "vmdk" && subformat == "streamOptimized";
  if (compress && out_fmt != "qcow2" && out_fmt != "vmdk") {
    PrintError("Compression not supported for this file format");
    return 1;
  }
  if (stream_vmdk && (no_create || !out_backing.empty())) {
    PrintError(fmt::format("{}: streamOptimized output must be created fresh, without a backing file",
                           out_name));
    return 1;
  }

  // Sources.
  std::vector<std::unique_ptr<Image>> images;
  for (const std::string& name : sources) {
    ImageOpen o;
    o.force_share = force_share;
    o.format = fmt;
    o.untrusted = untrusted;
    o.snapshot = snapshot;
    auto img = OpenOrReport(name, o);
    if (!img) return 1;
    images.push_back(std::move(img));
  }
  ConcatSource src(std::move(images));

  ConvertSettings cs;
  cs.min_sparse = min_sparse;
  cs.progress = progress && StdoutIsTty();
  cs.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (const char* t = std::getenv("VIMGFS_THREADS")) cs.threads = std::clamp(std::atoi(t), 1, 256);
  cs.requests_in_flight = requests;
  (void)out_of_order;  // permission, not a duty: writes go out in order either way
  cs.target_has_backing = !out_backing.empty();
  cs.target_fresh = !no_create || target_is_zero;

  std::map<std::string, std::string> create_opts;
  for (const auto& [k, v] : opts) create_opts[k] = v;

  // Flushes are deferred to one sync of each output file at the end, and skipped in the
  // default "unsafe" mode (a half-written conversion is worth nothing either way).
  DeferredSyncEnv env(Env::Default());
  const bool durable = out_cache != "unsafe";
  if (stream_vmdk) {
    auto w = StreamOptimizedWriter::Open(env, out_name, src.size(), create_opts);
    if (!w.ok()) {
      PrintFileError(out_name, w.error());
      return 1;
    }
    Status s = ConvertToStream(src, **w, cs);
    w->reset();
    if (s.ok() && durable) s = env.SyncAll();
    if (!s.ok()) {
      PrintFileError(out_name, s);
      return 1;
    }
    return 0;
  }

  if (!no_create) {
    CreateContext ctx;
    ctx.env = &env;
    ctx.path = out_name;
    ctx.size = src.size();
    ctx.options = create_opts;
    if (!out_backing.empty()) ctx.backing = BackingRef{out_backing, out_backing_fmt};
    Status s = Image::Create(out_fmt, ctx, false);
    if (!s.ok()) {
      PrintFileError(out_name, s);
      return 1;
    }
  }
  ImageOpen to;  // -U shares the sources only: the target convert writes is locked
  to.format = out_fmt;
  to.read_only = false;
  to.untrusted = untrusted;
  to.open_backing = cs.target_has_backing;
  to.env = &env;  // partial-cluster writes copy from it
  auto target = OpenOrReport(out_name, to);
  if (!target) return 1;
  if (target->size() < src.size()) {
    PrintError(fmt::format("{}: target image is smaller than the source ({} < {} bytes)", out_name,
                           target->size(), src.size()));
    return 1;
  }
  if (compress && out_fmt == "qcow2") {
    cs.compress = true;
    cs.codec = TargetCodec(*target);
  }
  Status s = ConvertToImage(src, *target, cs);
  if (s.ok()) s = target->Close();
  target.reset();
  if (s.ok() && durable) s = env.SyncAll();
  if (!s.ok()) {
    PrintFileError(out_name, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

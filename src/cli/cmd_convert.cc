// vimgfs convert: qemu-img convert (any supported format to any, sparse, -c on all cores).
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <ranges>
#include <thread>

#include "cli/cli_util.h"
#include "crypto/secrets.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/create_options.h"
#include "cli/deferred_sync_env.h"
#include "vimgfs/copy.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs convert [-f fmt] [-O output_fmt] [-o options] [-c] [-C] [-p] [-q] [-n] [-S size]\n"
    "                      [-B backing_file [-F backing_fmt]] [-l snapshot.name=NAME] [-m N] [-W]\n"
    "                      [-t cache] [-T src_cache]\n"
    "                      [--target-is-zero] [-U] [--untrusted] filename [filename2 [...]] output\n"
    "\n"
    "Converts one or more images (concatenated) into 'output' of format output_fmt (default\n"
    "raw). Only allocated data is read; zero areas stay unallocated in the target.\n"
    "  -O fmt           output format: qcow2, vmdk, vdi, vpc, vhdx, qed, qcow, parallels, raw\n"
    "  -o options       output format options ('-o help' lists them)\n"
    "  -c               compress the output (qcow2: zlib or -o compression_type=zstd; qcow: zlib;\n"
    "                   vmdk streamOptimized is always compressed), on every core\n"
    "  -S size          zero runs of at least this many bytes are not written (default 4k;\n"
    "                   0 allocates the whole output)\n"
    "  -n               do not create the output; write into an existing image\n"
    "  --target-is-zero with -n: the existing output already reads as zeros\n"
    "  -B backing_file  the output is based on this image: copy only what differs from it\n"
    "  -F backing_fmt   format of the -B image\n"
    "  -l snapshot.name=NAME   convert a qcow2 internal snapshot\n"
    "  -p               show progress, as qemu-img: \"    (25.00/100%)\\r\" lines;  -q  quiet\n"
    "  -m N             source reads in flight ahead of the writer, 1 to 16 (default 8)\n"
    "  -W               allow out-of-order writes (accepted; writes stay in order)\n"
    "  -C               copy offloading: raw into raw by copy_file_range (the kernel copies, or\n"
    "                   shares blocks on a reflink file system); other formats copy as usual;\n"
    "                   refused with -c, -S, --salvage\n"
    "  -r rate          write the output at most this many bytes per second (suffixes k, M, G)\n"
    "  --bitmaps        copy the source's persistent dirty bitmaps (qcow2 to qcow2, one source)\n"
    "  --skip-broken-bitmaps  with --bitmaps: leave out inconsistent ones, with a warning\n"
    "  --salvage        go on past read errors of the sources: each 512-byte sector that cannot\n"
    "                   be read is written as zeros, with a warning naming its offset\n"
    "  -t cache         output cache mode (default unsafe, as qemu-img: nothing is flushed;\n"
    "                   any other mode makes the output durable before exit); none and\n"
    "                   directsync write around the host's page cache (O_DIRECT)\n"
    "  -T src_cache     source cache mode: none and directsync read around the host's\n"
    "                   page cache (O_DIRECT); the others read through it\n"
    "  -U, --force-share  read the source images even while another process writes them (no lock)\n"
    "  --image-opts      the source image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n"
    "  --target-image-opts  the output name is a key=value list too (with -n)\n";

// --bitmaps: the source's bitmaps, read once, after qemu-img's checks on them (made before
// anything is created); nullopt when refused (said).
std::optional<std::vector<DirtyBitmap>> ReadCopyableBitmaps(Image& source, bool skip_broken) {
  if (!source.BitmapsSupported()) {
    PrintError("Source lacks bitmap support");
    return std::nullopt;
  }
  auto maps = source.Bitmaps();
  if (!maps.ok()) {
    PrintFileError(source.path(), maps.error());
    return std::nullopt;
  }
  // qemu walks an image's bitmaps newest first: the last one stored is named first.
  for (const DirtyBitmap& b : std::views::reverse(*maps)) {
    if (!skip_broken && !b.consistent) {
      PrintError(fmt::format("Cannot copy inconsistent bitmap '{}'", b.name));
      std::fputs("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n", stderr);
      return std::nullopt;
    }
  }
  return std::move(*maps);
}

// --bitmaps, once the data is copied: each bitmap of the source made anew in the target
// (same granularity, same enabled state) and filled from the source's.
bool CopyBitmaps(const std::vector<DirtyBitmap>& maps, uint64_t source_size, Image& target,
                 bool skip_broken) {
  using Op = Image::BitmapChange::Op;
  // Warnings in qemu's order (newest first); the copies keep the source's order.
  for (const DirtyBitmap& b : std::views::reverse(maps))
    if (skip_broken && !b.consistent)
      PrintError(fmt::format("warning: Skipping inconsistent bitmap '{}'", b.name));
  for (const DirtyBitmap& b : maps) {
    if (!b.consistent) continue;
    Image::BitmapChange add;
    add.name = b.name;
    add.granularity = uint64_t{1} << b.granularity_bits;
    add.enabled = b.enabled;
    if (Status s = target.ChangeBitmap(add); !s.ok()) {
      PrintError(
          fmt::format("Failed to create bitmap {}: {}", b.name, StripPathPrefix(target.path(), s.message())));
      return false;
    }
    Image::BitmapChange merge{Op::kMerge, b.name, 0, true, b.name, &maps, source_size};
    if (Status s = target.ChangeBitmap(merge); !s.ok()) {
      PrintError(fmt::format("Failed to populate bitmap {}: {}", b.name,
                             StripPathPrefix(target.path(), s.message())));
      (void)target.ChangeBitmap({Op::kRemove, b.name, 0, true, "", nullptr, 0});
      return false;
    }
  }
  return true;
}

}  // namespace

int RunConvert(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", snapshot;
  std::optional<std::string> out_backing, out_backing_fmt;
  std::string options;  // the -o lists, joined
  bool compress = false, progress = false, quiet = false, no_create = false;
  bool target_is_zero = false, untrusted = false, out_of_order = false;
  bool image_opts = false;         // --image-opts: the image names are key=value lists
  bool target_image_opts = false;  // the output name is a key=value list (with -n)
  bool out_fmt_given = false;
  bool copy_range = false, salvage = false, explicit_min_sparse = false;
  bool bitmaps = false, skip_broken_bitmaps = false;
  uint64_t min_sparse = 4096;
  uint64_t rate_limit = 0;           // -r: bytes per second written to the target
  std::string out_cache = "unsafe";  // qemu-img convert's default: no flushes at all
  int requests = 8;
  bool force_share = false;
  auto stop_with = [](const std::string& msg) -> std::optional<int> {
    PrintError(msg);
    return 1;
  };
  auto optional_value = [](std::optional<std::string>* set) {
    return [set](const char* arg) -> std::optional<int> {
      *set = arg;
      return std::nullopt;
    };
  };
  std::string in_cache = "writeback";
  OptionParser parser("convert", kUsage);
  parser.Value('f', nullptr, &fmt)
      .Add('O', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             out_fmt = arg;
             out_fmt_given = true;
             return std::nullopt;
           })
      .Add('B', nullptr, true, optional_value(&out_backing))
      .Add('F', nullptr, true, optional_value(&out_backing_fmt))
      .Flag('c', nullptr, &compress)
      .Flag('C', nullptr, &copy_range)
      .Add('o', nullptr, true, AccumulateOptionsInto(&options))
      .Add('l', nullptr, true, SnapshotParamInto(&snapshot))
      .Add('S', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             std::optional<uint64_t> v = CvtNum("buffer size for sparse output", arg);
             if (!v) return 1;
             if (*v % 512 != 0 || *v > (16u << 20))
               return stop_with(
                   "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
                   "up to 16777216. Select 0 to disable sparse detection (fully allocates output).");
             min_sparse = *v;
             explicit_min_sparse = true;
             return std::nullopt;
           })
      .Flag('p', nullptr, &progress)
      .Value('t', nullptr, &out_cache)
      .Value('T', nullptr, &in_cache)
      .Add('m', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             char* end = nullptr;
             errno = 0;
             long v = std::strtol(arg, &end, 0);
             if (errno || end == arg || *end || v < 1 || v > 16)
               return stop_with(
                   "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
             requests = static_cast<int>(v);
             return std::nullopt;
           })
      .Flag('W', nullptr, &out_of_order)
      .Flag('U', "force-share", &force_share)
      .Add('r', nullptr, true, RateLimitInto(&rate_limit))
      .Flag('q', nullptr, &quiet)
      .Flag('n', nullptr, &no_create)
      .Flag(0, "target-is-zero", &target_is_zero)
      .Flag(0, "target-image-opts", &target_image_opts)
      .Flag(0, "bitmaps", &bitmaps)
      .Flag(0, "skip-broken-bitmaps", &skip_broken_bitmaps)
      .Flag(0, "salvage", &salvage)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = parser.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;

  // qemu-img's checks, in its order.
  if (skip_broken_bitmaps && !bitmaps) return *stop_with("Use of --skip-broken-bitmaps requires --bitmaps");
  if (compress && copy_range) return *stop_with("Cannot enable copy offloading when -c is used");
  if (explicit_min_sparse && copy_range) return *stop_with("Cannot enable copy offloading when -S is used");
  if (copy_range && salvage) return *stop_with("Cannot use copy offloading in salvaging mode");
  if (no_create && !options.empty()) return *stop_with("-o has no effect when skipping image creation");
  if (target_image_opts && !no_create) return *stop_with("--target-image-opts requires use of -n flag");
  if (target_is_zero && !no_create) return *stop_with("--target-is-zero requires use of -n flag");
  const std::vector<std::string>& operands = parser.operands();
  if (HasHelpOption(options))
    return PrintCreateOptionHelp(out_fmt, operands.empty() ? nullptr : &operands.back());
  if (operands.size() < 2) return UsageError("convert", "Must specify image file name");
  if (!IsCacheMode(in_cache)) return *stop_with("Invalid source cache option: " + in_cache);
  // From here on, as in qemu-img, -p prints its figure (0 first; the newline on any exit).
  Progress bar(progress);
  bar.Start();
  const std::string& out_name = operands.back();
  std::vector<std::string> sources(operands.begin(), operands.end() - 1);
  if (!snapshot.empty() && sources.size() > 1)
    return *stop_with("No support for concatenating multiple snapshot");

  // Sources.
  std::vector<std::unique_ptr<Image>> images;
  for (const std::string& name : sources) {
    ImageOpen o;
    o.image_opts = image_opts;
    o.force_share = force_share;
    o.format = fmt;
    o.untrusted = untrusted;
    o.snapshot = snapshot;
    o.env = CacheModeEnv(in_cache);
    o.keep_raw_unchanged = true;  // qemu-img convert locks its sources against writers
    auto img = OpenOrReport(name, o);
    if (!img) return 1;
    images.push_back(std::move(img));
  }
  Image* const first_source = images.front().get();
  ConcatSource sources_in_order(std::move(images));
  // --salvage: what cannot be read is read as zeros, and said (unless -q).
  SalvagingSource salvaging(sources_in_order, [quiet](const std::string& what) {
    if (!quiet) PrintError("warning: " + what);
  });
  CopySource& src = salvage ? static_cast<CopySource&>(salvaging) : sources_in_order;

  // The target's create options, checked (as qemu-img does) once the sources are open.
  OptionList opts;
  std::string out_path = out_name;  // the host file (without "file:")
  if (!no_create) {
    if (std::string err = CreateFormatError(out_fmt); !err.empty()) return *stop_with(err);
    auto host = HostFilename(out_name);
    if (!host.ok()) return *stop_with(host.error().message());
    out_path = *host;
    if (Status s = ParseCreateOptions(out_fmt, options, &opts); !s.ok()) return *stop_with(s.message());
    SetCreateOption(out_fmt, "size", std::to_string(src.size()), &opts);
    if (out_backing && !SetCreateOption(out_fmt, "backing_file", *out_backing, &opts))
      return *stop_with(fmt::format("Backing file not supported for file format '{}'", out_fmt));
    if (out_backing_fmt && !SetCreateOption(out_fmt, "backing_fmt", *out_backing_fmt, &opts))
      return *stop_with(fmt::format("Backing file format not supported for file format '{}'", out_fmt));
    if (auto b = FindOption(opts, "backing_file")) out_backing = b;
    if (auto f = FindOption(opts, "backing_fmt")) out_backing_fmt = f;
  }
  if (target_is_zero && out_backing)
    return *stop_with("Cannot use --target-is-zero when the destination image has a backing file");
  if (sources.size() > 1 && out_backing)
    return *stop_with(
        "Having a backing file for the target makes no sense when concatenating multiple "
        "input images");
  if (!no_create && out_backing && !out_backing_fmt)
    return *stop_with("Use of backing file requires explicit backing format");
  const std::string subformat = FindOption(opts, "subformat").value_or("");
  const FormatDriver* out_driver = FindFormat(out_fmt);
  const FormatTraits::Compression compression =
      out_driver ? out_driver->traits().compression : FormatTraits::Compression::kNone;
  const bool as_stream = compression == FormatTraits::Compression::kStreamSubformat &&
                         subformat == out_driver->traits().compressed_subformat;
  // With --target-image-opts the target's format is known once it is open (below).
  if (compress && !target_image_opts) {
    if (compression == FormatTraits::Compression::kNone)
      return *stop_with("Compression not supported for this file format");
    if (FindOption(opts, "encrypt.format") || FindOption(opts, "encryption").value_or("off") != "off")
      return *stop_with("Compression and encryption not supported at the same time");
    if (FindOption(opts, "preallocation").value_or("off") != "off")
      return *stop_with("Compression and preallocation not supported at the same time");
  }
  if (as_stream && (no_create || out_backing)) {
    PrintError(
        fmt::format("{}: streamOptimized output must be created fresh, without a backing file", out_name));
    return 1;
  }
  std::optional<std::vector<DirtyBitmap>> source_bitmaps;
  if (bitmaps) {
    if (sources.size() > 1) return *stop_with("Copying bitmaps only possible with single source");
    source_bitmaps = ReadCopyableBitmaps(*first_source, skip_broken_bitmaps);
    if (!source_bitmaps) return 1;
  }
  if (!IsCacheMode(out_cache)) return *stop_with("Invalid cache option: " + out_cache);

  CopyOptions cs;
  cs.min_sparse = min_sparse;
  cs.zero_runs = min_sparse != 0;  // -S 0 writes the zeros too
  cs.progress = [&bar](double percent) { bar.UpdatePercent(percent); };
  cs.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (const char* t = std::getenv("VIMGFS_THREADS")) cs.threads = std::clamp(std::atoi(t), 1, 256);
  cs.requests_in_flight = requests;
  cs.rate_limit = rate_limit;
  cs.copy_offload = copy_range;
  (void)out_of_order;  // permission, not a duty: writes go out in order either way
  cs.target_has_backing = out_backing.has_value();
  cs.target_fresh = !no_create || target_is_zero;  // and the new image reads as zeros (below)

  CreateContext ctx;
  ctx.secrets = crypto::SecretStore::Process().Lookup();
  ctx.path = out_path;
  ctx.size = src.size();
  FileCreateOptions file;
  std::vector<std::string> warnings;
  ctx.warnings = &warnings;
  auto create_failed = [&](const Status& s) {
    PrintError(fmt::format("{}: error while converting {}: {}", out_name, out_fmt,
                           StripPathPrefix(out_path, s.message())));
    return 1;
  };
  if (!no_create) {
    if (Status s = SplitCreateOptions(out_fmt, opts, &ctx.options, &file); !s.ok()) return create_failed(s);
    ctx.nocow = file.nocow;
    if (file.extent_size_hint) {
      ctx.extent_size_hint = static_cast<uint32_t>(*file.extent_size_hint);
      ctx.extent_size_hint_given = true;
    }
    if (out_backing || out_backing_fmt)
      ctx.backing = BackingRef{out_backing.value_or(""), out_backing_fmt.value_or("")};
  }

  // Flushes are deferred to one sync of each output file at the end, and skipped in the
  // default "unsafe" mode (a half-written conversion is worth nothing either way).
  // -t none and directsync write around the host's page cache (O_DIRECT), as qemu-img's
  // cache.direct=on: a large conversion does not push everything else out of it.
  DeferredSyncEnv deferred(Env::Default());
  std::unique_ptr<Env> direct = IsDirectCacheMode(out_cache) ? NewDirectIoEnv(&deferred) : nullptr;
  Env& env = direct ? *direct : deferred;
  const bool durable = out_cache != "unsafe";
  if (as_stream) {
    ctx.env = &env;
    auto w = out_driver->CreateStream(ctx);
    if (!w.ok()) return create_failed(w.error());
    Status s = CopyToStream(src, **w, cs);
    w->reset();
    if (s.ok() && durable) s = deferred.SyncAll();
    if (!s.ok()) {
      PrintFileError(out_name, s);
      return 1;
    }
    bar.Done();
    return 0;
  }

  if (!no_create) {
    ctx.env = &env;
    Status s = Image::Create(CreateDriverName(out_fmt), ctx,
                             /*unsafe=*/true);  // the target's open checks the backing
    for (const std::string& w : warnings) PrintError("warning: " + w);
    if (!s.ok()) return create_failed(s);
  }
  ImageOpen to;  // -U shares the sources only: the target convert writes is locked
  to.image_opts = target_image_opts;
  // An image spec names its own driver: -O with it is refused as -f with --image-opts.
  to.format = target_image_opts ? (out_fmt_given ? out_fmt : "") : CreateDriverName(out_fmt);
  to.read_only = false;
  to.untrusted = untrusted;
  // A new encrypted target opens with the secret it was created with.
  for (const char* key : {"key-secret", "encrypt.key-secret"}) {
    if (auto it = ctx.options.find(key); it != ctx.options.end()) to.key_secret = it->second;
  }
  // An existing target (-n) keeps its own backing file open, as qemu-img does: a zero run
  // over it must be written where the backing file holds data (a version 2 qcow2 has no
  // zero flag to hide it; iotest 122).
  to.open_backing = cs.target_has_backing || no_create;
  to.env = &env;  // partial-cluster writes copy from it
  auto target = OpenOrReport(out_name, to);
  if (!target) return 1;
  if (!no_create && !target->ZeroInit()) cs.target_fresh = target_is_zero;
  if (bitmaps && !target->BitmapsSupported())
    return *stop_with(fmt::format("Format driver '{}' does not support bitmaps", target->format()));
  if (target->size() < src.size()) {
    PrintError("output file is smaller than input file");
    return 1;
  }
  if (compress && target_image_opts) {
    if (target->traits().compression != FormatTraits::Compression::kClusters) {
      PrintError("Compression not supported for this file format");
      return 1;
    }
    cs.compress = true;
    cs.codec = target->Info().compression;
  } else if (compress && compression == FormatTraits::Compression::kClusters) {
    cs.compress = true;
    cs.codec = target->Info().compression;
  }
  Status s = CopyToImage(src, *target, cs);
  if (s.ok() && bitmaps &&
      !CopyBitmaps(*source_bitmaps, first_source->size(), *target, skip_broken_bitmaps)) {
    (void)target->Close();
    return 1;
  }
  if (s.ok()) s = target->Close();
  target.reset();
  if (s.ok() && durable) s = deferred.SyncAll();
  if (!s.ok()) {
    PrintFileError(out_name, s);
    return 1;
  }
  bar.Done();
  return 0;
}

}  // namespace vimgfs::cli

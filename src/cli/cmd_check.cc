// vimgfs check: qemu-img check (human and JSON, -r leaks|all).
#include <cinttypes>
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs check [-f fmt] [--output=human|json] [-r leaks|all] [-T src_cache] [-q] [-U]\n"
    "                    [--untrusted] filename\n"
    "\n"
    "Checks an image's metadata for consistency, and repairs it with -r.\n"
    "  -r leaks   free leaked clusters;  -r all   also fix corruptions\n"
    "             (a VHDX log left unreplayed is replayed by either, and refused without)\n"
    "Exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only,\n"
    "63 the format cannot be checked.\n"
    "  -T src_cache  none or directsync: read around the host's page cache (O_DIRECT)\n"
    "  -U, --force-share  check the image even while another process writes it (no lock; not with -r)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

void DumpHuman(const CheckReport& r, bool quiet) {
  if (quiet) return;
  if (!(r.corruptions || r.leaks || r.check_errors)) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions)
      std::printf("\n%" PRId64
                  " errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  r.corruptions);
    if (r.leaks)
      std::printf("\n%" PRId64
                  " leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  r.leaks);
    if (r.check_errors)
      std::printf("\n%" PRId64 " internal errors have occurred during the check.\n", r.check_errors);
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    std::printf("%" PRIu64 "/%" PRIu64
                " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                "clusters\n",
                r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
                r.fragmented_clusters * 100.0 / r.allocated_clusters,
                r.compressed_clusters * 100.0 / r.allocated_clusters);
  }
  if (r.image_end_offset) std::printf("Image end offset: %" PRIu64 "\n", r.image_end_offset);
}

void DumpJson(const CheckReport& r, const std::string& filename, const std::string& format,
              int64_t leaks_fixed, int64_t corruptions_fixed) {
  nlohmann::ordered_json j;
  j["filename"] = filename;
  j["format"] = format;
  j["check-errors"] = r.check_errors;
  if (r.image_end_offset) j["image-end-offset"] = r.image_end_offset;
  if (r.corruptions) j["corruptions"] = r.corruptions;
  if (r.leaks) j["leaks"] = r.leaks;
  if (corruptions_fixed) j["corruptions-fixed"] = corruptions_fixed;
  if (leaks_fixed) j["leaks-fixed"] = leaks_fixed;
  if (r.total_clusters) j["total-clusters"] = r.total_clusters;
  if (r.allocated_clusters) j["allocated-clusters"] = r.allocated_clusters;
  if (r.fragmented_clusters) j["fragmented-clusters"] = r.fragmented_clusters;
  if (r.compressed_clusters) j["compressed-clusters"] = r.compressed_clusters;
  std::printf("%s\n", QemuJson(j).c_str());
}

}  // namespace

int RunCheck(int argc, char** argv) {
  std::string fmt, output = "human", src_cache;
  bool untrusted = false, quiet = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  RepairMode mode = RepairMode::kNone;
  bool force_share = false;
  OptionParser opts("check", kUsage);
  opts.Value('f', "format", &fmt)
      .Add('r', "repair", true,
           [&](const char* arg) -> std::optional<int> {
             if (std::string(arg) == "leaks") {
               mode = RepairMode::kLeaks;
             } else if (std::string(arg) == "all") {
               mode = RepairMode::kAll;
             } else {
               return UsageError("check", "Invalid option for -r. Use -r leaks or -r all.");
             }
             return std::nullopt;
           })
      .Value(0, "output", &output)
      .Value('T', nullptr, &src_cache)
      .Flag('q', nullptr, &quiet)
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (opts.operands().size() != 1) return UsageError("check", "Expecting one image file name");
  if (!CheckOutputFormat(output) || !CheckCacheMode(src_cache, true)) return 1;
  std::string filename = opts.operands()[0];
  ImageOpen o;
  o.env = CacheModeEnv(src_cache);
  o.image_opts = image_opts;
  o.force_share = force_share;
  o.format = fmt;
  o.untrusted = untrusted;
  o.read_only = mode == RepairMode::kNone;
  // check looks at this image's metadata only, but opens its backing chain as qemu-img does
  // (a backing file that cannot be opened fails the check).
  o.for_check = true;
  std::unique_ptr<Image> img = OpenOrReport(filename, o);
  if (!img) return 1;

  auto res = img->Check(mode);
  if (!res.ok()) {
    if (res.error().kind() == ErrorKind::kUnsupported) {
      PrintError("This image format does not support checks");
      return 63;
    }
    // A format may report findings before the cause, one per line (vmdk: "ERROR: ..."
    // then "Invalid argument"), as qemu-img prints them.
    std::string msg = res.error().message();
    if (auto nl = msg.rfind('\n'); nl != std::string::npos) {
      std::fprintf(stderr, "%s\n", msg.substr(0, nl).c_str());
      msg = msg.substr(nl + 1);
    }
    PrintError(fmt::format("Check failed: {}", msg));
    return 1;
  }
  CheckReport r = *res;
  if (!r.failure.empty()) {
    for (const std::string& e : r.error_reports) PrintError(e);
    for (const std::string& m : r.messages) std::fprintf(stderr, "%s\n", m.c_str());
    PrintError(fmt::format("Check failed: {}", r.failure));
    return 1;
  }
  for (const std::string& m : r.messages) std::fprintf(stderr, "%s\n", m.c_str());
  int64_t leaks_fixed = r.leaks_fixed, corruptions_fixed = r.corruptions_fixed;
  if (mode != RepairMode::kNone && (leaks_fixed || corruptions_fixed)) {
    if (output == "human" && !quiet)
      std::printf(
          "The following inconsistencies were found and repaired:\n\n"
          "    %" PRId64
          " leaked clusters\n"
          "    %" PRId64
          " corruptions\n\n"
          "Double checking the fixed image now...\n",
          leaks_fixed, corruptions_fixed);
    Status fl = img->Flush();
    if (!fl.ok()) {
      PrintFileError(filename, fl);
      return 1;
    }
    auto again = img->Check(RepairMode::kNone);
    if (!again.ok()) {
      PrintError(fmt::format("Check failed: {}", again.error().message()));
      return 1;
    }
    r = *again;
    for (const std::string& m : r.messages) std::fprintf(stderr, "%s\n", m.c_str());
  }
  if (output == "human") {
    DumpHuman(r, quiet);
  } else {
    DumpJson(r, filename, img->format(), leaks_fixed, corruptions_fixed);
  }
  Status cl = img->Close();
  if (!cl.ok() && mode != RepairMode::kNone) {
    PrintFileError(filename, cl);
    return 1;
  }
  if (r.check_errors) {
    PrintError("Check failed");
    return 1;
  }
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace vimgfs::cli

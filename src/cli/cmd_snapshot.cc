// vimgfs snapshot: qemu-img snapshot (-l list, -c create, -a apply, -d delete).
#include <getopt.h>

#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/info_render.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs snapshot [-f fmt] [-l | -c name | -a name | -d name] [-q] [-U] [--untrusted]\n"
    "                       filename\n"
    "\n"
    "Lists (-l, the default), creates (-c), applies (-a: reverts the disk to it) or deletes\n"
    "(-d) internal snapshots of a qcow2 image.\n"
    "  -U, --force-share  open the image even while another process writes it (no lock)\n";

}  // namespace

int RunSnapshot(int argc, char** argv) {
  std::string fmt, name;
  char action = 0;
  bool quiet = false, untrusted = false;
  enum { kUntrusted = 256, kImageOpts, kObject };
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"untrusted", no_argument, nullptr, kUntrusted},
                                 {"image-opts", no_argument, nullptr, kImageOpts},
                                 {"object", required_argument, nullptr, kObject},
                                 {nullptr, 0, nullptr, 0}};
  bool force_share = false;
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, ":la:c:d:f:hqU", kLong, nullptr)) != -1) {
    switch (c) {
      case 'h': std::fputs(kUsage, stdout); return 0;
      case 'f': fmt = optarg; break;
      case 'l':
      case 'a':
      case 'c':
      case 'd':
        if (action) return UsageError("snapshot", "Cannot mix -l, -a, -c and -d");
        action = static_cast<char>(c);
        if (c != 'l') name = optarg;
        break;
      case 'q': quiet = true; break;
      case 'U': force_share = true; break;
      case kUntrusted: untrusted = true; break;
      case kImageOpts: PrintError("--image-opts is not supported"); return 1;
      case kObject: break;
      case ':': return UsageError("snapshot", fmt::format("option requires an argument -- '{}'", argv[optind - 1]));
      default: return UsageError("snapshot", fmt::format("invalid option -- '{}'", argv[optind - 1]));
    }
  }
  if (!action) action = 'l';
  if (optind != argc - 1) return UsageError("snapshot", "Expecting one image file name");
  std::string filename = argv[optind];
  ImageOpen o;
  o.force_share = force_share;
  o.format = fmt;
  o.read_only = action == 'l';
  o.untrusted = untrusted;
  o.open_backing = false;
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;
  (void)quiet;

  Status s;
  switch (action) {
    case 'l': {
      FormatInfo fi = img->Info();
      if (fi.snapshots.empty()) return 0;
      std::printf("Snapshot list:\n%s\n", SnapshotTableHeader().c_str());
      for (const SnapshotInfo& si : fi.snapshots) std::printf("%s\n", SnapshotTableRow(si).c_str());
      return 0;
    }
    case 'c':
      s = img->cluster_map().SnapshotCreate(name);
      if (!s.ok()) s = s.WithContext("Could not create snapshot '{}'", name);
      break;
    case 'a':
      s = img->cluster_map().SnapshotApply(name);
      if (!s.ok()) s = s.WithContext("Could not apply snapshot '{}'", name);
      break;
    case 'd':
      s = img->cluster_map().SnapshotDelete(name);
      if (!s.ok()) s = s.WithContext("Could not delete snapshot '{}'", name);
      break;
  }
  if (s.ok()) s = img->Close();
  if (!s.ok()) {
    PrintError(s.message());
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

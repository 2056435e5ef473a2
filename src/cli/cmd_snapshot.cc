// vimgfs snapshot: qemu-img snapshot (-l list, -c create, -a apply, -d delete).
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/info_render.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs snapshot [-f fmt] [-l | -c name | -a name | -d name] [-q] [-U] [--untrusted]\n"
    "                       filename\n"
    "\n"
    "Lists (-l, the default), creates (-c), applies (-a: reverts the disk to it) or deletes\n"
    "(-d) internal snapshots of a qcow2 image.\n"
    "  -U, --force-share  list snapshots even while another process writes the image (no lock; -l only)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

}  // namespace

int RunSnapshot(int argc, char** argv) {
  std::string fmt, name;
  char action = 0;
  bool quiet = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  bool force_share = false;
  auto set_action = [&](char which) {
    return [&, which](const char* arg) -> std::optional<int> {
      if (action) return UsageError("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
      action = which;
      if (arg) name = arg;
      return std::nullopt;
    };
  };
  OptionParser opts("snapshot", kUsage);
  opts.Add('l', nullptr, false, set_action('l'))
      .Add('a', nullptr, true, set_action('a'))
      .Add('c', nullptr, true, set_action('c'))
      .Add('d', nullptr, true, set_action('d'))
      .Value('f', nullptr, &fmt)
      .Flag('q', nullptr, &quiet)
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (!action) action = 'l';
  if (opts.operands().size() != 1) return UsageError("snapshot", "Expecting one image file name");
  std::string filename = opts.operands()[0];
  ImageOpen o;
  o.image_opts = image_opts;
  o.force_share = force_share;
  o.format = fmt;
  o.read_only = action == 'l';
  o.untrusted = untrusted;
  o.open_backing = false;
  o.keep_bitmaps = action == 'c' || action == 'd';  // no guest data changes
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
    // qemu-img's words: a failed create says only its errno; a format without snapshots
    // cannot load one and finds none to delete.
    case 'c':
      s = img->SnapshotCreate(name);
      if (!s.ok()) {
        const int err = s.err() ? s.err() : EIO;
        s = Status::Io("Could not create snapshot '{}': {} ({})", name, -err, std::strerror(err));
      }
      break;
    case 'a':
      s = img->SnapshotApply(name);
      if (s.kind() == ErrorKind::kUnsupported)
        s = Status::Unsupported("Block driver does not support snapshots");
      if (!s.ok()) s = s.WithContext("Could not apply snapshot '{}'", name);
      break;
    case 'd':
      s = img->SnapshotDelete(name);
      if (s.kind() == ErrorKind::kUnsupported) s = Status::NotFound("snapshot not found");
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

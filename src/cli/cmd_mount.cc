// `vimgfs [mount] [options] IMAGE MOUNTPOINT`: parse, then hand to src/fuse.
#include <cstdio>
#include <cstring>

#include "cli/commands.h"
#include "fuse/mount.h"
#include "fuse/mount_config.h"

namespace vimgfs::cli {

int RunMount(int argc, char** argv) {
  // Shorthand form: argv[0] is the program path; explicit form: "mount".
  bool explicit_form = argc > 0 && std::strcmp(argv[0], "mount") == 0;
  std::string prog = "vimgfs";
  auto config = mount::ParseMountArgs(argc, argv);
  if (!config.ok()) {
    std::fprintf(stderr, "vimgfs%s: %s\nTry 'vimgfs mount --help' for more information.\n",
                 explicit_form ? " mount" : "", config.error().ToString().c_str());
    return 1;
  }
  if (config->help) {
    std::fputs(mount::MountUsage(prog).c_str(), stdout);
    return 0;
  }
  if (config->version) {
#ifdef VIMGFS_VERSION
    std::printf("vimgfs version %s\n", VIMGFS_VERSION);
#endif
    return 0;
  }
  return mount::RunMount(*config);
}

}  // namespace vimgfs::cli

// `vimgfs [mount] [options] IMAGE MOUNTPOINT`: parse, then hand to src/fuse.
#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/image_spec.h"
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
  // An image spec (--image-opts, json:) read here, as every command reads it.
  if (config->image_opts || IsJsonName(config->image)) {
    if (config->image_opts && !config->format.empty()) {
      PrintError("--image-opts and --format are mutually exclusive");
      return 1;
    }
    auto spec = ParseImageSpec(config->image, config->image_opts);
    if (spec.ok() && !spec->invalid.ok()) spec = spec->invalid;
    if (!spec.ok()) {
      PrintError(OpenErrorMessage(config->image, spec.error()));
      return 1;
    }
    config->image = spec->filename;
    config->format = spec->format;
    config->read_only = config->read_only || spec->read_only;
    if (spec->direct) config->direct_io = *spec->direct;
    if (!spec->key_secret.empty()) config->key_secret = spec->key_secret;
    config->open_backing = !spec->no_backing;
    config->data_file = spec->data_file;
    config->backing_specs = spec->backing;
  }
  return mount::RunMount(*config);
}

}  // namespace vimgfs::cli

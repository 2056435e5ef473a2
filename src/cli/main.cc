// vimgfs: dispatch to a command, or mount when the first argument is not one.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "cli/cli_util.h"
#include "cli/commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* synopsis;
};

const Command kCommands[] = {
    {"mount", vimgfs::cli::RunMount, "mount [options] IMAGE MOUNTPOINT   serve the image as a raw file"},
    {"create", vimgfs::cli::RunCreate, "create [-f fmt] [-o opts] [-b backing [-F fmt]] [-u] file [size]"},
    {"info", vimgfs::cli::RunInfo, "info [-f fmt] [--output=human|json] [--backing-chain] file"},
    {"check", vimgfs::cli::RunCheck, "check [-f fmt] [--output=human|json] [-r leaks|all] file"},
    {"convert", vimgfs::cli::RunConvert, "convert [-f fmt] [-O fmt] [-o opts] [-c] [-p] file... output"},
    {"compare", vimgfs::cli::RunCompare, "compare [-f fmt] [-F fmt] [-s] file1 file2"},
    {"map", vimgfs::cli::RunMap, "map [-f fmt] [--output=human|json] file"},
    {"resize", vimgfs::cli::RunResize, "resize [-f fmt] [--shrink] file [+|-]size"},
    {"snapshot", vimgfs::cli::RunSnapshot, "snapshot [-l | -c name | -a name | -d name] file"},
    {"rebase", vimgfs::cli::RunRebase, "rebase [-f fmt] [-u] -b backing [-F fmt] file"},
    {"commit", vimgfs::cli::RunCommit, "commit [-f fmt] [-d] [-b base] file"},
    {"amend", vimgfs::cli::RunAmend, "amend [-f fmt] [-p] [--force] -o options file"},
    {"bitmap", vimgfs::cli::RunBitmap,
     "bitmap (--add|--remove|--clear|--enable|--disable|--merge SRC)... [-g gran] [-b file] file name"},
    {"dd", vimgfs::cli::RunDd, "dd [-f fmt] [-O fmt] [bs=N] [count=N] [skip=N] if=input of=output"},
    {"bench", vimgfs::cli::RunBench, "bench [-c count] [-d depth] [-f fmt] [-s size] [-w] [-t cache] file"},
    {"measure", vimgfs::cli::RunMeasure,
     "measure [-O fmt] [-o opts] [--output=human|json] (--size N | file)"},
    {"run", vimgfs::cli::RunRun, "run [-r] [-p N | --partition LABEL] IMAGE -- COMMAND...  edit guest files"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "vimgfs %s - mount VM disk images as a raw file; qemu-img compatible tools\n\n"
               "usage: vimgfs [mount-options] IMAGE MOUNTPOINT\n"
               "       vimgfs COMMAND [options] ...\n\n"
               "Commands:\n",
               VIMGFS_VERSION);
  for (const Command& c : kCommands) std::fprintf(out, "  %s\n", c.synopsis);
  std::fprintf(out,
               "\nFormats: qcow2, vmdk, vdi, vpc (VHD), vhdx, qed, qcow, parallels, luks, raw (detected\n"
               "from content unless -f is given).\n"
               "Read-only, as in qemu: bochs, cloop, dmg (Apple disk images, known by their .dmg name).\n"
               "Run 'vimgfs COMMAND --help' for a command's options, 'vimgfs mount --help'\n"
               "for the mount options, and see vimgfs(1).\n");
}

}  // namespace

int main(int argc, char** argv) {
  vimgfs::cli::SetProgramName(argv[0]);
  if (argc < 2) {
    PrintUsage(stderr);
    return 1;
  }
  std::string_view first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    PrintUsage(stdout);
    return 0;
  }
  if (first == "--version" || first == "-V") {
    std::printf("vimgfs version %s\n", VIMGFS_VERSION);
    return 0;
  }
  for (const Command& c : kCommands) {
    if (first == c.name) return c.run(argc - 1, argv + 1);
  }
  // Shorthand mount: `vimgfs [options] IMAGE MOUNTPOINT` (also what mount.fuse3 runs).
  return vimgfs::cli::RunMount(argc, argv);
}

// vimgfs rebase (in progress).
#include "cli/cli_util.h"
#include "cli/commands.h"

namespace vimgfs::cli {

int RunRebase(int, char**) {
  PrintError("rebase: not implemented yet");
  return 1;
}

}  // namespace vimgfs::cli

// vimgfs commit (in progress).
#include "cli/cli_util.h"
#include "cli/commands.h"

namespace vimgfs::cli {

int RunCommit(int, char**) {
  PrintError("commit: not implemented yet");
  return 1;
}

}  // namespace vimgfs::cli

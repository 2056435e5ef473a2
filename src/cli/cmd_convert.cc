// vimgfs convert (in progress).
#include "cli/cli_util.h"
#include "cli/commands.h"

namespace vimgfs::cli {

int RunConvert(int, char**) {
  PrintError("convert: not implemented yet");
  return 1;
}

}  // namespace vimgfs::cli

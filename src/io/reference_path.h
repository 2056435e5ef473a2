// Lexical rules for names an image stores, shared by every Env's OpenReference.
#pragma once

#include <string>
#include <vector>

#include "vimgfs/env.h"

namespace vimgfs {

// The components of `name` below folder `dir` (as given, and its realpath `real_dir`),
// for a resolution that must stay inside it: "." and empty parts dropped; ".." refused
// (EXDEV), as is an absolute name that does not start with the folder.
Result<std::vector<std::string>> ComponentsBeneath(const std::string& dir, const std::string& real_dir,
                                                   const std::string& name);

}  // namespace vimgfs

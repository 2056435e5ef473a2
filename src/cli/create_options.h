// Format creation options as qemu-img shows them: `-o help` and the "Formatting ..." line.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs::cli {

using OptionList = std::vector<std::pair<std::string, std::string>>;

// Prints "Supported <fmt> options:" and the driver's options, as `qemu-img create -o help`.
void PrintCreateOptionHelp(const FormatDriver& driver);
// Parses the -o texts of create and convert, in order, into *opts. "help" or "?" among
// them prints fmt's options (PrintCreateOptionHelp). Returns the command's exit code when
// it is done here (0 after help; 1 after a bad list or help for an unknown format, with
// the error printed), nullopt to go on.
std::optional<int> CollectCreateOptions(const std::vector<std::string>& texts, const std::string& fmt,
                                        OptionList* opts);
// The first option key the format does not take, or "".
std::string UnknownCreateOption(const FormatDriver& driver, const OptionList& opts);
bool FormatHasBacking(const std::string& fmt);
// "cluster_size=65536 ... size=N ..." (after "fmt=X "), in qemu's order with its defaults.
// opts may hold backing_file/backing_fmt; size is given separately.
std::string FormattingLine(const std::string& fmt, uint64_t size, const OptionList& opts);

}  // namespace vimgfs::cli

// Format creation options as qemu-img takes and shows them: -o lists, `-o help`, their
// checks and the "Formatting ..." line. A format's options are qemu's for that format,
// merged with those of the file protocol under it (size, nocow, preallocation,
// extent_size_hint), in qemu's order.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cli/option_parser.h"
#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs::cli {

// Option name and value, each name once (a later value replaces an earlier one, as the
// last one given counts in qemu). Sizes and numbers hold their value as a decimal.
using OptionList = std::vector<std::pair<std::string, std::string>>;

// Adds one -o argument to *options as qemu-img does: each must be a valid list (not
// empty, no leading comma, not ending in an odd number of commas); they are joined with
// ','. Otherwise prints "Invalid option list: ARG" and returns false.
bool AccumulateOptions(std::string* options, const std::string& arg);
// The same as an OptionParser handler for -o.
OptionParser::Handler AccumulateOptionsInto(std::string* options);
// Whether an element of the list ("a=b,help,c", ",," escapes a comma) is "help" or "?".
bool HasHelpOption(const std::string& options);
// `-o help`: the create options of fmt, with the file protocol's when a target filename
// is given ("Supported options:"), else the format's alone. Returns the exit code.
int PrintCreateOptionHelp(const std::string& fmt, const std::string* filename);

// `amend -o help`: the amend options of fmt ("Amend options for 'fmt':"), or qemu's
// error for a format that has none. Returns the exit code.
int PrintAmendOptionHelp(const std::string& fmt);
// Parses the -o text of amend against the driver's amend options, as create's (bools as
// on/off); an option only create takes fails with qemu's hint on the next line.
Status ParseAmendOptions(const FormatDriver& driver, const std::string& text,
                         std::map<std::string, std::string>* out);

// Why a format cannot be created: "Unknown file format 'x'" or "Format driver 'x' does not
// support image creation". Empty when it can (qcow2, vmdk, vdi, vpc, vhdx, qcow, raw, file).
std::string CreateFormatError(const std::string& fmt);
// The driver that writes fmt ("file" is raw on the file protocol).
std::string CreateDriverName(const std::string& fmt);
// That driver, or null for a format vimgfs cannot create.
const FormatDriver* CreateDriver(const std::string& fmt);

// Parses the -o text as qemu parses create options: a name without '=' is "on" ("noX" is
// X=off), each name must be one of fmt's options and each value of its type. Adds to *opts.
// Errors read as qemu's ("Invalid parameter 'x'", "Parameter 'x' expects ...").
Status ParseCreateOptions(const std::string& fmt, const std::string& text, OptionList* opts);
// Sets an option (after -o: the size, -b, -F). false when fmt has no such option.
bool SetCreateOption(const std::string& fmt, const std::string& name, const std::string& value,
                     OptionList* opts);
std::optional<std::string> FindOption(const OptionList& opts, const std::string& name);

// "cluster_size=65536 ... size=N ..." (after "fmt=X "): the options given and the defaults
// qemu prints, in qemu's order.
std::string FormattingLine(const std::string& fmt, const OptionList& opts);

// The file protocol's options, applied to the new image file.
struct FileCreateOptions {
  bool nocow = false;
  std::optional<uint64_t> extent_size_hint;  // given; qemu's default is 1 MiB
};
// Splits opts into what the format driver takes (bools as on/off; without size, backing
// options and the file protocol's) and the file protocol's. Fails as qemu does for an
// extent_size_hint above 4 GiB - 1.
Status SplitCreateOptions(const std::string& fmt, const OptionList& opts,
                          std::map<std::string, std::string>* driver_opts, FileCreateOptions* file);

}  // namespace vimgfs::cli

#include "cli/create_options.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "cli/cli_util.h"
#include "vimgfs/image.h"

namespace vimgfs::cli {
namespace {

using Desc = CreateOptionSpec;
using Kind = CreateOptionSpec::Type;

const char kPreallocHelp[] = "Preallocation mode (allowed values: off, falloc, full)";

// The file protocol's create options, in qemu's order.
const std::vector<Desc> kFileProtocol = {
    {"size", Kind::kSize, "Virtual disk size"},
    {"nocow", Kind::kBool, "Turn off copy-on-write (valid only on btrfs)"},
    {"preallocation", Kind::kString, kPreallocHelp},
    {"extent_size_hint", Kind::kSize, "Extent size hint for the image file, 0 to disable"},
};

// Each format's own create options (its driver declares them), or the file protocol's.
const std::vector<Desc>* FormatDescs(const std::string& fmt) {
  if (fmt == "file") return &kFileProtocol;
  const FormatDriver* d = FindFormat(fmt);
  return d && !d->traits().read_only ? &d->traits().create_options : nullptr;
}

// The format's options, then the file protocol's it does not have (qemu_opts_append).
std::vector<Desc> MergedDescs(const std::string& fmt) {
  std::vector<Desc> out = *FormatDescs(fmt);
  for (const Desc& d : kFileProtocol) {
    if (std::none_of(out.begin(), out.end(), [&](const Desc& o) { return std::string(o.name) == d.name; }))
      out.push_back(d);
  }
  return out;
}

const Desc* FindDesc(const std::vector<Desc>& descs, const std::string& name) {
  for (const Desc& d : descs)
    if (name == d.name) return &d;
  return nullptr;
}

Status ParseOptionsOf(const std::vector<Desc>& descs, const std::string& text, OptionList* opts);

// qemu's drivers that create no images and that vimgfs has no driver for. Read-only
// formats vimgfs drives (bochs, cloop, dmg) say so by their traits.
bool IsQemuReadOnlyFormat(const std::string& fmt) {
  if (const FormatDriver* d = FindFormat(fmt)) return d->traits().read_only;
  static const std::set<std::string> kNames = {
      "vvfat",       "blkdebug", "blkverify",   "blklogwrites",   "null-co",
      "null-aio",    "throttle", "compress",    "copy-on-read",   "copy-before-write",
      "preallocate", "quorum",   "replication", "snapshot-access"};
  return kNames.count(fmt) > 0;
}

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

const char* TypeLabel(Kind k) {
  switch (k) {
    case Kind::kSize:
      return "size";
    case Kind::kBool:
      return "bool (on/off)";
    case Kind::kNumber:
      return "num";
    case Kind::kString:
      break;
  }
  return "str";
}

// qemu_opts_print_help: one line per option, sorted.
void PrintOptionLines(const std::vector<Desc>& descs) {
  std::vector<std::string> lines;
  for (const Desc& d : descs) {
    std::string line = fmt::format("  {}=<{}>", d.name, TypeLabel(d.type));
    if (line.size() < 24) line.resize(24, ' ');
    lines.push_back(line + " - " + d.help);
  }
  std::sort(lines.begin(), lines.end());
  for (const std::string& l : lines) std::printf("%s\n", l.c_str());
}

// qemu's get_opt_value: up to an unescaped ',' (",," is a comma); returns the position
// of that comma or the end.
size_t ReadOptValue(const std::string& text, size_t pos, std::string* value) {
  value->clear();
  while (pos < text.size()) {
    if (text[pos] == ',') {
      if (pos + 1 < text.size() && text[pos + 1] == ',') {
        *value += ',';
        pos += 2;
        continue;
      }
      break;
    }
    *value += text[pos++];
  }
  return pos;
}

// Checks a value against its option's type; the stored form of sizes and numbers is the
// number (printed as qemu prints it, as a signed 64-bit decimal).
Status CheckValue(const Desc& d, const std::string& value, std::string* stored) {
  *stored = value;
  switch (d.type) {
    case Kind::kString:
      return Status::Ok();
    case Kind::kBool:
      if (value == "on" || value == "yes" || value == "true" || value == "y" || value == "off" ||
          value == "no" || value == "false" || value == "n")
        return Status::Ok();
      return Status::InvalidArgument("Parameter '{}' expects 'on' or 'off'", d.name);
    case Kind::kSize: {
      auto n = ParseSize(value);
      if (!n.ok() && n.error().kind() == ErrorKind::kOutOfRange)
        return Status::InvalidArgument("Value '{}' is out of range for parameter '{}'", value, d.name);
      if (!n.ok())
        return Status::InvalidArgument(
            "Parameter '{}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.",
            d.name);
      *stored = std::to_string(static_cast<int64_t>(*n));
      return Status::Ok();
    }
    case Kind::kNumber: {
      // qemu_strtou64 with base 0: decimal, 0x hex or 0 octal; strtoull's wrap of "-1".
      char* end = nullptr;
      errno = 0;
      unsigned long long n = std::strtoull(value.c_str(), &end, 0);
      if (errno == ERANGE)
        return Status::InvalidArgument("Value '{}' is too large for parameter '{}'", value, d.name);
      if (end == value.c_str() || *end)
        return Status::InvalidArgument("Parameter '{}' expects a number", d.name);
      *stored = std::to_string(static_cast<int64_t>(n));
      return Status::Ok();
    }
  }
  return Status::Ok();
}

void Put(OptionList* opts, const std::string& name, const std::string& value) {
  auto it = std::find_if(opts->begin(), opts->end(), [&](const auto& p) { return p.first == name; });
  if (it != opts->end())
    it->second = value;
  else
    opts->emplace_back(name, value);
}

bool IsTrue(const std::string& v) { return v == "on" || v == "yes" || v == "true" || v == "y"; }

}  // namespace

OptionParser::Handler AccumulateOptionsInto(std::string* options) {
  return [options](const char* arg) -> std::optional<int> {
    if (!AccumulateOptions(options, arg)) return 1;
    return std::nullopt;
  };
}

bool AccumulateOptions(std::string* options, const std::string& arg) {
  size_t trailing = 0;
  while (trailing < arg.size() && arg[arg.size() - 1 - trailing] == ',') trailing++;
  if (arg.empty() || arg[0] == ',' || trailing % 2 != 0) {
    PrintError("Invalid option list: " + arg);
    return false;
  }
  *options = options->empty() ? arg : *options + "," + arg;
  return true;
}

bool HasHelpOption(const std::string& options) {
  size_t pos = 0;
  std::string element;
  while (pos < options.size()) {
    pos = ReadOptValue(options, pos, &element);
    if (pos < options.size()) pos++;
    if (element == "help" || element == "?") return true;
  }
  return false;
}

std::string CreateFormatError(const std::string& fmt) {
  if (IsQemuReadOnlyFormat(fmt))
    return fmt::format("Format driver '{}' does not support image creation", fmt);
  if (FormatDescs(fmt)) return "";
  return fmt::format("Unknown file format '{}'", fmt);
}

std::string CreateDriverName(const std::string& fmt) { return fmt == "file" ? "raw" : fmt; }

const FormatDriver* CreateDriver(const std::string& fmt) { return FindFormat(CreateDriverName(fmt)); }

int PrintCreateOptionHelp(const std::string& fmt, const std::string* filename) {
  if (std::string err = CreateFormatError(fmt); !err.empty()) {
    PrintError(err);
    return 1;
  }
  if (filename) {
    if (auto host = HostFilename(*filename); !host.ok()) {
      PrintError(host.error().message());
      return 1;
    }
  }
  if (filename)
    std::printf("Supported options:\n");
  else
    std::printf("Supported %s options:\n", fmt.c_str());
  PrintOptionLines(filename ? MergedDescs(fmt) : *FormatDescs(fmt));
  if (!filename)
    std::printf(
        "\nThe protocol level may support further options.\n"
        "Specify the target filename to include those options.\n");
  return 0;
}

Status ParseCreateOptions(const std::string& fmt, const std::string& text, OptionList* opts) {
  return ParseOptionsOf(MergedDescs(fmt), text, opts);
}

int PrintAmendOptionHelp(const std::string& fmt) {
  const FormatDriver* d = FindFormat(fmt);
  if (!d && !IsUndrivenQemuFormat(fmt) && fmt != "file") {
    PrintError(fmt::format("Unknown file format '{}'", fmt));
    return 1;
  }
  if (!d || d->traits().amend_options.empty()) {
    PrintError(fmt::format("Format driver '{}' does not support option amendment", fmt));
    return 1;
  }
  std::printf("Amend options for '%s':\n", fmt.c_str());
  PrintOptionLines(d->traits().amend_options);
  return 0;
}

Status ParseAmendOptions(const FormatDriver& driver, const std::string& text,
                         std::map<std::string, std::string>* out) {
  const std::vector<Desc>& descs = driver.traits().amend_options;
  OptionList opts;
  Status s = ParseOptionsOf(descs, text, &opts);
  if (!s.ok()) {
    // What the create options would take is worth a hint, as qemu-img gives it.
    std::vector<Desc> with_create = descs;
    with_create.insert(with_create.end(), driver.traits().create_options.begin(),
                       driver.traits().create_options.end());
    OptionList scratch;
    if (ParseOptionsOf(with_create, text, &scratch).ok())
      return Status::Error(s.kind(), s.err(),
                           s.message() + "\nThis option is only supported for image creation");
    return s;
  }
  for (const auto& [k, v] : opts) {
    const Desc* d = FindDesc(descs, k);
    (*out)[k] = d->type == Kind::kBool ? (IsTrue(v) ? "on" : "off") : v;
  }
  return Status::Ok();
}

namespace {

Status ParseOptionsOf(const std::vector<Desc>& descs, const std::string& text, OptionList* opts) {
  size_t pos = 0;
  while (pos < text.size()) {
    // qemu's get_opt_name_value: "name=value" or a bare "name" (on) or "noname" (off).
    size_t len = text.find_first_of("=,", pos);
    if (len == std::string::npos) len = text.size();
    std::string name = text.substr(pos, len - pos), value;
    if (len < text.size() && text[len] == '=') {
      pos = ReadOptValue(text, len + 1, &value);
    } else {
      pos = len;
      if (name.rfind("no", 0) == 0) {
        name = name.substr(2);
        value = "off";
      } else {
        value = "on";
      }
    }
    if (pos < text.size()) pos++;  // the comma
    if (name == "id") continue;
    const Desc* d = FindDesc(descs, name);
    if (!d) return Status::InvalidArgument("Invalid parameter '{}'", name);
    std::string stored;
    RETURN_IF_ERROR(CheckValue(*d, value, &stored));
    Put(opts, name, stored);
  }
  return Status::Ok();
}

}  // namespace

bool SetCreateOption(const std::string& fmt, const std::string& name, const std::string& value,
                     OptionList* opts) {
  const std::vector<Desc> descs = MergedDescs(fmt);
  const Desc* d = FindDesc(descs, name);
  std::string stored;
  if (!d || !CheckValue(*d, value, &stored).ok()) return false;
  Put(opts, name, stored);
  return true;
}

std::optional<std::string> FindOption(const OptionList& opts, const std::string& name) {
  for (const auto& [k, v] : opts)
    if (k == name) return v;
  return std::nullopt;
}

std::string FormattingLine(const std::string& fmt, const OptionList& opts) {
  std::string out;
  for (const Desc& d : MergedDescs(fmt)) {
    std::optional<std::string> v = FindOption(opts, d.name);
    if (!v && !d.default_value) continue;
    if (!out.empty()) out += ' ';
    out +=
        std::string(d.name) + "=" + (v && d.type == Kind::kString ? Escape(*v) : v.value_or(d.default_value));
  }
  return out;
}

Status SplitCreateOptions(const std::string& fmt, const OptionList& opts,
                          std::map<std::string, std::string>* driver_opts, FileCreateOptions* file) {
  const std::vector<Desc> descs = MergedDescs(fmt);
  const FormatDriver* driver = CreateDriver(fmt);
  const auto prealloc =
      driver ? driver->traits().create_preallocation : FormatTraits::CreatePreallocation::kFile;
  for (const auto& [k, v] : opts) {
    const Desc* d = FindDesc(descs, k);
    if (k == "size" || k == "backing_file" || k == "backing_fmt") continue;
    if (k == "preallocation" && prealloc != FormatTraits::CreatePreallocation::kFormat) {
      // The file protocol's, applied to the new, empty file: the format then writes it
      // (raw and flat vmdk extents take it; a vdi or sparse vmdk file keeps its size).
      if (v != "off" && v != "metadata" && v != "falloc" && v != "full")
        return Status::InvalidArgument("invalid parameter value: {}", v);
      if (v == "metadata") return Status::InvalidArgument("Unsupported preallocation mode: metadata");
      if (prealloc == FormatTraits::CreatePreallocation::kIgnored) continue;
      (*driver_opts)[k] = v;
    } else if (k == "nocow") {
      file->nocow = IsTrue(v);
    } else if (k == "extent_size_hint") {
      uint64_t hint = std::strtoull(v.c_str(), nullptr, 10);  // stored as a decimal
      if (hint > 0xffffffffu) return Status::InvalidArgument("Extent size hint is too large");
      file->extent_size_hint = hint;
    } else if (d && d->type == Kind::kBool) {
      (*driver_opts)[k] = IsTrue(v) ? "on" : "off";
    } else {
      (*driver_opts)[k] = v;
    }
  }
  return Status::Ok();
}

}  // namespace vimgfs::cli

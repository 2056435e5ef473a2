// vimgfs create: qemu-img create.
#include <algorithm>
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/create_options.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs create [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u] [-q]\n"
    "                     [--untrusted] filename [size]\n"
    "\n"
    "Creates a new disk image 'filename' of 'size' bytes (suffixes k, M, G, T, P, E).\n"
    "  -f fmt          image format: qcow2, vmdk, vdi or raw (default raw)\n"
    "  -o options      comma-separated format options ('-o help' lists them)\n"
    "  -b backing_file image the new one is based on (its size is used when none is given)\n"
    "  -F backing_fmt  format of the backing file\n"
    "  -u              do not open or check the backing file\n"
    "  -q              quiet: print nothing on success\n"
    "  --untrusted     accepted for symmetry with the other commands\n";

}  // namespace

int RunCreate(int argc, char** argv) {
  std::string fmt = "raw";
  std::string backing, backing_fmt;
  std::vector<std::string> option_texts;
  bool unsafe = false, quiet = false;
  auto add_option_text = [&](const char* arg) -> std::optional<int> {
    option_texts.push_back(arg);
    return std::nullopt;
  };
  OptionParser parser("create", kUsage);
  parser.Value('f', nullptr, &fmt)
      .Value('F', nullptr, &backing_fmt)
      .Value('b', nullptr, &backing)
      .Add('o', nullptr, true, add_option_text)
      .Flag('q', nullptr, &quiet)
      .Flag('u', nullptr, &unsafe)
      .Accept(0, "untrusted", false)
      .Accept(0, "object", true);
  if (auto stop = parser.Parse(argc, argv)) return *stop;
  const std::vector<std::string>& operands = parser.operands();

  OptionList opts;
  if (auto done = CollectCreateOptions(option_texts, fmt, &opts)) return *done;
  const FormatDriver* driver = FindFormat(fmt);
  if (operands.empty()) return UsageError("create", "Expecting image file name");
  std::string filename = operands[0];
  std::optional<uint64_t> size;
  if (operands.size() > 1) {
    auto sz = ParseSize(operands[1]);
    if (!sz.ok()) {
      PrintError(sz.error().message());
      return 1;
    }
    size = *sz;
  }
  if (operands.size() > 2) return UsageError("create", fmt::format("Unexpected argument: {}", operands[2]));
  if (!driver) {
    PrintError(fmt::format("{}: Unknown file format '{}'", filename, fmt));
    return 1;
  }

  auto take = [&](const std::string& key) -> std::optional<std::string> {
    auto it = std::find_if(opts.begin(), opts.end(), [&](const auto& p) { return p.first == key; });
    if (it == opts.end()) return std::nullopt;
    return it->second;
  };
  if (!backing.empty() && !FormatHasBacking(fmt)) {
    PrintError(fmt::format("{}: Backing file not supported for file format '{}'", filename, fmt));
    return 1;
  }
  if (!backing.empty()) opts.emplace_back("backing_file", backing);
  if (!backing_fmt.empty()) opts.emplace_back("backing_fmt", backing_fmt);
  // Later duplicates win (-b after -o backing_file=).
  {
    std::vector<std::pair<std::string, std::string>> dedup;
    for (const auto& kv : opts) {
      auto it = std::find_if(dedup.begin(), dedup.end(), [&](const auto& p) { return p.first == kv.first; });
      if (it != dedup.end()) it->second = kv.second; else dedup.push_back(kv);
    }
    opts = dedup;
  }
  if (auto s = take("size")) {
    auto sz = ParseSize(*s);
    if (!sz.ok()) {
      PrintError(fmt::format("{}: Parameter 'size' expects a non-negative number below 2^64", filename));
      return 1;
    }
    if (!size) size = *sz;
  }
  std::string unknown = UnknownCreateOption(*driver, opts);
  if (!unknown.empty()) {
    PrintError(fmt::format("{}: Invalid parameter '{}'", filename, unknown));
    return 1;
  }
  std::optional<std::string> bfile = take("backing_file");
  std::optional<std::string> bfmt = take("backing_fmt");
  if (bfile && !FormatHasBacking(fmt)) {
    PrintError(fmt::format("{}: Backing file not supported for file format '{}'", filename, fmt));
    return 1;
  }
  if (bfile && !bfmt) {
    PrintError(fmt::format("{}: Backing file specified without backing format", filename));
    if (!unsafe) {
      Env* env = Env::Default();
      auto p = Image::Probe(*env, PathCombine(filename, *bfile));
      if (p.ok()) std::fprintf(stderr, "Detected format of %s.\n", p->c_str());
    }
    return 1;
  }
  if (bfile && !unsafe) {
    ImageOpen bo;
    bo.format = *bfmt;
    bo.force_share = true;  // only its size is read: qemu-img reads it even while in use
    auto b = OpenImage(PathCombine(filename, *bfile), bo);
    if (!b.ok()) {
      // Here qemu-img names a host error once: "Could not open 'b': No such file or directory".
      const std::string& msg = b.error().message();
      PrintError(fmt::format("{}: {}", filename,
                             msg.rfind("Could not open '", 0) == 0 ? msg : OpenErrorMessage(*bfile, b.error())));
      std::fprintf(stderr, "Could not open backing image.\n");
      return 1;
    }
    if (!size) size = (*b)->size();
  }
  if (!size) {
    PrintError(fmt::format("{}: Image creation needs a size parameter", filename));
    return 1;
  }
  opts.erase(std::remove_if(opts.begin(), opts.end(), [](const auto& p) { return p.first == "size"; }),
             opts.end());
  if (!quiet) {
    std::printf("Formatting '%s', fmt=%s %s\n", filename.c_str(), fmt.c_str(),
                FormattingLine(fmt, *size, opts).c_str());
    std::fflush(stdout);
  }

  CreateContext ctx;
  ctx.env = Env::Default();
  ctx.path = filename;
  ctx.size = *size;
  for (const auto& [k, v] : opts) {
    if (k == "backing_file" || k == "backing_fmt") continue;
    ctx.options[k] = v;
  }
  if (bfile) ctx.backing = BackingRef{*bfile, bfmt.value_or("")};
  Status s = Image::Create(fmt, ctx, unsafe);
  if (!s.ok()) {
    PrintFileError(filename, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

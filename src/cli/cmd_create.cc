// vimgfs create: qemu-img create.
#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/image_spec.h"
#include "crypto/secrets.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/create_options.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs create [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u] [-q]\n"
    "                     [--untrusted] filename [size]\n"
    "\n"
    "Creates a new disk image 'filename' of 'size' bytes (suffixes k, M, G, T, P, E; 1.5M).\n"
    "  -f fmt          image format: qcow2, vmdk, vdi, vpc, vhdx, qed, qcow, parallels or raw\n"
    "                  (default raw; 'file' is raw)\n"
    "  -o options      comma-separated format options, also size=, nocow, extent_size_hint\n"
    "                  and preallocation ('-o help' lists them; with a file name, all)\n"
    "  -b backing_file image the new one is based on (its size is used when none is given)\n"
    "  -F backing_fmt  format of the backing file\n"
    "  -u              do not open or check the backing file\n"
    "  -q              quiet: print nothing on success\n"
    "  --untrusted     accepted for symmetry with the other commands\n";

}  // namespace

int RunCreate(int argc, char** argv) {
  std::string fmt = "raw";
  std::optional<std::string> backing, backing_fmt;
  std::string options;  // the -o lists, joined
  bool unsafe = false, quiet = false;
  OptionParser parser("create", kUsage);
  parser.Value('f', nullptr, &fmt)
      .Add('F', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             backing_fmt = arg;
             return std::nullopt;
           })
      .Add('b', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             backing = arg;
             return std::nullopt;
           })
      .Add('o', nullptr, true, AccumulateOptionsInto(&options))
      .Flag('q', nullptr, &quiet)
      .Flag('u', nullptr, &unsafe)
      .Accept(0, "untrusted", false)
      .Objects();
  if (auto stop = parser.Parse(argc, argv)) return *stop;
  const std::vector<std::string>& operands = parser.operands();

  // In qemu-img's order: help, operands, then bdrv_img_create's checks.
  if (HasHelpOption(options)) return PrintCreateOptionHelp(fmt, operands.empty() ? nullptr : &operands[0]);
  if (operands.empty()) return UsageError("create", "Expecting image file name");
  const std::string& filename = operands[0];
  std::optional<uint64_t> size;
  if (operands.size() > 1) {
    size = CvtNum("image size", operands[1]);
    if (!size) return 1;
  }
  if (operands.size() > 2) return UsageError("create", fmt::format("Unexpected argument: {}", operands[2]));
  auto fail = [&](const std::string& msg) {
    PrintError(filename + ": " + msg);
    return 1;
  };
  if (std::string err = CreateFormatError(fmt); !err.empty()) return fail(err);
  auto host = HostFilename(filename);
  if (!host.ok()) return fail(host.error().message());

  OptionList opts;
  if (Status s = ParseCreateOptions(fmt, options, &opts); !s.ok()) return fail(s.message());
  if (FindOption(opts, "size") && size) return fail("The image size must be specified only once");
  if (size) SetCreateOption(fmt, "size", std::to_string(*size), &opts);
  if (backing && !SetCreateOption(fmt, "backing_file", *backing, &opts))
    return fail(fmt::format("Backing file not supported for file format '{}'", fmt));
  if (backing_fmt && !SetCreateOption(fmt, "backing_fmt", *backing_fmt, &opts))
    return fail(fmt::format("Backing file format not supported for file format '{}'", fmt));
  std::optional<std::string> bfile = FindOption(opts, "backing_file");
  std::optional<std::string> bfmt = FindOption(opts, "backing_fmt");
  if (bfile && *bfile == filename)
    return fail("Error: Trying to create an image with the same filename as the backing file");
  if (bfile && bfile->empty()) return fail("Expected backing file name, got empty string");

  if (bfile && !unsafe) {
    // The backing file is opened (its size is the default) and must name its format.
    auto no_backing = [&](const std::string& msg) {
      fail(msg);
      std::fprintf(stderr, "Could not open backing image.\n");
      return 1;
    };
    // A json: name is the user's own spec: opened as such, and stored as typed (vimgfs
    // itself will not follow it from inside the image; qemu will).
    auto bname =
        IsJsonName(*bfile) ? Result<std::string>(*bfile) : HostFilename(PathCombine(filename, *bfile));
    if (!bname.ok()) return no_backing(bname.error().message());
    ImageOpen bo;
    bo.format = bfmt.value_or("");
    bo.force_share = true;  // only its size is read: qemu-img reads it even while in use
    bo.no_io = true;        // nor its data: an encrypted backing file needs no key
    auto b = OpenImage(*bname, bo);
    if (!b.ok()) {
      // Here qemu-img names a host error once: "Could not open 'b': No such file or directory";
      // a format's complaint comes alone ("invalid VMDK image descriptor", iotest 301).
      const std::string& msg = b.error().message();
      const ErrorKind kind = b.error().kind();
      const bool host_error =
          kind == ErrorKind::kNotFound || kind == ErrorKind::kIo || kind == ErrorKind::kReadOnly;
      if (msg.rfind("Could not open '", 0) == 0) return no_backing(msg);
      return no_backing(host_error ? OpenErrorMessage(*bfile, b.error()) : StripPathPrefix(*bname, msg));
    }
    if (!bfmt) {
      fail("Backing file specified without backing format");
      std::fprintf(stderr, "Detected format of %s.", (*b)->format().c_str());  // no newline, as qemu-img
      return 1;
    }
    if (!size && !FindOption(opts, "size")) SetCreateOption(fmt, "size", std::to_string((*b)->size()), &opts);
  } else if (bfile && !bfmt) {
    return fail("Backing file specified without backing format");
  }
  std::optional<std::string> size_opt = FindOption(opts, "size");
  if (!size_opt) return fail("Image creation needs a size parameter");
  if (!quiet) {
    std::printf("Formatting '%s', fmt=%s %s\n", filename.c_str(), fmt.c_str(),
                FormattingLine(fmt, opts).c_str());
    std::fflush(stdout);
  }

  CreateContext ctx;
  ctx.secrets = crypto::SecretStore::Process().Lookup();
  ctx.env = Env::Default();
  ctx.path = *host;
  ctx.size = std::strtoull(size_opt->c_str(), nullptr, 10);
  FileCreateOptions file;
  if (Status s = SplitCreateOptions(fmt, opts, &ctx.options, &file); !s.ok()) return fail(s.message());
  ctx.nocow = file.nocow;
  if (file.extent_size_hint) {
    ctx.extent_size_hint = static_cast<uint32_t>(*file.extent_size_hint);
    ctx.extent_size_hint_given = true;
  }
  std::vector<std::string> warnings;
  ctx.warnings = &warnings;
  if (bfile || bfmt) ctx.backing = BackingRef{bfile.value_or(""), bfmt.value_or("")};
  Status s = Image::Create(CreateDriverName(fmt), ctx, /*unsafe=*/true);  // the backing was checked above
  for (const std::string& w : warnings) PrintError("warning: " + w);
  if (!s.ok() && s.err() == EFBIG) {  // the host's or the format's limit, in qemu-img's words
    const FormatDriver* driver = CreateDriver(fmt);
    return fail(fmt::format("The image size is too large for file format '{}'{}", fmt,
                            driver ? driver->traits().too_large_hint : ""));
  }
  if (!s.ok()) {
    PrintFileError(filename, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

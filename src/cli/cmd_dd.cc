// vimgfs dd: qemu-img dd, a copy of an image's guest bytes into a new image.
#include <climits>
#include <cstdio>

#include "cli/cli_util.h"
#include "crypto/secrets.h"
#include "cli/commands.h"
#include "cli/create_options.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs dd [-f fmt] [-O output_fmt] [-U] [--untrusted] [bs=block_size] [count=blocks]\n"
    "                 [skip=blocks] if=input of=output\n"
    "\n"
    "Copies the guest bytes of image `input` into a new image `output` of format output_fmt\n"
    "(default raw), as qemu-img dd does: bs bytes at a time (default 512), from block `skip`\n"
    "of the input, `count` blocks at most (default: to its end). The output has the size of\n"
    "what is copied, and every byte of it written (zeros too).\n"
    "  -f fmt      input format (probed when absent)\n"
    "  -O fmt      output format\n"
    "  -U, --force-share  read the input even while another process writes it (no lock)\n"
    "  --image-opts      the input name is a key=value list (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

}  // namespace

int RunDd(int argc, char** argv) {
  std::string fmt, out_fmt = "raw";
  bool force_share = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the input name is a key=value list
  OptionParser opts("dd", kUsage);
  opts.Value('f', nullptr, &fmt)
      .Value('O', nullptr, &out_fmt)
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;

  uint64_t bs = 512, count = 0, skip = 0;
  bool have_count = false, have_skip = false;
  std::string in_name, out_name;
  bool have_if = false, have_of = false;
  for (const std::string& operand : opts.operands()) {
    const size_t eq = operand.find('=');
    const std::string key = operand.substr(0, eq),
                      value = eq == std::string::npos ? "" : operand.substr(eq + 1);
    std::optional<uint64_t> n;
    if (eq == std::string::npos) {
      PrintError("unrecognized operand " + operand);
      return 1;
    } else if (key == "bs") {
      if (!(n = CvtNum("bs", value, 1, INT_MAX))) return 1;
      bs = *n;
    } else if (key == "count") {
      if (!(n = CvtNum("count", value))) return 1;
      count = *n;
      have_count = true;
    } else if (key == "skip") {
      if (!(n = CvtNum("skip", value))) return 1;
      skip = *n;
      have_skip = true;
    } else if (key == "if") {
      in_name = value;
      have_if = true;
    } else if (key == "of") {
      out_name = value;
      have_of = true;
    } else {
      PrintError("unrecognized operand " + key);
      return 1;
    }
  }
  if (!have_if || !have_of) {
    PrintError("Must specify both input and output files");
    return 1;
  }

  ImageOpen o;
  o.image_opts = image_opts;
  o.format = fmt;
  o.force_share = force_share;
  o.untrusted = untrusted;
  std::unique_ptr<Image> in = OpenOrReport(in_name, o);
  if (!in) return 1;
  if (!FindFormat(out_fmt) && out_fmt != "file") {
    PrintError("Unknown file format");
    return 1;
  }
  if (std::string err = CreateFormatError(out_fmt); !err.empty()) {
    PrintError(err);
    return 1;
  }
  auto host = HostFilename(out_name);
  if (!host.ok()) {
    PrintError(host.error().message());
    return 1;
  }

  uint64_t size = in->size();
  if (have_count && count <= INT64_MAX / bs && count * bs < size) size = count * bs;
  // A skip past the end makes an empty output (with a warning, as dd(1) does).
  const bool skip_past_end = have_skip && (skip > INT64_MAX / bs || size < skip * bs);
  CreateContext ctx;
  ctx.secrets = crypto::SecretStore::Process().Lookup();
  ctx.path = *host;
  ctx.size = skip_past_end ? 0 : size - skip * bs;
  if (Status s = Image::Create(CreateDriverName(out_fmt), ctx, /*unsafe=*/true); !s.ok()) {
    PrintError(fmt::format("{}: error while creating output image: {}", out_name,
                           StripPathPrefix(*host, s.message())));
    return 1;
  }
  ImageOpen oo;
  oo.format = CreateDriverName(out_fmt);
  oo.read_only = false;
  oo.untrusted = untrusted;
  std::unique_ptr<Image> out = OpenOrReport(out_name, oo);
  if (!out) return 1;

  uint64_t in_pos = skip * bs;
  if (skip_past_end) {
    PrintError(fmt::format("{}: cannot skip to specified offset", in_name));
    in_pos = size;
  }
  // Whole bs blocks as qemu-img copies them, gathered into larger pieces: the bytes land
  // the same.
  const uint64_t piece = std::max<uint64_t>(bs, (1u << 20) / bs * bs);
  std::vector<std::byte> buf(piece);
  for (uint64_t out_pos = 0; in_pos < size;) {
    const uint64_t n = std::min(piece, size - in_pos);
    std::span<std::byte> chunk(buf.data(), n);
    if (Status s = in->Read(in_pos, chunk); !s.ok()) {
      PrintError("error while reading from input image file: " + s.message());
      return 1;
    }
    if (Status s = out->Write(out_pos, chunk); !s.ok()) {
      PrintError("error while writing to output image file: " + s.message());
      return 1;
    }
    in_pos += n;
    out_pos += n;
  }
  if (Status s = out->Close(); !s.ok()) {
    PrintFileError(out_name, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

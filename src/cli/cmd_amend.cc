// vimgfs amend: qemu-img amend (-o options of an existing image: qcow2's compat,
// refcount_bits, lazy_refcounts, data_file, size; LUKS key slots of luks and qcow2).
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/create_options.h"
#include "cli/option_parser.h"
#include "crypto/secrets.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs amend [--object OBJ] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force]\n"
    "                    -o options filename\n"
    "\n"
    "Changes options of an existing image, as qemu-img amend does ('-o help' lists a\n"
    "format's). qcow2: compat=0.10|1.1 (a downgrade turns zero clusters into data),\n"
    "refcount_bits, lazy_refcounts, data_file, data_file_raw=off, size; luks and qcow2\n"
    "with encrypt.format=luks: key slots ([encrypt.]state=active|inactive, keyslot,\n"
    "new-secret, old-secret, iter-time; the image's own key-secret unlocks it).\n"
    "  -o options      comma-separated; repeated -o are joined\n"
    "  -p              show progress\n"
    "  -q              quiet\n"
    "  -t cache        qemu's cache mode (amend syncs every step either way); none and\n"
    "                  directsync go around the host's page cache (O_DIRECT)\n"
    "  --force         erase the last active key slot, or overwrite an active one\n"
    "  --object secret,id=ID,data=...|file=...  a secret for key-secret=ID, new-secret=ID\n"
    "  --image-opts    the image name is a key=value list (driver=qcow2,file.filename=F)\n";

}  // namespace

int RunAmend(int argc, char** argv) {
  std::string fmt, options, cache;
  bool quiet = false, progress = false, force = false, untrusted = false, image_opts = false;
  OptionParser opts("amend", kUsage);
  opts.Value('f', "format", &fmt)
      .Add('o', nullptr, true, AccumulateOptionsInto(&options))
      .Value('t', nullptr, &cache)
      .Flag('p', nullptr, &progress)
      .Flag('q', nullptr, &quiet)
      .Flag(0, "force", &force)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (options.empty()) return UsageError("amend", "Must specify options (-o)");
  if (quiet) progress = false;
  Progress bar(progress);

  const std::vector<std::string>& operands = opts.operands();
  if (!fmt.empty() && HasHelpOption(options)) return PrintAmendOptionHelp(fmt);
  if (operands.size() != 1) {
    PrintError("Expecting one image file name");
    return 1;
  }
  if (!CheckCacheMode(cache, false)) return 1;
  const std::string& filename = operands[0];

  ImageOpen o;
  o.env = CacheModeEnv(cache);
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  o.image_opts = image_opts;
  // Amend writes no guest data: persistent bitmaps stay valid.
  o.keep_bitmaps = true;
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;
  const std::string img_path = img->path();
  const FormatDriver* driver = FindFormat(img->format());
  if (HasHelpOption(options)) return PrintAmendOptionHelp(img->format());
  if (!driver || driver->traits().amend_options.empty()) {
    PrintError(fmt::format("Format driver '{}' does not support option amendment", img->format()));
    return 1;
  }
  AmendRequest req;
  req.force = force;
  req.secrets = crypto::SecretStore::Process().Lookup();
  if (Status s = ParseAmendOptions(*driver, options, &req.options); !s.ok()) {
    PrintError(s.message());
    return 1;
  }
  req.progress = [&bar](double fraction) { bar.Update(fraction); };
  bar.Start();
  Status s = img->Amend(req);
  if (s.ok()) {
    bar.Done();
    s = img->Close();
  } else {
    bar.End();
    (void)img->Close();
  }
  img.reset();
  if (!s.ok()) {
    // qemu-img reports the driver's words alone, without the file name.
    PrintError(StripPathPrefix(img_path, AsQemuWordsLocks(s)));
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli

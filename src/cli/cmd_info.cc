// vimgfs info: qemu-img info (human and JSON, --backing-chain).
#include <cstdio>
#include <ctime>
#include <set>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"
#include "cli/image_spec.h"
#include "cli/info_render.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs info [-f fmt] [--output=human|json] [--backing-chain] [-U] [--untrusted]\n"
    "                   filename\n"
    "\n"
    "Shows the format, virtual size, disk usage, backing file, snapshots and format details\n"
    "of an image. The backing file is named but not opened unless --backing-chain is given.\n"
    "  -f fmt            image format (probed from the content when absent)\n"
    "  --output=FMT      'human' (default) or 'json'\n"
    "  --backing-chain   show every image of the backing chain\n"
    "  --untrusted       do not follow references the image makes to other files\n"
    "  -U, --force-share  open the image even while another process writes it (no lock)\n"
    "  --image-opts      the image names are key=value lists (driver=qcow2,file.filename=F);\n"
    "                    json:{...} names are taken with or without it\n";

}  // namespace

namespace {

// qemu's one-line JSON (qobject_to_json): ", " between members, ": " after keys.
std::string CompactQemuJson(const nlohmann::ordered_json& j) {
  if (!j.is_object()) return j.dump();
  std::string out = "{";
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it != j.begin()) out += ", ";
    out += nlohmann::ordered_json(it.key()).dump() + ": " + CompactQemuJson(it.value());
  }
  return out + "}";
}

}  // namespace

nlohmann::ordered_json ImageInfoJson(Image& img) {
  nlohmann::ordered_json j;
  FormatInfo fi = img.Info();
  if (!fi.snapshots.empty()) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const SnapshotInfo& s : fi.snapshots) list.push_back(SnapshotJson(s));
    j["snapshots"] = list;
  }
  j["virtual-size"] = img.size();
  j["filename"] = img.path();
  if (fi.encrypted && !img.key_secret().empty()) {
    // A key secret is one of the options qemu cannot fold into a plain file name, so its
    // name for the image is a json: one (bdrv_refresh_filename's strong runtime options).
    nlohmann::ordered_json name;
    name[img.format() == "luks" ? "key-secret" : "encrypt.key-secret"] = img.key_secret();
    name["driver"] = img.format();
    name["file"] = {{"driver", "file"}, {"filename", img.path()}};
    j["filename"] = "json:" + CompactQemuJson(name);
  }
  if (fi.cluster_size) j["cluster-size"] = fi.cluster_size;
  j["format"] = img.format();
  uint64_t actual = 0;
  bool have_actual = false;
  if (auto a = img.file().AllocatedSize(); a.ok()) {
    actual = *a;
    have_actual = true;
  }
  if (img.traits().disk_size_sums_host_files) {
    for (File* f : img.host_files()) {
      if (f == &img.file()) continue;
      if (auto a = f->AllocatedSize(); a.ok()) actual += *a;
    }
  }
  if (have_actual) j["actual-size"] = actual;
  if (fi.encrypted) j["encrypted"] = true;
  if (auto fs = FormatSpecificJson(img.format(), fi.format_specific); !fs.is_null())
    j["format-specific"] = std::move(fs);
  if (const auto& b = img.backing_ref()) {
    j["backing-filename"] = b->name;
    j["full-backing-filename"] = PathCombine(img.path(), b->name);
    if (!b->format.empty()) j["backing-filename-format"] = b->format;
  }
  if (img.traits().reports_dirty_flag) j["dirty-flag"] = fi.dirty;
  return j;
}

int RunInfo(int argc, char** argv) {
  std::string fmt, output = "human";
  bool chain = false, untrusted = false;
  bool image_opts = false;  // --image-opts: the image names are key=value lists
  bool force_share = false;
  OptionParser opts("info", kUsage);
  opts.Value('f', "format", &fmt)
      .Value(0, "output", &output)
      .Flag(0, "backing-chain", &chain)
      .Flag('U', "force-share", &force_share)
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (opts.operands().size() != 1) return UsageError("info", "Expecting one image file name");
  if (!CheckOutputFormat(output)) return 1;
  std::string filename = opts.operands()[0];

  ImageOpen o;

  o.image_opts = image_opts;

  o.force_share = force_share;
  o.format = fmt;
  o.read_only = true;
  o.untrusted = untrusted;
  o.open_backing = chain;
  o.no_io = true;  // info reads metadata only: an encrypted image needs no key
  std::unique_ptr<Image> img = OpenOrReport(filename, o);
  if (!img) return 1;

  std::vector<nlohmann::ordered_json> infos;
  for (Image* i = img.get(); i; i = chain ? i->backing() : nullptr) infos.push_back(ImageInfoJson(*i));
  // A spec naming a protocol alone (driver=file, driver=nbd) has qemu name that protocol
  // as the format; its nbd driver has no dirty flag to report.
  if (image_opts || IsJsonName(filename)) {
    if (auto spec = ParseImageSpec(filename, image_opts); spec.ok() && !spec->protocol.empty()) {
      infos[0]["format"] = spec->protocol;
      if (spec->protocol == "nbd") infos[0].erase("dirty-flag");
    }
  }

  if (output == "json") {
    if (chain) {
      nlohmann::ordered_json arr = nlohmann::ordered_json::array();
      for (auto& j : infos) arr.push_back(j);
      std::printf("%s\n", QemuJson(arr).c_str());
    } else {
      std::printf("%s\n", QemuJson(infos[0]).c_str());
    }
    return 0;
  }
  for (size_t i = 0; i < infos.size(); i++) {
    if (i) std::printf("\n");
    std::fputs(HumanImageInfo(infos[i]).c_str(), stdout);
  }
  return 0;
}

}  // namespace vimgfs::cli

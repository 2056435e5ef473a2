// json: names and --image-opts lists, read into an ImageSpec.
#include "cli/image_spec.h"

#include <algorithm>
#include <cctype>
#include <functional>

#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "cli/cli_util.h"
#include "io/nbd_file.h"
#include "vimgfs/format.h"

namespace vimgfs::cli {
namespace {

using Flat = std::map<std::string, std::string>;
constexpr const char* kNull = "\x01null";  // a JSON null (no key=value list can spell it)

// qemu's JSON parser also takes single-quoted strings: they become double-quoted ones.
std::string DoubleQuoted(const std::string& in) {
  std::string out;
  char quote = 0;
  for (size_t i = 0; i < in.size(); i++) {
    const char c = in[i];
    if (quote) {
      if (c == '\\' && i + 1 < in.size()) {
        if (quote == '\'' && in[i + 1] == '\'') {
          out += '\'';
        } else {
          out += c;
          out += in[i + 1];
        }
        i++;
        continue;
      }
      if (c == quote) {
        out += '"';
        quote = 0;
      } else if (c == '"') {
        out += "\\\"";
      } else {
        out += c;
      }
      continue;
    }
    if (c == '"' || c == '\'') {
      quote = c;
      out += '"';
    } else {
      out += c;
    }
  }
  return out;
}

void FlattenJson(const nlohmann::json& j, const std::string& prefix, Flat* out) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string key = prefix + it.key();
    const nlohmann::json& v = it.value();
    if (v.is_object()) {
      FlattenJson(v, key + ".", out);
    } else if (v.is_string()) {
      (*out)[key] = v.get<std::string>();
    } else if (v.is_null()) {
      (*out)[key] = kNull;
    } else if (v.is_boolean()) {
      (*out)[key] = v.get<bool>() ? "on" : "off";
    } else {
      (*out)[key] = v.dump();
    }
  }
}

// How deep {} and [] nest outside strings (the JSON parser recurses that deep).
size_t NestingDepth(const std::string& json) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < json.size(); i++) {
    const char c = json[i];
    if (in_string) {
      if (c == '\\') {
        i++;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == '}' || c == ']') && depth > 0) {
      depth--;
    }
  }
  return deepest;
}

bool IsTrue(const std::string& v) { return v == "on" || v == "true" || v == "yes"; }

// Options qemu's file protocol and format drivers take that tune caching, discards, checks
// or locking: nothing here depends on them.
bool IsTuningOption(const std::string& key) {
  static const std::set<std::string> kKeys = {"node-name",
                                              "discard",
                                              "detect-zeroes",
                                              "auto-read-only",
                                              "cache.direct",
                                              "cache.no-flush",
                                              "aio",
                                              "aio-max-batch",
                                              "locking",
                                              "drop-cache",
                                              "x-check-cache-dropped",
                                              "pr-manager",
                                              "lazy-refcounts",
                                              "pass-discard-request",
                                              "pass-discard-snapshot",
                                              "pass-discard-other",
                                              "discard-no-unref",
                                              "overlap-check",
                                              "cache-size",
                                              "l2-cache-size",
                                              "l2-cache-entry-size",
                                              "refcount-cache-size",
                                              "cache-clean-interval",
                                              "zeroed-grain",
                                              "toolsversion"};
  if (kKeys.contains(key)) return true;
  return key.rfind("overlap-check.", 0) == 0;
}

using Take = std::function<std::optional<std::string>(const std::string&)>;

// qemu's nbd protocol driver options under `prefix` (server.type=unix|inet, server.path,
// server.host, server.port, export; the older path, host, port) as the NBD URI vimgfs
// opens through libnbd (docs/ARCHITECTURE.md, "Images on NBD servers").
Result<std::string> NbdUri(const Take& take, const std::string& prefix) {
  std::optional<std::string> type = take(prefix + "server.type");
  std::optional<std::string> path = take(prefix + "server.path");
  if (!path) path = take(prefix + "path");
  std::optional<std::string> host = take(prefix + "server.host");
  if (!host) host = take(prefix + "host");
  std::optional<std::string> port = take(prefix + "server.port");
  if (!port) port = take(prefix + "port");
  const std::string exported = take(prefix + "export").value_or("");
  // qemu's experimental block-status context: carried to OpenNbd in the URI.
  const std::optional<std::string> context = take(prefix + "x-dirty-bitmap");
  auto with_context = [&](std::string uri) {
    if (!context) return uri;
    return uri + (uri.find('?') == std::string::npos ? "?" : "&") + "x-dirty-bitmap=" + UriEscape(*context);
  };
  if (auto f = take(prefix + "filename")) {
    if (path || host) return Status::InvalidArgument("No valid URL specified");
    return with_context(*f);
  }
  for (const char* ignored : {"reconnect-delay", "open-timeout"}) take(prefix + ignored);
  for (const char* refused : {"tls-creds", "tls-hostname"})
    if (take(prefix + refused))
      return Status::Unsupported("the nbd option '{}' is not supported (an nbds:// URI takes TLS)", refused);
  if (!type) type = path ? "unix" : "inet";
  if (*type == "unix") {
    if (!path) return Status::InvalidArgument("Parameter 'path' is missing");
    // No export: no path at all, as qemu writes the name ("nbd+unix://?socket=S").
    return with_context(fmt::format("nbd+unix://{}?socket={}",
                                    exported.empty() ? "" : "/" + UriEscape(exported), UriEscape(*path)));
  }
  if (*type != "inet") return Status::InvalidArgument("Unsupported NBD server type '{}'", *type);
  if (!host) return Status::InvalidArgument("NBD server address missing");
  const std::string bracketed = host->find(':') != std::string::npos ? "[" + *host + "]" : *host;
  return with_context(fmt::format("nbd://{}:{}{}", bracketed, port.value_or("10809"),
                                  exported.empty() ? "" : "/" + UriEscape(exported)));
}

// What the spec asks that cannot be done is reported after the -U conflict check, as
// qemu-img orders its errors.
ImageSpec Invalid(ImageSpec spec, Status why) {
  spec.invalid = std::move(why);
  return spec;
}

Result<ImageSpec> Interpret(Flat opts) {
  ImageSpec spec;
  auto take = [&](const std::string& key) -> std::optional<std::string> {
    auto it = opts.find(key);
    if (it == opts.end()) return std::nullopt;
    std::string v = it->second;
    opts.erase(it);
    return v;
  };
  const std::optional<std::string> driver = take("driver");
  if (auto v = take("read-only")) spec.read_only = IsTrue(*v);
  if (auto v = take("force-share")) spec.force_share = IsTrue(*v);
  if (auto l = take("locking")) spec.no_locks = *l == "off" || *l == "false";
  for (const char* key : {"cache.direct", "file.cache.direct"})
    if (auto v = take(key)) spec.direct = IsTrue(*v);
  std::optional<std::string> filename;
  if (driver && *driver == "nbd") {
    spec.format = "raw";  // the nbd protocol alone: the export is the disk
    spec.protocol = "nbd";
    auto uri = NbdUri(take, "");
    if (!uri.ok()) return Invalid(spec, uri.error());
    filename = *uri;
  } else if (driver && *driver == "file") {
    filename = take("filename");
    spec.format = "raw";  // the file protocol alone: the file is the disk
    spec.protocol = "file";
  } else {
    filename = take("filename");
    spec.format = driver.value_or("");  // none: probed, as qemu probes it
    if (auto b = take("backing")) {
      if (*b != kNull && *b != "null" && !b->empty())
        return Invalid(spec,
                       Status::Unsupported("a backing image given by node name ('{}') is not supported", *b));
      spec.no_backing = true;
    }
    if (auto f = take("file")) filename = *f;  // "file": "name"
    // backing.*: the backing image's driver, file and key, then backing.backing.*, ...
    for (std::string prefix = "backing.";; prefix += "backing.") {
      if (std::none_of(opts.begin(), opts.end(),
                       [&](const auto& kv) { return kv.first.rfind(prefix, 0) == 0; }))
        break;
      BackingSpec b;
      if (auto d = take(prefix + "driver")) b.format = *d == "file" ? "raw" : *d;
      if (auto d = take(prefix + "file.driver"); d && *d == "nbd") {
        auto uri = NbdUri(take, prefix + "file.");
        if (!uri.ok()) return Invalid(spec, uri.error());
        b.filename = *uri;
      } else if (d && *d != "file") {
        return Invalid(
            spec,
            Status::Unsupported("Unknown protocol '{}' (only the file and nbd protocols are supported)", *d));
      }
      for (const char* key : {"file.filename", "filename", "file"})
        if (auto f = take(prefix + key)) b.filename = *f;
      for (const char* key : {"encrypt.key-secret", "key-secret"})
        if (auto k = take(prefix + key)) b.key_secret = *k;
      for (auto it = opts.begin(); it != opts.end();) {
        const std::string& k = it->first;
        const bool tuning =
            k.rfind(prefix, 0) == 0 &&
            (IsTuningOption(k.substr(prefix.size())) ||
             (k.rfind(prefix + "file.", 0) == 0 && IsTuningOption(k.substr(prefix.size() + 5))));
        it = tuning ? opts.erase(it) : std::next(it);
      }
      if (b.format.size() && !FindFormat(b.format))
        return Invalid(spec, Status::Unsupported("Unknown driver '{}'", b.format));
      spec.backing.push_back(std::move(b));
    }
    // The passphrase's secret: luks's key-secret, qcow2's encrypt.key-secret.
    if (auto k = take(spec.format == "luks" ? "key-secret" : "encrypt.key-secret")) spec.key_secret = *k;
    if (auto d = take("file.driver"); d && *d == "nbd") {
      auto uri = NbdUri(take, "file.");
      if (!uri.ok()) return Invalid(spec, uri.error());
      filename = *uri;
    } else if (d && *d != "file") {
      return Invalid(spec, Status::Unsupported(
                               "Unknown protocol '{}' (only the file and nbd protocols are supported)", *d));
    }
    if (auto f = take("file.filename")) filename = *f;
    if (auto d = take("data-file.driver"); d && *d != "file")
      return Invalid(spec,
                     Status::Unsupported("Unknown protocol '{}' (only the file protocol is supported)", *d));
    if (auto f = take("data-file.filename")) spec.data_file = *f;
    if (auto l = take("file.locking")) spec.no_locks = *l == "off" || *l == "false";
    for (auto it = opts.begin(); it != opts.end();) {
      const std::string& k = it->first;
      if (k.rfind("file.", 0) == 0 && IsTuningOption(k.substr(5))) {
        it = opts.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (!FindFormat(spec.format) && !spec.format.empty())
    return Invalid(spec, Status::Unsupported("Unknown driver '{}'", spec.format));
  if (!filename || filename->empty())
    return Invalid(spec, Status::InvalidArgument("A block device must be specified for \"file\""));
  spec.filename = *filename;
  for (const auto& [key, value] : opts) {
    if (IsTuningOption(key)) continue;
    return Invalid(spec, Status::InvalidArgument("Block format '{}' does not support the option '{}'",
                                                 spec.format.empty() ? "file" : spec.format, key));
  }
  return spec;
}

}  // namespace

bool IsJsonName(const std::string& name) { return name.rfind("json:", 0) == 0; }

Result<ImageSpec> ParseImageSpec(const std::string& text, bool image_opts) {
  Flat opts;
  if (image_opts) {
    std::vector<std::pair<std::string, std::string>> list;
    RETURN_IF_ERROR(ParseOptionList(text, &list));
    opts.insert(list.begin(), list.end());
  } else {
    const std::string json = DoubleQuoted(text.substr(5));
    if (NestingDepth(json) > 32)
      return Status::InvalidArgument("Could not parse the JSON options: nested too deeply");
    auto j = nlohmann::json::parse(json, nullptr, false);
    if (j.is_discarded()) return Status::InvalidArgument("Could not parse the JSON options");
    if (!j.is_object()) return Status::InvalidArgument("Invalid JSON object given");
    FlattenJson(j, "", &opts);
  }
  return Interpret(std::move(opts));
}

}  // namespace vimgfs::cli

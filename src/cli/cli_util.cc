#include "cli/cli_util.h"

#include "io/nbd_file.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string_view>

#include "cli/image_spec.h"
#include "crypto/secrets.h"
#include "engine/image_lock.h"

namespace vimgfs::cli {

namespace {
std::string g_program_name = "vimgfs";
}  // namespace

void SetProgramName(const char* argv0) {
  std::string_view name = argv0 ? argv0 : "";
  auto slash = name.rfind('/');
  if (slash != std::string_view::npos) name.remove_prefix(slash + 1);
  g_program_name = name == "qemu-img" ? "qemu-img" : "vimgfs";
}

const std::string& ProgramName() { return g_program_name; }

bool RunAsQemuImg() { return g_program_name == "qemu-img"; }

void PrintError(const std::string& msg) {
  std::fprintf(stderr, "%s: %s\n", g_program_name.c_str(), msg.c_str());
}

std::string StripPathPrefix(const std::string& path, const std::string& msg) {
  std::string prefix = "'" + path + "': ";
  if (msg.rfind(prefix, 0) == 0) return msg.substr(prefix.size());
  return msg;
}

namespace {

bool NamesPath(const std::string& path, const std::string& msg) {
  return msg.find("'" + path + "'") != std::string::npos;
}

}  // namespace

// qemu-img words a lock conflict in two lines, the second naming the locked file
// ("... lock\nIs another process using the image [x.qcow2]?"); scripts that wait for it
// match them. vimgfs keeps one line.
std::string AsQemuWordsLocks(const Status& s) {
  std::string msg = s.message();
  const std::string kLockTail = ": is another process using the image?";
  if (s.kind() == ErrorKind::kBusy && RunAsQemuImg() && msg.size() > kLockTail.size() &&
      msg.compare(msg.size() - kLockTail.size(), kLockTail.size(), kLockTail) == 0 && msg[0] == '\'') {
    const std::string locked = msg.substr(1, msg.find("': ") - 1);
    msg = msg.substr(0, msg.size() - kLockTail.size()) + "\nIs another process using the image [" + locked +
          "]?";
  }
  return msg;
}

void PrintFileError(const std::string& path, const Status& s) {
  const std::string msg = AsQemuWordsLocks(s);
  if (NamesPath(path, msg) && msg.rfind("'" + path + "': ", 0) != 0) {
    PrintError(msg);
  } else {
    PrintError(path + ": " + StripPathPrefix(path, msg));
  }
}

std::string OpenErrorMessage(const std::string& path, const Status& s) {
  const std::string msg = AsQemuWordsLocks(s);
  if (IsBackingLoop(s)) return msg;
  // qemu opens the image, then fails to load the snapshot (-l): not an open error.
  if (msg.rfind("Failed to load snapshot: ", 0) == 0) return msg;
  if (msg == "--force-share/-U conflicts with image options") return msg;  // before any open
  // A host error already reads "Could not open 'X': <strerror>"; qemu-img wraps it once
  // more ("Could not open 'X': Could not open 'X': No such file or directory").
  bool host_error =
      s.kind() == ErrorKind::kNotFound || s.kind() == ErrorKind::kIo || s.kind() == ErrorKind::kReadOnly;
  if (msg.rfind("Could not open '" + path + "'", 0) == 0)
    return host_error ? "Could not open '" + path + "': " + msg : msg;
  return "Could not open '" + path + "': " + StripPathPrefix(path, msg);
}

int UsageError(const std::string& command, const std::string& msg) {
  PrintError(msg);
  if (RunAsQemuImg())
    std::fprintf(stderr, "Try 'qemu-img --help' for more information\n");
  else
    std::fprintf(stderr, "Try 'vimgfs %s --help' for more information\n", command.c_str());
  return 1;
}

std::string SizeToStr(uint64_t v) {
  static const char* kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  int e = 0;
  std::frexp(static_cast<double>(v) / (1000.0 / 1024.0), &e);
  int i = (e - 1) / 10;
  if (i < 0) i = 0;
  if (i > 6) i = 6;
  uint64_t div = 1ull << (i * 10);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%0.3g %sB", static_cast<double>(v) / static_cast<double>(div),
                kSuffixes[i]);
  return buf;
}

namespace {

// qemu's QDict bucket of a key (qobject/qdict.c: tdb_hash modulo 512).
unsigned QdictBucket(const std::string& key) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); i++)
    value += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  return (1103515243u * value + 12345u) % 512;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04X", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

void DumpJson(const nlohmann::ordered_json& j, int level, std::string* out) {
  std::string pad(static_cast<size_t>(level + 1) * 4, ' ');
  std::string close_pad(static_cast<size_t>(level) * 4, ' ');
  if (j.is_object()) {
    if (j.empty()) {
      *out += "{}";
      return;
    }
    *out += "{\n";
    bool first = true;
    for (const std::string& k : QemuKeyOrder(j)) {
      if (!first) *out += ",\n";
      first = false;
      *out += pad + JsonString(k) + ": ";
      DumpJson(j.at(k), level + 1, out);
    }
    *out += "\n" + close_pad + "}";
  } else if (j.is_array()) {
    if (j.empty()) {
      *out += "[\n" + close_pad + "]";  // qemu prints an empty list on two lines
      return;
    }
    *out += "[\n";
    bool first = true;
    for (const auto& e : j) {
      if (!first) *out += ",\n";
      first = false;
      *out += pad;
      DumpJson(e, level + 1, out);
    }
    *out += "\n" + close_pad + "]";
  } else if (j.is_string()) {
    *out += JsonString(j.get<std::string>());
  } else {
    *out += j.dump();
  }
}

}  // namespace

std::vector<std::string> QemuKeyOrder(const nlohmann::ordered_json& obj) {
  // Iteration goes bucket by bucket; inside a bucket the newest key comes first.
  std::vector<std::string> keys;
  for (auto it = obj.begin(); it != obj.end(); ++it) keys.push_back(it.key());
  std::reverse(keys.begin(), keys.end());
  std::stable_sort(keys.begin(), keys.end(), [](const std::string& a, const std::string& b) {
    return QdictBucket(a) < QdictBucket(b);
  });
  return keys;
}

std::string QemuJson(const nlohmann::ordered_json& j) {
  std::string out;
  DumpJson(j, 0, &out);
  return out;
}

std::string QemuHumanDump(const nlohmann::ordered_json& j, int indent) {
  std::string out;
  std::string pad(static_cast<size_t>(indent) * 4, ' ');
  auto scalar = [](const nlohmann::ordered_json& v) -> std::string {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    if (v.is_null()) return "";
    return v.dump();
  };
  if (j.is_object()) {
    for (const std::string& k : QemuKeyOrder(j)) {
      const auto& v = j.at(k);
      std::string key = k;
      std::replace(key.begin(), key.end(), '-', ' ');
      bool composite = v.is_object() || v.is_array();
      out += pad + key + ":" + (composite ? "\n" : " ");
      if (composite) {
        out += QemuHumanDump(v, indent + 1);
      } else {
        out += scalar(v) + "\n";
      }
    }
  } else if (j.is_array()) {
    int i = 0;
    for (const auto& v : j) {
      bool composite = v.is_object() || v.is_array();
      out += pad + "[" + std::to_string(i++) + "]:" + (composite ? "\n" : " ");
      if (composite) {
        out += QemuHumanDump(v, indent + 1);
      } else {
        out += scalar(v) + "\n";
      }
    }
  } else {
    out += scalar(j);
  }
  return out;
}

Status ParseOptionList(const std::string& text, std::vector<std::pair<std::string, std::string>>* out) {
  size_t i = 0;
  while (i < text.size()) {
    std::string key;
    while (i < text.size() && text[i] != '=' && text[i] != ',') key += text[i++];
    std::string value;
    bool has_value = false;
    if (i < text.size() && text[i] == '=') {
      has_value = true;
      i++;
      while (i < text.size()) {
        if (text[i] == ',') {
          if (i + 1 < text.size() && text[i + 1] == ',') {
            value += ',';
            i += 2;
            continue;
          }
          break;
        }
        value += text[i++];
      }
    }
    if (i < text.size() && text[i] == ',') i++;
    if (key.empty()) {
      if (!has_value && value.empty()) continue;
      return Status::InvalidArgument("Invalid option list '{}': empty option name", text);
    }
    if (!has_value) value = "on";
    auto it = std::find_if(out->begin(), out->end(), [&](const auto& p) { return p.first == key; });
    if (it != out->end()) {
      it->second = value;
    } else {
      out->emplace_back(key, value);
    }
  }
  return Status::Ok();
}

bool IsHelpOption(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> kv;
  if (!ParseOptionList(text, &kv).ok()) return false;
  for (const auto& [k, v] : kv) {
    if ((k == "help" || k == "?") && v == "on") return true;
  }
  return false;
}

Result<std::unique_ptr<Image>> OpenImage(const std::string& path, const ImageOpen& given) {
  ImageOpen o = given;
  bool no_locks = false;                   // locking=off in an image spec
  std::string name = path;                 // the host file's name, as typed or from a json:/image-opts spec
  std::string data_file;                   // qcow2's data file, when the spec names it
  std::vector<BackingSpec> backing_specs;  // backing.* of the spec
  if (o.image_opts || IsJsonName(path)) {
    ASSIGN_OR_RETURN(ImageSpec spec, ParseImageSpec(path, o.image_opts));
    o.format = spec.format;
    if (spec.read_only && !o.read_only) return Status::ReadOnly("Block node is read-only");
    if (o.force_share && spec.force_share == false)
      return Status::InvalidArgument("--force-share/-U conflicts with image options");
    RETURN_IF_ERROR(spec.invalid);
    o.force_share = o.force_share || spec.force_share.value_or(false);
    no_locks = spec.no_locks;
    if (spec.direct) o.env = *spec.direct ? Env::DefaultDirect() : Env::Default();
    o.open_backing = o.open_backing && !spec.no_backing;
    name = spec.filename;
    if (!spec.key_secret.empty()) o.key_secret = spec.key_secret;
    data_file = spec.data_file;
    backing_specs = spec.backing;
  }
  OpenOptions opts;
  opts.format = o.format;
  opts.read_only = o.read_only;
  opts.untrusted = o.untrusted;
  opts.open_backing = o.open_backing;
  opts.snapshot = o.snapshot;
  opts.env = o.env;
  opts.for_check = o.for_check;
  opts.keep_bitmaps = o.keep_bitmaps;
  opts.no_io = o.no_io;
  opts.key_secret = o.key_secret;
  opts.data_file = data_file;
  opts.backing_specs = backing_specs;
  opts.secrets = crypto::SecretStore::Process().Lookup();
  // qemu-img prints these bare (a dirty image's repair, as check -r all words it).
  opts.notice = [](const std::string& line) { fmt::print(stderr, "{}\n", line); };
  if (!o.format.empty() && IsUndrivenQemuFormat(o.format))
    return Status::Unsupported("Could not open '{}': image format '{}' is not supported", path, o.format);
  if (!o.format.empty() && !FindFormat(o.format))
    return Status::InvalidArgument("Unknown driver '{}'", o.format);
  // Skipping the lock is safe only for a reader: a writer would change an image that a VM
  // or a mount is writing too (qemu-img refuses it the same way).
  if (o.force_share && !o.read_only)
    return Status::InvalidArgument(
        "Could not open '{}': force-share=on can only be used with "
        "read-only images",
        path);
  ASSIGN_OR_RETURN(std::string host_path, HostFilename(name));
  auto opened = Image::Open(host_path, opts);
  if (!opened.ok() && host_path != path) {  // named by a spec: the message names the spec, once
    const Status& e = opened.error();
    return Status::Error(e.kind(), e.err(), StripPathPrefix(host_path, e.message()));
  }
  ASSIGN_OR_RETURN(auto img, std::move(opened));
  if (img->probed_raw() && !img->read_only())  // qemu's raw driver warns so (raw_open)
    std::fprintf(stderr,
                 "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                 "         Automatically detecting the format is dangerous for raw images, write "
                 "operations on block 0 will be restricted.\n"
                 "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                 host_path.c_str());
  if (!o.force_share && !no_locks)
    RETURN_IF_ERROR(o.lock_backing
                        ? LockImageChain(*img, !o.keep_raw_unchanged)
                        : LockImageFiles(*img, !img->read_only() || o.lock_as_writer, !o.keep_raw_unchanged));
  return img;
}

std::unique_ptr<Image> OpenOrReport(const std::string& path, const ImageOpen& o) {
  if (o.image_opts && !o.format.empty()) {
    PrintError("--image-opts and --format are mutually exclusive");
    return nullptr;
  }
  auto r = OpenImage(path, o);
  if (!r.ok()) {
    PrintError(OpenErrorMessage(path, r.error()));
    return nullptr;
  }
  return std::move(r).value();
}

namespace {

// qemu's path_has_protocol: a ':' before the first '/'.
bool HasProtocolPrefix(const std::string& name) {
  size_t p = name.find_first_of(":/");
  return p != std::string::npos && name[p] == ':';
}

}  // namespace

Result<std::string> HostFilename(const std::string& name) {
  if (name.rfind("file:", 0) == 0) {
    std::string rest = name.substr(5);
    return HasProtocolPrefix(rest) ? "./" + rest : rest;
  }
  if (IsNbdUri(name)) return name;  // an image on an NBD server (io/nbd_file.h)
  if (HasProtocolPrefix(name))
    return Status::InvalidArgument("Unknown protocol '{}'", name.substr(0, name.find(':')));
  return name;
}

bool ParseSnapshotParam(const std::string& arg, std::string* snapshot) {
  if (arg.rfind("snapshot.", 0) != 0) {
    *snapshot = arg;  // a name or an ID
    return true;
  }
  // qemu's internal_snapshot_opts: snapshot.id and snapshot.name.
  std::vector<std::pair<std::string, std::string>> kv;
  Status s = ParseOptionList(arg, &kv);
  std::string id, name;
  for (const auto& [key, value] : kv) {
    if (!s.ok()) break;
    if (key == "snapshot.id") {
      id = value;
    } else if (key == "snapshot.name") {
      name = value;
    } else {
      s = Status::InvalidArgument("Invalid parameter '{}'", key);
    }
  }
  if (!s.ok()) {
    PrintError(s.message());
    PrintError(fmt::format("Failed in parsing snapshot param '{}'", arg));
    return false;
  }
  *snapshot = name.empty() ? id : name;
  return true;
}

OptionParser::Handler SnapshotParamInto(std::string* snapshot) {
  return [snapshot](const char* arg) -> std::optional<int> {
    if (!ParseSnapshotParam(arg, snapshot)) return 1;
    return std::nullopt;
  };
}

OptionParser::Handler RateLimitInto(uint64_t* rate) {
  return [rate](const char* arg) -> std::optional<int> {
    std::optional<uint64_t> v = CvtNum("rate limit", arg);
    if (!v) return 1;
    *rate = *v;
    return std::nullopt;
  };
}

std::optional<uint64_t> CvtNum(const std::string& what, const std::string& value, uint64_t min,
                               uint64_t max) {
  auto n = ParseSize(value);
  if (!n.ok() && n.error().kind() != ErrorKind::kOutOfRange) {
    PrintError(fmt::format("Invalid {} specified. You may use k, M, G, T, P or E suffixes for", what));
    PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    return std::nullopt;
  }
  if (!n.ok() || *n > max || *n < min) {
    PrintError(fmt::format("Invalid {} specified. Must be between {} and {}.", what, min, max));
    return std::nullopt;
  }
  return *n;
}

std::string PathCombine(const std::string& base, const std::string& name) {
  if (name.empty() || name[0] == '/' || HasProtocolPrefix(name)) return name;
  if (IsNbdUri(base)) {  // the export of that name on the same server, as the engine opens it
    auto uri = SameServerUri(base, name);
    return uri.ok() ? *uri : name;
  }
  size_t keep = 0;  // what stays of base: its protocol prefix, its folder
  if (HasProtocolPrefix(base)) keep = base.find(':') + 1;
  auto slash = base.rfind('/');
  if (slash != std::string::npos && slash + 1 > keep) keep = slash + 1;
  return base.substr(0, keep) + name;
}

bool IsCacheMode(const std::string& mode) {
  return mode == "none" || mode == "off" || mode == "writeback" || mode == "unsafe" || mode == "directsync" ||
         mode == "writethrough";
}

bool IsDirectCacheMode(const std::string& mode) {
  return mode == "none" || mode == "off" || mode == "directsync";
}

bool CheckCacheMode(const std::string& mode, bool source) {
  if (mode.empty() || IsCacheMode(mode)) return true;
  PrintError(fmt::format("Invalid {}cache option: {}", source ? "source " : "", mode));
  return false;
}

Env* CacheModeEnv(const std::string& mode) {
  return IsDirectCacheMode(mode) ? Env::DefaultDirect() : Env::Default();
}

bool StdoutIsTty() { return isatty(STDOUT_FILENO) == 1; }

void Progress::Print(float percent) {
  if (!enabled_ || ended_) return;
  current_ = std::min(percent, 100.0f);
  constexpr float kMinSkip = 1.0f;
  if (current_ > last_print_ + kMinSkip || current_ < last_print_ - kMinSkip || current_ == 100 ||
      current_ == 0) {
    last_print_ = current_;
    std::printf("    (%3.2f/100%%)\r", static_cast<double>(current_));
    std::fflush(stdout);
  }
}

void Progress::End() {
  if (!enabled_ || ended_) return;
  ended_ = true;
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace vimgfs::cli

#include "cli/create_options.h"

#include <algorithm>
#include <cstdio>
#include <set>

#include "cli/cli_util.h"
#include "vimgfs/image.h"

namespace vimgfs::cli {
namespace {

enum class Kind { kString, kSize, kNumber, kBool };
struct Desc {
  const char* name;
  Kind kind;
  const char* def;  // printed when the option is not given (qemu's def_value_str)
};

// The order in which qemu 7.2 prints each format's merged (format + file protocol) list.
const std::vector<Desc>& DescsFor(const std::string& fmt) {
  static const std::vector<Desc> kQcow2 = {
      {"encryption", Kind::kBool, nullptr},       {"encrypt.format", Kind::kString, nullptr},
      {"encrypt.key-secret", Kind::kString, nullptr}, {"encrypt.cipher-alg", Kind::kString, nullptr},
      {"encrypt.cipher-mode", Kind::kString, nullptr}, {"encrypt.ivgen-alg", Kind::kString, nullptr},
      {"encrypt.ivgen-hash-alg", Kind::kString, nullptr}, {"encrypt.hash-alg", Kind::kString, nullptr},
      {"encrypt.iter-time", Kind::kNumber, nullptr},
      {"cluster_size", Kind::kSize, "65536"},     {"extended_l2", Kind::kBool, "off"},
      {"preallocation", Kind::kString, nullptr},  {"compression_type", Kind::kString, "zlib"},
      {"size", Kind::kSize, nullptr},             {"compat", Kind::kString, nullptr},
      {"backing_file", Kind::kString, nullptr},   {"backing_fmt", Kind::kString, nullptr},
      {"data_file", Kind::kString, nullptr},      {"data_file_raw", Kind::kBool, nullptr},
      {"lazy_refcounts", Kind::kBool, "off"},     {"refcount_bits", Kind::kNumber, "16"},
      {"nocow", Kind::kBool, nullptr},
  };
  static const std::vector<Desc> kVmdk = {
      {"size", Kind::kSize, nullptr},          {"adapter_type", Kind::kString, nullptr},
      {"backing_file", Kind::kString, nullptr}, {"backing_fmt", Kind::kString, nullptr},
      {"compat6", Kind::kBool, "off"},         {"hwversion", Kind::kString, "undefined"},
      {"toolsversion", Kind::kString, nullptr}, {"subformat", Kind::kString, nullptr},
      {"zeroed_grain", Kind::kBool, nullptr},  {"nocow", Kind::kBool, nullptr},
      {"preallocation", Kind::kString, nullptr},
  };
  static const std::vector<Desc> kVdi = {
      {"size", Kind::kSize, nullptr}, {"static", Kind::kBool, "off"},
      {"preallocation", Kind::kString, nullptr}, {"nocow", Kind::kBool, nullptr},
  };
  static const std::vector<Desc> kRaw = {
      {"size", Kind::kSize, nullptr}, {"preallocation", Kind::kString, nullptr},
      {"nocow", Kind::kBool, nullptr},
  };
  if (fmt == "qcow2") return kQcow2;
  if (fmt == "vmdk") return kVmdk;
  if (fmt == "vdi") return kVdi;
  return kRaw;
}

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

std::string TypeLabel(const std::string& type) {
  if (type == "size") return "<size>";
  if (type == "bool") return "<bool (on/off)>";
  if (type == "number") return "<num>";
  return "<str>";
}

}  // namespace

void PrintCreateOptionHelp(const FormatDriver& driver) {
  std::vector<CreateOptionHelp> opts = driver.CreateOptions();
  if (std::none_of(opts.begin(), opts.end(), [](const auto& o) { return o.name == "size"; }))
    opts.push_back({"size", "size", "Virtual disk size"});
  std::sort(opts.begin(), opts.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  std::printf("Supported %s options:\n", driver.name());
  for (const auto& o : opts) {
    std::string head = o.name + "=" + TypeLabel(o.type);
    std::printf("  %-22s - %s\n", head.c_str(), o.help.c_str());
  }
  std::printf("\nThe protocol level may support further options.\n"
              "Specify the target filename to include those options.\n");
}

std::string UnknownCreateOption(const FormatDriver& driver, const OptionList& opts) {
  std::set<std::string> known = {"size"};
  for (const auto& o : driver.CreateOptions()) known.insert(o.name);
  for (const Desc& d : DescsFor(driver.name())) known.insert(d.name);
  if (std::string(driver.name()) == "raw") known.insert("preallocation");
  for (const auto& [k, v] : opts) {
    if (!known.count(k)) return k;
  }
  return "";
}

bool FormatHasBacking(const std::string& fmt) { return fmt == "qcow2" || fmt == "vmdk"; }

std::string FormattingLine(const std::string& fmt, uint64_t size, const OptionList& opts) {
  std::string out;
  auto add = [&out](const std::string& s) {
    if (!out.empty()) out += ' ';
    out += s;
  };
  std::set<std::string> printed;
  for (const Desc& d : DescsFor(fmt)) {
    std::string name = d.name;
    printed.insert(name);
    if (name == "size") {
      add("size=" + std::to_string(size));
      continue;
    }
    auto it = std::find_if(opts.begin(), opts.end(), [&](const auto& p) { return p.first == name; });
    if (it == opts.end()) {
      if (d.def) add(name + "=" + d.def);
      continue;
    }
    std::string v = it->second;
    if (d.kind == Kind::kSize) {
      auto n = ParseSize(v);
      if (n.ok()) v = std::to_string(*n);
    }
    add(name + "=" + (d.kind == Kind::kString ? Escape(v) : v));
  }
  for (const auto& [k, v] : opts) {
    if (!printed.count(k)) add(k + "=" + Escape(v));
  }
  return out;
}

std::optional<int> CollectCreateOptions(const std::vector<std::string>& texts, const std::string& fmt,
                                        OptionList* opts) {
  bool want_help = false;
  for (const std::string& t : texts) {
    if (IsHelpOption(t)) {
      want_help = true;
      continue;
    }
    if (Status s = ParseOptionList(t, opts); !s.ok()) {
      PrintError(s.message());
      return 1;
    }
  }
  if (!want_help) return std::nullopt;
  const FormatDriver* driver = FindFormat(fmt);
  if (!driver) {
    PrintError(fmt::format("Unknown file format '{}'", fmt));
    return 1;
  }
  PrintCreateOptionHelp(*driver);
  return 0;
}

}  // namespace vimgfs::cli

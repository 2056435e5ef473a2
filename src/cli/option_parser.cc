#include "cli/option_parser.h"

#include <getopt.h>

#include <cstdio>

#include <fmt/format.h>

#include "cli/cli_util.h"
#include "crypto/secrets.h"

namespace vimgfs::cli {

namespace {
constexpr int kFirstLongOnly = 256;  // getopt values of long-only options: above any char
}

OptionParser::OptionParser(const char* command, const char* usage, int refused_exit)
    : command_(command), usage_(usage), refused_exit_(refused_exit) {}

OptionParser& OptionParser::Add(char short_name, const char* long_name, bool takes_arg, Handler on) {
  specs_.push_back({short_name, long_name, takes_arg, std::move(on)});
  return *this;
}

OptionParser& OptionParser::Flag(char short_name, const char* long_name, bool* set) {
  return Add(short_name, long_name, false, [set](const char*) -> std::optional<int> {
    *set = true;
    return std::nullopt;
  });
}

OptionParser& OptionParser::Value(char short_name, const char* long_name, std::string* set) {
  return Add(short_name, long_name, true, [set](const char* arg) -> std::optional<int> {
    *set = arg;
    return std::nullopt;
  });
}

OptionParser& OptionParser::Accept(char short_name, const char* long_name, bool takes_arg) {
  return Add(short_name, long_name, takes_arg,
             [](const char*) -> std::optional<int> { return std::nullopt; });
}

OptionParser& OptionParser::Refuse(const char* long_name, bool takes_arg) {
  int code = refused_exit_;
  return Add(0, long_name, takes_arg, [long_name, code](const char*) -> std::optional<int> {
    PrintError(fmt::format("--{} is not supported", long_name));
    return code;
  });
}

OptionParser& OptionParser::Objects() {
  return Add(0, "object", true, [](const char* arg) -> std::optional<int> {
    auto added = crypto::SecretStore::Process().AddObject(arg);
    // The value has been copied: ps and /proc/PID/cmdline no longer show it.
    crypto::ScrubSecretData(const_cast<char*>(arg));
    if (!added.ok()) {
      PrintError(added.error().message());
      return 1;
    }
    return std::nullopt;
  });
}

OptionParser& OptionParser::CommonImageOptions(bool* untrusted, bool* image_opts) {
  Flag(0, "untrusted", untrusted);
  Objects();
  return image_opts ? Flag(0, "image-opts", image_opts) : Refuse("image-opts");
}

std::optional<int> OptionParser::Parse(int argc, char** argv) {
  std::string shorts = ":h";
  std::vector<option> longs{{"help", no_argument, nullptr, 'h'}};
  for (size_t i = 0; i < specs_.size(); i++) {
    const Spec& s = specs_[i];
    if (s.short_name) {
      shorts += s.short_name;
      if (s.takes_arg) shorts += ':';
    }
    if (s.long_name) {
      int val = s.short_name ? s.short_name : kFirstLongOnly + static_cast<int>(i);
      longs.push_back({s.long_name, s.takes_arg ? required_argument : no_argument, nullptr, val});
    }
  }
  longs.push_back({nullptr, 0, nullptr, 0});

  optind = 0;  // 0: getopt re-initializes (commands may parse more than once in tests)
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, shorts.c_str(), longs.data(), nullptr)) != -1) {
    if (c == 'h') {
      std::fputs(usage_, stdout);
      return 0;
    }
    if (c == ':') {
      return UsageError(command_, fmt::format("missing argument for option '{}'", argv[optind - 1]));
    }
    const Spec* spec = nullptr;
    if (c >= kFirstLongOnly) {
      spec = &specs_[static_cast<size_t>(c - kFirstLongOnly)];
    } else {
      for (const Spec& s : specs_)
        if (s.short_name && s.short_name == c) spec = &s;
    }
    if (!spec) {
      return UsageError(command_, fmt::format("unrecognized option '{}'", argv[optind - 1]));
    }
    if (std::optional<int> stop = spec->on(spec->takes_arg ? optarg : nullptr)) return stop;
  }
  operands_.assign(argv + optind, argv + argc);
  return std::nullopt;
}

bool CheckOutputFormat(const std::string& output) {
  if (output == "human" || output == "json") return true;
  PrintError("--output must be used with human or json as argument.");
  return false;
}

}  // namespace vimgfs::cli

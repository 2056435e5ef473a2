// Command-line options in qemu-img's manner: getopt_long (options and operands in any
// order), qemu-img's error lines and exit code 1 for a bad command line, -h/--help
// printing the command's usage. A command lists
// each option once, with what to do with it; the short-option string and the long table
// come from that list.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace vimgfs::cli {

class OptionParser {
 public:
  // Called with the option's argument (nullptr for a flag). nullopt: go on; a number:
  // stop parsing, the command exits with it.
  using Handler = std::function<std::optional<int>(const char* arg)>;

  // `refused_exit`: the exit code after an option Refuse()d, which qemu-img would take and
  // then fail to open the image with (compare: 2).
  OptionParser(const char* command, const char* usage, int refused_exit = 1);

  // short_name 0: long only; long_name nullptr: short only.
  OptionParser& Add(char short_name, const char* long_name, bool takes_arg, Handler on);
  OptionParser& Flag(char short_name, const char* long_name, bool* set);
  OptionParser& Value(char short_name, const char* long_name, std::string* set);
  // qemu-img options that change nothing here (cache modes of reads, --object, ...).
  OptionParser& Accept(char short_name, const char* long_name, bool takes_arg);
  // Options qemu-img has that vimgfs refuses: prints "<long_name> is not supported".
  OptionParser& Refuse(const char* long_name, bool takes_arg = false);
  // --object: qemu's secret objects are kept for key-secret= (crypto::SecretStore), other
  // object types change nothing here.
  OptionParser& Objects();
  // What every image command takes: --untrusted, --object (Objects()), --image-opts (the
  // image names are key=value lists; refused without image_opts).
  OptionParser& CommonImageOptions(bool* untrusted, bool* image_opts = nullptr);

  // nullopt: parsed, operands() holds the rest of the command line; otherwise the exit
  // code (0 after --help).
  std::optional<int> Parse(int argc, char** argv);
  const std::vector<std::string>& operands() const { return operands_; }

 private:
  struct Spec {
    char short_name;
    const char* long_name;
    bool takes_arg;
    Handler on;
  };
  const char* command_;
  const char* usage_;
  int refused_exit_;
  std::vector<Spec> specs_;
  std::vector<std::string> operands_;
};

// --output's value as qemu-img takes it: "human" or "json"; anything else prints
// qemu-img's error line and returns false.
bool CheckOutputFormat(const std::string& output);

}  // namespace vimgfs::cli

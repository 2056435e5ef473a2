// ResolveReference: the one place where names stored inside images become paths we open.
#include <climits>
#include <cstdlib>

#include "vimgfs/format.h"

namespace vimgfs {
namespace {

std::string DirName(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// "nbd:...", "http://...", "json:{...}": a protocol prefix before any slash.
bool HasProtocolPrefix(const std::string& name) {
  auto colon = name.find(':');
  if (colon == std::string::npos || colon == 0) return false;
  auto slash = name.find('/');
  if (slash != std::string::npos && slash < colon) return false;
  for (size_t i = 0; i < colon; i++) {
    char c = name[i];
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.' || c == '_'))
      return false;
  }
  return true;
}

}  // namespace

Result<std::string> ResolveReference(Env& env, const std::string& referrer_path,
                                     const std::string& name, bool untrusted,
                                     bool confine_to_folder) {
  if (name.empty()) return Status::InvalidFormat("'{}': empty file name reference", referrer_path);
  if (name.find('\0') != std::string::npos)
    return Status::InvalidFormat("'{}': file name reference contains a NUL byte", referrer_path);
  if (name.rfind("json:", 0) == 0 || HasProtocolPrefix(name))
    return Status::Unsupported("'{}': refusing to follow '{}': only plain file names are supported",
                               referrer_path, name);
  if (untrusted && !confine_to_folder)
    return Status::Error(ErrorKind::kUnsupported, EPERM,
                         fmt::format("'{}' refers to '{}': external references are refused with "
                                     "--untrusted", referrer_path, name));
  std::string dir = DirName(referrer_path);
  std::string path = name[0] == '/' ? name
                     : dir == "."    ? name
                     : dir == "/"    ? "/" + name
                                     : dir + "/" + name;
  if (confine_to_folder) {
    char real_dir[PATH_MAX], real_target[PATH_MAX];
    if (!realpath(dir.c_str(), real_dir) || !realpath(path.c_str(), real_target))
      return Status::NotFound("'{}' refers to '{}', which does not exist", referrer_path, name);
    std::string d(real_dir), t(real_target);
    if (t.compare(0, d.size() + 1, d + "/") != 0)
      return Status::Error(ErrorKind::kUnsupported, EPERM,
                           fmt::format("'{}' refers to '{}', outside its folder: refused with "
                                       "--untrusted", referrer_path, name));
  }
  ASSIGN_OR_RETURN(FileStat st, env.Stat(path));
  if (!st.exists)
    return Status::NotFound("'{}' refers to '{}', which does not exist", referrer_path, name);
  if (!st.regular)
    return Status::Error(ErrorKind::kUnsupported, EPERM,
                         fmt::format("'{}' refers to '{}', which is not a regular file: refused",
                                     referrer_path, name));
  return path;
}

}  // namespace vimgfs

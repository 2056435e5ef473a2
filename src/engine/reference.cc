// OpenReference: the one place where names stored inside images become files we open.
#include "io/nbd_file.h"
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

Result<OpenedReference> OpenReference(Env& env, const std::string& referrer_path, const std::string& name,
                                      OpenMode mode, bool untrusted) {
  if (name.empty()) return Status::InvalidFormat("'{}': empty file name reference", referrer_path);
  if (name.find('\0') != std::string::npos)
    return Status::InvalidFormat("'{}': file name reference contains a NUL byte", referrer_path);
  if (name.rfind("json:", 0) == 0 || HasProtocolPrefix(name))
    return Status::Unsupported("'{}': refusing to follow '{}': only plain file names are supported",
                               referrer_path, name);
  if (IsNbdUri(referrer_path)) {  // an image on a server names exports of that server only
    ASSIGN_OR_RETURN(std::string uri, SameServerUri(referrer_path, name));
    auto file = env.Open(uri, mode);
    if (!file.ok()) return file.error().WithContext("'{}' refers to '{}'", referrer_path, name);
    return OpenedReference{uri, std::move(file).value()};
  }
  std::string dir = DirName(referrer_path);
  auto file = env.OpenReference(dir, name, mode, untrusted);
  if (file.ok()) return OpenedReference{JoinPath(dir, name), std::move(file).value()};
  const Status& s = file.error();
  if (s.kind() == ErrorKind::kNotFound)
    return Status::NotFound("'{}' refers to '{}', which does not exist", referrer_path, name);
  if (s.kind() == ErrorKind::kUnsupported && s.err() == EXDEV)
    return Status::Error(ErrorKind::kUnsupported, EXDEV,
                         fmt::format("'{}' refers to '{}', outside its folder or through a symlink: "
                                     "refused with --untrusted",
                                     referrer_path, name));
  if (s.kind() == ErrorKind::kUnsupported && s.err() == EPERM)
    return Status::Error(
        ErrorKind::kUnsupported, EPERM,
        fmt::format("'{}' refers to '{}', which is not a regular file: refused", referrer_path, name));
  return s.WithContext("'{}' refers to '{}'", referrer_path, name);
}

}  // namespace vimgfs

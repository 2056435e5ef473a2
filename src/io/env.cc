// What every Env shares: path joining and the check-then-open OpenReference for Envs
// whose files nobody else can change.
#include "io/reference_path.h"

namespace vimgfs {

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (!name.empty() && name[0] == '/') return name;
  if (dir.empty() || dir == ".") return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

Result<std::vector<std::string>> ComponentsBeneath(const std::string& dir, const std::string& real_dir,
                                                   const std::string& name) {
  std::string rel = name;
  if (!rel.empty() && rel[0] == '/') {
    // An absolute name may still point into the folder: accept it only if it names it.
    rel.clear();
    for (const std::string& base : {dir, real_dir}) {
      if (base.empty() || base[0] != '/') continue;
      std::string prefix = base.back() == '/' ? base : base + "/";
      if (name.compare(0, prefix.size(), prefix) == 0) {
        rel = name.substr(prefix.size());
        break;
      }
    }
    if (rel.empty()) return Status::Error(ErrorKind::kUnsupported, EXDEV, "absolute name outside the folder");
  }
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= rel.size()) {
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    std::string part = rel.substr(start, slash - start);
    start = slash + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") return Status::Error(ErrorKind::kUnsupported, EXDEV, "'..' leaves the folder");
    parts.push_back(std::move(part));
  }
  if (parts.empty()) return Status::Error(ErrorKind::kUnsupported, EPERM, "names the folder itself");
  return parts;
}

Result<std::unique_ptr<File>> Env::OpenReference(const std::string& dir, const std::string& name,
                                                 OpenMode mode, bool beneath) {
  std::string path = JoinPath(dir, name);
  if (beneath) {
    ASSIGN_OR_RETURN(auto parts, ComponentsBeneath(dir, dir, name));
    path = dir;
    for (const std::string& p : parts) path = JoinPath(path, p);
  }
  ASSIGN_OR_RETURN(FileStat st, Stat(path));
  if (!st.exists) return Status::NotFound("'{}': No such file or directory", path);
  if (!st.regular) return Status::Error(ErrorKind::kUnsupported, EPERM, "not a regular file");
  return Open(path, mode);
}

}  // namespace vimgfs

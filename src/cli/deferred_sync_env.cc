#include "cli/deferred_sync_env.h"

#include <algorithm>

#include "io/forwarding_file.h"

namespace vimgfs::cli {
namespace {

// Writes pass through; syncs wait for the one at the end (DeferredSyncEnv::SyncAll).
class DeferredSyncFile final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  Status Sync(bool) override { return Status::Ok(); }
};

}  // namespace

Result<std::unique_ptr<File>> DeferredSyncEnv::Open(const std::string& path, OpenMode mode) {
  ASSIGN_OR_RETURN(auto f, base_->Open(path, mode));
  return Defer(std::move(f), mode);
}

Result<std::unique_ptr<File>> DeferredSyncEnv::OpenReference(const std::string& dir, const std::string& name,
                                                             OpenMode mode, bool beneath) {
  ASSIGN_OR_RETURN(auto f, base_->OpenReference(dir, name, mode, beneath));
  return Defer(std::move(f), mode);
}

std::unique_ptr<File> DeferredSyncEnv::Defer(std::unique_ptr<File> f, OpenMode mode) {
  if (mode == OpenMode::kReadOnly) return f;
  {
    std::lock_guard lk(mu_);
    if (std::find(written_.begin(), written_.end(), f->path()) == written_.end())
      written_.push_back(f->path());
  }
  return std::unique_ptr<File>(new DeferredSyncFile(std::move(f)));
}

Result<std::unique_ptr<File>> DeferredSyncEnv::Create(const std::string& path, bool exclusive) {
  ASSIGN_OR_RETURN(auto f, base_->Create(path, exclusive));
  return Defer(std::move(f), OpenMode::kReadWrite);
}

Status DeferredSyncEnv::SyncAll() {
  std::vector<std::string> paths;
  {
    std::lock_guard lk(mu_);
    paths = written_;
  }
  for (const std::string& p : paths) {
    ASSIGN_OR_RETURN(auto f, base_->Open(p, OpenMode::kReadWrite));
    RETURN_IF_ERROR(f->Sync(false));
  }
  return Status::Ok();
}

}  // namespace vimgfs::cli

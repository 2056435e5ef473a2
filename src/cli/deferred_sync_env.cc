#include "cli/deferred_sync_env.h"

#include <algorithm>

namespace vimgfs::cli {
namespace {

class DeferredSyncFile final : public File {
 public:
  explicit DeferredSyncFile(std::unique_ptr<File> f) : f_(std::move(f)) {}
  Status PRead(uint64_t off, std::span<std::byte> buf) override { return f_->PRead(off, buf); }
  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) override {
    return f_->PWrite(off, buf, tag);
  }
  Status Sync(bool) override { return Status::Ok(); }
  Result<uint64_t> Size() override { return f_->Size(); }
  Status Truncate(uint64_t size) override { return f_->Truncate(size); }
  Status PunchHole(uint64_t off, uint64_t len) override { return f_->PunchHole(off, len); }
  Status Allocate(uint64_t off, uint64_t len) override { return f_->Allocate(off, len); }
  Result<HostExtent> ProbeExtent(uint64_t off) override { return f_->ProbeExtent(off); }
  Result<uint64_t> AllocatedSize() override { return f_->AllocatedSize(); }
  const std::string& path() const override { return f_->path(); }
  bool writable() const override { return f_->writable(); }
  int fd() const override { return f_->fd(); }

 private:
  std::unique_ptr<File> f_;
};

}  // namespace

Result<std::unique_ptr<File>> DeferredSyncEnv::Open(const std::string& path, OpenMode mode) {
  ASSIGN_OR_RETURN(auto f, base_->Open(path, mode));
  if (mode == OpenMode::kReadOnly) return f;
  {
    std::lock_guard lk(mu_);
    if (std::find(written_.begin(), written_.end(), path) == written_.end()) written_.push_back(path);
  }
  return std::unique_ptr<File>(new DeferredSyncFile(std::move(f)));
}

Result<std::unique_ptr<File>> DeferredSyncEnv::Create(const std::string& path, bool exclusive) {
  ASSIGN_OR_RETURN(auto f, base_->Create(path, exclusive));
  {
    std::lock_guard lk(mu_);
    if (std::find(written_.begin(), written_.end(), path) == written_.end()) written_.push_back(path);
  }
  return std::unique_ptr<File>(new DeferredSyncFile(std::move(f)));
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

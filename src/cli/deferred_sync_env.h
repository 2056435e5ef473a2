// An Env whose files skip every Sync until SyncAll(): a conversion writes a whole new
// image, and a crash half-way leaves nothing worth keeping, so per-step flushes (which
// qemu-img convert also skips: its default cache mode is "unsafe") only cost time.
// SyncAll() makes everything durable once at the end.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vimgfs/env.h"

namespace vimgfs::cli {

class DeferredSyncEnv final : public Env {
 public:
  explicit DeferredSyncEnv(Env* base) : base_(base) {}
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override;
  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override;
  Status Remove(const std::string& path) override { return base_->Remove(path); }
  Result<FileStat> Stat(const std::string& path) override { return base_->Stat(path); }
  Result<std::unique_ptr<File>> OpenReference(const std::string& dir, const std::string& name, OpenMode mode,
                                              bool beneath) override;
  // Opens every file written through this Env again and syncs it (data and metadata).
  Status SyncAll();

 private:
  // Wraps a file opened for writing so its syncs wait for SyncAll.
  std::unique_ptr<File> Defer(std::unique_ptr<File> f, OpenMode mode);

  Env* base_;
  std::mutex mu_;
  std::vector<std::string> written_;
};

}  // namespace vimgfs::cli

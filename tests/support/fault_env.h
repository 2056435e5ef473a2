// FaultEnv: wraps another Env and fails chosen writes (EIO, ENOSPC), in the manner of
// leveldb's fault-injection Env and qemu's blkdebug. A rule names an IoTag (or any), the
// n-th matching write, an errno, and whether it fails once or from then on.
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "vimgfs/env.h"

namespace vimgfs::test {

struct FaultRule {
  std::optional<IoTag> tag;  // nullopt: any write
  int nth = 1;               // fail the nth matching write (1-based)
  int err = EIO;
  bool sticky = false;     // keep failing every later matching write
  bool fail_sync = false;  // also fail Sync once triggered
};

class FaultEnv : public Env {
 public:
  explicit FaultEnv(Env* base) : base_(base) {}

  void SetRule(FaultRule r) {
    std::lock_guard lk(mu_);
    rule_ = r;
    matched_ = 0;
    triggered_ = false;
  }
  void ClearRule() {
    std::lock_guard lk(mu_);
    rule_.reset();
  }
  bool triggered() const { return triggered_; }
  int writes_seen() const { return writes_; }

  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override {
    ASSIGN_OR_RETURN(auto f, base_->Open(path, mode));
    return Wrap(std::move(f));
  }
  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override {
    ASSIGN_OR_RETURN(auto f, base_->Create(path, exclusive));
    return Wrap(std::move(f));
  }
  Status Remove(const std::string& path) override { return base_->Remove(path); }
  Result<FileStat> Stat(const std::string& path) override { return base_->Stat(path); }

  // Whether this write fails (and counts it).
  std::optional<int> ShouldFail(IoTag tag) {
    std::lock_guard lk(mu_);
    writes_++;
    if (!rule_) return std::nullopt;
    if (rule_->tag && *rule_->tag != tag) return std::nullopt;
    if (triggered_ && rule_->sticky) return rule_->err;
    if (triggered_) return std::nullopt;
    if (++matched_ == rule_->nth) {
      triggered_ = true;
      return rule_->err;
    }
    return std::nullopt;
  }
  bool SyncFails() {
    std::lock_guard lk(mu_);
    return rule_ && triggered_ && rule_->fail_sync;
  }

 private:
  class FaultFile : public File {
   public:
    FaultFile(FaultEnv* env, std::unique_ptr<File> f) : env_(env), f_(std::move(f)) {}
    Status PRead(uint64_t off, std::span<std::byte> buf) override { return f_->PRead(off, buf); }
    Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) override {
      if (auto err = env_->ShouldFail(tag))
        return Status::FromErrno(*err, "'{}': injected write failure at {:#x}", path(), off);
      return f_->PWrite(off, buf, tag);
    }
    Status Sync(bool data_only) override {
      if (env_->SyncFails()) return Status::FromErrno(EIO, "'{}': injected sync failure", path());
      return f_->Sync(data_only);
    }
    Result<uint64_t> Size() override { return f_->Size(); }
    Status Truncate(uint64_t size) override { return f_->Truncate(size); }
    Status PunchHole(uint64_t off, uint64_t len) override { return f_->PunchHole(off, len); }
    Status Allocate(uint64_t off, uint64_t len) override {
      if (auto err = env_->ShouldFail(IoTag::kOther))
        return Status::FromErrno(*err, "'{}': injected allocation failure", path());
      return f_->Allocate(off, len);
    }
    Result<HostExtent> ProbeExtent(uint64_t off) override { return f_->ProbeExtent(off); }
    Result<uint64_t> AllocatedSize() override { return f_->AllocatedSize(); }
    const std::string& path() const override { return f_->path(); }
    bool writable() const override { return f_->writable(); }
    int fd() const override { return f_->fd(); }

   private:
    FaultEnv* env_;
    std::unique_ptr<File> f_;
  };

  Result<std::unique_ptr<File>> Wrap(std::unique_ptr<File> f) {
    return std::unique_ptr<File>(new FaultFile(this, std::move(f)));
  }

  Env* base_;
  std::mutex mu_;
  std::optional<FaultRule> rule_;
  int matched_ = 0;
  std::atomic<bool> triggered_{false};
  std::atomic<int> writes_{0};
};

}  // namespace vimgfs::test

#include "support/power_loss_env.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace vimgfs::test {

class PowerLossEnv::Handle : public File {
 public:
  Handle(PowerLossEnv* env, std::unique_ptr<File> f, uint64_t generation)
      : env_(env), f_(std::move(f)), generation_(generation) {}

  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    RETURN_IF_ERROR(Alive());
    return f_->PRead(off, buf);
  }
  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag) override {
    Op op{Op::kWrite, off, buf.size(), std::vector<std::byte>(buf.begin(), buf.end())};
    RETURN_IF_ERROR(env_->Record(path(), generation_, std::move(op)));
    return f_->PWrite(off, buf, tag);
  }
  Status Sync(bool) override { return env_->SyncFile(path(), generation_, *f_); }
  Result<uint64_t> Size() override {
    RETURN_IF_ERROR(Alive());
    return f_->Size();
  }
  Status Truncate(uint64_t size) override {
    RETURN_IF_ERROR(env_->Record(path(), generation_, Op{Op::kTruncate, size, 0, {}}));
    return f_->Truncate(size);
  }
  Status PunchHole(uint64_t off, uint64_t len) override {
    RETURN_IF_ERROR(env_->Record(path(), generation_, Op{Op::kPunch, off, len, {}}));
    return f_->PunchHole(off, len);
  }
  Status Allocate(uint64_t off, uint64_t len) override {
    RETURN_IF_ERROR(env_->Record(path(), generation_, Op{Op::kAllocate, off, len, {}}));
    return f_->Allocate(off, len);
  }
  Result<HostExtent> ProbeExtent(uint64_t off) override {
    RETURN_IF_ERROR(Alive());
    return f_->ProbeExtent(off);
  }
  Result<uint64_t> AllocatedSize() override {
    RETURN_IF_ERROR(Alive());
    return f_->AllocatedSize();
  }
  const std::string& path() const override { return f_->path(); }
  bool writable() const override { return f_->writable(); }

 private:
  Status Alive() {
    std::lock_guard lk(env_->mu_);
    if (generation_ != env_->generation_) return Status::FromErrno(EIO, "'{}': the power went off", path());
    return Status::Ok();
  }
  PowerLossEnv* env_;
  std::unique_ptr<File> f_;
  uint64_t generation_;
};

Result<std::unique_ptr<File>> PowerLossEnv::Open(const std::string& path, OpenMode mode) {
  ASSIGN_OR_RETURN(auto f, base_->Open(path, mode));
  std::lock_guard lk(mu_);
  if (!logs_.contains(path)) {
    // First sight of a file made before this env watched it: durable as it is.
    ASSIGN_OR_RETURN(uint64_t size, f->Size());
    FileLog& log = logs_[path];
    log.durable.resize(size);
    RETURN_IF_ERROR(f->PRead(0, log.durable));
  }
  return std::unique_ptr<File>(new Handle(this, std::move(f), generation_));
}

Result<std::unique_ptr<File>> PowerLossEnv::Create(const std::string& path, bool exclusive) {
  ASSIGN_OR_RETURN(auto f, base_->Create(path, exclusive));
  std::lock_guard lk(mu_);
  logs_[path] = FileLog{};  // an empty file (its name is taken as durable)
  return std::unique_ptr<File>(new Handle(this, std::move(f), generation_));
}

Status PowerLossEnv::Remove(const std::string& path) {
  std::lock_guard lk(mu_);
  logs_.erase(path);
  return base_->Remove(path);
}

Status PowerLossEnv::Record(const std::string& path, uint64_t generation, Op op) {
  std::lock_guard lk(mu_);
  if (generation != generation_) return Status::FromErrno(EIO, "'{}': the power went off", path);
  if (CrashHereLocked()) return Status::FromErrno(EIO, "'{}': the power went off", path);
  logs_[path].since_sync.push_back(std::move(op));
  return Status::Ok();
}

Status PowerLossEnv::SyncFile(const std::string& path, uint64_t generation, File& base_file) {
  std::lock_guard lk(mu_);
  if (generation != generation_) return Status::FromErrno(EIO, "'{}': the power went off", path);
  if (CrashHereLocked()) return Status::FromErrno(EIO, "'{}': the power went off", path);
  if (syncs_until_crash_ > 0 && --syncs_until_crash_ == 0) {
    std::mt19937_64 rng(crash_seed_);
    CrashLocked(rng, crash_keep_);
    return Status::FromErrno(EIO, "'{}': the power went off", path);
  }
  FileLog& log = logs_[path];
  ASSIGN_OR_RETURN(uint64_t size, base_file.Size());
  log.durable.assign(size, std::byte{0});
  RETURN_IF_ERROR(base_file.PRead(0, log.durable));
  log.since_sync.clear();
  return Status::Ok();
}

void PowerLossEnv::Apply(std::vector<std::byte>& content, const Op& op) {
  switch (op.kind) {
    case Op::kWrite:
      if (content.size() < op.off + op.len) content.resize(op.off + op.len, std::byte{0});
      std::memcpy(content.data() + op.off, op.data.data(), op.len);
      break;
    case Op::kTruncate:
      content.resize(op.off, std::byte{0});
      break;
    case Op::kPunch:
      if (op.off < content.size())
        std::fill_n(content.begin() + static_cast<ptrdiff_t>(op.off),
                    std::min<uint64_t>(op.len, content.size() - op.off), std::byte{0});
      break;
    case Op::kAllocate:
      if (content.size() < op.off + op.len) content.resize(op.off + op.len, std::byte{0});
      break;
  }
}

void PowerLossEnv::Crash(std::mt19937_64& rng, double keep_probability) {
  std::lock_guard lk(mu_);
  CrashLocked(rng, keep_probability);
}

void PowerLossEnv::CrashAtSync(int n, uint64_t seed, double keep_probability) {
  std::lock_guard lk(mu_);
  syncs_until_crash_ = n;
  crash_seed_ = seed;
  crash_keep_ = keep_probability;
}

void PowerLossEnv::CrashAtOp(int n, uint64_t seed, double keep_probability) {
  std::lock_guard lk(mu_);
  ops_until_crash_ = n;
  crash_seed_ = seed;
  crash_keep_ = keep_probability;
}

int PowerLossEnv::ops() const {
  std::lock_guard lk(mu_);
  return ops_;
}

bool PowerLossEnv::CrashHereLocked() {
  ops_++;
  if (ops_until_crash_ <= 0 || --ops_until_crash_ > 0) return false;
  std::mt19937_64 rng(crash_seed_);
  CrashLocked(rng, crash_keep_);
  return true;
}

bool PowerLossEnv::crashed() const {
  std::lock_guard lk(mu_);
  return crashes_ > 0;
}

void PowerLossEnv::CrashLocked(std::mt19937_64& rng, double keep_probability) {
  generation_++;
  crashes_++;
  syncs_until_crash_ = 0;
  ops_until_crash_ = 0;
  std::bernoulli_distribution keep(keep_probability);
  for (auto& [path, log] : logs_) {
    std::vector<std::byte> content = log.durable;
    for (const Op& op : log.since_sync)
      if (keep(rng)) Apply(content, op);
    auto f = base_->Create(path, false);
    if (f.ok()) (void)(*f)->PWrite(0, content);
    log.durable = std::move(content);
    log.since_sync.clear();
  }
}

}  // namespace vimgfs::test

// An in-memory Env for tests and fuzzing. Files are sparse: stored in 64 KiB chunks, so
// a test can write at a terabyte offset without allocating a terabyte.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "vimgfs/env.h"

namespace vimgfs {
namespace {

constexpr uint64_t kChunk = 64 * 1024;

struct MemData {
  std::mutex mu;
  uint64_t size = 0;
  std::map<uint64_t, std::unique_ptr<std::byte[]>> chunks;  // chunk index -> bytes
};

class MemFile final : public File {
 public:
  MemFile(std::shared_ptr<MemData> d, std::string path, bool writable)
      : d_(std::move(d)), path_(std::move(path)), writable_(writable) {}

  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    std::lock_guard lk(d_->mu);
    uint64_t pos = 0;
    while (pos < buf.size()) {
      uint64_t o = off + pos;
      uint64_t n = std::min<uint64_t>(buf.size() - pos, kChunk - o % kChunk);
      auto it = d_->chunks.find(o / kChunk);
      if (it == d_->chunks.end() || o >= d_->size) {
        std::memset(buf.data() + pos, 0, n);
      } else {
        uint64_t valid = std::min(n, d_->size > o ? d_->size - o : 0);
        std::memcpy(buf.data() + pos, it->second.get() + o % kChunk, valid);
        std::memset(buf.data() + pos + valid, 0, n - valid);
      }
      pos += n;
    }
    return Status::Ok();
  }

  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag) override {
    if (!writable_) return Status::FromErrno(EBADF, "'{}': not open for writing", path_);
    std::lock_guard lk(d_->mu);
    uint64_t pos = 0;
    while (pos < buf.size()) {
      uint64_t o = off + pos;
      uint64_t n = std::min<uint64_t>(buf.size() - pos, kChunk - o % kChunk);
      auto& c = d_->chunks[o / kChunk];
      if (!c) {
        c.reset(new std::byte[kChunk]);
        std::memset(c.get(), 0, kChunk);
      }
      std::memcpy(c.get() + o % kChunk, buf.data() + pos, n);
      pos += n;
    }
    d_->size = std::max(d_->size, off + buf.size());
    return Status::Ok();
  }

  Status Sync(bool) override { return Status::Ok(); }
  Result<uint64_t> Size() override {
    std::lock_guard lk(d_->mu);
    return d_->size;
  }
  Result<uint64_t> AllocatedSize() override {
    std::lock_guard lk(d_->mu);
    return d_->chunks.size() * kChunk;
  }
  Status Truncate(uint64_t size) override {
    std::lock_guard lk(d_->mu);
    if (size < d_->size) {
      // Zero the tail of the last kept chunk so a later grow reads zeros.
      auto it = d_->chunks.find(size / kChunk);
      if (it != d_->chunks.end() && size % kChunk)
        std::memset(it->second.get() + size % kChunk, 0, kChunk - size % kChunk);
      d_->chunks.erase(d_->chunks.lower_bound(DivUp(size)), d_->chunks.end());
    }
    d_->size = size;
    return Status::Ok();
  }
  Status PunchHole(uint64_t off, uint64_t len) override {
    std::vector<std::byte> zeros(std::min<uint64_t>(len, kChunk));
    for (uint64_t p = 0; p < len;) {
      uint64_t n = std::min<uint64_t>(len - p, zeros.size());
      uint64_t o = off + p;
      if (o % kChunk == 0 && n == kChunk) {
        std::lock_guard lk(d_->mu);
        d_->chunks.erase(o / kChunk);
      } else {
        uint64_t keep;
        {
          std::lock_guard lk(d_->mu);
          keep = d_->size;
        }
        RETURN_IF_ERROR(PWrite(o, std::span(zeros.data(), n), IoTag::kOther));
        std::lock_guard lk(d_->mu);
        d_->size = keep;
      }
      p += n;
    }
    return Status::Ok();
  }
  Status Allocate(uint64_t off, uint64_t len) override {
    std::lock_guard lk(d_->mu);
    d_->size = std::max(d_->size, off + len);
    return Status::Ok();
  }
  Result<HostExtent> ProbeExtent(uint64_t off) override {
    std::lock_guard lk(d_->mu);
    if (off >= d_->size) return HostExtent{false, 0};
    bool data = d_->chunks.count(off / kChunk) != 0;
    uint64_t end = (off / kChunk + 1) * kChunk;
    while (end < d_->size && (d_->chunks.count(end / kChunk) != 0) == data) end += kChunk;
    return HostExtent{data, std::min(end, d_->size) - off};
  }
  const std::string& path() const override { return path_; }
  bool writable() const override { return writable_; }

 private:
  static uint64_t DivUp(uint64_t v) { return (v + kChunk - 1) / kChunk; }
  std::shared_ptr<MemData> d_;
  std::string path_;
  bool writable_;
};

class MemEnv final : public Env {
 public:
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override {
    std::lock_guard lk(mu_);
    auto it = files_.find(path);
    if (it == files_.end()) return Status::NotFound("Could not open '{}': No such file or directory", path);
    return std::unique_ptr<File>(new MemFile(it->second, path, mode == OpenMode::kReadWrite));
  }
  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override {
    std::lock_guard lk(mu_);
    auto& d = files_[path];
    if (d && exclusive) return Status::FromErrno(EEXIST, "Could not create '{}': File exists", path);
    d = std::make_shared<MemData>();
    return std::unique_ptr<File>(new MemFile(d, path, true));
  }
  Status Remove(const std::string& path) override {
    std::lock_guard lk(mu_);
    if (files_.erase(path) == 0) return Status::NotFound("Could not remove '{}': No such file", path);
    return Status::Ok();
  }
  Result<FileStat> Stat(const std::string& path) override {
    std::lock_guard lk(mu_);
    FileStat st;
    auto it = files_.find(path);
    if (it == files_.end()) return st;
    st.exists = st.regular = true;
    std::lock_guard lk2(it->second->mu);
    st.size = it->second->size;
    return st;
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<MemData>> files_;
};

}  // namespace

std::unique_ptr<Env> NewMemEnv() { return std::make_unique<MemEnv>(); }

}  // namespace vimgfs

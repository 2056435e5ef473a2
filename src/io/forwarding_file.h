// A File that hands every call to another one. Wrapping Envs (deferred syncs, test
// recorders and fault injectors) derive from it and override only the calls they change.
#pragma once

#include <memory>

#include "vimgfs/env.h"

namespace vimgfs {

class ForwardingFile : public File {
 public:
  explicit ForwardingFile(std::unique_ptr<File> f) : f_(std::move(f)) {}
  Status PRead(uint64_t o, std::span<std::byte> b) override { return f_->PRead(o, b); }
  Status PWrite(uint64_t o, std::span<const std::byte> b, IoTag t) override { return f_->PWrite(o, b, t); }
  Status Sync(bool data_only) override { return f_->Sync(data_only); }
  Result<uint64_t> Size() override { return f_->Size(); }
  Status Truncate(uint64_t s) override { return f_->Truncate(s); }
  Status PunchHole(uint64_t o, uint64_t l) override { return f_->PunchHole(o, l); }
  Status Allocate(uint64_t o, uint64_t l) override { return f_->Allocate(o, l); }
  Result<HostExtent> ProbeExtent(uint64_t o) override { return f_->ProbeExtent(o); }
  Result<uint64_t> AllocatedSize() override { return f_->AllocatedSize(); }
  const std::string& path() const override { return f_->path(); }
  bool writable() const override { return f_->writable(); }
  int fd() const override { return f_->fd(); }

 private:
  std::unique_ptr<File> f_;
};

}  // namespace vimgfs

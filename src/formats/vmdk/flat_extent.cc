// Flat extents (FLAT, VMFS, VMFSRAW, VMFSRDM): the guest bytes are the file's bytes from
// a start offset on, always writable in place. ZERO extents read as zeros and hold no file.
#include "formats/vmdk/vmdk_internal.h"

namespace vimgfs::vmdk {
namespace {

class FlatExtent final : public Extent {
 public:
  FlatExtent(File* file, std::unique_ptr<File> owned, uint64_t file_offset)
      : file_(file), owned_(std::move(owned)), file_offset_(file_offset) {}

  File* file() override { return file_; }

  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    Mapping m;
    m.kind = Mapping::Kind::kData;
    m.length = len;
    m.file = file_;
    m.host_offset = file_offset_ + off;
    m.writable = !read_only;
    out->push_back(m);
    return Status::Ok();
  }

  // Never called for writable flat extents (their data is writable in place); a read-only
  // one is refused.
  Result<WritePlan> PrepareWrite(uint64_t, uint64_t) override {
    return Status::ReadOnly("'{}': the extent is read-only", file_->path());
  }

  Status SyncFile() override { return read_only ? Status::Ok() : file_->Sync(true); }

  Result<std::string> CheckGrains(uint64_t guest_start) override {
    ASSIGN_OR_RETURN(uint64_t size, file_->Size());
    if (file_offset_ >= size)
      return fmt::format("ERROR: cluster offset for sector {} points after EOF", guest_start / kSector);
    return std::string();
  }

 private:
  File* file_;
  std::unique_ptr<File> owned_;
  uint64_t file_offset_;
};

class ZeroExtent final : public Extent {
 public:
  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    Mapping m;
    m.kind = Mapping::Kind::kZero;
    m.length = len;
    out->push_back(m);
    return Status::Ok();
  }
  // Zeros stay zeros.
  Status ZeroRange(uint64_t, uint64_t) override { return Status::Ok(); }
};

// An extent named by the descriptor but not opened (--untrusted info): `info` shows its
// name; any read is refused.
class UnopenedExtent final : public Extent {
 public:
  explicit UnopenedExtent(std::string name) : name_(std::move(name)) {}
  Status Lookup(uint64_t, uint64_t, std::vector<Mapping>*) override {
    return Status::Error(ErrorKind::kUnsupported, EPERM,
                         fmt::format("extent '{}' was not opened (--untrusted)", name_));
  }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

}  // namespace

std::unique_ptr<Extent> NewUnopenedExtent(std::string name, std::string type, uint64_t length) {
  auto e = std::make_unique<UnopenedExtent>(std::move(name));
  e->length = length;
  e->type = std::move(type);
  e->read_only = true;
  return e;
}

std::unique_ptr<Extent> NewFlatExtent(File* file, std::unique_ptr<File> owned, uint64_t file_offset,
                                      uint64_t length, bool read_only, std::string type) {
  auto e = std::make_unique<FlatExtent>(file, std::move(owned), file_offset);
  e->length = length;
  e->read_only = read_only;
  e->type = std::move(type);
  return e;
}

std::unique_ptr<Extent> NewZeroExtent(uint64_t length) {
  auto e = std::make_unique<ZeroExtent>();
  e->length = length;
  e->type = "ZERO";
  return e;
}

VmdkExtentDetails Extent::Info() const {
  VmdkExtentDetails d;
  auto* self = const_cast<Extent*>(this);
  d.compressed = self->compressed();
  d.virtual_size = length;
  if (auto* u = dynamic_cast<const UnopenedExtent*>(this)) {
    d.filename = u->name();
  } else {
    d.filename = self->file() ? self->file()->path() : std::string();
  }
  d.cluster_size = grain_bytes();
  d.format = type;
  return d;
}

}  // namespace vimgfs::vmdk

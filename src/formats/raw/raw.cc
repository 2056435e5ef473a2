// raw: the file is the disk. Holes (SEEK_HOLE) are reported as zero runs so block
// status, map and sparse copies see them; writes into holes fill them in place.
#include <algorithm>
#include <array>
#include <climits>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "util/checked.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

// A raw file grown from empty gets its first block written with zeros, as qemu's file
// driver does (so block status sees the host's alignment): a fresh image maps one data
// block at 0 in qemu-img map and occupies that block on disk.
Status AllocateFirstBlock(File& f, uint64_t size) {
  if (size == 0) return Status::Ok();
  static const std::array<std::byte, 4096> kZeros{};
  const uint64_t n = std::min<uint64_t>(size < kZeros.size() ? 512 : kZeros.size(), size);
  return f.PWrite(0, std::span(kZeros.data(), n));
}

constexpr uint64_t kSector = 512;

class RawMap final : public ClusterMap {
 public:
  RawMap(std::unique_ptr<File> file, uint64_t size, bool read_only)
      : file_(std::move(file)), size_(size), read_only_(read_only) {}

  uint64_t virtual_size() const override { return size_; }
  uint64_t cluster_size() const override { return kSector; }
  bool read_only() const override { return read_only_; }

  // Past the host EOF (the file shrank under us) reads as zeros.
  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    return LookupPlainExtents(*file_, 0, off, len, !read_only_, out);
  }

  // A hole: the bytes land where they belong, nothing to link.
  Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) override {
    if (read_only_) return Status::ReadOnly("'{}' is opened read-only", file_->path());
    WritePlan p;
    p.guest_offset = off;
    p.length = len;
    p.file = file_.get();
    p.host_offset = off;
    return p;
  }
  Status CommitWrite(const WritePlan&) override { return Status::Ok(); }

  Status ZeroRange(uint64_t off, uint64_t len, bool) override {
    return file_->PunchHole(off, std::min(len, size_ - off));
  }
  Status Discard(uint64_t off, uint64_t len) override {
    Status s = file_->PunchHole(off, std::min(len, size_ - off));
    return s.kind() == ErrorKind::kUnsupported ? Status::Ok() : s;
  }
  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return read_only_ ? Status::Ok() : file_->Sync(true); }
  Status Close() override { return Flush(); }

  FormatInfo Info() override {
    FormatInfo fi;
    fi.format = "raw";
    fi.virtual_size = size_;
    return fi;
  }

  Result<CheckReport> Check(RepairMode) override {
    return Status::Unsupported("This image format does not support checks");
  }

  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros) override {
    if (read_only_) return Status::ReadOnly("'{}' is opened read-only", file_->path());
    if (new_size < size_ && !allow_shrink)
      return Status::InvalidArgument("Use the --shrink option to perform a shrink operation.");
    RETURN_IF_ERROR(file_->Truncate(new_size));
    if (size_ == 0) RETURN_IF_ERROR(AllocateFirstBlock(*file_, new_size));
    size_ = new_size;
    return Status::Ok();
  }

 private:
  std::unique_ptr<File> file_;
  uint64_t size_;
  bool read_only_;
};

class RawDriverImpl final : public FormatDriver {
 public:
  const char* name() const override { return "raw"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = {
        .create_options = {{"size", CreateOptionSpec::Type::kSize, "Virtual disk size"}},
        .grow_preallocation = FormatTraits::GrowPreallocation::kHostFile,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte>, const std::string&) const override { return 1; }

  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    if (!ctx.options.snapshot.empty())
      return Status::Unsupported("'{}': raw images have no snapshots", ctx.path);
    ASSIGN_OR_RETURN(uint64_t size, ctx.file->Size());
    size = (size + kSector - 1) / kSector * kSector;  // qemu sees whole sectors: the tail reads zeros
    bool ro = ctx.options.read_only || !ctx.file->writable();
    return std::unique_ptr<ClusterMap>(new RawMap(std::move(ctx.file), size, ro));
  }

  Status Create(const CreateContext& ctx) const override {
    if (ctx.backing) return Status::Unsupported("'{}': raw images cannot have a backing file", ctx.path);
    std::string prealloc = "off";
    for (const auto& [k, v] : ctx.options) {
      if (k == "preallocation") {
        prealloc = v;
      } else {
        return Status::InvalidArgument("Invalid parameter '{}'", k);
      }
    }
    if (prealloc != "off" && prealloc != "falloc" && prealloc != "full")
      return Status::InvalidArgument("Invalid preallocation mode: '{}'", prealloc);
    if (ctx.size > uint64_t{INT64_MAX})  // an off_t cannot hold it
      return Status::InvalidArgument("Could not resize file: Invalid argument");
    ASSIGN_OR_RETURN(auto f, CreateImageFile(ctx, ctx.path));
    RETURN_IF_ERROR(f->Truncate(ctx.size));
    if (prealloc == "off") RETURN_IF_ERROR(AllocateFirstBlock(*f, ctx.size));
    if (prealloc == "falloc" && ctx.size) RETURN_IF_ERROR(f->Allocate(0, ctx.size));
    if (prealloc == "full") RETURN_IF_ERROR(WriteZeros(*f, 0, ctx.size));
    return f->Sync(false);
  }

  // qemu's raw_measure: the file is the disk, allocated or not.
  Result<MeasureResult> Measure(const MeasureRequest& req) const override {
    MeasureResult m;
    if (req.source) {
      m.required = req.source->size();
    } else if (auto it = req.options.find("size"); it != req.options.end()) {
      ASSIGN_OR_RETURN(uint64_t size, ParseSize(it->second));
      m.required = AlignUp(size, kSector);
    }
    m.fully_allocated = m.required;
    return m;
  }
};

}  // namespace

const FormatDriver* RawDriver() {
  static RawDriverImpl driver;
  return &driver;
}

}  // namespace vimgfs

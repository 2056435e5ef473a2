// `create -f qed` (the layout qemu-img 7.2 writes: the header in cluster 0, the backing
// name right after the header fields, an all-zero L1 table in the next clusters) and the
// driver object.
#include <cstring>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/qed/qed_internal.h"
#include "util/checked.h"
#include "vimgfs/image.h"

namespace vimgfs::qed {

Status CreateQed(const CreateContext& ctx) {
  uint64_t size = ctx.size;
  uint64_t cluster_size = kDefaultClusterSize;
  uint64_t table_size = kDefaultTableSize;
  std::optional<BackingRef> backing = ctx.backing;
  for (const auto& [key, value] : ctx.options) {
    if (key == "size") {
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "cluster_size") {
      ASSIGN_OR_RETURN(cluster_size, ParseSize(value));
    } else if (key == "table_size") {
      ASSIGN_OR_RETURN(table_size, ParseSize(value));
    } else if (key == "backing_file") {
      if (!backing) backing = BackingRef{};
      backing->name = value;
    } else if (key == "backing_fmt") {
      if (!backing) backing = BackingRef{};
      backing->format = value;
    } else {
      return Status::InvalidArgument("Invalid parameter '{}'", key);
    }
  }
  if (!IsValidClusterSize(cluster_size))
    return Status::InvalidArgument("QED cluster size must be within range [{}, {}] and power of 2",
                                   kMinClusterSize, kMaxClusterSize);
  if (!IsValidTableSize(table_size))
    return Status::InvalidArgument("QED table size must be within range [1, {}] and power of 2",
                                   kMaxTableSize);
  size = AlignUp(size, 512);  // qemu rounds up silently
  if (!IsValidImageSize(size, cluster_size, table_size))
    return Status::InvalidArgument(
        "QED image size must be a non-zero multiple of cluster size and less than {} bytes",
        MaxImageSize(cluster_size, table_size));
  if (cluster_size * table_size > kMaxTableBytes)
    return Status::Unsupported("QED tables of {} bytes are larger than vimgfs writes ({} bytes)",
                               cluster_size * table_size, kMaxTableBytes);
  const bool has_backing = backing && !backing->name.empty();
  if (backing && !has_backing)
    return Status::InvalidArgument("Backing format cannot be used without backing file");

  Header h;
  h.cluster_size = static_cast<uint32_t>(cluster_size);
  h.table_size = static_cast<uint32_t>(table_size);
  h.header_size = 1;
  h.l1_table_offset = cluster_size;
  h.image_size = size;
  std::vector<std::byte> head(kHeaderBytes);
  if (has_backing) {
    if (kHeaderBytes + backing->name.size() > cluster_size || backing->name.size() > kMaxBackingNameBytes)
      return Status::InvalidArgument("the backing file name is too long for the QED header ({} bytes)",
                                     backing->name.size());
    h.features |= kFeatureBackingFile;
    if (backing->format == "raw") h.features |= kFeatureBackingNoProbe;
    h.backing_name_offset = kHeaderBytes;
    h.backing_name_size = static_cast<uint32_t>(backing->name.size());
    head.resize(kHeaderBytes + backing->name.size());
    std::memcpy(head.data() + kHeaderBytes, backing->name.data(), backing->name.size());
  }
  const auto fields = SerializeHeader(h);
  std::memcpy(head.data(), fields.data(), kHeaderBytes);

  // QED tells allocation by the file's length: the new file starts empty.
  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  RETURN_IF_ERROR(file->PWrite(0, head, IoTag::kHeader).WithContext("'{}': writing the header", ctx.path));
  const std::vector<std::byte> l1(h.table_bytes());
  RETURN_IF_ERROR(
      file->PWrite(h.l1_table_offset, l1, IoTag::kL1).WithContext("'{}': writing the L1 table", ctx.path));
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class QedFormat final : public FormatDriver {
 public:
  const char* name() const override { return "qed"; }
  const FormatTraits& traits() const override {
    using Opt = CreateOptionSpec::Type;
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", Opt::kSize, "Virtual disk size"},
                {"backing_file", Opt::kString, "File name of a base image"},
                {"backing_fmt", Opt::kString, "Image format of the base image"},
                {"cluster_size", Opt::kSize, "Cluster size (in bytes)", "65536"},
                {"table_size", Opt::kSize, "L1/L2 table size (in clusters)"},
            },
        // qemu truncates the new file to zero before it writes the header.
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeQed(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return QedMap::Open(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override { return CreateQed(ctx); }
};

}  // namespace
}  // namespace vimgfs::qed

namespace vimgfs {
const FormatDriver* QedDriver() {
  static const qed::QedFormat driver;
  return &driver;
}
}  // namespace vimgfs

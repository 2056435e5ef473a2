// `create -f qcow` (the layout qemu-img 7.2 writes) and the driver object.
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "crypto/secrets.h"
#include "formats/drivers.h"
#include "formats/format_util.h"
#include "formats/qcow/qcow_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::qcow {

Status CreateQcow(const CreateContext& ctx) {
  uint64_t size = ctx.size;
  bool aes = false;  // the legacy AES: a header flag, the key comes at each open
  std::string key_secret;
  for (const auto& [key, value] : ctx.options) {
    if (key == "size") {
      ASSIGN_OR_RETURN(size, ParseSize(value));
    } else if (key == "encryption") {  // the deprecated spelling of encrypt.format=aes
      ASSIGN_OR_RETURN(aes, ParseBoolOption(key, value));
    } else if (key == "encrypt.format") {
      // qemu knows only AES ('aes', or its crypto layer's name 'qcow') for qcow.
      if (value != "aes" && value != "qcow") return Status::InvalidArgument("Unsupported encryption format");
      aes = true;
    } else if (key == "encrypt.key-secret") {
      key_secret = value;
    } else {
      return Status::InvalidArgument("Invalid parameter '{}'", key);
    }
  }
  if (aes) {  // qemu checks the secret now
    if (key_secret.empty())
      return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
    RETURN_IF_ERROR(crypto::LookupPassphrase(ctx.secrets, key_secret).status());
  }
  if (size == 0) return Status::InvalidArgument("Image size is too small, cannot be zero length");
  if (size > limits::kMaxVirtualSize) {
    return Status::Error(ErrorKind::kUnsupported, EFBIG, fmt::format("qcow disk size {} is too large", size));
  }
  size = AlignUp(size, kSectorSize);  // qemu silently rounds up to a sector

  std::string backing_name;
  if (ctx.backing) {
    const std::string& fmt_name = ctx.backing->format;
    // qcow cannot store the backing format; qemu only checks that it names a format.
    if (!fmt_name.empty() && !FindFormat(fmt_name) && !IsUndrivenQemuFormat(fmt_name)) {
      return Status::InvalidArgument("unrecognized backing format '{}'", fmt_name);
    }
    backing_name = ctx.backing->name;
    if (backing_name.size() > limits::kMaxBackingNameBytes) {
      return Status::InvalidArgument("Backing file name too long ({} bytes, qcow allows {})",
                                     backing_name.size(), limits::kMaxBackingNameBytes);
    }
  }
  // "fat:" is qemu's vvfat pseudo backing file: the image gets none, but the geometry of
  // an image with one.
  const bool backing_geometry = ctx.backing && !backing_name.empty();
  if (backing_name == "fat:") backing_name.clear();
  const uint32_t cluster_bits = backing_geometry ? kCreateBackingClusterBits : kCreateClusterBits;
  const uint32_t l2_bits = backing_geometry ? kCreateBackingL2Bits : kCreateL2Bits;
  auto l1_entries = L1Entries(size, cluster_bits, l2_bits, ctx.path);
  if (!l1_entries.ok()) return Status::Error(ErrorKind::kUnsupported, EFBIG, l1_entries.error().message());

  const uint64_t l1_offset = AlignUp(kHeaderSize + backing_name.size(), 8);
  // qemu writes the L1 table as whole zeroed sectors.
  const uint64_t l1_disk_bytes = AlignUp(*l1_entries * 8, kSectorSize);
  std::vector<std::byte> head(l1_offset);
  StoreBE32(&head[off::kMagic], kMagic);
  StoreBE32(&head[off::kVersion], kVersion);
  if (!backing_name.empty()) {
    StoreBE64(&head[off::kBackingOffset], kHeaderSize);
    StoreBE32(&head[off::kBackingSize], static_cast<uint32_t>(backing_name.size()));
    std::memcpy(&head[kHeaderSize], backing_name.data(), backing_name.size());
  }
  StoreBE64(&head[off::kSize], size);
  head[off::kClusterBits] = static_cast<std::byte>(cluster_bits);
  head[off::kL2Bits] = static_cast<std::byte>(l2_bits);
  StoreBE32(&head[off::kCryptMethod], aes ? kCryptAes : kCryptNone);
  StoreBE64(&head[off::kL1Offset], l1_offset);

  ASSIGN_OR_RETURN(std::unique_ptr<File> file, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(file->Truncate(0));
  RETURN_IF_ERROR(
      file->PWrite(0, head, IoTag::kHeader).WithContext("'{}': writing the qcow header", ctx.path));
  const std::vector<std::byte> zeros(std::min<uint64_t>(l1_disk_bytes, 1 << 20));
  for (uint64_t done = 0; done < l1_disk_bytes;) {
    const uint64_t n = std::min<uint64_t>(zeros.size(), l1_disk_bytes - done);
    RETURN_IF_ERROR(file->PWrite(l1_offset + done, std::span(zeros.data(), n), IoTag::kL1)
                        .WithContext("'{}': writing the qcow L1 table", ctx.path));
    done += n;
  }
  return file->Sync(false).WithContext("'{}': syncing", ctx.path);
}

namespace {

class QcowFormat final : public FormatDriver {
 public:
  const char* name() const override { return "qcow"; }
  const FormatTraits& traits() const override {
    using Opt = CreateOptionSpec::Type;
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", Opt::kSize, "Virtual disk size"},
                {"backing_file", Opt::kString, "File name of a base image"},
                {"backing_fmt", Opt::kString, "Format of the backing image"},
                {"encryption", Opt::kBool,
                 "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
                {"encrypt.format", Opt::kString, "Encrypt the image, format choices: 'aes'"},
                {"encrypt.key-secret", Opt::kString, "ID of the secret that provides the AES encryption key"},
            },
        // qemu's qcow sizes its file itself; the file protocol's option changes nothing.
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .compression = FormatTraits::Compression::kClusters,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string& path) const override {
    return ProbeQcow(head);
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return OpenQcow(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override { return CreateQcow(ctx); }
};

}  // namespace
}  // namespace vimgfs::qcow

namespace vimgfs {
const FormatDriver* QcowDriver() {
  static const qcow::QcowFormat driver;
  return &driver;
}
}  // namespace vimgfs

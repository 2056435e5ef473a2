// qcow2 create (qemu-img create -f qcow2 -o ...) and the FormatDriver.
//
// Layout, as qemu lays out a new image: header cluster, refcount table, refcount
// block(s), L1 table, then (with preallocation) each L2 table followed by its data.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "formats/drivers.h"
#include "formats/format_util.h"
#include "crypto/luks.h"
#include "crypto/secrets.h"
#include "formats/qcow2/qcow2_internal.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::qcow2 {
namespace {

struct CreateParams {
  uint64_t size = 0;
  uint32_t cluster_bits = 16;
  int version = 3;
  bool lazy_refcounts = false;
  uint32_t refcount_order = 4;
  uint8_t compression = kCompressionZlib;
  bool extended_l2 = false;
  std::string prealloc = "off";
  std::optional<BackingRef> backing;
  std::string data_file;
  bool data_file_raw = false;
  // encrypt.format=luks and its encrypt.* options (key_secret empty: not encrypted).
  std::optional<crypto::LuksCreateOptions> luks;
  bool aes = false;  // the legacy AES instead of LUKS: a header flag, no key material
  std::string key_secret;
};

// A size the format cannot describe: EFBIG, which qemu-img words for every format alike.
Status TooLarge(const char* msg) { return Status::Error(ErrorKind::kInvalidArgument, EFBIG, msg); }

// Reads and checks the options in qemu's order (qcow2_co_create), with its messages
// (which name options as QMP does: version, compression-type).
Result<CreateParams> ParseParams(const CreateContext& ctx) {
  CreateParams p;
  p.size = ctx.size;
  p.backing = ctx.backing;
  uint64_t cluster_size = 1u << 16;
  uint64_t refcount_bits = 16;
  bool compression_set = false;
  bool encrypt_format = false;
  for (const auto& [key, v] : ctx.options) {
    if (key == "size") {
      ASSIGN_OR_RETURN(p.size, ParseSize(v));
    } else if (key == "cluster_size") {
      ASSIGN_OR_RETURN(cluster_size, ParseSize(v));
    } else if (key == "compat") {
      if (v == "0.10" || v == "v2")
        p.version = 2;
      else if (v == "1.1" || v == "v3")
        p.version = 3;
      else
        return Status::InvalidArgument("Parameter 'version' does not accept value '{}'", v);
    } else if (key == "lazy_refcounts") {
      ASSIGN_OR_RETURN(p.lazy_refcounts, ParseBoolOption(key, v));
    } else if (key == "refcount_bits") {
      char* endp = nullptr;
      refcount_bits = std::strtoull(v.c_str(), &endp, 0);
      if (v.empty() || *endp) return Status::InvalidArgument("Parameter 'refcount-bits' expects a number");
    } else if (key == "compression_type") {
      if (v == "zlib")
        p.compression = kCompressionZlib;
      else if (v == "zstd")
        p.compression = kCompressionZstd;
      else
        return Status::InvalidArgument("Parameter 'compression-type' does not accept value '{}'", v);
      compression_set = true;
    } else if (key == "extended_l2") {
      ASSIGN_OR_RETURN(p.extended_l2, ParseBoolOption(key, v));
    } else if (key == "preallocation") {
      if (v != "off" && v != "metadata" && v != "falloc" && v != "full")
        return Status::InvalidArgument("Parameter 'preallocation' does not accept value '{}'", v);
      p.prealloc = v;
    } else if (key == "backing_file") {
      if (!p.backing) p.backing = BackingRef{};
      p.backing->name = v;
    } else if (key == "backing_fmt") {
      if (!p.backing) p.backing = BackingRef{};
      p.backing->format = v;
    } else if (key == "data_file") {
      p.data_file = v;
    } else if (key == "data_file_raw") {
      ASSIGN_OR_RETURN(p.data_file_raw, ParseBoolOption(key, v));
    } else if (key == "encryption") {  // the deprecated spelling of encrypt.format=aes
      ASSIGN_OR_RETURN(bool on, ParseBoolOption(key, v));
      if (!on) continue;
      if (!p.luks) p.luks.emplace();
      p.aes = true;
      encrypt_format = true;
    } else if (key.rfind("encrypt.", 0) == 0) {
      if (!p.luks) p.luks.emplace();
      const std::string sub = key.substr(8);
      if (sub == "format") {
        p.aes = v == "aes";
        if (v != "luks" && v != "aes")
          return Status::InvalidArgument("Parameter 'encrypt.format' does not accept value '{}'", v);
        encrypt_format = true;
      } else if (!crypto::SetLuksCreateOption(sub, v, &*p.luks, &p.key_secret)) {
        return Status::InvalidArgument("Invalid parameter '{}'", key);
      }
    } else {
      return Status::InvalidArgument("Invalid parameter '{}'", key);
    }
  }
  if (p.luks && !encrypt_format)
    return Status::InvalidArgument("Parameter 'encrypt.format' is required with encryption options");
  if (p.luks && p.key_secret.empty())
    return Status::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher");
  if (p.extended_l2 && p.version < 3)
    return Status::InvalidArgument(
        "Extended L2 entries are only supported with compatibility level 1.1 and "
        "above (use version=v3 or greater)");
  if (!IsPowerOfTwo(cluster_size) || cluster_size < 512 || cluster_size > (2u << 20))
    return Status::InvalidArgument("Cluster size must be a power of two between 512 and 2048k");
  p.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(cluster_size));
  if (p.extended_l2 && p.cluster_bits < 14)
    return Status::InvalidArgument(
        "Extended L2 entries are only supported with cluster sizes of at least "
        "16384 bytes");
  const bool has_backing_file = p.backing && !p.backing->name.empty();
  if (has_backing_file && p.prealloc != "off" && !p.extended_l2)
    return Status::InvalidArgument(
        "Backing file and preallocation can only be used at the same time if "
        "extended_l2 is on");
  if (p.backing && !has_backing_file)
    return Status::InvalidArgument("Backing format cannot be used without backing file");
  if (p.version < 3 && p.lazy_refcounts)
    return Status::InvalidArgument(
        "Lazy refcounts only supported with compatibility level 1.1 and above "
        "(use version=v3 or greater)");
  if (refcount_bits > 64 || !IsPowerOfTwo(refcount_bits))
    return Status::InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
  if (p.version < 3 && refcount_bits != 16)
    return Status::InvalidArgument(
        "Different refcount widths than 16 bits require compatibility level 1.1 "
        "or above (use version=v3 or greater)");
  p.refcount_order = static_cast<uint32_t>(__builtin_ctzll(refcount_bits));
  if (p.data_file_raw && p.data_file.empty())
    return Status::InvalidArgument("data-file-raw requires data-file");
  if (p.data_file_raw && has_backing_file)
    return Status::InvalidArgument("Backing file and data-file-raw cannot be used at the same time");
  // A raw data file must be readable alone: every cluster is mapped from the start.
  if (p.data_file_raw && p.prealloc == "off") p.prealloc = "metadata";
  if (!p.data_file.empty() && p.version < 3)
    return Status::InvalidArgument(
        "External data files are only supported with compatibility level 1.1 and "
        "above (use version=v3 or greater)");
  if (compression_set && p.compression != kCompressionZlib && p.version < 3)
    return Status::InvalidArgument(
        "Non-zlib compression type is only supported with compatibility level 1.1 "
        "and above (use version=v3 or greater)");
  if (p.size > uint64_t{INT64_MAX})
    return Status::InvalidArgument("Could not resize image: Image size cannot be negative");  // as qemu
  if (p.size > limits::kMaxVirtualSize) return TooLarge("Image size is too large");
  if (p.backing && p.backing->name.size() > limits::kMaxBackingNameBytes)
    return Status::InvalidArgument("Backing file name too long");
  return p;
}

}  // namespace

Status CreateImage(const CreateContext& ctx) {
  ASSIGN_OR_RETURN(CreateParams p, ParseParams(ctx));
  const uint64_t cs = 1ull << p.cluster_bits;
  const uint64_t l2_entries = cs / (p.extended_l2 ? 16 : 8);
  // qemu aligns the virtual size up to 512 bytes.
  const uint64_t size = AlignUp(p.size, 512);
  const uint64_t guest_clusters = DivRoundUp(size, cs);
  const uint64_t l1_entries = DivRoundUp(guest_clusters, l2_entries);
  if (l1_entries * 8 > limits::kMaxL1Bytes) return TooLarge("Image size is too large for this cluster size");
  const uint64_t l1_clusters = std::max<uint64_t>(1, DivRoundUp(l1_entries * 8, cs));
  const bool prealloc = p.prealloc != "off";
  const bool has_data_file = !p.data_file.empty();
  // Clusters after the L1 table: L2 tables, and data clusters unless in a data file.
  const uint64_t l2_tables = prealloc ? l1_entries : 0;
  const uint64_t data_clusters = prealloc && !has_data_file ? guest_clusters : 0;
  // The LUKS header's clusters follow the L1 table, as qemu allocates them before it
  // preallocates anything.
  uint64_t crypto_bytes = 0;
  if (p.luks && !p.aes) {
    crypto::CipherSpec spec;
    ASSIGN_OR_RETURN(spec.alg, crypto::CipherAlg::Named(p.luks->cipher_alg));
    ASSIGN_OR_RETURN(spec.mode, crypto::CipherModeNamed(p.luks->cipher_mode));
    crypto_bytes = crypto::LuksPayloadOffset(spec);
  }
  const uint64_t crypto_clusters = DivRoundUp(crypto_bytes, cs);
  const uint64_t rb_entries = cs * 8 / (1u << p.refcount_order);
  uint64_t rt_clusters = 1, rb_count = 1;
  for (int i = 0; i < 64; i++) {
    uint64_t total = 1 + rt_clusters + rb_count + l1_clusters + crypto_clusters + l2_tables + data_clusters;
    uint64_t rb = DivRoundUp(total, rb_entries);
    uint64_t rt = std::max<uint64_t>(1, DivRoundUp(rb * 8, cs));
    if (rb == rb_count && rt == rt_clusters) break;
    rb_count = std::max(rb, rb_count);
    rt_clusters = std::max(rt, rt_clusters);
  }
  if (rt_clusters * cs > limits::kMaxRefTableBytes)
    return TooLarge("Image size is too large for this cluster size and refcount width");
  const uint64_t rt_off = cs;
  const uint64_t rb_off = rt_off + rt_clusters * cs;
  const uint64_t l1_off = rb_off + rb_count * cs;
  const uint64_t crypto_off = l1_off + l1_clusters * cs;
  const uint64_t meta_end = crypto_off + crypto_clusters * cs;
  const uint64_t total_clusters = meta_end / cs + l2_tables + data_clusters;

  Header h;
  h.version = p.version;
  h.cluster_bits = p.cluster_bits;
  h.size = size;
  h.l1_size = static_cast<uint32_t>(l1_entries);
  h.l1_table_offset = l1_off;
  h.refcount_table_offset = rt_off;
  h.refcount_table_clusters = static_cast<uint32_t>(rt_clusters);
  h.refcount_order = p.refcount_order;
  if (p.version >= 3) {
    h.header_length = kV3HeaderLengthWithCompression;
    h.compression_type = p.compression;
    if (p.compression != kCompressionZlib) h.incompatible_features |= kIncompatCompression;
    if (p.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
    if (p.lazy_refcounts) h.compatible_features |= kCompatLazyRefcounts;
    if (has_data_file) {
      h.incompatible_features |= kIncompatDataFile;
      h.data_file = p.data_file;
      if (p.data_file_raw) h.autoclear_features |= kAutoclearDataFileRaw;
    }
  } else {
    h.header_length = kV2HeaderLength;
  }
  if (p.backing) {
    h.backing_file = p.backing->name;
    if (!p.backing->format.empty()) h.backing_format = p.backing->format;
  }
  if (p.aes) {
    h.crypt_method = 1;
  } else if (p.luks) {
    h.crypt_method = 2;
    h.crypto_header_offset = crypto_off;
    h.crypto_header_length = crypto_bytes;
  }
  ASSIGN_OR_RETURN(std::vector<std::byte> head, SerializeHeader(h));
  std::string passphrase;
  if (p.luks) {
    ASSIGN_OR_RETURN(passphrase, crypto::LookupPassphrase(ctx.secrets, p.key_secret));  // as qemu reads it
  }

  if (has_data_file) {
    if (p.data_file.rfind("json:", 0) == 0)
      return Status::Unsupported("data file '{}': only plain file names are supported", p.data_file);
    // The data file is created next to the image, under the name the header stores.
    std::string name = p.data_file;
    if (!name.empty() && name[0] != '/') {
      auto slash = ctx.path.rfind('/');
      if (slash != std::string::npos) name = ctx.path.substr(0, slash + 1) + name;
    }
    ASSIGN_OR_RETURN(auto df, CreateImageFile(ctx, name));
    RETURN_IF_ERROR(df->Truncate(size));
    if (p.prealloc == "falloc") RETURN_IF_ERROR(df->Allocate(0, size));
    if (p.prealloc == "full") RETURN_IF_ERROR(WriteZeros(*df, 0, size));
    RETURN_IF_ERROR(df->Sync(false));
  }

  ASSIGN_OR_RETURN(auto f, CreateImageFile(ctx, ctx.path));
  RETURN_IF_ERROR(f->Truncate(0));
  // The whole first cluster, as qemu writes it: the same bytes, and the same host
  // allocation, which qemu's block status weighs (Qcow2Map::MapShowsHostHoles).
  if (head.size() < cs) head.resize(cs);
  RETURN_IF_ERROR(f->PWrite(0, head, IoTag::kHeader));

  // Refcount table and blocks.
  {
    std::vector<std::byte> rt(rt_clusters * cs);
    for (uint64_t i = 0; i < rb_count; i++) StoreBE64(rt.data() + i * 8, rb_off + i * cs);
    RETURN_IF_ERROR(f->PWrite(rt_off, rt, IoTag::kRefTable));
    std::vector<std::byte> block(cs);
    const uint32_t bits = 1u << p.refcount_order;
    for (uint64_t b = 0; b < rb_count; b++) {
      std::memset(block.data(), 0, cs);
      uint64_t first = b * rb_entries;
      uint64_t n = std::min(rb_entries, total_clusters > first ? total_clusters - first : 0);
      for (uint64_t i = 0; i < n; i++) {
        switch (bits) {
          case 8:
            block[i] = std::byte{1};
            break;
          case 16:
            StoreBE16(block.data() + i * 2, 1);
            break;
          case 32:
            StoreBE32(block.data() + i * 4, 1);
            break;
          case 64:
            StoreBE64(block.data() + i * 8, 1);
            break;
          default: {
            uint64_t bit = i * bits;
            block[bit / 8] |= static_cast<std::byte>(1u << (bit % 8));
          }
        }
      }
      RETURN_IF_ERROR(f->PWrite(rb_off + b * cs, block, IoTag::kRefBlock));
    }
  }

  // L1 (and L2 tables with their data when preallocating).
  std::vector<std::byte> l1(l1_entries * 8);
  uint64_t next = meta_end;
  if (!has_data_file && p.prealloc == "full")
    RETURN_IF_ERROR(WriteZeros(*f, meta_end, total_clusters * cs - meta_end));
  if (prealloc) {
    std::vector<std::byte> l2(cs);
    const uint32_t eb = p.extended_l2 ? 16 : 8;
    for (uint64_t t = 0; t < l1_entries; t++) {
      uint64_t l2_off = next;
      next += cs;
      StoreBE64(l1.data() + t * 8, l2_off | kFlagCopied);
      std::memset(l2.data(), 0, cs);
      uint64_t first = t * l2_entries;
      uint64_t n = std::min(l2_entries, guest_clusters - first);
      for (uint64_t i = 0; i < n; i++) {
        uint64_t host = has_data_file ? (first + i) * cs : next;
        if (!has_data_file) next += cs;
        StoreBE64(l2.data() + i * eb, host | kFlagCopied);
        // qemu leaves preallocated subclusters unallocated (they read as zeros / backing).
      }
      RETURN_IF_ERROR(f->PWrite(l2_off, l2, IoTag::kL2));
    }
  }
  if (!l1.empty()) RETURN_IF_ERROR(f->PWrite(l1_off, l1, IoTag::kL1));
  if (p.luks && !p.aes) {
    auto made = crypto::CreateLuks(*p.luks, *f, crypto_off, std::as_bytes(std::span(passphrase)));
    crypto::Wipe(std::as_writable_bytes(std::span(passphrase)));
    if (!made.ok()) return made.error();
    crypto::Wipe(made->master_key);
    if (next <= meta_end) RETURN_IF_ERROR(f->Truncate(meta_end));  // whole clusters, as qemu
  }
  // falloc reserves the data clusters; full writes them (before the L2 tables go between
  // them), as qemu's file driver does: whole clusters of host space either way.
  if (!has_data_file && next > meta_end && p.prealloc == "falloc")
    RETURN_IF_ERROR(f->Allocate(meta_end, next - meta_end));
  if (next > meta_end) RETURN_IF_ERROR(f->Truncate(next));
  return f->Sync(false);
}

namespace {

using Opt = CreateOptionSpec::Type;

// qemu's qcow2 amend options: the LUKS keyslot options, then the create options that an
// existing image can take (amend.cc).
FormatTraits WithAmendOptions(FormatTraits t) {
  static const char* const kAmendable[] = {"size",      "compat",        "backing_file",   "backing_fmt",
                                           "data_file", "data_file_raw", "lazy_refcounts", "refcount_bits"};
  t.amend_options = crypto::LuksAmendOptionSpecs("encrypt.");
  for (const char* name : kAmendable)
    for (const CreateOptionSpec& o : t.create_options)
      if (std::string_view(o.name) == name) t.amend_options.push_back(o);
  return t;
}

class Qcow2Driver final : public FormatDriver {
 public:
  const char* name() const override { return "qcow2"; }
  const FormatTraits& traits() const override {
    static const FormatTraits kTraits = WithAmendOptions({
        .create_options =
            {
                {"encryption", Opt::kBool,
                 "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
                {"encrypt.format", Opt::kString, "Encrypt the image, format choices: 'aes', 'luks'"},
                {"encrypt.key-secret", Opt::kString,
                 "ID of secret providing qcow AES key or LUKS passphrase"},
                {"encrypt.cipher-alg", Opt::kString, "Name of encryption cipher algorithm"},
                {"encrypt.cipher-mode", Opt::kString, "Name of encryption cipher mode"},
                {"encrypt.ivgen-alg", Opt::kString, "Name of IV generator algorithm"},
                {"encrypt.ivgen-hash-alg", Opt::kString, "Name of IV generator hash algorithm"},
                {"encrypt.hash-alg", Opt::kString, "Name of encryption hash algorithm"},
                {"encrypt.iter-time", Opt::kNumber, "Time to spend in PBKDF in milliseconds"},
                {"cluster_size", Opt::kSize, "qcow2 cluster size", "65536"},
                {"extended_l2", Opt::kBool, "Extended L2 tables", "off"},
                {"preallocation", Opt::kString,
                 "Preallocation mode (allowed values: off, metadata, falloc, full)"},
                {"compression_type", Opt::kString, "Compression method used for image cluster compression",
                 "zlib"},
                {"size", Opt::kSize, "Virtual disk size"},
                {"compat", Opt::kString, "Compatibility level (v2 [0.10] or v3 [1.1])"},
                {"backing_file", Opt::kString, "File name of a base image"},
                {"backing_fmt", Opt::kString, "Image format of the base image"},
                {"data_file", Opt::kString, "File name of an external data file"},
                {"data_file_raw", Opt::kBool, "The external data file must stay valid as a raw image"},
                {"lazy_refcounts", Opt::kBool, "Postpone refcount updates", "off"},
                {"refcount_bits", Opt::kNumber, "Width of a reference count entry in bits", "16"},
            },
        .create_preallocation = FormatTraits::CreatePreallocation::kFormat,
        .compression = FormatTraits::Compression::kClusters,
        .grow_preallocation = FormatTraits::GrowPreallocation::kClusters,
        .too_large_hint = " (try using a larger cluster size)",
        .cached_lookups = true,
    });
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string&) const override {
    if (head.size() >= 8 && LoadBE32(head.data()) == kMagic && LoadBE32(head.data() + 4) >= 2) return 100;
    return 0;
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    return Qcow2Map::Open(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override { return CreateImage(ctx); }
  Result<MeasureResult> Measure(const MeasureRequest& req) const override { return qcow2::Measure(req); }
};

}  // namespace
}  // namespace vimgfs::qcow2

namespace vimgfs {
const FormatDriver* Qcow2Driver() {
  static const qcow2::Qcow2Driver driver;
  return &driver;
}
}  // namespace vimgfs

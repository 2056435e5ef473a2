// luks: a LUKS1 header and key slots, then the encrypted disk (qemu's luks driver). The
// disk is one run of sectors: guest byte N lives at payload offset + N, encrypted with
// the IV of guest sector N / 512. Encryption is a File (crypto/crypt_file.h), so the
// engine reads and writes plaintext through the ordinary kData path.
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "crypto/crypt_file.h"
#include "crypto/luks.h"
#include "crypto/secrets.h"
#include "formats/drivers.h"
#include "formats/format_util.h"
#include "io/lock.h"
#include "util/checked.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using crypto::kSectorSize;

constexpr const char* kNeedKey = "Parameter 'key-secret' is required for cipher";

class LuksMap final : public ClusterMap {
 public:
  LuksMap(std::unique_ptr<File> file, crypto::LuksHeader header, std::unique_ptr<crypto::CryptFile> crypt,
          uint64_t size, bool read_only, std::string key_secret)
      : file_(std::move(file)),
        header_(std::move(header)),
        crypt_(std::move(crypt)),
        size_(size),
        read_only_(read_only),
        key_secret_(std::move(key_secret)) {}

  uint64_t virtual_size() const override { return size_; }
  uint64_t cluster_size() const override { return kSectorSize; }
  bool read_only() const override { return read_only_; }

  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    if (!crypt_) return Status::InvalidArgument("{}", kNeedKey);  // opened for its header only
    Mapping m;
    m.kind = Mapping::Kind::kData;
    m.length = len;
    m.file = crypt_.get();
    m.host_offset = off;
    m.writable = !read_only_;
    m.opaque_data = true;
    out->push_back(m);
    return Status::Ok();
  }

  Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) override {
    if (read_only_ || !crypt_) return Status::ReadOnly("'{}' is opened read-only", file_->path());
    WritePlan p;
    p.guest_offset = off;
    p.length = len;
    p.file = crypt_.get();
    p.host_offset = off;
    return p;
  }
  Status CommitWrite(const WritePlan&) override { return Status::Ok(); }

  Status WriteBack() override { return Status::Ok(); }
  Status SyncFiles() override { return read_only_ ? Status::Ok() : file_->Sync(true); }
  Status Close() override { return Flush(); }

  FormatInfo Info() override {
    FormatInfo fi;
    fi.format = "luks";
    fi.virtual_size = size_;
    fi.encrypted = true;
    fi.format_specific = crypto::DescribeLuks(header_);
    return fi;
  }

  Result<CheckReport> Check(RepairMode) override {
    return Status::Unsupported("This image format does not support checks");
  }
  bool ZeroInit() override { return false; }  // unwritten sectors decrypt to noise

  // The payload is the end of the file: a resize moves the end.
  Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros) override {
    if (read_only_) return Status::ReadOnly("'{}' is opened read-only", file_->path());
    if (new_size < size_ && !allow_shrink)
      return Status::InvalidArgument("Use the --shrink option to perform a shrink operation.");
    if (new_size > uint64_t{INT64_MAX} - payload())
      return Status::InvalidArgument("Could not resize file: File too large");
    RETURN_IF_ERROR(file_->Truncate(payload() + new_size));
    size_ = new_size;
    return Status::Ok();
  }

  // Key slots: add or erase (crypto::AmendLuks).
  Status Amend(const AmendRequest& req, AmendStage stage) override {
    if (stage != AmendStage::kMain) return Status::Ok();
    if (read_only_ || !crypt_) return Status::ReadOnly("'{}' is opened read-only", file_->path());
    ASSIGN_OR_RETURN(crypto::LuksAmendOptions o, crypto::ReadLuksAmendOptions(req.options, ""));
    // As qemu's crypto driver: nobody else may read the file while its key slots change.
    if (Status ex = LockImageExclusive(*file_); !ex.ok()) {
      (void)LockImage(*file_, /*write=*/true);  // a refused lock drops the ones held
      return ex;
    }
    Status s = crypto::AmendLuks(&header_, *file_, 0, o, req.secrets, key_secret_, req.force);
    Status back = LockImage(*file_, /*write=*/true);
    return s.ok() ? back : s;
  }

 private:
  uint64_t payload() const { return uint64_t{header_.payload_offset_sector} * kSectorSize; }

  std::unique_ptr<File> file_;
  crypto::LuksHeader header_;
  std::unique_ptr<crypto::CryptFile> crypt_;  // null: opened without the key (info)
  uint64_t size_;
  bool read_only_;
  std::string key_secret_;  // the secret that opened it: a new key slot's master key
};

// The create options (measure takes them too; "size" is read by the caller).
Status ParseOptions(const std::map<std::string, std::string>& options, crypto::LuksCreateOptions* o,
                    std::string* key_secret) {
  for (const auto& [k, v] : options) {
    if (k != "size" && !crypto::SetLuksCreateOption(k, v, o, key_secret))
      return Status::InvalidArgument("Invalid parameter '{}'", k);
  }
  return Status::Ok();
}

class LuksDriverImpl final : public FormatDriver {
 public:
  const char* name() const override { return "luks"; }
  const FormatTraits& traits() const override {
    using T = CreateOptionSpec::Type;
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", T::kSize, "Virtual disk size"},
                {"key-secret", T::kString, "ID of the secret that provides the keyslot passphrase"},
                {"cipher-alg", T::kString, "Name of encryption cipher algorithm"},
                {"cipher-mode", T::kString, "Name of encryption cipher mode"},
                {"ivgen-alg", T::kString, "Name of IV generator algorithm"},
                {"ivgen-hash-alg", T::kString, "Name of IV generator hash algorithm"},
                {"hash-alg", T::kString, "Name of encryption hash algorithm"},
                {"iter-time", T::kNumber, "Time to spend in PBKDF in milliseconds"},
            },
        .create_preallocation = FormatTraits::CreatePreallocation::kIgnored,
        .block_status = false,  // qemu's crypto driver answers none: map shows one data run
        .amend_options = crypto::LuksAmendOptionSpecs(""),
    };
    return kTraits;
  }

  // Version 2 scores too, so that a LUKS2 container is refused by Open rather than probed
  // as raw and written over.
  int Probe(std::span<const std::byte> head, const std::string&) const override {
    static const char kMagic[] = {'L', 'U', 'K', 'S', '\xba', '\xbe'};
    return head.size() >= 8 && std::memcmp(head.data(), kMagic, sizeof kMagic) == 0 ? 100 : 0;
  }

  // Errors name the file ("'x.luks': Invalid password, ..."): the commands print them after
  // "Could not open 'x.luks': " without the repeat, the mount as they are.
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    const std::string path = ctx.path;
    auto map = OpenUnlocked(std::move(ctx));
    if (!map.ok() && map.error().message().rfind("'" + path + "'", 0) != 0)
      return map.error().WithContext("'{}'", path);
    return map;
  }

 private:
  Result<std::unique_ptr<ClusterMap>> OpenUnlocked(OpenContext ctx) const {
    if (!ctx.options.snapshot.empty())
      return Status::Unsupported("'{}': luks images have no snapshots", ctx.path);
    std::vector<std::byte> head(crypto::kLuksHeaderSize);
    ASSIGN_OR_RETURN(uint64_t file_size, ctx.file->Size());
    if (file_size < head.size()) return Status::InvalidFormat("Volume is not in LUKS format");
    RETURN_IF_ERROR(ctx.file->PRead(0, head));
    ASSIGN_OR_RETURN(crypto::LuksHeader h, crypto::ParseLuksHeader(head, file_size));
    const uint64_t payload = uint64_t{h.payload_offset_sector} * kSectorSize;
    if (payload > file_size) return Status::Io("Could not refresh total sector count: Input/output error");
    const uint64_t size = AlignUp(file_size - payload, kSectorSize);
    const bool ro = ctx.options.read_only || !ctx.file->writable();

    std::unique_ptr<crypto::CryptFile> crypt;
    if (!ctx.options.no_io) {  // info reads the header only: not even the secret (qemu's NO_IO)
      ASSIGN_OR_RETURN(auto cipher, crypto::OpenLuksCipher(h, *ctx.file, 0, ctx.options.secrets,
                                                           ctx.options.key_secret, "key-secret"));
      crypt = std::make_unique<crypto::CryptFile>(*ctx.file, payload, 0, std::move(cipher));
    }
    return std::unique_ptr<ClusterMap>(
        new LuksMap(std::move(ctx.file), std::move(h), std::move(crypt), size, ro, ctx.options.key_secret));
  }

 public:
  // qemu's block_crypto_measure: the header area of the options' cipher, then the disk.
  Result<MeasureResult> Measure(const MeasureRequest& req) const override {
    crypto::LuksCreateOptions o;
    std::string key_secret;
    RETURN_IF_ERROR(ParseOptions(req.options, &o, &key_secret));
    if (key_secret.empty()) return Status::InvalidArgument("{}", kNeedKey);
    crypto::CipherSpec spec;
    ASSIGN_OR_RETURN(spec.alg, crypto::CipherAlg::Named(o.cipher_alg));
    ASSIGN_OR_RETURN(spec.mode, crypto::CipherModeNamed(o.cipher_mode));
    uint64_t size = 0;
    if (req.source) {
      size = req.source->size();
    } else if (auto it = req.options.find("size"); it != req.options.end()) {
      ASSIGN_OR_RETURN(size, ParseSize(it->second));
    }
    MeasureResult m;
    m.required = crypto::LuksPayloadOffset(spec) + size;
    m.fully_allocated = m.required;
    return m;
  }

  Status Create(const CreateContext& ctx) const override {
    if (ctx.backing) return Status::Unsupported("'{}': luks images cannot have a backing file", ctx.path);
    crypto::LuksCreateOptions o;
    std::string key_secret;
    RETURN_IF_ERROR(ParseOptions(ctx.options, &o, &key_secret));
    if (key_secret.empty()) return Status::InvalidArgument("{}", kNeedKey);
    ASSIGN_OR_RETURN(auto f, CreateImageFile(ctx, ctx.path));
    // A failure from here on removes the file, a pre-existing one too, as qemu does.
    auto fail = [&](const Status& s) {
      f.reset();
      (void)(ctx.env ? ctx.env : Env::Default())->Remove(ctx.path);
      return s;
    };
    auto pass = crypto::LookupPassphrase(ctx.secrets, key_secret);
    if (!pass.ok()) return fail(pass.error());
    auto made = crypto::CreateLuks(o, *f, 0, std::as_bytes(std::span(*pass)));
    crypto::Wipe(std::as_writable_bytes(std::span(*pass)));
    if (!made.ok()) return fail(made.error());
    crypto::Wipe(made->master_key);
    const uint64_t payload = uint64_t{made->header.payload_offset_sector} * kSectorSize;
    if (ctx.size > uint64_t{INT64_MAX} - payload)
      return Status::InvalidArgument("Could not resize file: File too large");
    RETURN_IF_ERROR(f->Truncate(payload + ctx.size));
    return f->Sync(false);
  }
};

}  // namespace

const FormatDriver* LuksDriver() {
  static LuksDriverImpl driver;
  return &driver;
}

}  // namespace vimgfs

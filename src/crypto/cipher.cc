// libgcrypt behind the sector cipher, PBKDF2, hashes and random bytes (cipher.h).
#include "crypto/cipher.h"

#include <gcrypt.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "util/endian.h"

namespace vimgfs::crypto {
namespace {

// libgcrypt must be initialised once before any other call; the secure-memory pool is
// off (it would need privileges; keys are wiped by hand instead).
void InitLibrary() {
  static const bool done = [] {
    gcry_check_version(nullptr);
    gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
    gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    return true;
  }();
  (void)done;
}

Status GcryError(const char* what, gcry_error_t err) {
  return Status::Io("{}: {}", what, gcry_strerror(err));
}

struct NamedCipher {
  const char* family;
  size_t key_size;
  int algo;
};
// twofish-192 is missing: libgcrypt's Twofish takes 128- and 256-bit keys only.
constexpr NamedCipher kCiphers[] = {
    {"aes", 16, GCRY_CIPHER_AES128},         {"aes", 24, GCRY_CIPHER_AES192},
    {"aes", 32, GCRY_CIPHER_AES256},         {"serpent", 16, GCRY_CIPHER_SERPENT128},
    {"serpent", 24, GCRY_CIPHER_SERPENT192}, {"serpent", 32, GCRY_CIPHER_SERPENT256},
    {"twofish", 16, GCRY_CIPHER_TWOFISH128}, {"twofish", 32, GCRY_CIPHER_TWOFISH},
    {"cast5", 16, GCRY_CIPHER_CAST5},
};

int GcryMode(CipherMode mode) {
  switch (mode) {
    case CipherMode::kEcb:
      return GCRY_CIPHER_MODE_ECB;
    case CipherMode::kCbc:
      return GCRY_CIPHER_MODE_CBC;
    case CipherMode::kCtr:
      return GCRY_CIPHER_MODE_CTR;
    case CipherMode::kXts:
      return GCRY_CIPHER_MODE_XTS;
  }
  return GCRY_CIPHER_MODE_NONE;
}

Result<gcry_cipher_hd_t> OpenKeyed(int algo, int mode, std::span<const std::byte> key) {
  gcry_cipher_hd_t h;
  if (gcry_error_t e = gcry_cipher_open(&h, algo, mode, 0)) return GcryError("cipher", e);
  if (gcry_error_t e = gcry_cipher_setkey(h, key.data(), key.size())) {
    gcry_cipher_close(h);
    return GcryError("cipher key", e);
  }
  return h;
}

}  // namespace

Result<Hash> Hash::Named(const std::string& name) {
  static const std::pair<const char*, int> kHashes[] = {
      {"md5", GCRY_MD_MD5},          {"sha1", GCRY_MD_SHA1},     {"sha224", GCRY_MD_SHA224},
      {"sha256", GCRY_MD_SHA256},    {"sha384", GCRY_MD_SHA384}, {"sha512", GCRY_MD_SHA512},
      {"ripemd160", GCRY_MD_RMD160},
  };
  InitLibrary();
  for (const auto& [n, algo] : kHashes) {
    if (name == n) return Hash{algo, name, gcry_md_get_algo_dlen(algo)};
  }
  return Status::Unsupported("Hash algorithm '{}' not supported", name);
}

Result<CipherAlg> CipherAlg::FromFamily(const std::string& family, size_t key_size) {
  InitLibrary();
  for (const NamedCipher& c : kCiphers) {
    if (family == c.family && key_size == c.key_size) {
      size_t block = gcry_cipher_get_algo_blklen(c.algo);
      return CipherAlg{c.algo, family, key_size, block};
    }
  }
  for (const NamedCipher& c : kCiphers) {
    if (family == c.family)
      return Status::Unsupported("Algorithm '{}' with key size {} bytes not supported", family, key_size);
  }
  return Status::Unsupported("Algorithm '{}' not supported", family);
}

Result<CipherAlg> CipherAlg::Named(const std::string& name) {
  // qemu's QCryptoCipherAlgorithm names; those this library lacks (des, 3des: not for
  // LUKS in qemu either; twofish-192: not in libgcrypt) are refused as qemu refuses des.
  static const char* const kQemuNames[] = {"aes-128",     "aes-192",     "aes-256",     "des",
                                           "3des",        "cast5-128",   "serpent-128", "serpent-192",
                                           "serpent-256", "twofish-128", "twofish-192", "twofish-256"};
  if (std::find(std::begin(kQemuNames), std::end(kQemuNames), name) == std::end(kQemuNames))
    return Status::InvalidArgument("Parameter 'cipher-alg' does not accept value '{}'", name);
  for (const NamedCipher& c : kCiphers) {
    if (name == std::string(c.family) + "-" + std::to_string(c.key_size * 8))
      return FromFamily(c.family, c.key_size);
  }
  return Status::Unsupported("Algorithm '{}' not supported", name);
}

Result<CipherMode> CipherModeNamed(const std::string& name) {
  if (name == "ecb") return CipherMode::kEcb;
  if (name == "cbc") return CipherMode::kCbc;
  if (name == "ctr") return CipherMode::kCtr;
  if (name == "xts") return CipherMode::kXts;
  return Status::InvalidArgument("Parameter 'cipher-mode' does not accept value '{}'", name);
}

const char* CipherModeName(CipherMode mode) {
  static const char* kNames[] = {"ecb", "cbc", "ctr", "xts"};
  return kNames[static_cast<int>(mode)];
}

Result<IvGen> IvGenNamed(const std::string& name) {
  if (name == "plain") return IvGen::kPlain;
  if (name == "plain64") return IvGen::kPlain64;
  if (name == "essiv") return IvGen::kEssiv;
  return Status::InvalidArgument("Parameter 'ivgen-alg' does not accept value '{}'", name);
}

const char* IvGenName(IvGen ivgen) {
  static const char* kNames[] = {"plain", "plain64", "essiv"};
  return kNames[static_cast<int>(ivgen)];
}

Result<std::unique_ptr<SectorCipher>> SectorCipher::Create(const CipherSpec& spec,
                                                           std::span<const std::byte> key) {
  InitLibrary();
  if (key.size() != spec.key_bytes())
    return Status::InvalidArgument("cipher {} needs a {}-byte key, not {}", spec.alg.Name(), spec.key_bytes(),
                                   key.size());
  if (spec.mode == CipherMode::kXts && spec.alg.block_size != 16)
    return Status::Unsupported("Unsupported cipher mode xts for cipher {}", spec.alg.Name());
  std::unique_ptr<SectorCipher> c(new SectorCipher());
  c->spec_ = spec;
  c->key_.assign(key.begin(), key.end());
  if (spec.ivgen == IvGen::kEssiv) {
    // ESSIV: the IV is the sector number encrypted (ECB) with the hash of the key, by the
    // same cipher family with the hash's size as key size (qemu's rule).
    c->essiv_key_ = HashOf(spec.ivgen_hash, key);
    auto essiv_alg = CipherAlg::FromFamily(spec.alg.family, c->essiv_key_.size());
    if (!essiv_alg.ok())
      return Status::Unsupported("No {} cipher with key size {} available", spec.alg.family,
                                 c->essiv_key_.size());
    c->essiv_algo_ = essiv_alg->algo;
  }
  // One pair now, so that a bad key is reported here rather than at the first I/O.
  ASSIGN_OR_RETURN(Handles first, c->TakeHandles());
  c->ReturnHandles(first);
  return c;
}

SectorCipher::~SectorCipher() {
  for (const Handles& h : idle_) {
    gcry_cipher_close(static_cast<gcry_cipher_hd_t>(h.data));
    if (h.essiv) gcry_cipher_close(static_cast<gcry_cipher_hd_t>(h.essiv));
  }
  Wipe(key_);
  Wipe(essiv_key_);
}

Result<SectorCipher::Handles> SectorCipher::TakeHandles() {
  {
    std::lock_guard lk(mu_);
    if (!idle_.empty()) {
      Handles h = idle_.back();
      idle_.pop_back();
      return h;
    }
  }
  Handles h;
  ASSIGN_OR_RETURN(gcry_cipher_hd_t data, OpenKeyed(spec_.alg.algo, GcryMode(spec_.mode), key_));
  h.data = data;
  if (essiv_algo_) {
    auto essiv = OpenKeyed(essiv_algo_, GCRY_CIPHER_MODE_ECB, essiv_key_);
    if (!essiv.ok()) {
      gcry_cipher_close(data);
      return essiv.error();
    }
    h.essiv = *essiv;
  }
  return h;
}

void SectorCipher::ReturnHandles(Handles h) {
  std::lock_guard lk(mu_);
  idle_.push_back(h);
}

Status SectorCipher::Crypt(uint64_t sector, std::span<std::byte> data, bool encrypt) {
  ASSIGN_OR_RETURN(Handles handles, TakeHandles());
  auto h = static_cast<gcry_cipher_hd_t>(handles.data);
  const size_t iv_len = spec_.alg.block_size;
  std::array<std::byte, 16> iv{};
  Status st;
  for (size_t pos = 0; pos < data.size() && st.ok(); pos += kSectorSize, sector++) {
    std::span<std::byte> s = data.subspan(pos, kSectorSize);
    if (spec_.mode != CipherMode::kEcb) {
      iv.fill(std::byte{0});
      if (spec_.ivgen == IvGen::kPlain) {
        StoreLE<uint32_t>(iv.data(), static_cast<uint32_t>(sector));
      } else {
        StoreLE<uint64_t>(iv.data(), sector);
      }
      if (spec_.ivgen == IvGen::kEssiv) {
        auto e = static_cast<gcry_cipher_hd_t>(handles.essiv);
        if (gcry_error_t err = gcry_cipher_encrypt(e, iv.data(), iv_len, nullptr, 0))
          st = GcryError("essiv", err);
      }
      gcry_error_t err = spec_.mode == CipherMode::kCtr ? gcry_cipher_setctr(h, iv.data(), iv_len)
                                                        : gcry_cipher_setiv(h, iv.data(), iv_len);
      if (err) st = GcryError("cipher IV", err);
    }
    if (!st.ok()) break;
    gcry_error_t err = encrypt ? gcry_cipher_encrypt(h, s.data(), s.size(), nullptr, 0)
                               : gcry_cipher_decrypt(h, s.data(), s.size(), nullptr, 0);
    if (err) st = GcryError(encrypt ? "encrypt" : "decrypt", err);
  }
  ReturnHandles(handles);
  return st;
}

Status SectorCipher::Encrypt(uint64_t sector, std::span<std::byte> data) { return Crypt(sector, data, true); }
Status SectorCipher::Decrypt(uint64_t sector, std::span<std::byte> data) {
  return Crypt(sector, data, false);
}

Status Pbkdf2(const Hash& hash, std::span<const std::byte> password, std::span<const std::byte> salt,
              uint64_t iterations, std::span<std::byte> out) {
  InitLibrary();
  if (iterations == 0 || iterations > ULONG_MAX)
    return Status::InvalidArgument("PBKDF2: bad iteration count");
  gcry_error_t e =
      gcry_kdf_derive(password.data(), password.size(), GCRY_KDF_PBKDF2, hash.algo, salt.data(), salt.size(),
                      static_cast<unsigned long>(iterations), out.size(), out.data());
  if (e) return GcryError("PBKDF2", e);
  return Status::Ok();
}

namespace {
uint64_t ThreadCpuMs() {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}
}  // namespace

Result<uint64_t> Pbkdf2IterationsPerSecond(const Hash& hash, size_t key_size) {
  std::vector<std::byte> key(key_size), salt(32), out(key_size);
  RandomBytes(key);
  RandomBytes(salt);
  uint64_t iterations = 1 << 15;
  uint64_t delta_ms = 0;
  for (;;) {
    const uint64_t start = ThreadCpuMs();
    RETURN_IF_ERROR(Pbkdf2(hash, key, salt, iterations, out));
    delta_ms = ThreadCpuMs() - start;
    if (delta_ms > 500) break;
    // Too short to time: ten times more (qemu refuses a 0 ms run; this only goes on).
    iterations = delta_ms < 100 ? iterations * 10 : iterations * 1000 / delta_ms;
  }
  Wipe(key);
  return iterations * 1000 / delta_ms;
}

std::vector<std::byte> HashOf(const Hash& hash, std::span<const std::byte> data) {
  InitLibrary();
  std::vector<std::byte> out(hash.digest_size);
  gcry_md_hash_buffer(hash.algo, out.data(), data.data(), data.size());
  return out;
}

void RandomBytes(std::span<std::byte> out) {
  InitLibrary();
  gcry_randomize(out.data(), out.size(), GCRY_STRONG_RANDOM);
}

void Wipe(std::span<std::byte> buf) {
  // Through a volatile pointer, so the compiler cannot drop the stores as dead.
  volatile std::byte* p = buf.data();
  for (size_t i = 0; i < buf.size(); i++) p[i] = std::byte{0};
}

}  // namespace vimgfs::crypto

// Disk encryption primitives as LUKS and qemu use them, over libgcrypt: block ciphers in a
// sector mode with an IV generator, PBKDF2, hashes and random bytes. libgcrypt is the one
// library in Debian with every cipher qemu's LUKS accepts (AES, Serpent, Twofish, CAST5 in
// ECB, CBC, CTR and XTS); nothing here implements a cipher or a hash itself.
// docs/ARCHITECTURE.md, "Encryption".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/status.h"

namespace vimgfs::crypto {

// The unit every cipher works on: IVs count 512-byte sectors.
constexpr uint64_t kSectorSize = 512;

// A hash by its LUKS/qemu name: md5, sha1, sha224, sha256, sha384, sha512, ripemd160.
struct Hash {
  int algo = 0;  // libgcrypt's GCRY_MD_*
  std::string name;
  size_t digest_size = 0;
  static Result<Hash> Named(const std::string& name);
};

// A cipher algorithm with its key size: "aes-256", "serpent-128", "twofish-192",
// "cast5-128" (qemu's cipher-alg names).
struct CipherAlg {
  int algo = 0;        // GCRY_CIPHER_*
  std::string family;  // "aes", "serpent", "twofish", "cast5" (the LUKS header's name)
  size_t key_size = 0;
  size_t block_size = 0;
  std::string Name() const { return family + "-" + std::to_string(key_size * 8); }
  static Result<CipherAlg> Named(const std::string& name);
  // The family's cipher with this key size (LUKS headers store the family and key bytes).
  static Result<CipherAlg> FromFamily(const std::string& family, size_t key_size);
};

enum class CipherMode { kEcb, kCbc, kCtr, kXts };
Result<CipherMode> CipherModeNamed(const std::string& name);
const char* CipherModeName(CipherMode mode);

enum class IvGen { kPlain, kPlain64, kEssiv };
Result<IvGen> IvGenNamed(const std::string& name);
const char* IvGenName(IvGen ivgen);

// What encrypts a disk: cipher, mode and IV generator (with its hash for essiv).
struct CipherSpec {
  CipherAlg alg;
  CipherMode mode = CipherMode::kXts;
  IvGen ivgen = IvGen::kPlain64;
  Hash ivgen_hash;  // kEssiv only
  // Bytes of the master key: the cipher's key size, twice that for XTS.
  size_t key_bytes() const { return mode == CipherMode::kXts ? 2 * alg.key_size : alg.key_size; }
};

// Encrypts and decrypts whole sectors in place, each with the IV of its sector number.
// Thread-safe: every call takes a cipher handle of its own from a pool.
class SectorCipher {
 public:
  static Result<std::unique_ptr<SectorCipher>> Create(const CipherSpec& spec, std::span<const std::byte> key);
  ~SectorCipher();
  // REQUIRES: data.size() a multiple of kSectorSize; data's first sector is `sector`.
  Status Encrypt(uint64_t sector, std::span<std::byte> data);
  Status Decrypt(uint64_t sector, std::span<std::byte> data);

 private:
  SectorCipher() = default;
  // libgcrypt handles keep state: each call takes a pair of its own.
  struct Handles {
    void* data = nullptr;   // the disk's cipher and mode
    void* essiv = nullptr;  // ECB keyed with hash(key), for essiv IVs (null otherwise)
  };
  Status Crypt(uint64_t sector, std::span<std::byte> data, bool encrypt);
  Result<Handles> TakeHandles();
  void ReturnHandles(Handles h);

  CipherSpec spec_;
  std::vector<std::byte> key_;
  int essiv_algo_ = 0;
  std::vector<std::byte> essiv_key_;
  std::mutex mu_;
  std::vector<Handles> idle_;
};

// PBKDF2 (RFC 8018) of `password` with `salt` and `iterations` rounds of HMAC-`hash`.
Status Pbkdf2(const Hash& hash, std::span<const std::byte> password, std::span<const std::byte> salt,
              uint64_t iterations, std::span<std::byte> out);
// How many PBKDF2 iterations of `hash` this thread runs per second, measured as qemu
// measures it (thread CPU time, until a run takes over half a second).
Result<uint64_t> Pbkdf2IterationsPerSecond(const Hash& hash, size_t key_size);

std::vector<std::byte> HashOf(const Hash& hash, std::span<const std::byte> data);
// Strong random bytes (keys, salts).
void RandomBytes(std::span<std::byte> out);
// Overwrites key material before its memory is released.
void Wipe(std::span<std::byte> buf);

}  // namespace vimgfs::crypto

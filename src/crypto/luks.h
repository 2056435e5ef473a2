// The LUKS1 header as qemu writes and reads it (cryptsetup's on-disk format, version 1):
// parse and validate, unlock a key slot with a passphrase, and lay out a new header. The
// `luks` format keeps its payload after this header; qcow2's encrypt.format=luks keeps
// the same header in clusters of its own. docs/ARCHITECTURE.md, "Encryption".
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "crypto/cipher.h"
#include "vimgfs/env.h"
#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs::crypto {

constexpr size_t kLuksHeaderSize = 592;  // the fields; qemu reserves 4096 bytes
constexpr size_t kLuksSlots = 8;
constexpr uint32_t kLuksStripes = 4000;
constexpr uint32_t kLuksSlotActive = 0x00AC71F3;
constexpr uint32_t kLuksSlotInactive = 0x0000DEAD;

struct LuksSlot {
  bool active = false;
  uint32_t iterations = 0;
  std::array<std::byte, 32> salt{};
  uint32_t key_offset_sector = 0;  // the key material, in 512-byte sectors from the header
  uint32_t stripes = kLuksStripes;
};

struct LuksHeader {
  CipherSpec cipher;
  Hash hash;  // PBKDF2 and the anti-forensic splitter
  uint32_t payload_offset_sector = 0;
  uint32_t key_bytes = 0;
  std::array<std::byte, 20> mk_digest{};
  std::array<std::byte, 32> mk_digest_salt{};
  uint32_t mk_digest_iterations = 0;
  std::string uuid;
  std::array<LuksSlot, kLuksSlots> slots;

  // Sectors of one slot's key material: key_bytes * stripes, in whole 4 KiB.
  uint32_t KeyMaterialSectors() const;
  // The 592 bytes of the header, as stored (big-endian).
  std::vector<std::byte> Encode() const;
};

// Bytes before the payload of a new header for `cipher` (qemu's layout).
uint64_t LuksPayloadOffset(const CipherSpec& cipher);

// Parses and validates a header read from the start of `head` (at least kLuksHeaderSize
// bytes): magic and version, terminated strings, a cipher, mode, IV generator and hash
// this library has, key slots within the header area and apart, payload after them.
// `file_size` bounds the key material. Errors read as qemu's.
Result<LuksHeader> ParseLuksHeader(std::span<const std::byte> head, uint64_t file_size);

// Limits of unlocking: PBKDF2 runs of more iterations are refused rather than spent
// (fuzzing; a real image stays far below the default).
struct UnlockLimits {
  uint64_t max_iterations = UINT32_MAX;
};

// The master key, from the first active slot `passphrase` opens; the slot's key material
// is read from `file` at `base` + its offset. A wrong passphrase: "Invalid password,
// cannot unlock any keyslot".
Result<std::vector<std::byte>> UnlockLuks(const LuksHeader& h, File& file, uint64_t base,
                                          std::span<const std::byte> passphrase, UnlockLimits limits = {});

// The payload cipher of header `h` (at `base` in `file`), unlocked with the passphrase of
// the secret `key_secret` names. Without one: "Parameter '<param>' is required for
// cipher", param being key-secret (luks) or encrypt.key-secret (qcow2).
Result<std::unique_ptr<SectorCipher>> OpenLuksCipher(const LuksHeader& h, File& file, uint64_t base,
                                                     const SecretLookup& secrets,
                                                     const std::string& key_secret, const char* param);
// What info shows of a header.
LuksDetails DescribeLuks(const LuksHeader& h);

// qemu's luks create options.
struct LuksCreateOptions {
  std::string cipher_alg = "aes-256";
  std::string cipher_mode = "xts";
  std::string ivgen_alg = "plain64";
  std::string ivgen_hash_alg = "sha256";
  std::string hash_alg = "sha256";
  uint64_t iter_time_ms = 2000;
};

// Takes one of qemu's LUKS create options by its name (without qcow2's "encrypt."
// prefix): cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg, iter-time (a
// number, checked by the command line), key-secret. False: not a LUKS option.
bool SetLuksCreateOption(const std::string& name, const std::string& value, LuksCreateOptions* o,
                         std::string* key_secret);

// A new header with a random master key, slot 0 opened by `passphrase`: writes the header
// and slot 0's key material to `file` at `base` (the area is `payload_offset_sector`
// sectors) and returns the header and the master key.
struct NewLuks {
  LuksHeader header;
  std::vector<std::byte> master_key;
};
Result<NewLuks> CreateLuks(const LuksCreateOptions& opts, File& file, uint64_t base,
                           std::span<const std::byte> passphrase);

// qemu's LUKS keyslot amend options (qemu-img amend -o [encrypt.]state=...): activate a
// slot with new-secret (the one named, or the first free), or erase the slot named or
// every slot old-secret opens.
struct LuksAmendOptions {
  bool activate = false;  // state=active; state=inactive erases
  std::optional<int64_t> keyslot;
  std::optional<std::string> old_secret, new_secret;  // secret IDs
  std::optional<uint64_t> iter_time_ms;
};
// Their descriptions for `amend -o help`, named prefix + name.
const std::vector<CreateOptionSpec>& LuksAmendOptionSpecs(const std::string& prefix);
// Reads them from amend options named prefix + name ("encrypt." for qcow2, "" for luks).
Result<LuksAmendOptions> ReadLuksAmendOptions(const std::map<std::string, std::string>& options,
                                              const std::string& prefix);
// Applies them to header *h at `base` in `file`, as qemu-img amend does, with its checks
// and words; `key_secret` (the image's key) unlocks the master key for a new slot. What
// would leave no active slot, or overwrite an active one, needs `force`. Each slot change
// is crash-safe: a slot is inactive in the header before its material changes, and
// active only after its new material is durable.
Status AmendLuks(LuksHeader* h, File& file, uint64_t base, const LuksAmendOptions& o,
                 const SecretLookup& secrets, const std::string& key_secret, bool force);

}  // namespace vimgfs::crypto

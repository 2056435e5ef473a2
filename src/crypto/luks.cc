// LUKS1 headers: parse, validate, unlock, create (luks.h). Field layout from the LUKS1
// on-disk format specification; the checks and their wording follow qemu's reader.
#include "crypto/luks.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "crypto/secrets.h"
#include "util/endian.h"

namespace vimgfs::crypto {
namespace {

constexpr char kMagic[] = {'L', 'U', 'K', 'S', '\xba', '\xbe'};
constexpr uint32_t kHeaderSectors = 4096 / kSectorSize;  // the key material starts after 4 KiB
constexpr uint32_t kMinIterations = 1000;                // qemu's floor for new slots and digests

// Field offsets in the 592-byte header.
constexpr size_t kOffVersion = 6, kOffCipherName = 8, kOffCipherMode = 40, kOffHashSpec = 72,
                 kOffPayload = 104, kOffKeyBytes = 108, kOffDigest = 112, kOffDigestSalt = 132,
                 kOffDigestIter = 164, kOffUuid = 168, kOffSlots = 208, kSlotSize = 48;
constexpr size_t kNameLen = 32, kUuidLen = 40;

std::string FieldString(std::span<const std::byte> head, size_t off, size_t len) {
  const char* p = reinterpret_cast<const char*>(head.data() + off);
  return std::string(p, strnlen(p, len));
}
bool Terminated(std::span<const std::byte> head, size_t off, size_t len) {
  return std::memchr(head.data() + off, 0, len) != nullptr;
}

uint64_t SplitKeyBytes(uint64_t key_bytes, uint64_t stripes) { return key_bytes * stripes; }
uint64_t SplitKeySectors(uint64_t key_bytes, uint64_t stripes) {
  uint64_t sectors = (SplitKeyBytes(key_bytes, stripes) + kSectorSize - 1) / kSectorSize;
  return (sectors + kHeaderSectors - 1) / kHeaderSectors * kHeaderSectors;
}

// The anti-forensic splitter's diffusion: each digest-sized piece of `block` becomes the
// hash of its index (big-endian) and itself.
void Diffuse(const Hash& hash, std::span<std::byte> block) {
  const size_t d = hash.digest_size;
  std::vector<std::byte> in(4 + d);
  for (size_t i = 0, pos = 0; pos < block.size(); i++, pos += d) {
    const size_t n = std::min(d, block.size() - pos);
    StoreBE<uint32_t>(in.data(), static_cast<uint32_t>(i));
    std::memcpy(in.data() + 4, block.data() + pos, n);
    std::vector<std::byte> out = HashOf(hash, std::span(in.data(), 4 + n));
    std::memcpy(block.data() + pos, out.data(), n);
  }
}

void XorInto(std::span<std::byte> dst, std::span<const std::byte> src) {
  for (size_t i = 0; i < dst.size(); i++) dst[i] ^= src[i];
}

// AF-merge: `stripes` pieces of `key_len` bytes back into the key.
std::vector<std::byte> AfMerge(const Hash& hash, std::span<const std::byte> split, size_t key_len,
                               uint32_t stripes) {
  std::vector<std::byte> block(key_len);
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    XorInto(block, split.subspan(i * key_len, key_len));
    Diffuse(hash, block);
  }
  XorInto(block, split.subspan(size_t{stripes - 1} * key_len, key_len));
  return block;
}

// AF-split: the key into `stripes` pieces, all but the last random.
std::vector<std::byte> AfSplit(const Hash& hash, std::span<const std::byte> key, uint32_t stripes) {
  const size_t n = key.size();
  std::vector<std::byte> out(n * stripes), block(n);
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    std::span<std::byte> piece(out.data() + i * n, n);
    RandomBytes(piece);
    XorInto(block, piece);
    Diffuse(hash, block);
  }
  std::span<std::byte> last(out.data() + size_t{stripes - 1} * n, n);
  std::memcpy(last.data(), key.data(), n);
  XorInto(last, block);
  Wipe(block);
  return out;
}

// The cipher that protects a slot's key material: the disk's cipher keyed with the
// slot key (PBKDF2 of the passphrase).
Result<std::unique_ptr<SectorCipher>> SlotCipher(const LuksHeader& h, std::span<const std::byte> slot_key) {
  return SectorCipher::Create(h.cipher, slot_key);
}

std::array<std::byte, 20> MasterKeyDigest(const LuksHeader& h, std::span<const std::byte> key, Status* st) {
  std::array<std::byte, 20> d{};
  *st = Pbkdf2(h.hash, key, h.mk_digest_salt, h.mk_digest_iterations, d);
  return d;
}

std::string NewUuid() {
  std::array<std::byte, 16> b;
  RandomBytes(b);
  b[6] = (b[6] & std::byte{0x0f}) | std::byte{0x40};  // version 4
  b[8] = (b[8] & std::byte{0x3f}) | std::byte{0x80};  // RFC 4122 variant
  std::string s;
  for (size_t i = 0; i < b.size(); i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += fmt::format("{:02x}", static_cast<unsigned>(b[i]));
  }
  return s;
}

}  // namespace

uint64_t LuksPayloadOffset(const CipherSpec& cipher) {
  return (kHeaderSectors + kLuksSlots * SplitKeySectors(cipher.key_bytes(), kLuksStripes)) * kSectorSize;
}

uint32_t LuksHeader::KeyMaterialSectors() const {
  return static_cast<uint32_t>(SplitKeySectors(key_bytes, kLuksStripes));
}

std::vector<std::byte> LuksHeader::Encode() const {
  std::vector<std::byte> b(kLuksHeaderSize);
  std::memcpy(b.data(), kMagic, sizeof kMagic);
  StoreBE<uint16_t>(&b[kOffVersion], 1);
  auto put = [&](size_t off, const std::string& s) { std::memcpy(&b[off], s.data(), s.size()); };
  put(kOffCipherName, cipher.alg.family);
  std::string mode = std::string(CipherModeName(cipher.mode)) + "-" + IvGenName(cipher.ivgen);
  if (cipher.ivgen == IvGen::kEssiv) mode += ":" + cipher.ivgen_hash.name;
  put(kOffCipherMode, mode);
  put(kOffHashSpec, hash.name);
  StoreBE<uint32_t>(&b[kOffPayload], payload_offset_sector);
  StoreBE<uint32_t>(&b[kOffKeyBytes], key_bytes);
  std::memcpy(&b[kOffDigest], mk_digest.data(), mk_digest.size());
  std::memcpy(&b[kOffDigestSalt], mk_digest_salt.data(), mk_digest_salt.size());
  StoreBE<uint32_t>(&b[kOffDigestIter], mk_digest_iterations);
  put(kOffUuid, uuid);
  for (size_t i = 0; i < kLuksSlots; i++) {
    std::byte* s = &b[kOffSlots + i * kSlotSize];
    const LuksSlot& slot = slots[i];
    StoreBE<uint32_t>(s, slot.active ? kLuksSlotActive : kLuksSlotInactive);
    StoreBE<uint32_t>(s + 4, slot.iterations);
    std::memcpy(s + 8, slot.salt.data(), slot.salt.size());
    StoreBE<uint32_t>(s + 40, slot.key_offset_sector);
    StoreBE<uint32_t>(s + 44, slot.stripes);
  }
  return b;
}

Result<LuksHeader> ParseLuksHeader(std::span<const std::byte> head, uint64_t file_size) {
  if (head.size() < kLuksHeaderSize || std::memcmp(head.data(), kMagic, sizeof kMagic) != 0)
    return Status::InvalidFormat("Volume is not in LUKS format");
  if (uint16_t v = LoadBE<uint16_t>(&head[kOffVersion]); v != 1)
    return Status::Unsupported("LUKS version {} is not supported", v);
  if (!Terminated(head, kOffCipherName, kNameLen))
    return Status::InvalidFormat("LUKS header cipher name is not NUL terminated");
  if (!Terminated(head, kOffCipherMode, kNameLen))
    return Status::InvalidFormat("LUKS header cipher mode is not NUL terminated");
  if (!Terminated(head, kOffHashSpec, kNameLen))
    return Status::InvalidFormat("LUKS header hash spec is not NUL terminated");
  LuksHeader h;
  h.payload_offset_sector = LoadBE<uint32_t>(&head[kOffPayload]);
  h.key_bytes = LoadBE<uint32_t>(&head[kOffKeyBytes]);
  std::memcpy(h.mk_digest.data(), &head[kOffDigest], h.mk_digest.size());
  std::memcpy(h.mk_digest_salt.data(), &head[kOffDigestSalt], h.mk_digest_salt.size());
  h.mk_digest_iterations = LoadBE<uint32_t>(&head[kOffDigestIter]);
  h.uuid = FieldString(head, kOffUuid, kUuidLen);
  if (h.payload_offset_sector < kHeaderSectors)
    return Status::InvalidFormat("LUKS payload is overlapping with the header");
  if (h.mk_digest_iterations == 0) return Status::InvalidFormat("LUKS key iteration count is zero");

  for (size_t i = 0; i < kLuksSlots; i++) {
    const std::byte* s = &head[kOffSlots + i * kSlotSize];
    LuksSlot& slot = h.slots[i];
    const uint32_t state = LoadBE<uint32_t>(s);
    slot.iterations = LoadBE<uint32_t>(s + 4);
    std::memcpy(slot.salt.data(), s + 8, slot.salt.size());
    slot.key_offset_sector = LoadBE<uint32_t>(s + 40);
    slot.stripes = LoadBE<uint32_t>(s + 44);
    if (slot.stripes != kLuksStripes)
      return Status::InvalidFormat("Keyslot {} is corrupted (stripes {} != {})", i, slot.stripes,
                                   kLuksStripes);
    if (state != kLuksSlotActive && state != kLuksSlotInactive)
      return Status::InvalidFormat("Keyslot {} state (active/disable) is corrupted", i);
    slot.active = state == kLuksSlotActive;
    if (slot.active && slot.iterations == 0)
      return Status::InvalidFormat("Keyslot {} iteration count is zero", i);
    if (slot.key_offset_sector < kHeaderSectors)
      return Status::InvalidFormat("Keyslot {} is overlapping with the LUKS header", i);
    if (uint64_t{slot.key_offset_sector} + SplitKeySectors(h.key_bytes, slot.stripes) >
        h.payload_offset_sector)
      return Status::InvalidFormat("Keyslot {} is overlapping with the encrypted payload", i);
  }
  for (size_t i = 0; i < kLuksSlots; i++) {
    const uint64_t s1 = h.slots[i].key_offset_sector, n = SplitKeySectors(h.key_bytes, kLuksStripes);
    for (size_t j = i + 1; j < kLuksSlots; j++) {
      const uint64_t s2 = h.slots[j].key_offset_sector;
      if (s1 + n > s2 && s2 + n > s1)
        return Status::InvalidFormat("Keyslots {} and {} are overlapping in the header", i, j);
    }
  }

  // "aes" + "xts-plain64" / "cbc-essiv:sha256" + key bytes.
  const std::string family = FieldString(head, kOffCipherName, kNameLen);
  const std::string mode_spec = FieldString(head, kOffCipherMode, kNameLen);
  const size_t dash = mode_spec.find('-');
  if (dash == std::string::npos)
    return Status::InvalidFormat("Unexpected cipher mode string format {}", mode_spec);
  auto mode = CipherModeNamed(mode_spec.substr(0, dash));
  if (!mode.ok()) return Status::Unsupported("Cipher mode '{}' not supported", mode_spec.substr(0, dash));
  h.cipher.mode = *mode;
  std::string ivgen = mode_spec.substr(dash + 1);
  std::string ivhash;
  if (size_t colon = ivgen.find(':'); colon != std::string::npos) {
    ivhash = ivgen.substr(colon + 1);
    ivgen.resize(colon);
  }
  auto iv = IvGenNamed(ivgen);
  if (!iv.ok()) return Status::Unsupported("IV generator '{}' not supported", ivgen);
  h.cipher.ivgen = *iv;
  if (h.cipher.ivgen == IvGen::kEssiv) {
    if (ivhash.empty()) return Status::InvalidFormat("Missing IV generator hash specification");
    ASSIGN_OR_RETURN(h.cipher.ivgen_hash, Hash::Named(ivhash));
  }
  const uint64_t alg_key = h.cipher.mode == CipherMode::kXts ? h.key_bytes / 2 : h.key_bytes;
  ASSIGN_OR_RETURN(h.cipher.alg, CipherAlg::FromFamily(family, alg_key));
  if (h.cipher.key_bytes() != h.key_bytes)  // an odd XTS key
    return Status::Unsupported("Algorithm '{}' with key size {} bytes not supported", family, h.key_bytes);
  if (h.cipher.mode == CipherMode::kXts && h.cipher.alg.block_size != 16)
    return Status::Unsupported("Unsupported cipher mode xts for cipher {}", family);
  const std::string hash = FieldString(head, kOffHashSpec, kNameLen);
  auto hh = Hash::Named(hash);
  if (!hh.ok()) return Status::Unsupported("Hash '{}' not supported", hash);
  h.hash = *hh;
  (void)file_size;  // key material past the end of the file reads as zeros, as in qemu
  return h;
}

namespace {

// The master key if slot `i` is active and `passphrase` opens it, else nullopt.
Result<std::optional<std::vector<std::byte>>> TrySlot(const LuksHeader& h, size_t i, File& file,
                                                      uint64_t base, std::span<const std::byte> passphrase,
                                                      const UnlockLimits& limits) {
  const LuksSlot& slot = h.slots[i];
  if (!slot.active || slot.iterations > limits.max_iterations) return std::optional<std::vector<std::byte>>();
  const uint64_t split_bytes = SplitKeyBytes(h.key_bytes, kLuksStripes);
  if (split_bytes % kSectorSize)  // qemu's reader asserts on this (aes-192 outside XTS)
    return Status::Unsupported("LUKS key material of {} bytes is not whole sectors", split_bytes);
  if (h.mk_digest_iterations > limits.max_iterations)
    return Status::Unsupported("LUKS master key digest takes {} PBKDF2 iterations", h.mk_digest_iterations);
  std::vector<std::byte> split(split_bytes), slot_key(h.key_bytes);
  Status st = Pbkdf2(h.hash, passphrase, slot.salt, slot.iterations, slot_key);
  if (st.ok()) st = file.PRead(base + uint64_t{slot.key_offset_sector} * kSectorSize, split);
  std::unique_ptr<SectorCipher> cipher;
  if (st.ok()) {
    auto c = SlotCipher(h, slot_key);
    Wipe(slot_key);
    if (!c.ok()) return c.error();
    cipher = std::move(*c);
    st = cipher->Decrypt(0, split);
  }
  Wipe(slot_key);
  if (!st.ok()) {
    Wipe(split);
    return st;
  }
  std::vector<std::byte> key = AfMerge(h.hash, split, h.key_bytes, kLuksStripes);
  Wipe(split);
  std::array<std::byte, 20> digest = MasterKeyDigest(h, key, &st);
  if (st.ok() && digest == h.mk_digest) return std::optional(std::move(key));
  Wipe(key);
  RETURN_IF_ERROR(st);
  return std::optional<std::vector<std::byte>>();
}

// An error with qemu's hint on the line after it (error_append_hint).
Status WithHint(const Status& s, const std::string& hint) {
  return Status::Error(s.kind(), s.err(), s.message() + "\n" + hint);
}

Status InvalidPassword() {
  return Status::Error(ErrorKind::kInvalidArgument, EPERM, "Invalid password, cannot unlock any keyslot");
}

// PBKDF2 iterations that take about iter_time_ms here (qemu's rule for slots, digest /8).
Result<uint32_t> IterationsFor(const LuksHeader& h, uint64_t iter_time_ms, uint64_t divisor) {
  ASSIGN_OR_RETURN(uint64_t ips, Pbkdf2IterationsPerSecond(h.hash, h.key_bytes));
  if (iter_time_ms && ips > UINT64_MAX / iter_time_ms)
    return Status::InvalidArgument("PBKDF iterations {} too large to scale", ips);
  uint64_t iters = std::max<uint64_t>(ips * iter_time_ms / 1000 / divisor, kMinIterations);
  if (iters > UINT32_MAX)
    return Status::InvalidArgument("PBKDF iterations {} larger than {}", iters, UINT32_MAX);
  return static_cast<uint32_t>(iters);
}

// Makes slot `i` hold `master_key` under `passphrase`, with a new salt: key material
// first, then the header naming the slot active, so a crash never leaves an active slot
// whose material does not match it.
Status StoreSlot(LuksHeader* h, size_t i, File& file, uint64_t base, std::span<const std::byte> master_key,
                 std::span<const std::byte> passphrase, uint64_t iter_time_ms) {
  LuksSlot& slot = h->slots[i];
  if (slot.active) {
    // Overwriting a slot (--force): it stops being active before its material changes.
    slot.active = false;
    RETURN_IF_ERROR(file.PWrite(base, h->Encode(), IoTag::kHeader));
    RETURN_IF_ERROR(file.Sync(true));
  }
  RandomBytes(slot.salt);
  ASSIGN_OR_RETURN(slot.iterations, IterationsFor(*h, iter_time_ms, 1));
  std::vector<std::byte> slot_key(h->key_bytes);
  RETURN_IF_ERROR(Pbkdf2(h->hash, passphrase, slot.salt, slot.iterations, slot_key));
  std::vector<std::byte> split = AfSplit(h->hash, master_key, kLuksStripes);
  auto cipher = SlotCipher(*h, slot_key);
  Wipe(slot_key);
  Status st = cipher.ok() ? (*cipher)->Encrypt(0, split) : cipher.error();
  if (st.ok()) st = file.PWrite(base + uint64_t{slot.key_offset_sector} * kSectorSize, split, IoTag::kHeader);
  Wipe(split);
  RETURN_IF_ERROR(st);
  RETURN_IF_ERROR(file.Sync(true));
  slot.active = true;
  RETURN_IF_ERROR(file.PWrite(base, h->Encode(), IoTag::kHeader));
  return file.Sync(true);
}

// Marks slot `i` inactive, then overwrites its key material with random bytes (16
// passes, as qemu and cryptsetup do).
Status EraseSlot(LuksHeader* h, size_t i, File& file, uint64_t base) {
  LuksSlot& slot = h->slots[i];
  slot.salt.fill(std::byte{0});
  slot.iterations = 0;
  slot.active = false;
  Status header = file.PWrite(base, h->Encode(), IoTag::kHeader);
  if (header.ok()) header = file.Sync(true);
  std::vector<std::byte> garbage(SplitKeyBytes(h->key_bytes, kLuksStripes));
  for (int pass = 0; pass < 16; pass++) {
    RandomBytes(garbage);
    RETURN_IF_ERROR(
        file.PWrite(base + uint64_t{slot.key_offset_sector} * kSectorSize, garbage, IoTag::kHeader));
  }
  RETURN_IF_ERROR(file.Sync(true));
  return header;
}

}  // namespace

Result<std::vector<std::byte>> UnlockLuks(const LuksHeader& h, File& file, uint64_t base,
                                          std::span<const std::byte> passphrase, UnlockLimits limits) {
  for (size_t i = 0; i < kLuksSlots; i++) {
    ASSIGN_OR_RETURN(std::optional<std::vector<std::byte>> key,
                     TrySlot(h, i, file, base, passphrase, limits));
    if (key) return std::move(*key);
  }
  return InvalidPassword();
}

Result<std::unique_ptr<SectorCipher>> OpenLuksCipher(const LuksHeader& h, File& file, uint64_t base,
                                                     const SecretLookup& secrets,
                                                     const std::string& key_secret, const char* param) {
  if (key_secret.empty()) return Status::InvalidArgument("Parameter '{}' is required for cipher", param);
  ASSIGN_OR_RETURN(std::string pass, LookupPassphrase(secrets, key_secret));
  auto key = UnlockLuks(h, file, base, std::as_bytes(std::span(pass)));
  Wipe(std::as_writable_bytes(std::span(pass)));
  if (!key.ok()) return key.error();
  auto cipher = SectorCipher::Create(h.cipher, *key);
  Wipe(*key);
  return cipher;
}

LuksDetails DescribeLuks(const LuksHeader& h) {
  LuksDetails d;
  d.ivgen_alg = IvGenName(h.cipher.ivgen);
  if (h.cipher.ivgen == IvGen::kEssiv) d.ivgen_hash_alg = h.cipher.ivgen_hash.name;
  d.hash_alg = h.hash.name;
  d.cipher_alg = h.cipher.alg.Name();
  d.uuid = h.uuid;
  d.cipher_mode = CipherModeName(h.cipher.mode);
  for (const LuksSlot& s : h.slots)
    d.slots.push_back({s.active, s.iterations, uint64_t{s.key_offset_sector} * kSectorSize, s.stripes});
  d.payload_offset = uint64_t{h.payload_offset_sector} * kSectorSize;
  d.master_key_iterations = h.mk_digest_iterations;
  return d;
}

bool SetLuksCreateOption(const std::string& name, const std::string& value, LuksCreateOptions* o,
                         std::string* key_secret) {
  if (name == "key-secret") {
    *key_secret = value;
  } else if (name == "cipher-alg") {
    o->cipher_alg = value;
  } else if (name == "cipher-mode") {
    o->cipher_mode = value;
  } else if (name == "ivgen-alg") {
    o->ivgen_alg = value;
  } else if (name == "ivgen-hash-alg") {
    o->ivgen_hash_alg = value;
  } else if (name == "hash-alg") {
    o->hash_alg = value;
  } else if (name == "iter-time") {
    o->iter_time_ms = std::strtoull(value.c_str(), nullptr, 10);
  } else {
    return false;
  }
  return true;
}

Result<NewLuks> CreateLuks(const LuksCreateOptions& opts, File& file, uint64_t base,
                           std::span<const std::byte> passphrase) {
  NewLuks out;
  LuksHeader& h = out.header;
  ASSIGN_OR_RETURN(h.cipher.alg, CipherAlg::Named(opts.cipher_alg));
  ASSIGN_OR_RETURN(h.cipher.mode, CipherModeNamed(opts.cipher_mode));
  ASSIGN_OR_RETURN(h.cipher.ivgen, IvGenNamed(opts.ivgen_alg));
  auto hash_of = [](const std::string& name, const char* param) -> Result<Hash> {
    auto hh = Hash::Named(name);
    if (!hh.ok()) return Status::InvalidArgument("Parameter '{}' does not accept value '{}'", param, name);
    return hh;
  };
  if (h.cipher.ivgen == IvGen::kEssiv) {
    ASSIGN_OR_RETURN(h.cipher.ivgen_hash, hash_of(opts.ivgen_hash_alg, "ivgen-hash-alg"));
  }
  ASSIGN_OR_RETURN(h.hash, hash_of(opts.hash_alg, "hash-alg"));
  if (h.cipher.mode == CipherMode::kXts && h.cipher.alg.block_size != 16)
    return Status::Unsupported("Unsupported cipher mode xts");
  h.key_bytes = static_cast<uint32_t>(h.cipher.key_bytes());
  if (SplitKeyBytes(h.key_bytes, kLuksStripes) % kSectorSize)
    return Status::Unsupported("Cipher {} in mode {} is not supported for LUKS key slots", opts.cipher_alg,
                               opts.cipher_mode);
  h.uuid = NewUuid();

  out.master_key.resize(h.key_bytes);
  RandomBytes(out.master_key);
  // The cipher must take the key before anything is written (an ESSIV hash too long for
  // the cipher fails here, as in qemu).
  ASSIGN_OR_RETURN(auto payload_cipher, SectorCipher::Create(h.cipher, out.master_key));
  payload_cipher.reset();

  // The digest's iterations: an eighth of iter-time, so that all eight slots together
  // take about iter-time to try (cryptsetup's rule, which qemu keeps).
  RandomBytes(h.mk_digest_salt);
  ASSIGN_OR_RETURN(h.mk_digest_iterations, IterationsFor(h, opts.iter_time_ms, 8));
  Status st;
  h.mk_digest = MasterKeyDigest(h, out.master_key, &st);
  RETURN_IF_ERROR(st);

  const uint32_t split_sectors = h.KeyMaterialSectors();
  for (size_t i = 0; i < kLuksSlots; i++) {
    h.slots[i].key_offset_sector = kHeaderSectors + static_cast<uint32_t>(i) * split_sectors;
    h.slots[i].stripes = kLuksStripes;
  }
  h.payload_offset_sector = kHeaderSectors + kLuksSlots * split_sectors;

  // The area first (truncated to its size), then slot 0 (its key material, then the
  // header that names it active): a crash leaves no header pointing at missing material.
  ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  if (file_size < base + uint64_t{h.payload_offset_sector} * kSectorSize)
    RETURN_IF_ERROR(file.Truncate(base + uint64_t{h.payload_offset_sector} * kSectorSize));
  RETURN_IF_ERROR(StoreSlot(&h, 0, file, base, out.master_key, passphrase, opts.iter_time_ms));
  return out;
}

const std::vector<CreateOptionSpec>& LuksAmendOptionSpecs(const std::string& prefix) {
  using T = CreateOptionSpec::Type;
  static const struct {
    const char* name;
    T type;
    const char* help;
  } kOptions[] = {
      {"state", T::kString, "Select new state of affected keyslots (active/inactive)"},
      {"keyslot", T::kNumber, "Select a single keyslot to modify explicitly"},
      {"old-secret", T::kString, "Select all keyslots that match this password"},
      {"new-secret", T::kString, "New secret to set in the matching keyslots. Empty string to erase"},
      {"iter-time", T::kNumber, "Time to spend in PBKDF in milliseconds"},
  };
  // Built in place and never moved: the specs point into the names.
  struct Specs {
    explicit Specs(const std::string& p) {
      for (const auto& o : kOptions) names.push_back(p + o.name);
      for (size_t i = 0; i < names.size(); i++)
        specs.push_back({names[i].c_str(), kOptions[i].type, kOptions[i].help});
    }
    std::vector<std::string> names;
    std::vector<CreateOptionSpec> specs;
  };
  static const Specs kPlain(""), kEncrypt("encrypt.");
  return prefix.empty() ? kPlain.specs : kEncrypt.specs;
}

Result<LuksAmendOptions> ReadLuksAmendOptions(const std::map<std::string, std::string>& options,
                                              const std::string& prefix) {
  LuksAmendOptions o;
  bool has_state = false;
  for (const auto& [key, v] : options) {
    if (key.rfind(prefix, 0) != 0) continue;
    const std::string name = key.substr(prefix.size());
    if (name == "state") {
      if (v != "active" && v != "inactive")
        return Status::InvalidArgument("Parameter 'state' does not accept value '{}'", v);
      o.activate = v == "active";
      has_state = true;
    } else if (name == "keyslot") {
      o.keyslot = std::strtoll(v.c_str(), nullptr, 10);
    } else if (name == "old-secret") {
      o.old_secret = v;
    } else if (name == "new-secret") {
      o.new_secret = v;
    } else if (name == "iter-time") {
      o.iter_time_ms = std::strtoull(v.c_str(), nullptr, 10);
    }
  }
  if (!has_state) return Status::InvalidArgument("Parameter 'state' is missing");
  return o;
}

Status AmendLuks(LuksHeader* h, File& file, uint64_t base, const LuksAmendOptions& o,
                 const SecretLookup& secrets, const std::string& key_secret, bool force) {
  auto slot_range_error = [](int64_t slot) {
    return Status::InvalidArgument("Invalid keyslot {} specified, must be between 0 and {}", slot,
                                   kLuksSlots - 1);
  };
  auto active_slots = [&] {
    return std::count_if(h->slots.begin(), h->slots.end(), [](const LuksSlot& s) { return s.active; });
  };
  if (o.activate) {
    if (!o.new_secret) return Status::InvalidArgument("'new-secret' is required to activate a keyslot");
    if (o.old_secret)
      return Status::InvalidArgument("'old-secret' must not be given when activating keyslots");
    size_t slot = 0;
    if (o.keyslot) {
      if (*o.keyslot < 0 || *o.keyslot >= static_cast<int64_t>(kLuksSlots))
        return slot_range_error(*o.keyslot);
      slot = static_cast<size_t>(*o.keyslot);
    } else {
      while (slot < kLuksSlots && h->slots[slot].active) slot++;
      if (slot == kLuksSlots) return Status::InvalidArgument("Can't add a keyslot - all keyslots are in use");
    }
    if (!force && h->slots[slot].active)
      return Status::InvalidArgument("Refusing to overwrite active keyslot {} - please erase it first", slot);
    ASSIGN_OR_RETURN(std::string old_pass, LookupPassphrase(secrets, key_secret));
    auto key = UnlockLuks(*h, file, base, std::as_bytes(std::span(old_pass)));
    Wipe(std::as_writable_bytes(std::span(old_pass)));
    if (!key.ok()) return WithHint(key.error(), "Failed to retrieve the master key");
    auto new_pass = LookupPassphrase(secrets, *o.new_secret);
    Status st = new_pass.ok() ? StoreSlot(h, slot, file, base, *key, std::as_bytes(std::span(*new_pass)),
                                          o.iter_time_ms.value_or(2000))
                              : new_pass.error();
    Wipe(*key);
    if (new_pass.ok()) Wipe(std::as_writable_bytes(std::span(*new_pass)));
    if (!st.ok()) return WithHint(st, fmt::format("Failed to write to keyslot {}", slot));
    return Status::Ok();
  }

  if (o.new_secret) return Status::InvalidArgument("'new-secret' must not be given when erasing keyslots");
  if (o.iter_time_ms) return Status::InvalidArgument("'iter-time' must not be given when erasing keyslots");
  std::string old_pass;
  if (o.old_secret) {
    ASSIGN_OR_RETURN(old_pass, LookupPassphrase(secrets, *o.old_secret));
  }
  auto opens = [&](size_t slot) -> Result<bool> {
    ASSIGN_OR_RETURN(auto key, TrySlot(*h, slot, file, base, std::as_bytes(std::span(old_pass)), {}));
    if (key) Wipe(*key);
    return key.has_value();
  };
  std::array<bool, kLuksSlots> erase{};
  if (o.keyslot) {
    const int64_t slot = *o.keyslot;
    if (slot < 0 || slot >= static_cast<int64_t>(kLuksSlots)) return slot_range_error(slot);
    if (o.old_secret) {
      ASSIGN_OR_RETURN(bool match, opens(static_cast<size_t>(slot)));
      if (!match)
        return Status::InvalidArgument(
            "Given keyslot {} doesn't contain the given old password for erase operation", slot);
    }
    if (!force && !h->slots[slot].active)
      return Status::InvalidArgument("Given keyslot {} is already erased (inactive) ", slot);
    if (!force && active_slots() == 1)
      return Status::InvalidArgument(
          "Attempt to erase the only active keyslot {} which will erase all the data in the image "
          "irreversibly - refusing operation",
          slot);
    erase[static_cast<size_t>(slot)] = true;
  } else if (o.old_secret) {
    int64_t matches = 0;
    for (size_t i = 0; i < kLuksSlots; i++) {
      ASSIGN_OR_RETURN(erase[i], opens(i));
      matches += erase[i];
    }
    if (matches == 0)
      return Status::InvalidArgument("No keyslots match given (old) password for erase operation");
    if (!force && matches == active_slots())
      return Status::InvalidArgument(
          "All the active keyslots match the (old) password that was given and erasing them will "
          "erase all the data in the image irreversibly - refusing operation");
  } else {
    return Status::InvalidArgument(
        "To erase keyslot(s), either explicit keyslot index or the password currently contained in "
        "them must be given");
  }
  Wipe(std::as_writable_bytes(std::span(old_pass)));
  for (size_t i = 0; i < kLuksSlots; i++) {
    if (!erase[i]) continue;
    Status st = EraseSlot(h, i, file, base);
    if (!st.ok()) return WithHint(st, fmt::format("Failed to erase keyslot {}", i));
  }
  return Status::Ok();
}

}  // namespace vimgfs::crypto

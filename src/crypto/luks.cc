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

Result<std::vector<std::byte>> UnlockLuks(const LuksHeader& h, File& file, uint64_t base,
                                          std::span<const std::byte> passphrase, UnlockLimits limits) {
  const uint64_t split_bytes = SplitKeyBytes(h.key_bytes, kLuksStripes);
  if (split_bytes % kSectorSize)  // qemu's reader asserts on this (aes-192 outside XTS)
    return Status::Unsupported("LUKS key material of {} bytes is not whole sectors", split_bytes);
  if (h.mk_digest_iterations > limits.max_iterations)
    return Status::Unsupported("LUKS master key digest takes {} PBKDF2 iterations", h.mk_digest_iterations);
  std::vector<std::byte> split(split_bytes), slot_key(h.key_bytes);
  for (const LuksSlot& slot : h.slots) {
    if (!slot.active) continue;
    if (slot.iterations > limits.max_iterations) continue;
    RETURN_IF_ERROR(Pbkdf2(h.hash, passphrase, slot.salt, slot.iterations, slot_key));
    RETURN_IF_ERROR(file.PRead(base + uint64_t{slot.key_offset_sector} * kSectorSize, split));
    ASSIGN_OR_RETURN(auto cipher, SlotCipher(h, slot_key));
    RETURN_IF_ERROR(cipher->Decrypt(0, split));
    std::vector<std::byte> key = AfMerge(h.hash, split, h.key_bytes, kLuksStripes);
    Status st;
    std::array<std::byte, 20> digest = MasterKeyDigest(h, key, &st);
    if (st.ok() && digest == h.mk_digest) {
      Wipe(split);
      Wipe(slot_key);
      return key;
    }
    Wipe(key);
    RETURN_IF_ERROR(st);
  }
  Wipe(split);
  Wipe(slot_key);
  return Status::Error(ErrorKind::kInvalidArgument, EPERM, "Invalid password, cannot unlock any keyslot");
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
  ASSIGN_OR_RETURN(uint64_t ips, Pbkdf2IterationsPerSecond(h.hash, h.key_bytes));
  if (opts.iter_time_ms && ips > UINT64_MAX / opts.iter_time_ms)
    return Status::InvalidArgument("PBKDF iterations would overflow");
  uint64_t iters = std::max<uint64_t>(ips * opts.iter_time_ms / 1000 / 8, kMinIterations);
  if (iters > UINT32_MAX)
    return Status::InvalidArgument("PBKDF iterations {} larger than {}", iters, UINT32_MAX);
  h.mk_digest_iterations = static_cast<uint32_t>(iters);
  Status st;
  h.mk_digest = MasterKeyDigest(h, out.master_key, &st);
  RETURN_IF_ERROR(st);

  const uint32_t split_sectors = h.KeyMaterialSectors();
  for (size_t i = 0; i < kLuksSlots; i++) {
    h.slots[i].key_offset_sector = kHeaderSectors + static_cast<uint32_t>(i) * split_sectors;
    h.slots[i].stripes = kLuksStripes;
  }
  h.payload_offset_sector = kHeaderSectors + kLuksSlots * split_sectors;

  // Slot 0: the passphrase's key protects the split master key.
  LuksSlot& slot = h.slots[0];
  RandomBytes(slot.salt);
  ASSIGN_OR_RETURN(ips, Pbkdf2IterationsPerSecond(h.hash, h.key_bytes));
  if (opts.iter_time_ms && ips > UINT64_MAX / opts.iter_time_ms)
    return Status::InvalidArgument("PBKDF iterations would overflow");
  iters = std::max<uint64_t>(ips * opts.iter_time_ms / 1000, kMinIterations);
  if (iters > UINT32_MAX)
    return Status::InvalidArgument("PBKDF iterations {} larger than {}", iters, UINT32_MAX);
  slot.iterations = static_cast<uint32_t>(iters);
  std::vector<std::byte> slot_key(h.key_bytes);
  RETURN_IF_ERROR(Pbkdf2(h.hash, passphrase, slot.salt, slot.iterations, slot_key));
  std::vector<std::byte> split = AfSplit(h.hash, out.master_key, kLuksStripes);
  auto cipher = SlotCipher(h, slot_key);
  Wipe(slot_key);
  if (!cipher.ok()) return cipher.error();
  RETURN_IF_ERROR((*cipher)->Encrypt(0, split));
  // The area first (truncated to its size), then the key material, then the header that
  // names it active: a crash leaves no header pointing at missing key material.
  ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  if (file_size < base + uint64_t{h.payload_offset_sector} * kSectorSize)
    RETURN_IF_ERROR(file.Truncate(base + uint64_t{h.payload_offset_sector} * kSectorSize));
  RETURN_IF_ERROR(file.PWrite(base + uint64_t{slot.key_offset_sector} * kSectorSize, split, IoTag::kHeader));
  Wipe(split);
  slot.active = true;
  RETURN_IF_ERROR(file.PWrite(base, h.Encode(), IoTag::kHeader));
  return out;
}

}  // namespace vimgfs::crypto

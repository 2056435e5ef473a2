// libFuzzer target for LUKS1 headers (src/crypto/luks.cc): the input is the start of a
// luks image (header and key material). The header is parsed and validated; a valid one
// is unlocked with the seeds' passphrase "abc" (PBKDF2 runs over 5000 iterations are
// refused, so a mutated count cannot stall the run), and an unlocked key decrypts the
// payload's first sectors as the format would.
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "crypto/luks.h"
#include "vimgfs/env.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vimgfs;
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  auto header = crypto::ParseLuksHeader(bytes, size);
  if (!header.ok()) return 0;
  (void)header->Encode();
  auto env = NewMemEnv();
  auto file = env->Create("fuzz.luks");
  if (!file.ok() || !(*file)->PWrite(0, bytes).ok()) return 0;
  constexpr std::string_view kPass = "abc";
  auto key =
      crypto::UnlockLuks(*header, **file, 0, std::as_bytes(std::span(kPass)), {.max_iterations = 5000});
  if (!key.ok()) return 0;
  auto cipher = crypto::SectorCipher::Create(header->cipher, *key);
  if (!cipher.ok()) return 0;
  std::vector<std::byte> sectors(4 * crypto::kSectorSize);
  if ((*file)->PRead(uint64_t{header->payload_offset_sector} * crypto::kSectorSize, sectors).ok())
    (void)(*cipher)->Decrypt(0, sectors);
  return 0;
}

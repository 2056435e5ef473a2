// qcow's legacy AES key (qcow_aes.h).
#include "crypto/qcow_aes.h"

#include <array>
#include <cstring>

#include "crypto/secrets.h"

namespace vimgfs::crypto {

Result<std::unique_ptr<SectorCipher>> OpenQcowAesCipher(const SecretLookup& secrets,
                                                        const std::string& key_secret, const char* param) {
  if (key_secret.empty()) return Status::InvalidArgument("Parameter '{}' is required for cipher", param);
  ASSIGN_OR_RETURN(std::string pass, LookupPassphrase(secrets, key_secret));
  // qemu copies the password as a C string: up to its first NUL, at most 16 bytes.
  std::array<std::byte, 16> key{};
  std::memcpy(key.data(), pass.data(), std::min<size_t>(strnlen(pass.c_str(), pass.size()), key.size()));
  Wipe(std::as_writable_bytes(std::span(pass)));
  CipherSpec spec;
  ASSIGN_OR_RETURN(spec.alg, CipherAlg::Named("aes-128"));
  spec.mode = CipherMode::kCbc;
  spec.ivgen = IvGen::kPlain64;
  auto cipher = SectorCipher::Create(spec, key);
  Wipe(key);
  return cipher;
}

}  // namespace vimgfs::crypto

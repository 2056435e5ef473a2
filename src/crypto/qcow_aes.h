// The legacy AES encryption of qcow and qcow2 (crypt_method 1): AES-128 in CBC mode, the
// key the passphrase's first 16 bytes (zero-padded), each sector's IV its guest sector
// number. Weak (no key derivation, guest-sector IVs); qemu reads and still creates it, so
// vimgfs does too. docs/ARCHITECTURE.md, "Encryption".
#pragma once

#include <memory>
#include <string>

#include "crypto/cipher.h"
#include "vimgfs/format.h"

namespace vimgfs::crypto {

// The cipher for the secret `key_secret` names; without one, "Parameter '<param>' is
// required for cipher".
Result<std::unique_ptr<SectorCipher>> OpenQcowAesCipher(const SecretLookup& secrets,
                                                        const std::string& key_secret, const char* param);

}  // namespace vimgfs::crypto

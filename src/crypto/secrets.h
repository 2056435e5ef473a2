// qemu's secret objects (`--object secret,id=ID,data=...|file=...[,format=base64]`): the
// passphrases of encrypted images, named by ID in key-secret= options. The front ends add
// what the command line gives; formats look secrets up by ID through SecretLookup. A
// secret's value never appears in an error message.
#pragma once

#include <map>
#include <string>

#include "vimgfs/format.h"

namespace vimgfs::crypto {

class SecretStore {
 public:
  // Takes one --object argument. A secret is parsed and kept (true); another object type
  // (qemu's iothread, throttle-group, ...) changes nothing here (false). Errors read as
  // qemu-img's.
  Result<bool> AddObject(const std::string& spec);
  Result<std::string> Get(const std::string& id) const;
  SecretLookup Lookup() const {
    return [this](const std::string& id) { return Get(id); };
  }
  // The secrets of this process's command line.
  static SecretStore& Process();

 private:
  std::map<std::string, std::string> secrets_;
};

// The passphrase the secret `id` holds, looked up as qemu looks up key-secret= secrets: it
// must be valid UTF-8 ("Data from secret X is not valid UTF-8").
Result<std::string> LookupPassphrase(const SecretLookup& secrets, const std::string& id);

// Overwrites the value of a data= key of an --object argument in place, so that
// /proc/PID/cmdline (ps, top) no longer shows it once parsed.
void ScrubSecretData(char* arg);

}  // namespace vimgfs::crypto

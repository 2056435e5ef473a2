// Opening an image to serve it to clients for a while (the FUSE mount, the nbdkit
// plugin): an overlay created or reused on request, a file that cannot be written served
// read-only with a warning, a format that cannot write refused up front (rather than every
// write failing later), and qemu's locks taken on every file of the chain.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "vimgfs/image.h"

namespace vimgfs {

struct ServeOptions {
  std::string image;
  std::string format;    // empty: probe
  std::string overlay;   // qcow2 file receiving the writes (created if absent); image untouched
  std::string snapshot;  // qcow2 internal snapshot, read-only view
  bool read_only = false;
  bool untrusted = false;
  std::optional<uint64_t> cache_bytes;
  bool direct_io = false;                  // image files around the host's page cache (Env::DefaultDirect)
  std::string key_secret;                  // OpenOptions::key_secret
  bool open_backing = true;                // OpenOptions::open_backing
  std::string data_file;                   // OpenOptions::data_file
  std::vector<BackingSpec> backing_specs;  // OpenOptions::backing_specs
  SecretLookup secrets;                    // OpenOptions::secrets
  std::function<void(const std::string&)> warn;  // one line, no prefix
  // How to serve an image whose format cannot be written in place, in the front end's words.
  std::string cannot_write_hint =
      "open it read-only, write to an overlay, or convert it (vimgfs convert -O qcow2)";
};

// A front end's cache=MODE option (the mount's -o cache=, the nbdkit plugin's cache=):
// true for none (ServeOptions::direct_io), false for writeback; else one error line.
Result<bool> DirectIoForCacheMode(const std::string& mode);

// The image (or overlay) opened and locked.
Result<std::unique_ptr<Image>> OpenForServing(const ServeOptions& options);

}  // namespace vimgfs

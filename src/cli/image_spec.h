// Image names as qemu-img takes them on its command line besides a plain file name:
// `json:{...}` (any command) and the key=value lists of --image-opts. Both describe a
// format driver over the file protocol or qemu's nbd driver (server.*, export: turned
// into the NBD URI vimgfs opens); vimgfs reads the driver, the file name, a null
// backing file or what backing.* says of the backing chain (driver, file name, key
// secret), read-only and force-share, qcow2's data file, and accepts the tuning options qemu's drivers
// take (cache sizes, discard passing, overlap checks, aio, locking), which change nothing
// here. The mount takes them too: cmd_mount.cc reads the spec into the mount's plain
// fields before src/fuse sees them. Names found inside images are never read this way (docs/ARCHITECTURE.md,
// "Names inside images"): only the user's own command line.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs::cli {

struct ImageSpec {
  std::string format;       // the format driver; "raw" for the file protocol alone
  std::string protocol;     // "file" or "nbd" when the spec is that protocol alone (qemu's
                            // info names it as the format)
  std::string filename;     // the host file
  bool no_backing = false;  // "backing": null
  bool read_only = false;
  std::optional<bool> force_share;   // given in the spec
  bool no_locks = false;             // file.locking=off: the user takes no lock, even to write
  std::optional<bool> direct;        // cache.direct (or file.cache.direct): O_DIRECT or not
  std::string key_secret;            // the ID of the --object secret that unlocks the image
  std::string data_file;             // qcow2's external data file (data-file.filename)
  std::vector<BackingSpec> backing;  // backing.*, backing.backing.*, ...
  Status invalid;                    // what cannot be opened as asked (checked after -U)
};

// Whether a command-line image name is a json: pseudo-protocol name.
bool IsJsonName(const std::string& name);
// Parses `json:{...}` (qemu's JSON, single-quoted strings included) or, with image_opts, a
// key=value list ("driver=qcow2,file.filename=a.qcow2"; ",," is a comma in a value).
// Errors read as qemu-img's.
Result<ImageSpec> ParseImageSpec(const std::string& text, bool image_opts);

}  // namespace vimgfs::cli

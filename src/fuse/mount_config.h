// What `vimgfs [mount] [options] IMAGE MOUNTPOINT` asked for, parsed from the command line
// the way FUSE file systems take it: options before or after the positionals, `-o` lists
// that mix vimgfs options (ro, format=, overlay=, ...) with FUSE/mount(8) options
// (allow_other, dev, suid, noauto, ...). mount.fuse3 runs `vimgfs IMAGE MNT -o OPTS` for
// `mount -t fuse.vimgfs` and for fstab lines.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs::mount {

struct MountConfig {
  std::string image;
  std::string mountpoint;
  bool read_only = false;
  std::string format;    // empty: probe
  std::string overlay;   // qcow2 file receiving the writes; IMAGE stays untouched
  std::string snapshot;  // qcow2 internal snapshot, read-only view
  bool untrusted = false;
  bool foreground = false;
  bool debug = false;
  bool single_threaded = false;
  bool detect_zeroes = true;    // whole zero clusters written become WriteZeroes
  bool partitions = true;       // p1, p2, ... beside disk.raw
  bool writeback_cache = true;  // the kernel's writeback cache for buffered writers
  bool direct_io = false;       // cache=none: image files opened O_DIRECT (Env::DefaultDirect)
  std::optional<uint64_t> cache_bytes;
  // --object arguments (qemu's secret objects) and the ID of the secret that unlocks an
  // encrypted image (--key-secret, -o key_secret=).
  std::vector<std::string> objects;
  std::string key_secret;
  // --image-opts: IMAGE is a key=value list, as a json: name always is. The command line
  // front end reads either into image and format and the fields below.
  bool image_opts = false;
  bool open_backing = true;                // false: the spec says "backing": null
  std::string data_file;                   // qcow2's data file named by the spec
  std::vector<BackingSpec> backing_specs;  // backing.* of the spec
  // Options handed to libfuse's -o (allow_other, fsname=, dev, suid, ...), one per entry.
  std::vector<std::string> fuse_options;
  bool help = false;
  bool version = false;
};

// Parses argv[1..argc) (argv[0] is "mount" or the program name). Errors name the bad
// argument. With --help or --version set, positionals are not required.
Result<MountConfig> ParseMountArgs(int argc, char** argv);

// The --help text.
std::string MountUsage(const std::string& prog);

}  // namespace vimgfs::mount

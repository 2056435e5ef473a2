// Runs a mount: opens and locks the image (creating an overlay if asked), mounts, goes
// to the background once the mount is ready, serves until unmounted or signalled, then
// flushes, marks the image clean and closes it.
#pragma once

#include "fuse/mount_config.h"

namespace vimgfs::mount {

// Returns the process exit code: 0 after a clean unmount (also on SIGINT/SIGTERM), 1 when
// the image cannot be opened, locked or mounted (reported on stderr before backgrounding)
// or could not be closed cleanly.
int RunMount(const MountConfig& config);

}  // namespace vimgfs::mount

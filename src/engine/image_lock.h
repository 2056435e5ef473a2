// qemu-compatible locks on the host files of open images (see io/lock.h for the scheme).
#pragma once

#include "vimgfs/image.h"
#include "vimgfs/status.h"

namespace vimgfs {

// Locks the image's own host files (the image file, VMDK extents, a qcow2 data file) as a
// writer when `write`, else as a reader. With raw_readers_share_writes a raw image read
// lets others write it, as qemu-img's readers other than convert's do (LockImageSharingWrites).
Status LockImageFiles(Image& img, bool write, bool raw_readers_share_writes = false);

// Locks the top image (as a writer when it is writable) and every backing image shared,
// as qemu does for a chain it has open.
Status LockImageChain(Image& top, bool raw_readers_share_writes = false);

}  // namespace vimgfs

// Image locking compatible with qemu's file-posix byte-range locks (qemu 7.2).
//
// qemu marks each block permission a user holds and each one it refuses to share with a
// shared (read) OFD lock on one byte of the image file:
//   byte 100 + bit  "I hold permission bit"
//   byte 200 + bit  "I do not share permission bit"
// with bits CONSISTENT_READ = 0, WRITE = 1, WRITE_UNCHANGED = 2, RESIZE = 3. Before using
// an image a process checks that nobody else holds a permission it refuses to share and
// that nobody refuses a permission it holds (F_OFD_GETLK with a write-lock probe).
//
// vimgfs takes what qemu takes for a qcow2 image (a format driver's view of its file):
//   writer: holds CONSISTENT_READ, WRITE, RESIZE;  shares neither WRITE nor RESIZE
//   reader: holds CONSISTENT_READ;                 shares neither WRITE nor RESIZE
// so qemu-img/qemu-io refuse to write an image vimgfs has open (and to open it at all
// without -U while vimgfs writes), and vimgfs refuses an image qemu writes.
//
// OFD locks belong to the open file description: they survive fork() (the mount's
// daemonizing) and are dropped when the last descriptor of the File is closed.
#pragma once

#include "vimgfs/env.h"
#include "vimgfs/status.h"

namespace vimgfs {

// qemu's permission bits (include/block/block-common.h, BLK_PERM_*).
enum class LockPerm : int {
  kConsistentRead = 0,
  kWrite = 1,
  kWriteUnchanged = 2,
  kResize = 3,
};

// Takes the locks for a reader (write = false) or a writer, then checks for conflicts with
// other processes. On conflict the locks just taken are released and kBusy is returned:
// "'a.qcow2': Failed to get "write" lock: is another process using the image?".
// A File without a descriptor (in-memory) or a host without OFD locks: Ok, nothing done.
//
// A conflict is retried for up to wait_ms (polling every 20 ms): `fusermount3 -u` returns
// before the vimgfs daemon has closed the image and dropped its locks, so a command run on
// the next line of a script would otherwise race the exiting daemon.
Status LockImage(File& f, bool write, int wait_ms = 1000);

// LockImage for a reader that lets others write: what qemu-img's readers (info, map,
// check, compare, measure, dd, bench) take on a raw image, whose file is all data (no
// metadata to keep consistent): only CONSISTENT_READ held, nothing refused.
Status LockImageSharingWrites(File& f, int wait_ms = 1000);

// LockImage for a writer that also refuses to share reading (qemu's crypto driver while
// it rewrites LUKS key slots): nobody else may have the file open at all.
Status LockImageExclusive(File& f, int wait_ms = 1000);

// Drops every lock LockImage took on f (closing f does the same).
void UnlockImage(File& f);

// Whether another process holds locks on path that stop a writer (write) or a reader.
// Used by tests and diagnostics; Ok when free.
Status CheckImageLockable(int fd, const std::string& path, bool write);

}  // namespace vimgfs

// The partition files of a directory mount: p1, p2, ... beside disk.raw, each a window
// onto its byte range of the disk (docs/ARCHITECTURE.md, "Partition files").
//
// The guest may rewrite its partition table through disk.raw (fdisk, sgdisk, parted). A
// write that touches the table's sectors marks the list stale; the next directory lookup
// or listing reads the table again. A partition whose range changed gets a new inode:
// the old inode keeps its old range, as an open partition of a Linux block device keeps
// its range until the table is re-read, so a file system mounted on it is never moved
// under its feet. Old inodes are remembered up to kMaxRetired; older ones vanish (their
// descriptors then fail with ESTALE).
//
// Thread-safety: all members may be called from any FUSE worker thread at once. The hot
// paths (Find, NoteWrite) take no lock for the current table.
#pragma once

#include <fuse_lowlevel.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "guest/partition_table.h"
#include "vimgfs/image.h"

namespace vimgfs::mount {

// A file of the mount: its inode and its byte range of the virtual disk.
struct FileView {
  fuse_ino_t ino = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct PartitionFile {
  std::string name;  // "p<number>"
  FileView view;
};

class PartitionFiles {
 public:
  static constexpr fuse_ino_t kFirstIno = 3;  // 1: the root, 2: disk.raw
  static constexpr size_t kMaxRetired = 4096;

  // enabled false: no partition files at all. log receives one line per table problem.
  PartitionFiles(Image* image, bool enabled, std::function<void(const std::string&)> log);

  // The current files, reading the table again first if a write touched it.
  std::vector<PartitionFile> List();
  // The view of a partition inode, current or retired.
  std::optional<FileView> Find(fuse_ino_t ino) const;
  // Called after every write or discard of [offset, offset + length) of the disk. The
  // table's ranges include the disk's edges, so a table written onto a blank disk counts.
  void NoteWrite(uint64_t offset, uint64_t length) {
    if (!enabled_ || stale_.load(std::memory_order_acquire)) return;  // read again anyway
    if (Current()->table.Touches(offset, length)) stale_.store(true, std::memory_order_release);
  }

 private:
  struct Layout {
    guest::PartitionTable table;
    std::vector<PartitionFile> files;
  };
  std::shared_ptr<const Layout> Current() const { return layout_.load(std::memory_order_acquire); }
  void Refresh();

  Image* image_;
  const bool enabled_;
  const uint64_t disk_size_;
  std::function<void(const std::string&)> log_;
  std::atomic<std::shared_ptr<const Layout>> layout_;
  std::atomic<bool> stale_{true};

  mutable std::mutex mu_;  // guards the members below and serializes Refresh
  fuse_ino_t next_ino_ = kFirstIno;
  std::map<fuse_ino_t, FileView> retired_;
  std::deque<fuse_ino_t> retired_order_;
  std::vector<std::string> last_notes_;
};

}  // namespace vimgfs::mount

// The guest's partition table (MBR with extended/logical partitions, GPT), read from the
// raw view of a disk. The mount shows one file per partition from it (docs/ARCHITECTURE.md,
// "Partition files"); `vimgfs run` picks the partition to mount with it.
//
// The table is guest data, as hostile as any image field: every entry is checked against
// the disk, EBR chains are bounded and loop-free, GPT headers and arrays must pass their
// CRCs. A table that is not valid reads as "no table" with a reason, never as an error;
// only a failed read of the disk is an error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/status.h"

namespace vimgfs::guest {

struct Partition {
  unsigned number = 0;    // MBR: 1-4 primary slots, 5.. logicals in chain order; GPT: entry index + 1
  uint64_t offset = 0;    // bytes from the start of the disk
  uint64_t length = 0;    // bytes, never past the end of the disk
  bool extended = false;  // an MBR extended partition (the container of the logicals)
  uint8_t mbr_type = 0;   // MBR system id (0 for GPT)
  std::string label;      // GPT partition name (UTF-8); empty for MBR
};

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct PartitionTable {
  enum class Kind { kNone, kMbr, kGpt };
  Kind kind = Kind::kNone;
  uint32_t sector_size = 512;
  std::vector<Partition> partitions;  // ascending by number
  // Where the table lives: a write overlapping one of these ranges may change it. Always
  // holds the first and last kWatchedEdge bytes of the disk, so a table written onto a
  // blank disk is seen too.
  std::vector<ByteRange> metadata;
  // Why a table, or some of its entries, were not taken (one line each, for the log).
  std::vector<std::string> notes;

  bool Touches(uint64_t offset, uint64_t length) const;
};

// The head and tail of the disk where MBR, GPT headers and GPT arrays normally live
// (both for 512- and 4096-byte sectors).
inline constexpr uint64_t kWatchedEdge = 64 * 1024;
// The first and last kWatchedEdge bytes of a disk of disk_size bytes (where a new table
// would be written): every PartitionTable's metadata starts with these.
std::vector<ByteRange> EdgeRanges(uint64_t disk_size);

// At most this many partitions are taken (the kernel's limit for one disk).
inline constexpr unsigned kMaxPartitions = 256;

// Reads bytes [offset, offset + out.size()) of the disk; the range is inside the disk.
using DiskReader = std::function<Status(uint64_t offset, std::span<std::byte> out)>;

// Parses the table of a disk of disk_size bytes. A GPT is used when sector 0 holds a
// protective (0xEE) entry and a valid primary or backup GPT header is found, with 512- or
// 4096-byte sectors; otherwise the MBR. Errors only when a read fails.
Result<PartitionTable> ReadPartitionTable(const DiskReader& read, uint64_t disk_size);

}  // namespace vimgfs::guest

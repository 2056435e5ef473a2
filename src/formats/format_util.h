// Small pieces several format drivers share.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/format.h"

namespace vimgfs {

// A boolean create option in qemu's syntax (on/off, yes/no, true/false, y/n).
Result<bool> ParseBoolOption(const std::string& key, const std::string& value);

// A random (version 4) UUID. guid_order: Microsoft's GUID layout, as VirtualBox and VHDX
// store it (the first three fields little-endian); otherwise RFC 4122 byte order.
std::array<std::byte, 16> RandomUuid(bool guid_order);

// Appends mappings for guest [off, off+len) of a disk stored plainly in `file` at host
// offset off + host_base: data runs and holes (kZero), as the file's extents say, so map
// and sparse copies see the holes. Past the end of the file reads as zeros.
Status LookupPlainExtents(File& file, uint64_t host_base, uint64_t off, uint64_t len, bool writable,
                          std::vector<Mapping>* out);

// Writes zeros over [off, off+len) of `file`: qemu's preallocation=full, which allocates
// the host blocks by writing them (a reserved, unwritten range would map as a hole).
Status WriteZeros(File& file, uint64_t off, uint64_t len, IoTag tag = IoTag::kData);

// Writes the 512-byte sectors of `table` named in `dirty` to `file` at base + their offset,
// one write per run of consecutive sectors, removing each run from `dirty` once written.
Status WriteDirtySectors(File& file, uint64_t base, std::span<const std::byte> table,
                         std::set<uint64_t>* dirty, IoTag tag);

}  // namespace vimgfs

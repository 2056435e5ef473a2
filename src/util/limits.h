// Hard limits on what an image may make us allocate or follow, each with its reason.
#pragma once

#include <algorithm>
#include <cstdint>

namespace vimgfs::limits {

// qcow2 cluster_bits: 9..21 (512 B .. 2 MiB), the range qemu accepts.
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
// Host offsets fit the 56-bit offset field of qcow2 table entries.
inline constexpr uint64_t kMaxHostOffset = 1ull << 56;
// Largest virtual disk: 2^61 bytes keeps offset arithmetic in int64 with room (qemu: 2^63-1
// with 512 alignment; its QCOW_MAX_... limit is 2^56 for the L1 geometry).
inline constexpr uint64_t kMaxVirtualSize = 1ull << 61;
// L1 table: qemu's QCOW_MAX_L1_SIZE is 32 MiB of entries (4M entries).
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
// Refcount table: qemu's QCOW_MAX_REFTABLE_SIZE is 8 MiB.
inline constexpr uint64_t kMaxRefTableBytes = 8ull << 20;
// Snapshot table: qemu's QCOW_MAX_SNAPSHOTS 65536, and at most 64 MiB of table.
inline constexpr uint64_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
// A header extension or a name we read into memory.
inline constexpr uint64_t kMaxBackingNameBytes = 1023;  // qemu: 1023
inline constexpr uint64_t kMaxHeaderExtensionBytes = 64ull << 10;
// Backing chains deeper than this are refused (loops are refused at any depth).
inline constexpr int kMaxChainDepth = 64;
// Metadata cache per image unless the user sets another cap.
inline constexpr uint64_t kDefaultCacheBytes = 32ull << 20;
// A VMDK descriptor is read whole into memory.
inline constexpr uint64_t kMaxDescriptorBytes = 1ull << 20;
// VMDK grain directory / VDI block map held in memory.
inline constexpr uint64_t kMaxMapBytes = 256ull << 20;
// qcow2 persistent dirty bitmaps loaded at open, all together (their dirty chunks: clean
// parts take no memory); an image needing more has them dropped as a program without
// bitmap support drops them.
inline constexpr uint64_t kMaxBitmapMemory = 256ull << 20;
// Largest compressed unit we inflate (qcow2 2 MiB cluster; VMDK grain up to 2 MiB here).
inline constexpr uint64_t kMaxCompressedUnit = 2ull << 20;
// dmg chunks: qemu's DMG_LENGTHS_MAX caps what a chunk stores and inflates to (64 MiB).
inline constexpr uint64_t kMaxDmgChunkBytes = 64ull << 20;
// dmg block tables: qemu reads at most 16 MiB of XML property list; a resource fork's data
// (qemu: no cap) is read whole, up to 64 MiB; at most 1M chunks (a 1 TiB disk in 1 MiB chunks).
inline constexpr uint64_t kMaxDmgPlistBytes = 16ull << 20;
inline constexpr uint64_t kMaxDmgTableBytes = 64ull << 20;
inline constexpr uint64_t kMaxDmgChunks = 1ull << 20;
// A cloop block: qemu's MAX_BLOCK_SIZE, 64 MiB inflated; its compressed form may take twice
// that (qemu refuses larger gaps in the offsets table).
inline constexpr uint64_t kMaxCloopBlock = 64ull << 20;
inline constexpr uint64_t kMaxCloopCompressedBlock = 2 * kMaxCloopBlock;
// The largest unit the engine inflates for any format, and the most it reads for one:
// cloop's blocks (and dmg's chunks) are the largest. Each reading thread keeps its last unit.
inline constexpr uint64_t kMaxInflatedUnit = std::max(kMaxCloopBlock, kMaxDmgChunkBytes);
inline constexpr uint64_t kMaxInflatedInput = kMaxCloopCompressedBlock + 4096;

}  // namespace vimgfs::limits

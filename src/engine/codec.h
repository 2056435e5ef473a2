// Compression codecs for compressed clusters, grains and chunks (zlib/deflate, zstd; bzip2
// for reading only).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs {

// Decompresses `in` into exactly out.size() bytes. Trailing input is ignored (qcow2
// compressed clusters are stored in whole sectors). Fails with kCorrupt when the stream
// is bad or produces fewer bytes than out.size(); with `must_end` (Mapping::stream_ends_unit,
// zlib streams only) also when the stream does not end exactly at out.size() bytes.
Status Decompress(Codec codec, std::span<const std::byte> in, std::span<std::byte> out,
                  bool must_end = false);

// Compresses `in`; returns the stream, or an empty vector when it would not be smaller
// than max_out bytes (the caller then stores the data uncompressed). level < 0: default.
Result<std::vector<std::byte>> Compress(Codec codec, std::span<const std::byte> in, size_t max_out,
                                        int level = -1);

}  // namespace vimgfs

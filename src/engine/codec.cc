#include "engine/codec.h"

#include <zlib.h>
#include <zstd.h>

namespace vimgfs {
namespace {

Status InflateInto(std::span<const std::byte> in, std::span<std::byte> out, int window_bits) {
  z_stream zs{};
  if (inflateInit2(&zs, window_bits) != Z_OK) return Status::Corrupt("inflateInit failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  int r = inflate(&zs, Z_FINISH);
  size_t produced = out.size() - zs.avail_out;
  inflateEnd(&zs);
  // Z_BUF_ERROR with a full buffer means the stream goes on past the unit: qemu accepts it.
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && produced == out.size())
    return Status::Ok();
  return Status::Corrupt("compressed data is invalid (inflate returned {} after {} of {} bytes)", r,
                         produced, out.size());
}

Status ZstdInto(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  if (!dctx) return Status::Corrupt("zstd context allocation failed");
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  // Frames may be split; keep going until the output is full or the input ends.
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream(dctx, &ob, &ib);
    if (ZSTD_isError(r)) {
      ZSTD_freeDCtx(dctx);
      return Status::Corrupt("compressed data is invalid (zstd: {})", ZSTD_getErrorName(r));
    }
    if (ib.pos == ib.size && ob.pos < ob.size && r != 0) {
      // Needs more input than the stored length holds.
      break;
    }
    if (r == 0 && ib.pos == ib.size) break;
  }
  ZSTD_freeDCtx(dctx);
  if (ob.pos != ob.size)
    return Status::Corrupt("compressed data is invalid (zstd produced {} of {} bytes)", ob.pos, ob.size);
  return Status::Ok();
}

}  // namespace

Status Decompress(Codec codec, std::span<const std::byte> in, std::span<std::byte> out) {
  switch (codec) {
    case Codec::kDeflateRaw:
      return InflateInto(in, out, -15);
    case Codec::kZlib:
      return InflateInto(in, out, 15);
    case Codec::kZstd:
      return ZstdInto(in, out);
    case Codec::kNone:
      break;
  }
  return Status::Corrupt("unknown compression codec");
}

Result<std::vector<std::byte>> Compress(Codec codec, std::span<const std::byte> in, size_t max_out,
                                        int level) {
  std::vector<std::byte> out;
  if (codec == Codec::kDeflateRaw || codec == Codec::kZlib) {
    z_stream zs{};
    // qcow2 uses a 4 KiB window (-12), as qemu writes it; VMDK a zlib stream.
    int wbits = codec == Codec::kDeflateRaw ? -12 : 15;
    if (deflateInit2(&zs, level < 0 ? Z_DEFAULT_COMPRESSION : level, Z_DEFLATED, wbits, 9,
                     Z_DEFAULT_STRATEGY) != Z_OK)
      return Status::Io("deflateInit failed");
    out.resize(std::max<size_t>(max_out, 64));
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    zs.avail_in = static_cast<uInt>(in.size());
    zs.next_out = reinterpret_cast<Bytef*>(out.data());
    zs.avail_out = static_cast<uInt>(out.size());
    int r = deflate(&zs, Z_FINISH);
    size_t n = out.size() - zs.avail_out;
    deflateEnd(&zs);
    if (r != Z_STREAM_END || n >= max_out) return std::vector<std::byte>{};
    out.resize(n);
    return out;
  }
  if (codec == Codec::kZstd) {
    out.resize(ZSTD_compressBound(in.size()));
    size_t n = ZSTD_compress(out.data(), out.size(), in.data(), in.size(),
                             level < 0 ? ZSTD_CLEVEL_DEFAULT : level);
    if (ZSTD_isError(n) || n >= max_out) return std::vector<std::byte>{};
    out.resize(n);
    return out;
  }
  return Status::InvalidArgument("unknown compression codec");
}

}  // namespace vimgfs

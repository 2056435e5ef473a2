#include "engine/codec.h"

#include <bzlib.h>
#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

#include <memory>

namespace vimgfs {
namespace {

// Compression contexts are costly to set up (hash tables of hundreds of KiB that would be
// allocated and cleared per cluster), so each thread keeps its own for its lifetime.
struct ThreadCodecs {
  struct FreeCompressor {
    void operator()(libdeflate_compressor* c) const { libdeflate_free_compressor(c); }
  };
  struct FreeDecompressor {
    void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
  };
  struct FreeCCtx {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
  };
  struct FreeDCtx {
    void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
  };
  std::unique_ptr<libdeflate_compressor, FreeCompressor> deflate;
  int deflate_level = -1;
  std::unique_ptr<libdeflate_decompressor, FreeDecompressor> inflate;
  std::unique_ptr<ZSTD_CCtx, FreeCCtx> zstd_c;
  std::unique_ptr<ZSTD_DCtx, FreeDCtx> zstd_d;

  libdeflate_compressor* Deflater(int level) {
    if (!deflate || deflate_level != level) {
      deflate.reset(libdeflate_alloc_compressor(level));
      deflate_level = level;
    }
    return deflate.get();
  }
  libdeflate_decompressor* Inflater() {
    if (!inflate) inflate.reset(libdeflate_alloc_decompressor());
    return inflate.get();
  }
  ZSTD_CCtx* ZstdCompressor() {
    if (!zstd_c) zstd_c.reset(ZSTD_createCCtx());
    return zstd_c.get();
  }
  ZSTD_DCtx* ZstdDecompressor() {
    if (!zstd_d) zstd_d.reset(ZSTD_createDCtx());
    return zstd_d.get();
  }
  // Output scratch, left uninitialized: a result is copied out at its real size, so
  // callers holding many results do not each keep a worst-case buffer.
  std::byte* Scratch(size_t n) {
    if (scratch_size < n) {
      scratch.reset(new std::byte[n]);
      scratch_size = n;
    }
    return scratch.get();
  }
  std::unique_ptr<std::byte[]> scratch;
  size_t scratch_size = 0;
};

ThreadCodecs& Codecs() {
  thread_local ThreadCodecs codecs;
  return codecs;
}

// zlib's streaming inflate: the lenient path, for streams libdeflate's whole-buffer
// decoder does not take as they are.
// With must_end the stream has to end exactly at out.size() bytes (Z_STREAM_END).
Status InflateInto(std::span<const std::byte> in, std::span<std::byte> out, int window_bits, bool must_end) {
  z_stream zs{};
  if (inflateInit2(&zs, window_bits) != Z_OK) return Status::Corrupt("inflateInit failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  int r = inflate(&zs, Z_FINISH);
  size_t produced = out.size() - zs.avail_out;
  inflateEnd(&zs);
  // Z_BUF_ERROR with a full buffer means the stream goes on past the unit: qemu accepts it,
  // except where the unit must be the whole stream (cloop).
  const bool ended = r == Z_STREAM_END || (!must_end && (r == Z_BUF_ERROR || r == Z_OK));
  if (ended && produced == out.size()) return Status::Ok();
  return Status::Corrupt("compressed data is invalid (inflate returned {} after {} of {} bytes)", r, produced,
                         out.size());
}

// The common case first: one whole stream of exactly out.size() bytes (trailing input,
// such as a qcow2 sector's padding, is ignored), decoded by libdeflate at about twice
// zlib's speed. Anything else goes to zlib, which decides and words the error.
Status DeflateInto(std::span<const std::byte> in, std::span<std::byte> out, bool zlib_wrapper,
                   bool must_end) {
  libdeflate_decompressor* d = Codecs().Inflater();
  if (d) {
    size_t in_used = 0, produced = 0;
    libdeflate_result r = zlib_wrapper ? libdeflate_zlib_decompress_ex(d, in.data(), in.size(), out.data(),
                                                                       out.size(), &in_used, &produced)
                                       : libdeflate_deflate_decompress_ex(d, in.data(), in.size(), out.data(),
                                                                          out.size(), &in_used, &produced);
    // Success means the whole stream was decoded (and its checksum matched).
    if (r == LIBDEFLATE_SUCCESS && produced == out.size()) return Status::Ok();
  }
  return InflateInto(in, out, zlib_wrapper ? 15 : -15, must_end);
}

Status ZstdInto(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* dctx = Codecs().ZstdDecompressor();
  if (!dctx) return Status::Corrupt("zstd context allocation failed");
  ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  // Frames may be split; keep going until the output is full or the input ends.
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream(dctx, &ob, &ib);
    if (ZSTD_isError(r))
      return Status::Corrupt("compressed data is invalid (zstd: {})", ZSTD_getErrorName(r));
    if (ib.pos == ib.size && ob.pos < ob.size && r != 0) break;  // needs more than stored
    if (r == 0 && ib.pos == ib.size) break;
  }
  if (ob.pos != ob.size)
    return Status::Corrupt("compressed data is invalid (zstd produced {} of {} bytes)", ob.pos, ob.size);
  return Status::Ok();
}

// One bzip2 stream that must end exactly at out.size() bytes (as qemu's dmg-bz2 module
// reads a dmg chunk). A stream has no dictionary to keep, so there is no context to reuse.
Status Bzip2Into(std::span<const std::byte> in, std::span<std::byte> out) {
  bz_stream bz{};
  if (BZ2_bzDecompressInit(&bz, 0, 0) != BZ_OK) return Status::Corrupt("bzip2 decoder allocation failed");
  // bzlib counts in unsigned int: units are far below 4 GiB (limits::kMaxInflatedUnit).
  bz.next_in = reinterpret_cast<char*>(const_cast<std::byte*>(in.data()));
  bz.avail_in = static_cast<unsigned>(in.size());
  bz.next_out = reinterpret_cast<char*>(out.data());
  bz.avail_out = static_cast<unsigned>(out.size());
  int r = BZ2_bzDecompress(&bz);
  const size_t produced = out.size() - bz.avail_out;
  BZ2_bzDecompressEnd(&bz);
  if (r == BZ_STREAM_END && produced == out.size()) return Status::Ok();
  if (r == BZ_STREAM_END || r == BZ_OK)
    return Status::Corrupt("compressed data is invalid (bzip2 stream {} after {} of {} bytes)",
                           r == BZ_STREAM_END ? "ended" : "goes on", produced, out.size());
  return Status::Corrupt("compressed data is invalid (bzip2 error {} after {} of {} bytes)", r, produced,
                         out.size());
}

}  // namespace

Status Decompress(Codec codec, std::span<const std::byte> in, std::span<std::byte> out, bool must_end) {
  switch (codec) {
    case Codec::kDeflateRaw:
      return DeflateInto(in, out, false, must_end);
    case Codec::kZlib:
      return DeflateInto(in, out, true, must_end);
    case Codec::kZstd:
      return ZstdInto(in, out);
    case Codec::kBzip2:
      return Bzip2Into(in, out);
    case Codec::kNone:
      break;
  }
  return Status::Corrupt("unknown compression codec");
}

Result<std::vector<std::byte>> Compress(Codec codec, std::span<const std::byte> in, size_t max_out,
                                        int level) {
  if (max_out == 0) return std::vector<std::byte>{};
  ThreadCodecs& codecs = Codecs();
  if (codec == Codec::kDeflateRaw || codec == Codec::kZlib) {
    // RFC 1951 streams (qcow2; the spec sets no window limit, and qemu inflates a cluster
    // in one call, so back-references up to 32 KiB read fine) or RFC 1950 (VMDK).
    libdeflate_compressor* c = codecs.Deflater(level < 0 ? 6 : level);
    if (!c) return Status::Io("cannot allocate a deflate compressor");
    const size_t room = max_out - 1;  // a stream of max_out bytes or more is of no use
    std::byte* out = codecs.Scratch(room);
    size_t n = codec == Codec::kDeflateRaw ? libdeflate_deflate_compress(c, in.data(), in.size(), out, room)
                                           : libdeflate_zlib_compress(c, in.data(), in.size(), out, room);
    return std::vector<std::byte>(out, out + n);  // n == 0: did not fit
  }
  if (codec == Codec::kZstd) {
    ZSTD_CCtx* c = codecs.ZstdCompressor();
    if (!c) return Status::Io("cannot allocate a zstd compressor");
    const size_t room = ZSTD_compressBound(in.size());
    std::byte* out = codecs.Scratch(room);
    size_t n = ZSTD_compressCCtx(c, out, room, in.data(), in.size(), level < 0 ? ZSTD_CLEVEL_DEFAULT : level);
    if (ZSTD_isError(n) || n >= max_out) return std::vector<std::byte>{};
    return std::vector<std::byte>(out, out + n);
  }
  return Status::InvalidArgument("unknown compression codec");
}

}  // namespace vimgfs

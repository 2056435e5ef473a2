// CryptFile: sector encryption under the engine's I/O (crypt_file.h).
#include "crypto/crypt_file.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "util/checked.h"

namespace vimgfs::crypto {
namespace {
// Bytes encrypted or decrypted per step: bounds the scratch buffer of a large request.
constexpr uint64_t kChunk = 1 << 20;
}  // namespace

Status CryptFile::Read(uint64_t off, std::span<std::byte> buf, uint64_t iv_bias) {
  std::vector<std::byte> tmp;
  while (!buf.empty()) {
    const uint64_t start = AlignDown(off, kSectorSize);
    const uint64_t end = std::min(AlignUp(off + buf.size(), kSectorSize), start + kChunk);
    const uint64_t n = std::min<uint64_t>(end - off, buf.size());
    if (start == off && n % kSectorSize == 0) {  // whole sectors: decrypt in the caller's buffer
      std::span<std::byte> dst = buf.first(n);
      RETURN_IF_ERROR(host_.PRead(base_ + start, dst));
      RETURN_IF_ERROR(cipher_->Decrypt(start / kSectorSize + iv_bias, dst));
    } else {
      tmp.resize(end - start);
      RETURN_IF_ERROR(host_.PRead(base_ + start, tmp));
      RETURN_IF_ERROR(cipher_->Decrypt(start / kSectorSize + iv_bias, tmp));
      std::memcpy(buf.data(), tmp.data() + (off - start), n);
    }
    off += n;
    buf = buf.subspan(n);
  }
  return Status::Ok();
}

Status CryptFile::Write(uint64_t off, std::span<const std::byte> buf, uint64_t iv_bias, IoTag tag) {
  std::vector<std::byte> tmp;
  while (!buf.empty()) {
    const uint64_t start = AlignDown(off, kSectorSize);
    const uint64_t end = std::min(AlignUp(off + buf.size(), kSectorSize), start + kChunk);
    const uint64_t n = std::min<uint64_t>(end - off, buf.size());
    RangeLock::Guard g(write_lock_, start, end, true);
    tmp.resize(end - start);
    // A partial first or last sector keeps its other bytes: read and decrypt it.
    if (off != start) {
      RETURN_IF_ERROR(Read(start, std::span(tmp).first(kSectorSize), iv_bias));
    }
    if ((off + n) % kSectorSize && (end - start > kSectorSize || off == start)) {
      RETURN_IF_ERROR(Read(end - kSectorSize, std::span(tmp).last(kSectorSize), iv_bias));
    }
    std::memcpy(tmp.data() + (off - start), buf.data(), n);
    RETURN_IF_ERROR(cipher_->Encrypt(start / kSectorSize + iv_bias, tmp));
    RETURN_IF_ERROR(host_.PWrite(base_ + start, tmp, tag));
    off += n;
    buf = buf.subspan(n);
  }
  return Status::Ok();
}

Result<uint64_t> CryptFile::Size() {
  ASSIGN_OR_RETURN(uint64_t size, host_.Size());
  return size > base_ ? size - base_ : 0;
}

Result<HostExtent> CryptFile::ProbeExtent(uint64_t off) {
  ASSIGN_OR_RETURN(uint64_t size, Size());
  return HostExtent{true, off < size ? size - off : 0};
}

}  // namespace vimgfs::crypto

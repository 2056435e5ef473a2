// A File whose bytes are encrypted on the host: a window of a host file starting at
// `base`, sector n of the window encrypted with the IV of sector n (+ iv_sector_bias), or,
// with guest_iv (qcow's AES), with the IV of the guest sector the engine names through
// PReadFor/PWriteFor.
// Formats hand it to the engine in their mappings, so the engine moves plaintext and never
// knows (docs/ARCHITECTURE.md, "Encryption"). Writes that cover part of a sector read,
// decrypt and re-encrypt the whole sector under a lock on its range, so two writers
// sharing a sector cannot undo each other.
#pragma once

#include <memory>

#include "crypto/cipher.h"
#include "util/range_lock.h"
#include "vimgfs/env.h"

namespace vimgfs::crypto {

class CryptFile final : public File {
 public:
  CryptFile(File& host, uint64_t base, uint64_t iv_sector_bias, std::unique_ptr<SectorCipher> cipher,
            bool guest_iv = false)
      : host_(host), base_(base), iv_bias_(iv_sector_bias), guest_iv_(guest_iv), cipher_(std::move(cipher)) {}

  Status PRead(uint64_t off, std::span<std::byte> buf) override { return Read(off, buf, iv_bias_); }
  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag = IoTag::kData) override {
    return Write(off, buf, iv_bias_, tag);
  }
  // Guest and host offsets of a cluster share their place in a sector: the IV of host
  // sector n is then that of guest sector n + (guest - host) / 512.
  Status PReadFor(uint64_t off, std::span<std::byte> buf, uint64_t guest_off) override {
    return Read(off, buf, guest_iv_ ? guest_off / kSectorSize - off / kSectorSize : iv_bias_);
  }
  Status PWriteFor(uint64_t off, std::span<const std::byte> buf, uint64_t guest_off, IoTag tag) override {
    return Write(off, buf, guest_iv_ ? guest_off / kSectorSize - off / kSectorSize : iv_bias_, tag);
  }
  Status Sync(bool data_only = true) override { return host_.Sync(data_only); }
  Result<uint64_t> Size() override;
  Status Truncate(uint64_t size) override { return host_.Truncate(base_ + size); }
  // A hole would read as zeros on the host and decrypt to noise: never punched.
  Status PunchHole(uint64_t, uint64_t) override {
    return Status::Unsupported("encrypted data is never punched");
  }
  Status Allocate(uint64_t off, uint64_t len) override { return host_.Allocate(base_ + off, len); }
  // Every byte is data: host holes decrypt to noise, as qemu reads them.
  Result<HostExtent> ProbeExtent(uint64_t off) override;
  Result<uint64_t> AllocatedSize() override { return host_.AllocatedSize(); }
  const std::string& path() const override { return host_.path(); }
  bool writable() const override { return host_.writable(); }
  int fd() const override { return host_.fd(); }

 private:
  // iv_bias: added (mod 2^64) to a window sector's number to give its IV's.
  Status Read(uint64_t off, std::span<std::byte> buf, uint64_t iv_bias);
  Status Write(uint64_t off, std::span<const std::byte> buf, uint64_t iv_bias, IoTag tag);

  File& host_;
  const uint64_t base_;
  const uint64_t iv_bias_;
  const bool guest_iv_;
  std::unique_ptr<SectorCipher> cipher_;
  RangeLock write_lock_;  // sector-aligned ranges being rewritten
};

}  // namespace vimgfs::crypto

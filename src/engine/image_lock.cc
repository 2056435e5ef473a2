#include "engine/image_lock.h"

#include "io/lock.h"

namespace vimgfs {

Status LockImageFiles(Image& img, bool write, bool raw_readers_share_writes) {
  const bool sharing = !write && raw_readers_share_writes && img.format() == "raw";
  auto lock = [&](File& f) { return sharing ? LockImageSharingWrites(f) : LockImage(f, write); };
  RETURN_IF_ERROR(lock(img.file()));
  for (File* f : img.host_files())
    if (f != nullptr && f != &img.file()) RETURN_IF_ERROR(lock(*f));
  return Status::Ok();
}

Status LockImageChain(Image& top, bool raw_readers_share_writes) {
  RETURN_IF_ERROR(LockImageFiles(top, !top.read_only(), raw_readers_share_writes));
  for (Image* b = top.backing(); b != nullptr; b = b->backing())
    RETURN_IF_ERROR(LockImageFiles(*b, false, raw_readers_share_writes));
  return Status::Ok();
}

}  // namespace vimgfs

#include "engine/image_lock.h"

#include "io/lock.h"

namespace vimgfs {

Status LockImageFiles(Image& img, bool write) {
  RETURN_IF_ERROR(LockImage(img.file(), write));
  for (File* f : img.host_files())
    if (f != nullptr && f != &img.file()) RETURN_IF_ERROR(LockImage(*f, write));
  return Status::Ok();
}

Status LockImageChain(Image& top) {
  RETURN_IF_ERROR(LockImageFiles(top, !top.read_only()));
  for (Image* b = top.backing(); b != nullptr; b = b->backing()) RETURN_IF_ERROR(LockImageFiles(*b, false));
  return Status::Ok();
}

}  // namespace vimgfs

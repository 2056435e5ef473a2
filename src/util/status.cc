#include "vimgfs/status.h"

namespace vimgfs {

ErrorKind Status::KindForErrno(int err) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return ErrorKind::kNoSpace;
    case EROFS:
    case EACCES:
    case EPERM:
      return err == EROFS ? ErrorKind::kReadOnly : ErrorKind::kIo;
    case ENOENT:
      return ErrorKind::kNotFound;
    case EAGAIN:
      return ErrorKind::kBusy;
    case EINVAL:
      return ErrorKind::kInvalidArgument;
    default:
      return ErrorKind::kIo;
  }
}

}  // namespace vimgfs

// Status and Result<T>: errors travel as values (kind + errno + message), never as
// exceptions. Result mirrors the std::expected API so it can be swapped for it later.
#pragma once

#include <cerrno>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace vimgfs {

enum class ErrorKind {
  kOk,
  kIo,               // the host said no (errno from the OS)
  kInvalidFormat,    // not an image of that format, or a header field out of range
  kUnsupported,      // a valid image using something vimgfs does not do
  kCorrupt,          // a table entry that cannot be right; the image is flagged
  kOutOfRange,       // request outside the virtual disk
  kNoSpace,          // ENOSPC on the host
  kReadOnly,         // write to an image opened read-only
  kNotFound,         // file or snapshot missing
  kInvalidArgument,  // a bad option or argument from the user
  kBusy,             // locked by another process
};

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK

  static Status Ok() { return Status(); }
  static Status Error(ErrorKind kind, int err, std::string msg) {
    Status s;
    s.kind_ = kind;
    s.err_ = err;
    s.msg_ = std::move(msg);
    return s;
  }

#define VIMGFS_STATUS_FACTORY(Name, Kind, Errno)                                       \
  template <typename... Args>                                                          \
  static Status Name(fmt::format_string<Args...> f, Args&&... args) {                  \
    return Error(ErrorKind::Kind, Errno, fmt::format(f, std::forward<Args>(args)...)); \
  }
  VIMGFS_STATUS_FACTORY(Io, kIo, EIO)
  VIMGFS_STATUS_FACTORY(InvalidFormat, kInvalidFormat, EINVAL)
  VIMGFS_STATUS_FACTORY(Unsupported, kUnsupported, ENOTSUP)
  VIMGFS_STATUS_FACTORY(Corrupt, kCorrupt, EIO)
  VIMGFS_STATUS_FACTORY(OutOfRange, kOutOfRange, EINVAL)
  VIMGFS_STATUS_FACTORY(NoSpace, kNoSpace, ENOSPC)
  VIMGFS_STATUS_FACTORY(ReadOnly, kReadOnly, EROFS)
  VIMGFS_STATUS_FACTORY(NotFound, kNotFound, ENOENT)
  VIMGFS_STATUS_FACTORY(InvalidArgument, kInvalidArgument, EINVAL)
  VIMGFS_STATUS_FACTORY(Busy, kBusy, EAGAIN)
#undef VIMGFS_STATUS_FACTORY

  // An OS error: kind follows errno (ENOSPC -> kNoSpace, EROFS -> kReadOnly, ...).
  template <typename... Args>
  static Status FromErrno(int err, fmt::format_string<Args...> f, Args&&... args) {
    return Error(KindForErrno(err), err, fmt::format(f, std::forward<Args>(args)...));
  }
  static ErrorKind KindForErrno(int err);

  bool ok() const { return kind_ == ErrorKind::kOk; }
  ErrorKind kind() const { return kind_; }
  int err() const { return err_; }
  const std::string& message() const { return msg_; }
  std::string ToString() const { return ok() ? std::string("OK") : msg_; }

  // Prefixes the message with what was being done: "reading L2 table at 0x50000: ...".
  template <typename... Args>
  Status WithContext(fmt::format_string<Args...> f, Args&&... args) const& {
    if (ok()) return *this;
    return Error(kind_, err_, fmt::format(f, std::forward<Args>(args)...) + ": " + msg_);
  }

 private:
  ErrorKind kind_ = ErrorKind::kOk;
  int err_ = 0;
  std::string msg_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: must not be OK

  bool has_value() const { return v_.index() == 0; }
  bool ok() const { return has_value(); }
  explicit operator bool() const { return has_value(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Status& error() const& { return std::get<1>(v_); }
  Status status() const { return has_value() ? Status() : std::get<1>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace vimgfs

#define VIMGFS_CONCAT_INNER(a, b) a##b
#define VIMGFS_CONCAT(a, b) VIMGFS_CONCAT_INNER(a, b)

// Returns from the enclosing function when a Status is an error.
#define RETURN_IF_ERROR(expr)      \
  do {                             \
    ::vimgfs::Status _st = (expr); \
    if (!_st.ok()) return _st;     \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, ResultExpr())`: binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) ASSIGN_OR_RETURN_IMPL(VIMGFS_CONCAT(_res_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.has_value()) return tmp.error();   \
  lhs = std::move(tmp).value()

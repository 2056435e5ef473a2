// NBD exports as Files through libnbd (see nbd_file.h).
//
// One libnbd handle per File, its calls serialized by the File's mutex (libnbd would
// serialize them anyway; the mutex also keeps one read's pipelined requests together).
// A large read goes out as several requests in flight at once, so one connection's round
// trips overlap, as qemu's NBD client does. The handle owns no thread, so it survives the
// mount's fork into the background.
#include "io/nbd_file.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string_view>
#include <mutex>
#include <vector>

#ifdef VIMGFS_HAVE_LIBNBD
#include <libnbd.h>
#endif

namespace vimgfs {

bool IsNbdUri(const std::string& name) {
  for (const char* scheme :
       {"nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"})
    if (name.rfind(scheme, 0) == 0) return true;
  return false;
}

std::string UriEscape(std::string_view in) {
  std::string out;
  for (unsigned char c : in) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '/') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

std::string UriUnescape(std::string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); i++) {
    if (in[i] == '%' && i + 2 < in.size() && std::isxdigit(static_cast<unsigned char>(in[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(in[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(in.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += in[i];
    }
  }
  return out;
}

namespace {

constexpr std::string_view kContextParameter = "x-dirty-bitmap=";

// The URI without its x-dirty-bitmap query parameter (qemu's nbd option of that name, which
// image_spec.cc carries here), and the metadata context it names ("" if none). The option
// belongs to the image it was given for: exports named from inside it do not inherit it.
std::pair<std::string, std::string> SplitContext(const std::string& uri) {
  const size_t query = uri.find('?');
  if (query == std::string::npos) return {uri, ""};
  std::string kept = uri.substr(0, query), context;
  char sep = '?';
  for (size_t pos = query + 1; pos <= uri.size();) {
    size_t amp = uri.find('&', pos);
    if (amp == std::string::npos) amp = uri.size();
    std::string_view param(uri.data() + pos, amp - pos);
    if (param.starts_with(kContextParameter)) {
      context = UriUnescape(param.substr(kContextParameter.size()));
    } else if (!param.empty()) {
      kept += sep;
      kept += param;
      sep = '&';
    }
    pos = amp + 1;
  }
  return {kept, context};
}

}  // namespace

Result<std::string> SameServerUri(const std::string& referrer, const std::string& name) {
  const std::string uri = SplitContext(referrer).first;
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    return Status::Error(ErrorKind::kUnsupported, EXDEV,
                         fmt::format("'{}' refers to '{}': an image on an NBD server may name only an export "
                                     "of the same server, by a bare name",
                                     uri, name));
  size_t authority = uri.find("://");
  if (authority == std::string::npos) return Status::InvalidArgument("'{}' is not an NBD URI", uri);
  size_t path = uri.find('/', authority + 3);
  size_t query = uri.find_first_of("?#", authority + 3);
  if (path == std::string::npos || (query != std::string::npos && query < path)) path = query;
  std::string out = uri.substr(0, path == std::string::npos ? uri.size() : path) + "/" + UriEscape(name);
  if (query != std::string::npos) out += uri.substr(query);
  return out;
}

#ifdef VIMGFS_HAVE_LIBNBD
namespace {

constexpr uint64_t kMaxRequest = 32ull << 20;   // libnbd and most servers take up to 32 MiB
constexpr uint64_t kPipelinePiece = 256 << 10;  // a large read: requests of this size in flight
constexpr size_t kPipelineDepth = 16;

Status NbdError(const std::string& uri, const std::string& what) {
  int err = nbd_get_errno();
  const char* msg = nbd_get_error();
  return Status::FromErrno(err > 0 ? err : EIO, "'{}': {}: {}", uri, what, msg ? msg : "NBD error");
}

class NbdFile final : public File {
 public:
  NbdFile(nbd_handle* h, std::string uri, std::string context, bool writable, uint64_t size)
      : h_(h), uri_(std::move(uri)), context_(std::move(context)), writable_(writable), size_(size) {}
  ~NbdFile() override {
    nbd_shutdown(h_, 0);
    nbd_close(h_);
  }

  Status PRead(uint64_t off, std::span<std::byte> buf) override {
    uint64_t inside = off >= size_ ? 0 : std::min<uint64_t>(buf.size(), size_ - off);
    // Past the end of the export: zeros, as past EOF of a file.
    std::memset(buf.data() + inside, 0, buf.size() - inside);
    std::lock_guard lock(mu_);
    if (inside > kPipelinePiece) return ReadPipelined(off, buf.first(inside));
    if (inside > 0 && nbd_pread(h_, buf.data(), inside, off, 0) == -1)
      return NbdError(uri_, fmt::format("read of {} bytes at {:#x} failed", inside, off));
    return Status::Ok();
  }

  Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag) override {
    std::lock_guard lock(mu_);
    if (off > size_ || buf.size() > size_ - off)
      return Status::NoSpace(
          "'{}': write at {:#x} past the end of the NBD export ({} bytes): an export cannot grow", uri_, off,
          size_);
    for (size_t done = 0; done < buf.size();) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size() - done, kMaxRequest));
      if (nbd_pwrite(h_, buf.data() + done, n, off + done, 0) == -1)
        return NbdError(uri_, fmt::format("write of {} bytes at {:#x} failed", n, off + done));
      done += n;
    }
    return Status::Ok();
  }

  Status Sync(bool) override {
    std::lock_guard lock(mu_);
    if (!writable_ || nbd_can_flush(h_) != 1) return Status::Ok();
    if (nbd_flush(h_, 0) == -1) return NbdError(uri_, "flush failed");
    return Status::Ok();
  }

  Result<uint64_t> Size() override { return size_; }

  Status Truncate(uint64_t size) override {
    if (size == size_ || (formatting_ && size < size_)) return Status::Ok();
    return Status::Unsupported("'{}': an NBD export has a fixed size ({} bytes)", uri_, size_);
  }

  // While an image is created in the export, the format's shrinks (setting the length of
  // what it wrote) leave the export as it is, as qemu's non-exact truncate of NBD nodes.
  void SetFormatting() { formatting_ = true; }

  Status PunchHole(uint64_t off, uint64_t len) override {
    std::lock_guard lock(mu_);
    if (nbd_can_zero(h_) != 1) return Status::Unsupported("'{}': the NBD server cannot zero", uri_);
    uint64_t end = std::min(off + len, size_);
    for (uint64_t at = off; at < end;) {
      uint64_t n = std::min(end - at, kMaxRequest);
      if (nbd_zero(h_, n, at, 0) == -1)
        return NbdError(uri_, fmt::format("zeroing {} bytes at {:#x} failed", n, at));
      at += n;
    }
    return Status::Ok();
  }

  Status Allocate(uint64_t off, uint64_t len) override {
    if (off + len <= size_) return Status::Ok();  // the server allocates as it likes
    return Status::NoSpace("'{}': cannot grow an NBD export ({} bytes) to {}", uri_, size_, off + len);
  }

  Result<HostExtent> ProbeExtent(uint64_t off) override {
    if (off >= size_) return HostExtent{true, 0};
    std::lock_guard lock(mu_);
    if (nbd_can_meta_context(h_, context_.c_str()) != 1) return HostExtent{true, size_ - off};
    struct First {
      const std::string* context;
      bool base;
      bool seen = false;
      HostExtent extent;
    } first{&context_, context_ == LIBNBD_CONTEXT_BASE_ALLOCATION, false, HostExtent{}};
    nbd_extent_callback cb{};
    cb.user_data = &first;
    cb.callback = [](void* user, const char* context, uint64_t, uint32_t* entries, size_t count, int*) {
      auto* f = static_cast<First*>(user);
      if (f->seen || count < 2 || *f->context != context) return 0;
      f->seen = true;
      f->extent.length = entries[0];
      if (f->base) {
        f->extent.data = (entries[1] & LIBNBD_STATE_ZERO) == 0;  // reads as zeros: a hole
      } else {
        f->extent.context_flags = entries[1];  // a dirty area is a "hole", for instance
      }
      return 0;
    };
    uint64_t ask = std::min<uint64_t>(size_ - off, 1ull << 30);
    if (nbd_block_status(h_, ask, off, cb, 0) == -1) return NbdError(uri_, "block status failed");
    if (!first.seen || first.extent.length == 0) return HostExtent{true, ask};
    first.extent.length = std::min(first.extent.length, size_ - off);
    return first.extent;
  }

  // The server's disk usage is not known: what the export holds as data.
  Result<uint64_t> AllocatedSize() override {
    return Status::Unsupported("'{}': the disk usage of an NBD export is not known", uri_);
  }

  const std::string& path() const override { return uri_; }
  bool writable() const override { return writable_; }

 private:
  // buf (inside the export) as pieces with up to kPipelineDepth requests in flight. Every
  // request issued is waited for, even after one failed: buf must outlive them.
  Status ReadPipelined(uint64_t off, std::span<std::byte> buf) {
    std::vector<int64_t> in_flight;
    Status first_error;
    size_t issued = 0;
    auto fail = [&](const std::string& what) {
      if (first_error.ok()) first_error = NbdError(uri_, what);
    };
    while (issued < buf.size() || !in_flight.empty()) {
      while (first_error.ok() && issued < buf.size() && in_flight.size() < kPipelineDepth) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size() - issued, kPipelinePiece));
        int64_t cookie = nbd_aio_pread(h_, buf.data() + issued, n, off + issued, NBD_NULL_COMPLETION, 0);
        if (cookie == -1) {
          fail(fmt::format("read of {} bytes at {:#x} failed", n, off + issued));
          break;
        }
        in_flight.push_back(cookie);
        issued += n;
      }
      if (!first_error.ok()) issued = buf.size();  // issue no more; drain what is out
      if (in_flight.empty()) break;
      for (size_t i = 0; i < in_flight.size();) {
        int done = nbd_aio_command_completed(h_, in_flight[i]);
        if (done == 0) {
          ++i;
          continue;
        }
        if (done == -1) fail(fmt::format("read at {:#x} failed", off));
        in_flight[i] = in_flight.back();
        in_flight.pop_back();
      }
      if (!in_flight.empty() && nbd_poll(h_, -1) == -1) {
        fail("waiting for the server failed");
        return first_error;  // the connection is gone: nothing more will complete
      }
    }
    return first_error;
  }

  std::mutex mu_;
  nbd_handle* h_;
  std::string uri_;
  std::string context_;  // the metadata context block status reads
  bool writable_;
  bool formatting_ = false;
  uint64_t size_;
};

Result<nbd_handle*> Connect(const std::string& uri, const std::string& context) {
  nbd_handle* h = nbd_create();
  if (h == nullptr) return NbdError(uri, "cannot create an NBD handle");
  if (nbd_add_meta_context(h, context.c_str()) == -1 || nbd_connect_uri(h, uri.c_str()) == -1) {
    Status st = NbdError(uri, "cannot connect");
    nbd_close(h);
    return st;
  }
  if (context != LIBNBD_CONTEXT_BASE_ALLOCATION && nbd_can_meta_context(h, context.c_str()) != 1) {
    nbd_close(h);
    return Status::InvalidArgument("'{}': requested x-dirty-bitmap {} not found", uri, context);
  }
  return h;
}

}  // namespace

Result<std::unique_ptr<File>> OpenNbd(const std::string& name, OpenMode mode) {
  auto [uri, context] = SplitContext(name);
  if (context.empty()) context = LIBNBD_CONTEXT_BASE_ALLOCATION;
  ASSIGN_OR_RETURN(nbd_handle * h, Connect(uri, context));
  int64_t size = nbd_get_size(h);
  bool read_only = nbd_is_read_only(h) == 1;
  if (size < 0 || (mode == OpenMode::kReadWrite && read_only)) {
    Status st = size < 0 ? NbdError(uri, "cannot get the export's size")
                         : Status::ReadOnly("'{}': the NBD export is read-only", uri);
    nbd_close(h);
    return st;
  }
  return std::unique_ptr<File>(
      new NbdFile(h, name, context, mode == OpenMode::kReadWrite, static_cast<uint64_t>(size)));
}

Result<std::unique_ptr<File>> CreateOnNbd(const std::string& uri) {
  ASSIGN_OR_RETURN(std::unique_ptr<File> f, OpenNbd(uri, OpenMode::kReadWrite));
  auto* nbd = static_cast<NbdFile*>(f.get());
  nbd->SetFormatting();
  // qemu's way for a protocol that cannot create: the export's first sector is wiped (no
  // old header may show through), then the format writes its image into it.
  ASSIGN_OR_RETURN(uint64_t size, f->Size());
  const std::vector<std::byte> zeros(std::min<uint64_t>(size, 512));
  RETURN_IF_ERROR(f->PWrite(0, zeros, IoTag::kHeader));
  return f;
}

Result<FileStat> StatNbd(const std::string& uri) {
  // Not a connection of its own: a server that takes one client (qemu-nbd without
  // --persistent exits after it) must get the open's. Opening says what is wrong.
  FileStat st;
  st.exists = st.regular = true;
  return st;
}

#else  // built without libnbd

Result<std::unique_ptr<File>> OpenNbd(const std::string& uri, OpenMode) {
  return Status::Unsupported("'{}': vimgfs was built without libnbd (apt-get install libnbd-dev)", uri);
}
Result<std::unique_ptr<File>> CreateOnNbd(const std::string& uri) {
  return OpenNbd(uri, OpenMode::kReadWrite);
}
Result<FileStat> StatNbd(const std::string& uri) { return OpenNbd(uri, OpenMode::kReadOnly).status(); }

#endif

}  // namespace vimgfs

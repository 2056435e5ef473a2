// Opening an image for serving (see serve.h).
#include "engine/serve.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "engine/image_lock.h"
#include "io/nbd_file.h"

namespace vimgfs {
namespace {

namespace fs = std::filesystem;

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

OpenOptions BaseOptions(const ServeOptions& c) {
  OpenOptions o;
  o.format = c.format;
  o.untrusted = c.untrusted;
  o.key_secret = c.key_secret;
  o.secrets = c.secrets;
  o.open_backing = c.open_backing;
  o.data_file = c.data_file;
  o.backing_specs = c.backing_specs;
  if (c.cache_bytes) o.cache_bytes = *c.cache_bytes;
  if (c.direct_io) o.env = Env::DefaultDirect();
  o.notice = c.warn;
  return o;
}

// The name the overlay stores for its backing image: relative to the overlay's folder when
// the image lies inside that folder tree, absolute otherwise; an image on an NBD server by
// its URI (qemu follows it; vimgfs opens it from the command line, never from the overlay).
std::string BackingName(const std::string& image, const std::string& overlay) {
  if (IsNbdUri(image)) return image;
  std::error_code ec;
  fs::path img = fs::weakly_canonical(fs::absolute(image), ec);
  if (ec) return image;
  fs::path dir = fs::weakly_canonical(fs::absolute(overlay).parent_path(), ec);
  if (ec) return img.string();
  fs::path rel = img.lexically_relative(dir);
  if (!rel.empty() && *rel.begin() != "..") return rel.string();
  return img.string();
}

Result<std::unique_ptr<Image>> OpenOverlay(const ServeOptions& c) {
  // The overlay's chain starts one image higher: what a spec says of IMAGE's own chain
  // would be misread as the overlay's.
  if (!c.open_backing || !c.data_file.empty() || !c.backing_specs.empty())
    return Status::InvalidArgument(
        "an overlay cannot be combined with an image spec's backing or data-file options");
  ASSIGN_OR_RETURN(FileStat st, Env::Default()->Stat(c.overlay));
  if (!st.exists) {
    if (c.read_only)
      return Status::NotFound("'{}': overlay does not exist (and -r forbids creating it)", c.overlay);
    OpenOptions io = BaseOptions(c);
    io.read_only = true;
    ASSIGN_OR_RETURN(auto base, Image::Open(c.image, io));
    CreateContext ctx;
    ctx.env = c.direct_io ? Env::DefaultDirect() : Env::Default();
    ctx.path = c.overlay;
    ctx.size = base->size();
    ctx.backing = BackingRef{BackingName(c.image, c.overlay), base->format()};
    base.reset();
    // The base was just opened; a URI stored as its name is not opened again (nor followed).
    RETURN_IF_ERROR(
        Image::Create("qcow2", ctx, IsNbdUri(c.image)).WithContext("creating overlay '{}'", c.overlay));
  } else if (!st.regular) {
    return Status::InvalidArgument("'{}': overlay is not a regular file", c.overlay);
  }
  OpenOptions oo = BaseOptions(c);
  oo.format = "qcow2";
  oo.read_only = c.read_only;
  // A protocol name stored in an image is never followed: the command line's URI is.
  const bool remote_base = IsNbdUri(c.image);
  if (remote_base) oo.backing_specs = {BackingSpec{c.format, c.image, ""}};
  auto overlay = Image::Open(c.overlay, oo);
  if (!overlay.ok()) {
    if (overlay.error().kind() == ErrorKind::kInvalidFormat)
      return Status::InvalidArgument(
          "'{}' exists and is not a qcow2 image backed by '{}'; "
          "refusing to use it as the overlay",
          c.overlay, c.image);
    return overlay.error();
  }
  Image* backing = (*overlay)->backing();
  const bool same = remote_base ? (*overlay)->backing_ref() && (*overlay)->backing_ref()->name == c.image
                                : backing != nullptr && SameFile(backing->path(), c.image);
  if (backing == nullptr || !same) {
    return Status::InvalidArgument(
        "'{}' exists but its backing file is not '{}'; refusing "
        "to use it as the overlay",
        c.overlay, c.image);
  }
  return std::move(*overlay);
}

Result<std::unique_ptr<Image>> OpenImage(const ServeOptions& c) {
  if (!c.overlay.empty()) return OpenOverlay(c);
  OpenOptions o = BaseOptions(c);
  o.snapshot = c.snapshot;
  o.read_only = c.read_only || !c.snapshot.empty();
  if (!o.read_only && ::access(c.image.c_str(), W_OK) != 0 && errno != ENOENT) {
    if (c.warn) c.warn(fmt::format("'{}' is not writable: serving it read-only", c.image));
    o.read_only = true;
  }
  auto opened = Image::Open(c.image, o);
  // The format can't write this image (VMDK streamOptimized, read-only extents) or any
  // image (bochs, cloop, dmg): say so now rather than fail every write with EROFS after the mount.
  const auto cannot_write = [&](const std::string& format) {
    return Status::ReadOnly("'{}' ({}) cannot be written in place: {}", c.image, format, c.cannot_write_hint);
  };
  if (!opened.ok() && !o.read_only && IsReadOnlyFormat(opened.error())) {
    if (!c.format.empty()) return cannot_write(c.format);
    auto probed = Image::Probe(*Env::Default(), c.image);
    return cannot_write(probed.ok() ? *probed : "read-only format");
  }
  ASSIGN_OR_RETURN(auto img, std::move(opened));
  if (!o.read_only && img->read_only()) return cannot_write(img->format());
  return img;
}

}  // namespace

Result<bool> DirectIoForCacheMode(const std::string& mode) {
  if (mode != "none" && mode != "writeback")
    return Status::InvalidArgument("invalid cache mode '{}' (none or writeback)", mode);
  return mode == "none";
}

Result<std::unique_ptr<Image>> OpenForServing(const ServeOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Image> image, OpenImage(options));
  RETURN_IF_ERROR(LockImageChain(*image));
  return image;
}

}  // namespace vimgfs

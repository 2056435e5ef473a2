// Images that live on NBD servers: `nbd://host[:port]/export`, `nbd+unix:///export?socket=P`
// (and the TLS and vsock forms libnbd takes) typed where a file name goes, as qemu-img takes
// them. The export's bytes are the image file: a qcow2 served raw by nbdkit's file plugin,
// qemu-nbd, or an rbd-nbd export is read, checked, converted and mounted without a copy
// (docs/ARCHITECTURE.md, "Images on NBD servers").
//
// Only the user's command line names a server: a name stored inside an image never does
// (reference.cc refuses protocol names). A backing file named inside an image on a server
// is looked up on that same server, as the export of that name, and must be a bare name.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "vimgfs/env.h"

namespace vimgfs {

// Whether name is an NBD URI.
bool IsNbdUri(const std::string& name);
// A socket path, export name or query value inside an NBD URI: what is not unreserved (or
// '/') %-escaped; and back.
std::string UriEscape(std::string_view in);
std::string UriUnescape(std::string_view in);

// Connects to the export (read-only exports refuse kReadWrite). Each File is one connection.
Result<std::unique_ptr<File>> OpenNbd(const std::string& uri, OpenMode mode);
// "Creates" an image file on a server as qemu does: the export must exist; its first
// sector is zeroed and the image is written into it (it keeps the export's size).
Result<std::unique_ptr<File>> CreateOnNbd(const std::string& uri);
// An export is taken to exist, as a regular file of unknown size (0), without connecting:
// the open is the one connection (a single-client server, qemu-nbd by default, serves just
// one), and its errors say what is wrong.
Result<FileStat> StatNbd(const std::string& uri);
// The URI of export `name` on the server of `uri` (same scheme, host or socket, options).
// name must be a bare file name: no '/', not "." or "..".
Result<std::string> SameServerUri(const std::string& uri, const std::string& name);

}  // namespace vimgfs

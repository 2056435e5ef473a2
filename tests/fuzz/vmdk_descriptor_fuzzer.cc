// libFuzzer target for the VMDK text descriptor parser alone (src/formats/vmdk/
// descriptor.cc): the input is descriptor text, as in a descriptor file or embedded in a
// sparse extent. Runs the probe and the parser; a parsed descriptor is written back out
// with the create path's formatter, so that runs on hostile field values too.
#include <cstdint>
#include <string>
#include <string_view>

#include "formats/vmdk/vmdk_internal.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vimgfs::vmdk;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)LooksLikeDescriptor(text);
  auto d = ParseDescriptor(text, "fuzz.vmdk");
  if (!d.ok()) return 0;
  DescriptorText out;
  out.cid = d->cid;
  out.parent_cid = d->parent_cid;
  out.create_type = d->create_type;
  out.parent_hint = d->parent_hint;
  out.extents = d->extents;
  (void)FormatDescriptor(out);
  return 0;
}

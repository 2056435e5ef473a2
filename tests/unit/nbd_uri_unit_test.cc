// NBD URI helpers (io/nbd_file.h): escaping, and the URI of another export on the same
// server, which keeps the server and its options but not the image's own x-dirty-bitmap.
#include <gtest/gtest.h>

#include "io/nbd_file.h"

namespace vimgfs {
namespace {

TEST(NbdUriHelpers, EscapeAndUnescapeRoundTrip) {
  const std::string context = "qemu:dirty-bitmap:b 1/%";
  EXPECT_EQ(UriEscape(context), "qemu%3Adirty-bitmap%3Ab%201/%25");
  EXPECT_EQ(UriUnescape(UriEscape(context)), context);
  EXPECT_EQ(UriUnescape("50%"), "50%");  // a lone '%' stays as it is
  EXPECT_EQ(UriUnescape("%zz%4"), "%zz%4");
}

TEST(NbdUriHelpers, AnotherExportOnTheSameServer) {
  auto uri = SameServerUri("nbd+unix:///top.qcow2?socket=/run/s.sock", "base.qcow2");
  ASSERT_TRUE(uri.ok());
  EXPECT_EQ(*uri, "nbd+unix:///base.qcow2?socket=/run/s.sock");
  uri = SameServerUri("nbd://host:10809/top.qcow2", "b a.qcow2");
  ASSERT_TRUE(uri.ok());
  EXPECT_EQ(*uri, "nbd://host:10809/b%20a.qcow2");
  // The image's block-status context is not passed on to the exports it names.
  uri = SameServerUri("nbd+unix:///top?socket=/s&x-dirty-bitmap=qemu%3Adirty-bitmap%3Ab", "base");
  ASSERT_TRUE(uri.ok());
  EXPECT_EQ(*uri, "nbd+unix:///base?socket=/s");
  EXPECT_FALSE(SameServerUri("nbd+unix:///top?socket=/s", "../etc/passwd").ok());
  EXPECT_FALSE(SameServerUri("nbd+unix:///top?socket=/s", "..").ok());
}

}  // namespace
}  // namespace vimgfs

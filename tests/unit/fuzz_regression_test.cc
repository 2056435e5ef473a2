// Replays every saved fuzz regression input and every corpus image (good and bad) through
// the fuzz body, so each build (and the ASan/UBSan build) re-checks them.
#include <gtest/gtest.h>

#include <filesystem>

#include "fuzz/fuzz_one_image.h"
#include "support/test_util.h"

namespace vimgfs {
namespace {

void ReplayDir(const std::string& dir, int* count) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.file_size() > (64u << 20)) continue;
    std::string name = e.path().filename();
    if (name == "MANIFEST.tsv" || name == "README.md" || name.ends_with(".sh") || name.ends_with(".bz2") ||
        name.ends_with(".gz"))
      continue;
    SCOPED_TRACE(e.path().string());
    auto bytes = test::ReadWholeFile(e.path());
    FuzzOneImage(bytes.data(), bytes.size());
    (*count)++;
  }
}

TEST(FuzzRegressionTest, SavedInputsRunCleanly) {
  int count = 0;
  ReplayDir(test::FuzzRegressionDir(), &count);
  EXPECT_GT(count, 0);
}

TEST(FuzzRegressionTest, CorpusImagesRunCleanly) {
  std::string corpus = test::CorpusDir();
  if (corpus.empty()) GTEST_SKIP() << "../shared/corpus not found";
  int count = 0;
  ReplayDir(corpus, &count);
  EXPECT_GT(count, 10);
}

}  // namespace
}  // namespace vimgfs

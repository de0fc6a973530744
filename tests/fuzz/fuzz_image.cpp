// libFuzzer target: the image loader's front end on arbitrary bytes, as io::read_image runs it on a file's
// content: header checks and pixel limit, PNG through libpng, the other formats through stb, 8- and 16-bit
// samples and their normalisation. A refusal (c10::Error) is fine; a crash, a sanitizer report, a hang, or a
// result that contradicts the header is a finding.
#include "tdfusion/io/image.hpp"

#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace io = tdfusion::io;
  static const bool single_threaded = [] {
    torch::set_num_threads(1);
    return true;
  }();
  (void)single_threaded;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  // A small pixel limit keeps every run fast; the code paths are those of any limit. Odd sizes also take the
  // min-max normalisation, for 8-bit files too.
  auto options = io::ImageReadOptions().max_pixels(int64_t{1} << 18);
  if (size % 2 == 1) options.normalisation(io::Normalisation::min_max).normalise_8_bit(true);
  io::ImageInfo header;
  try {
    io::detail::scan_header(bytes, /*complete=*/true, "fuzz input", options, header);
  } catch (const c10::Error&) {
    return 0;
  }
  try {
    const torch::Tensor image = io::decode_image(bytes, "fuzz input", options);
    const bool as_declared = image.dim() == 3 && image.size(0) == header.channels && image.size(1) == header.height &&
                             image.size(2) == header.width && image.scalar_type() == torch::kFloat;
    if (!as_declared || image.min().item<float>() < 0.0f || image.max().item<float>() > 1.0f) std::abort();
  } catch (const c10::Error&) {
  }
  return 0;
}

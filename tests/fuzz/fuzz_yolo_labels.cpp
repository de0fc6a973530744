// libFuzzer target: the YOLO label parser on arbitrary text. A refusal (c10::Error) is fine; a crash, a
// sanitizer report, a hang, or boxes outside what the parser promises are a finding.
#include "tdfusion/data/yolo_labels.hpp"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const torch::Tensor boxes = tdfusion::data::parse_yolo_labels(text, "fuzz input", 3);
    if (boxes.dim() != 2 || boxes.size(1) != 5 || boxes.size(0) > tdfusion::data::kMaxYoloBoxes) std::abort();
    const auto rows = boxes.accessor<float, 2>();
    for (int64_t i = 0; i < boxes.size(0); ++i) {
      const float id = rows[i][0];
      if (!(id >= 0.0f && id < 3.0f && id == std::floor(id))) std::abort();
      for (int64_t j = 1; j < 5; ++j) {
        if (!(rows[i][j] >= 0.0f && rows[i][j] <= 1.0f)) std::abort();
      }
    }
  } catch (const c10::Error&) {
  }
  return 0;
}

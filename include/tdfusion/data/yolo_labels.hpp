#pragma once
// YOLO label files: one box per line, `class cx cy w h`, the box normalised to [0,1] of its image, fields
// separated by any run of whitespace (MSRS-detection-label pads with several spaces). An empty file, or one
// with only blank lines, is an image without objects. Every error names the file and the line.

#include <torch/torch.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace tdfusion::data {

namespace detail {
/// Parses a whole token as a finite number (locale-independent); false for anything else.
inline bool parse_number(const std::string& token, double& value) {
  const char* begin = token.data();
  const char* end = begin + token.size();
  if (begin != end && *begin == '+') ++begin;  // from_chars rejects a leading '+'
  const auto result = std::from_chars(begin, end, value);
  return result.ec == std::errc() && result.ptr == end && std::isfinite(value);
}
}  // namespace detail

/// Reads a YOLO label file into K x 5 float32 (class, cx, cy, w, h). Class ids must be integers in
/// [0, num_classes) and the four coordinates in [0, 1].
inline torch::Tensor read_yolo_labels(const std::string& path, int64_t num_classes) {
  TORCH_CHECK(num_classes > 0, "tdfusion: read_yolo_labels needs num_classes > 0, got ", num_classes);
  std::ifstream file(path);
  TORCH_CHECK(file.is_open(), "tdfusion: cannot open YOLO label file ", path);
  static const char* const kNames[] = {"class", "cx", "cy", "w", "h"};
  std::vector<float> values;
  std::string line;
  for (int64_t number = 1; std::getline(file, line); ++number) {
    std::istringstream fields(line);
    std::vector<std::string> tokens;
    for (std::string token; fields >> token;) tokens.push_back(token);
    if (tokens.empty()) continue;
    TORCH_CHECK(tokens.size() == 5, "tdfusion: ", path, ":", number, ": expected 5 values (class cx cy w h), got ",
                tokens.size());
    double row[5];
    for (size_t i = 0; i < 5; ++i) {
      TORCH_CHECK(detail::parse_number(tokens[i], row[i]), "tdfusion: ", path, ":", number, ": ", kNames[i],
                  " '", tokens[i], "' is not a number");
    }
    TORCH_CHECK(row[0] == std::floor(row[0]) && row[0] >= 0 && row[0] < static_cast<double>(num_classes),
                "tdfusion: ", path, ":", number, ": class id ", tokens[0], " is not an integer in [0, ", num_classes,
                ")");
    for (size_t i = 1; i < 5; ++i) {
      TORCH_CHECK(row[i] >= 0.0 && row[i] <= 1.0, "tdfusion: ", path, ":", number, ": ", kNames[i], " = ", tokens[i],
                  " is outside [0, 1] (coordinates must be normalised)");
    }
    for (double v : row) values.push_back(static_cast<float>(v));
  }
  TORCH_CHECK(!file.bad(), "tdfusion: error while reading YOLO label file ", path);
  const auto rows = static_cast<int64_t>(values.size() / 5);
  if (rows == 0) return torch::zeros({0, 5}, torch::kFloat);
  return torch::from_blob(values.data(), {rows, 5}, torch::kFloat).clone();
}

}  // namespace tdfusion::data

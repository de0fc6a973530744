#pragma once
// YOLO label files: one box per line, `class cx cy w h`, the box normalised to [0,1] of its image, fields
// separated by any run of blanks (MSRS-detection-label pads with several spaces); LF or CRLF line ends,
// an optional UTF-8 byte-order mark. An empty file, or one with only blank lines, is an image without objects.
// Files are untrusted: their size and box count are bounded before anything grows with them, and every error
// names the file and the line, with the offending text quoted printably.

#include <torch/torch.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace tdfusion::data {

/// Bounds on a label file: far above real data (MSRS has at most a few dozen boxes an image, crowd data sets a
/// few thousand), and low enough that a hostile file cannot make training or evaluation allocate much.
inline constexpr int64_t kMaxYoloLabelBytes = int64_t{4} << 20;
inline constexpr int64_t kMaxYoloBoxes = 10000;

namespace detail {

/// `text` for a message: at most 40 characters, control and non-ASCII bytes as \xNN.
inline std::string printable(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size() && i < 40; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\x%02x", c);
      out += escaped;
    }
  }
  return text.size() > 40 ? out + "..." : out;
}

/// Parses a whole token as a finite decimal number (locale-independent: an optional sign, digits with an
/// optional point, an optional exponent); false for anything else: nan, inf, hexadecimal, two signs, and
/// values beyond double's range.
inline bool parse_number(std::string_view token, double& value) {
  const bool plus = !token.empty() && token.front() == '+';
  if (plus) token.remove_prefix(1);  // from_chars accepts only '-'
  const std::string_view digits = !plus && !token.empty() && token.front() == '-' ? token.substr(1) : token;
  if (digits.empty() || !(std::isdigit(static_cast<unsigned char>(digits.front())) != 0 || digits.front() == '.')) {
    return false;
  }
  const auto result = std::from_chars(token.data(), token.data() + token.size(), value, std::chars_format::general);
  return result.ec == std::errc() && result.ptr == token.data() + token.size() && std::isfinite(value);
}

/// The whole file at `path`, refusing directories, devices, pipes and files above kMaxYoloLabelBytes.
inline std::string read_label_file(const std::string& path) {
  // O_NONBLOCK: opening a named pipe must not wait for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int code = errno;
    TORCH_CHECK(false, "tdfusion: cannot open YOLO label file ", path, ": ", std::strerror(code));
  }
  std::string text;
  std::string problem;
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    problem = std::strerror(errno);
  } else if (!S_ISREG(info.st_mode)) {
    problem = S_ISDIR(info.st_mode) ? "it is a directory" : "it is not a regular file";
  } else if (info.st_size > kMaxYoloLabelBytes) {
    problem = "the file has " + std::to_string(info.st_size) + " bytes, more than the " +
              std::to_string(kMaxYoloLabelBytes) + " a label file may have";
  } else {
    text.resize(static_cast<size_t>(info.st_size));
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t got = ::read(fd, text.data() + done, text.size() - done);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        if (got < 0) problem = std::strerror(errno);
        break;
      }
      done += static_cast<size_t>(got);
    }
    text.resize(done);
  }
  ::close(fd);
  TORCH_CHECK(problem.empty(), "tdfusion: cannot read YOLO label file ", path, ": ", problem);
  return text;
}

}  // namespace detail

/// Parses the text of a YOLO label file into K x 5 float32 (class, cx, cy, w, h); `name` names the file in
/// messages. Class ids must be integers in [0, num_classes) and the four coordinates in [0, 1]; at most
/// kMaxYoloBoxes boxes.
inline torch::Tensor parse_yolo_labels(std::string_view text, const std::string& name, int64_t num_classes) {
  TORCH_CHECK(num_classes > 0, "tdfusion: read_yolo_labels needs num_classes > 0, got ", num_classes);
  static const char* const kNames[] = {"class", "cx", "cy", "w", "h"};
  static constexpr std::string_view kBlanks = " \t\r\v\f";  // what separates fields (\r: CRLF line ends)
  std::string_view rest = text;
  if (rest.substr(0, 3) == "\xef\xbb\xbf") rest.remove_prefix(3);  // UTF-8 byte-order mark
  std::vector<float> values;
  for (int64_t number = 1; !rest.empty(); ++number) {
    const size_t newline = rest.find('\n');
    const std::string_view line = rest.substr(0, newline);
    rest.remove_prefix(newline == std::string_view::npos ? rest.size() : newline + 1);
    const auto where = [&] { return "tdfusion: " + name + ":" + std::to_string(number) + ": "; };

    std::string_view tokens[5];
    size_t count = 0;
    for (size_t at = line.find_first_not_of(kBlanks); at != std::string_view::npos;
         at = line.find_first_not_of(kBlanks, at)) {
      const size_t stop = std::min(line.find_first_of(kBlanks, at), line.size());
      if (count < 5) tokens[count] = line.substr(at, stop - at);
      ++count;
      at = stop;
    }
    if (count == 0) continue;
    TORCH_CHECK(count == 5, where(), "expected 5 values (class cx cy w h), got ", count);
    TORCH_CHECK(static_cast<int64_t>(values.size()) < 5 * kMaxYoloBoxes, where(), "more than ", kMaxYoloBoxes,
                " boxes in one file");
    double row[5];
    for (size_t i = 0; i < 5; ++i) {
      TORCH_CHECK(detail::parse_number(tokens[i], row[i]), where(), kNames[i], " '", detail::printable(tokens[i]),
                  "' is not a number (or out of range)");
    }
    TORCH_CHECK(row[0] == std::floor(row[0]) && row[0] >= 0 && row[0] < static_cast<double>(num_classes), where(),
                "class id ", detail::printable(tokens[0]), " is not an integer in [0, ", num_classes, ")");
    for (size_t i = 1; i < 5; ++i) {
      TORCH_CHECK(row[i] >= 0.0 && row[i] <= 1.0, where(), kNames[i], " = ", detail::printable(tokens[i]),
                  " is outside [0, 1] (coordinates must be normalised)");
    }
    for (double v : row) values.push_back(static_cast<float>(v));
  }
  const auto rows = static_cast<int64_t>(values.size() / 5);
  if (rows == 0) return torch::zeros({0, 5}, torch::kFloat);
  return torch::from_blob(values.data(), {rows, 5}, torch::kFloat).clone();
}

/// Reads a YOLO label file (see parse_yolo_labels), at most kMaxYoloLabelBytes; a directory, device or pipe is
/// refused without reading it.
inline torch::Tensor read_yolo_labels(const std::string& path, int64_t num_classes) {
  return parse_yolo_labels(detail::read_label_file(path), path, num_classes);
}

/// A segmentation map drawn from boxes (K x 5: class, cx, cy, w, h normalised, as read_yolo_labels gives
/// them), for data sets that have boxes but no masks: H x W int64, class + 1 on the pixels whose centre lies
/// inside a box, 0 (background) elsewhere. Where boxes overlap, the smaller box wins, as it is usually the
/// object in front: boxes are painted largest first (equal areas in their given order).
inline torch::Tensor box_mask(const torch::Tensor& boxes, int64_t height, int64_t width) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 5, "tdfusion: box_mask needs K x 5 boxes (class, cx, cy, w, h), got ",
              boxes.sizes());
  TORCH_CHECK(height > 0 && width > 0, "tdfusion: box_mask needs a positive size, got ", height, " x ", width);
  const torch::Tensor b = boxes.to(torch::kCPU, torch::kDouble).contiguous();
  const auto count = static_cast<size_t>(b.size(0));
  const double* rows = b.data_ptr<double>();
  std::vector<size_t> order(count);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t i, size_t j) { return rows[5 * i + 3] * rows[5 * i + 4] > rows[5 * j + 3] * rows[5 * j + 4]; });
  // Pixel k covers [k, k + 1); its centre k + 0.5 lies in [lo, hi) for k in [ceil(lo - 0.5), ceil(hi - 0.5)).
  auto first_pixel = [](double edge, int64_t size) {
    return std::clamp(static_cast<int64_t>(std::ceil(edge - 0.5)), int64_t{0}, size);
  };
  torch::Tensor mask = torch::zeros({height, width}, torch::kLong);
  for (const size_t i : order) {
    const double* r = rows + 5 * i;
    const double w = static_cast<double>(width), h = static_cast<double>(height);
    const int64_t x0 = first_pixel((r[1] - r[3] / 2) * w, width), x1 = first_pixel((r[1] + r[3] / 2) * w, width);
    const int64_t y0 = first_pixel((r[2] - r[4] / 2) * h, height), y1 = first_pixel((r[2] + r[4] / 2) * h, height);
    if (x1 > x0 && y1 > y0) mask.slice(0, y0, y1).slice(1, x0, x1).fill_(static_cast<int64_t>(r[0]) + 1);
  }
  return mask;
}

}  // namespace tdfusion::data

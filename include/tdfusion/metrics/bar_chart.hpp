#pragma once
// A modest bar chart of a multi-method comparison, drawn without any plotting library: one panel per metric
// (each with its own scale, since EN ~ 7 and Qabf ~ 0.5 share no axis), one bar per method in a fixed palette,
// the protocol in the title and a legend with the method names. Text uses a built-in 5 x 7 bitmap font with
// upper-case letters, digits and a little punctuation (lower case is drawn as upper case).

#include "tdfusion/io/image.hpp"
#include "tdfusion/metrics/evaluate_folders.hpp"
#include "tdfusion/metrics/report.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace tdfusion::metrics {

struct BarChartOptions {
  TORCH_ARG(int, bar_width) = 16;     ///< pixels per bar
  TORCH_ARG(int, plot_height) = 220;  ///< pixels of the tallest bar area
  TORCH_ARG(std::string, title) = ""; ///< "" = "MEAN FUSION METRICS, PROTOCOL <name>, <n> PAIRS"
};

namespace detail {

struct Canvas {
  int width, height;
  std::vector<uint8_t> rgb;  // interleaved, row-major
  Canvas(int w, int h) : width(w), height(h), rgb(static_cast<std::size_t>(w) * h * 3, 255) {}

  void fill(int x0, int y0, int w, int h, std::array<uint8_t, 3> colour) {
    for (int y = std::max(0, y0); y < std::min(height, y0 + h); ++y) {
      for (int x = std::max(0, x0); x < std::min(width, x0 + w); ++x) {
        std::copy(colour.begin(), colour.end(), rgb.begin() + (static_cast<std::ptrdiff_t>(y) * width + x) * 3);
      }
    }
  }
};

/// Rows of a 5 x 7 glyph, bit 4 = leftmost column (the classic HD44780 shapes).
inline std::array<uint8_t, 7> glyph(char c) {
  switch (static_cast<char>(std::toupper(static_cast<unsigned char>(c)))) {
    case '0': return {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E};
    case '1': return {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E};
    case '2': return {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F};
    case '3': return {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E};
    case '4': return {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02};
    case '5': return {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E};
    case '6': return {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E};
    case '7': return {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08};
    case '8': return {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E};
    case '9': return {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C};
    case 'A': return {0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11};
    case 'B': return {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E};
    case 'C': return {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E};
    case 'D': return {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C};
    case 'E': return {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F};
    case 'F': return {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10};
    case 'G': return {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F};
    case 'H': return {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11};
    case 'I': return {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E};
    case 'J': return {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C};
    case 'K': return {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11};
    case 'L': return {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F};
    case 'M': return {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11};
    case 'N': return {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11};
    case 'O': return {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E};
    case 'P': return {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10};
    case 'Q': return {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D};
    case 'R': return {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11};
    case 'S': return {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E};
    case 'T': return {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04};
    case 'U': return {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E};
    case 'V': return {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04};
    case 'W': return {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A};
    case 'X': return {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11};
    case 'Y': return {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04};
    case 'Z': return {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F};
    case ' ': return {0, 0, 0, 0, 0, 0, 0};
    case '.': return {0, 0, 0, 0, 0, 0x0C, 0x0C};
    case ',': return {0, 0, 0, 0, 0x0C, 0x04, 0x08};
    case ':': return {0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0};
    case '-': return {0, 0, 0, 0x1F, 0, 0, 0};
    case '_': return {0, 0, 0, 0, 0, 0, 0x1F};
    case '+': return {0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0};
    case '=': return {0, 0, 0x1F, 0, 0x1F, 0, 0};
    case '/': return {0, 0x01, 0x02, 0x04, 0x08, 0x10, 0};
    case '(': return {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02};
    case ')': return {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08};
    case '%': return {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03};
    default: return {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04};  // '?'
  }
}

/// Text width in pixels at `scale` (6 columns per character, the last one blank).
inline int text_width(const std::string& text, int scale) { return static_cast<int>(text.size()) * 6 * scale; }

inline void draw_text(Canvas& canvas, int x, int y, const std::string& text, int scale, std::array<uint8_t, 3> colour) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    const std::array<uint8_t, 7> rows = glyph(text[i]);
    for (int r = 0; r < 7; ++r) {
      for (int c = 0; c < 5; ++c) {
        if (rows[static_cast<std::size_t>(r)] & (0x10 >> c)) {
          canvas.fill(x + (static_cast<int>(i) * 6 + c) * scale, y + r * scale, scale, scale, colour);
        }
      }
    }
  }
}

inline std::array<uint8_t, 3> palette(std::size_t i) {
  static const std::array<std::array<uint8_t, 3>, 10> colours = {{{31, 119, 180}, {255, 127, 14}, {44, 160, 44},
                                                                  {214, 39, 40}, {148, 103, 189}, {140, 86, 75},
                                                                  {227, 119, 194}, {127, 127, 127}, {188, 189, 34},
                                                                  {23, 190, 207}}};
  return colours[i % colours.size()];
}

inline std::string short_number(double value) {
  if (std::isnan(value)) return "NAN";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.3g", value);
  return buffer;
}

}  // namespace detail

/// The comparison chart of several methods' mean metrics as a 3 x H x W float image in [0, 1]. All tables must
/// use one protocol. Each panel spans [min(0, lowest), max(0, highest)] of its metric; NaN means get no bar.
inline torch::Tensor draw_comparison_chart(const std::vector<EvaluationTable>& tables,
                                           const BarChartOptions& options = {}) {
  detail::check_comparable(tables, "draw_comparison_chart");
  TORCH_CHECK(options.bar_width() > 0 && options.plot_height() > 0, "tdfusion: bar chart sizes must be positive");
  const std::vector<std::string>& metrics = tables.front().metrics;
  const int n = static_cast<int>(tables.size()), bar = options.bar_width(), gap = 4, margin = 20, spacing = 18;
  const int panel_width = n * bar + (n + 1) * gap;
  std::size_t pairs = 0;
  for (const EvaluationTable& table : tables) pairs = std::max(pairs, table.rows.size());
  std::string title = options.title();
  if (title.empty()) {
    title = "MEAN FUSION METRICS, PROTOCOL " + protocol_name(tables.front().protocol) + ", " + std::to_string(pairs) +
            " PAIRS";
  }
  int legend_width = 0;
  for (const EvaluationTable& table : tables) {
    legend_width = std::max(legend_width, 18 + detail::text_width(table.method, 2));
  }
  const int plot_top = margin + 14 + 12 + 7 + 6;  // title, gap, value labels
  const int width = std::max({2 * margin + static_cast<int>(metrics.size()) * (panel_width + spacing) - spacing,
                              2 * margin + detail::text_width(title, 2), 2 * margin + legend_width});
  const int legend_top = plot_top + options.plot_height() + 8 + 14 + 16;
  const int height = legend_top + n * 20 + margin;
  detail::Canvas canvas(width, height);
  const std::array<uint8_t, 3> ink = {30, 30, 30}, axis = {120, 120, 120}, background = {244, 244, 244};
  detail::draw_text(canvas, margin, margin, title, 2, ink);

  for (std::size_t m = 0; m < metrics.size(); ++m) {
    double low = 0.0, high = 0.0;
    for (const EvaluationTable& table : tables) {
      const double v = table.mean.values[m].second;
      if (!std::isnan(v)) {
        low = std::min(low, v);
        high = std::max(high, v);
      }
    }
    const double span = high - low > 0.0 ? high - low : 1.0;
    const int x0 = margin + static_cast<int>(m) * (panel_width + spacing);
    const int h = options.plot_height();
    canvas.fill(x0, plot_top, panel_width, h, background);
    const int zero_y = plot_top + static_cast<int>(std::lround(high / span * h));
    detail::draw_text(canvas, x0, plot_top - 10, detail::short_number(high), 1, axis);
    for (int i = 0; i < n; ++i) {
      const double v = tables[static_cast<std::size_t>(i)].mean.values[m].second;
      if (std::isnan(v)) continue;
      const int length = static_cast<int>(std::lround(std::abs(v) / span * h));
      const int bx = x0 + gap + i * (bar + gap);
      canvas.fill(bx, v >= 0 ? zero_y - length : zero_y, bar, std::max(length, 1),
                  detail::palette(static_cast<std::size_t>(i)));
    }
    canvas.fill(x0, zero_y, panel_width, 1, axis);
    const std::string& name = metrics[m];
    detail::draw_text(canvas, x0 + (panel_width - detail::text_width(name, 2)) / 2, plot_top + h + 8, name, 2, ink);
  }
  for (int i = 0; i < n; ++i) {
    const int y = legend_top + i * 20;
    canvas.fill(margin, y, 12, 14, detail::palette(static_cast<std::size_t>(i)));
    detail::draw_text(canvas, margin + 18, y, tables[static_cast<std::size_t>(i)].method, 2, ink);
  }
  return torch::from_blob(canvas.rgb.data(), {height, width, 3}, torch::kByte)
      .permute({2, 0, 1})
      .to(torch::kFloat)
      .div(255.0)
      .contiguous();
}

/// Draws the comparison chart and writes it (PNG, JPEG or BMP by extension; replaced atomically).
inline void write_comparison_chart(const std::string& path, const std::vector<EvaluationTable>& tables,
                                   const BarChartOptions& options = {}) {
  io::write_image(path, draw_comparison_chart(tables, options));
}

}  // namespace tdfusion::metrics

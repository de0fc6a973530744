#pragma once
// Filtering building blocks of the fusion metrics, on H x W Eigen arrays in double precision (Eigen's default
// column-major layout: a column is contiguous, so every inner loop below runs down a column).

#include <Eigen/Core>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>


namespace tdfusion::metrics::detail {

using Array = Eigen::ArrayXXd;

inline std::string size_string(const Array& image) {
  return std::to_string(image.rows()) + " x " + std::to_string(image.cols());
}

inline void check_not_empty(const Array& image, const char* what) {
  if (image.size() == 0) throw std::invalid_argument(std::string("tdfusion: ") + what + " got an empty image");
}

inline void check_same_size(const Array& a, const Array& b, const char* what) {
  check_not_empty(a, what);
  if (a.rows() != b.rows() || a.cols() != b.cols()) {
    throw std::invalid_argument(std::string("tdfusion: ") + what + " needs images of the same size, got " +
                                size_string(a) + " and " + size_string(b));
  }
}

inline void check_min_size(const Array& image, Eigen::Index minimum, const char* what) {
  if (image.rows() < minimum || image.cols() < minimum) {
    throw std::invalid_argument(std::string("tdfusion: ") + what + " needs images of at least " +
                                std::to_string(minimum) + " x " + std::to_string(minimum) + " pixels, got " +
                                size_string(image));
  }
}

/// The 1-D factor of MATLAB's fspecial('gaussian', size, sigma), normalised to sum 1. The 2-D window is its
/// outer product. fspecial also zeroes taps below eps * max; for the VIF windows (size 17, 9, 5, 3 with
/// sigma = size / 5) the smallest 2-D tap is exp(-25/4) ~ 0.002 of the largest, so that never applies and the
/// window stays exactly separable.
inline std::vector<double> gaussian_taps(int size, double sigma) {
  std::vector<double> taps(static_cast<std::size_t>(size));
  const double centre = (size - 1) / 2.0;
  double sum = 0.0;
  for (int i = 0; i < size; ++i) {
    const double x = i - centre;
    taps[static_cast<std::size_t>(i)] = std::exp(-(x * x) / (2.0 * sigma * sigma));
    sum += taps[static_cast<std::size_t>(i)];
  }
  for (double& tap : taps) tap /= sum;
  return taps;
}

// Separable 'valid' filtering, streamed one output column at a time: the windows used here are symmetric, so
// correlation and convolution (scipy.signal.convolve2d with the window rotated by 180 degrees, as the classic
// codes do) coincide. out(r, c) = sum_ij t_i t_j in(r + i, c + j) is computed as a horizontal pass over input
// columns c .. c + n - 1 into one column buffer, then a vertical pass down that buffer. Only column-sized
// buffers are allocated: whole-image temporaries cost more in page faults than in arithmetic.

/// out = sum_j taps[j] * column(c + j), where column(k) is an Eigen column expression of input column k (e.g.
/// x.col(k), or x.col(k) * y.col(k) for a product image that is never stored).
template <class Column>
void horizontal_pass(const Column& column, Eigen::Index c, const std::vector<double>& taps, Eigen::ArrayXd& out) {
  out = taps[0] * column(c);
  for (std::size_t j = 1; j < taps.size(); ++j) out += taps[j] * column(c + static_cast<Eigen::Index>(j));
}

/// out[r] = sum_i taps[i] * in[r + i] for the in.size() - n + 1 'valid' rows.
inline void vertical_pass(const Eigen::ArrayXd& in, const std::vector<double>& taps, Eigen::ArrayXd& out) {
  const Eigen::Index rows = in.size() - static_cast<Eigen::Index>(taps.size()) + 1;
  out = taps[0] * in.head(rows);
  for (std::size_t i = 1; i < taps.size(); ++i) out += taps[i] * in.segment(static_cast<Eigen::Index>(i), rows);
}

/// decimate(filter_valid(in)): the 'valid' filtered image at every second row and column, starting with the
/// first (in[::2, ::2] after filtering). Output ceil((H - n + 1) / 2) x ceil((W - n + 1) / 2).
inline Array filter_decimate(const Array& in, const std::vector<double>& taps) {
  const Eigen::Index n = static_cast<Eigen::Index>(taps.size());
  const Eigen::Index valid_rows = in.rows() - n + 1, valid_cols = in.cols() - n + 1;
  if (valid_rows <= 0 || valid_cols <= 0) return Array(0, 0);
  const Eigen::Index rows = (valid_rows + 1) / 2, cols = (valid_cols + 1) / 2;
  Array out(rows, cols);
  Eigen::ArrayXd column(in.rows());
  for (Eigen::Index c = 0; c < cols; ++c) {
    horizontal_pass([&](Eigen::Index k) { return in.col(k); }, 2 * c, taps, column);
    auto target = out.col(c);
    for (Eigen::Index i = 0; i < n; ++i) {
      const Eigen::Map<const Eigen::ArrayXd, 0, Eigen::InnerStride<2>> every_second(column.data() + i, rows);
      if (i == 0) {
        target = taps[0] * every_second;
      } else {
        target += taps[static_cast<std::size_t>(i)] * every_second;
      }
    }
  }
  return out;
}

}  // namespace tdfusion::metrics::detail


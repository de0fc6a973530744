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

/// Separable 'valid' filtering with the window taps x taps: out(r, c) = sum_ij t_i t_j in(r + i, c + j),
/// output (H - n + 1) x (W - n + 1). The windows used here are symmetric, so correlation and convolution
/// (scipy.signal.convolve2d with the window rotated by 180 degrees, as the classic code does) coincide.
/// An input smaller than the window gives an empty array.
inline Array filter_valid(const Array& in, const std::vector<double>& taps) {
  const Eigen::Index n = static_cast<Eigen::Index>(taps.size());
  const Eigen::Index rows = in.rows() - n + 1, cols = in.cols() - n + 1;
  if (rows <= 0 || cols <= 0) return Array(0, 0);
  Array vertical(rows, in.cols());
  for (Eigen::Index c = 0; c < in.cols(); ++c) {  // down each column: one column stays in L1
    auto out = vertical.col(c);
    const auto column = in.col(c);
    out = taps[0] * column.segment(0, rows);
    for (Eigen::Index i = 1; i < n; ++i) out += taps[static_cast<std::size_t>(i)] * column.segment(i, rows);
  }
  Array result(rows, cols);
  for (Eigen::Index c = 0; c < cols; ++c) {
    auto out = result.col(c);
    out = taps[0] * vertical.col(c);
    for (Eigen::Index j = 1; j < n; ++j) out += taps[static_cast<std::size_t>(j)] * vertical.col(c + j);
  }
  return result;
}

/// in[::2, ::2]: every second row and column, starting with the first.
inline Array decimate(const Array& in) {
  const Eigen::Index rows = (in.rows() + 1) / 2, cols = (in.cols() + 1) / 2;
  Array out(rows, cols);
  for (Eigen::Index c = 0; c < cols; ++c) {
    for (Eigen::Index r = 0; r < rows; ++r) out(r, c) = in(2 * r, 2 * c);
  }
  return out;
}

/// Sobel responses exactly as scipy.signal.convolve2d(img, h, mode='same') with zero padding computes them for
/// the classic Qabf kernels h3 = [[-1,0,1],[-2,0,2],[-1,0,1]] (sx) and h1 = [[1,2,1],[0,0,0],[-1,-2,-1]] (sy).
/// Convolution flips the kernel, so sx = left minus right and sy = below minus above; the sign convention
/// cancels in Qabf, which only compares angles of two images computed the same way.
inline void sobel_same(const Array& img, Array& sx, Array& sy) {
  const Eigen::Index rows = img.rows(), cols = img.cols();
  sx.resize(rows, cols);
  sy.resize(rows, cols);
  auto at = [&](Eigen::Index r, Eigen::Index c) {
    return (r < 0 || r >= rows || c < 0 || c >= cols) ? 0.0 : img(r, c);
  };
  auto interior = [&](Eigen::Index r, Eigen::Index c) {
    const double up_left = img(r - 1, c - 1), up = img(r - 1, c), up_right = img(r - 1, c + 1);
    const double left = img(r, c - 1), right = img(r, c + 1);
    const double down_left = img(r + 1, c - 1), down = img(r + 1, c), down_right = img(r + 1, c + 1);
    sx(r, c) = (up_left + 2.0 * left + down_left) - (up_right + 2.0 * right + down_right);
    sy(r, c) = (down_left + 2.0 * down + down_right) - (up_left + 2.0 * up + up_right);
  };
  auto border = [&](Eigen::Index r, Eigen::Index c) {
    sx(r, c) = (at(r - 1, c - 1) + 2.0 * at(r, c - 1) + at(r + 1, c - 1)) -
               (at(r - 1, c + 1) + 2.0 * at(r, c + 1) + at(r + 1, c + 1));
    sy(r, c) = (at(r + 1, c - 1) + 2.0 * at(r + 1, c) + at(r + 1, c + 1)) -
               (at(r - 1, c - 1) + 2.0 * at(r - 1, c) + at(r - 1, c + 1));
  };
  for (Eigen::Index c = 0; c < cols; ++c) {
    const bool edge_column = c == 0 || c == cols - 1;
    for (Eigen::Index r = 0; r < rows; ++r) {
      if (edge_column || r == 0 || r == rows - 1) {
        border(r, c);
      } else {
        interior(r, c);
      }
    }
  }
}

}  // namespace tdfusion::metrics::detail

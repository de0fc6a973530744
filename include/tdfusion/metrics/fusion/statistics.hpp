#pragma once
// The histogram and moment metrics of spec section 8: EN, SD, SF, AG (of the fused image alone) and MI, SCD
// (of the fused image against both sources). Images are H x W arrays of 8-bit grey values held as doubles.

#include "tdfusion/metrics/detail/filters.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>


namespace tdfusion::metrics {

namespace detail {

/// Grey level of a value: rounded half to even (numpy's np.round), which must lie in 0..255. The histogram
/// metrics bin by grey level; on integer images this is exactly the classic codes' binning.
inline int grey_level(double value, const char* what) {
  const double level = std::nearbyint(value);
  if (!(level >= 0.0 && level <= 255.0)) {  // also catches NaN
    throw std::invalid_argument(std::string("tdfusion: ") + what + " expects 8-bit grey values in [0, 255], found " +
                                std::to_string(value));
  }
  return static_cast<int>(level);
}

/// Pearson correlation of x and (y1 - y2) (two passes, no temporaries); NaN when either is constant, as numpy.
inline double correlation_with_difference(const Array& x, const Array& y1, const Array& y2) {
  const Eigen::Index n = x.size();
  const double* px = x.data();
  const double* p1 = y1.data();
  const double* p2 = y2.data();
  double sum_x = 0.0, sum_y = 0.0;
  for (Eigen::Index i = 0; i < n; ++i) {
    sum_x += px[i];
    sum_y += p1[i] - p2[i];
  }
  const double mean_x = sum_x / static_cast<double>(n), mean_y = sum_y / static_cast<double>(n);
  double sxy = 0.0, sxx = 0.0, syy = 0.0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const double dx = px[i] - mean_x, dy = (p1[i] - p2[i]) - mean_y;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  return sxy / std::sqrt(sxx * syy);
}

}  // namespace detail

/// EN: Shannon entropy in bits of the 256-bin grey-level histogram.
inline double entropy(const Eigen::ArrayXXd& image) {
  detail::check_not_empty(image, "entropy (EN)");
  std::array<double, 256> histogram{};
  for (Eigen::Index i = 0; i < image.size(); ++i) {
    histogram[static_cast<std::size_t>(detail::grey_level(image.data()[i], "entropy (EN)"))] += 1.0;
  }
  const double count = static_cast<double>(image.size());
  double result = 0.0;
  for (double h : histogram) {
    if (h > 0.0) result -= (h / count) * std::log2(h / count);
  }
  return result;
}

/// SD: population standard deviation (numpy's np.std).
inline double standard_deviation(const Eigen::ArrayXXd& image) {
  detail::check_not_empty(image, "standard deviation (SD)");
  return std::sqrt((image - image.mean()).square().mean());
}

/// SF: sqrt(mean of squared horizontal neighbour differences + mean of squared vertical ones).
/// A dimension of 1 pixel has no neighbour differences; its term is taken as 0.
inline double spatial_frequency(const Eigen::ArrayXXd& image) {
  detail::check_not_empty(image, "spatial frequency (SF)");
  const Eigen::Index rows = image.rows(), cols = image.cols();
  const double horizontal =
      cols > 1 ? (image.rightCols(cols - 1) - image.leftCols(cols - 1)).square().mean() : 0.0;
  const double vertical = rows > 1 ? (image.bottomRows(rows - 1) - image.topRows(rows - 1)).square().mean() : 0.0;
  return std::sqrt(horizontal + vertical);
}

/// AG: mean of sqrt((gx^2 + gy^2) / 2), gradients by central differences ((next - previous) / 2) inside and
/// one-sided differences on the first and last row / column (numpy.gradient's scheme, as the CDDFuse code has it).
inline double average_gradient(const Eigen::ArrayXXd& image) {
  detail::check_min_size(image, 2, "average gradient (AG)");
  const Eigen::Index rows = image.rows(), cols = image.cols();
  double sum = 0.0;
  for (Eigen::Index c = 0; c < cols; ++c) {
    for (Eigen::Index r = 0; r < rows; ++r) {
      const double gx = c == 0          ? image(r, 1) - image(r, 0)
                        : c == cols - 1 ? image(r, c) - image(r, c - 1)
                                        : (image(r, c + 1) - image(r, c - 1)) / 2.0;
      const double gy = r == 0          ? image(1, c) - image(0, c)
                        : r == rows - 1 ? image(r, c) - image(r - 1, c)
                                        : (image(r + 1, c) - image(r - 1, c)) / 2.0;
      sum += std::sqrt((gx * gx + gy * gy) / 2.0);
    }
  }
  return sum / static_cast<double>(image.size());
}

/// Mutual information in nats between two images, each grey level a bin (sklearn's mutual_info_score on the
/// flattened images), clipped at 0 as sklearn does. The MI metric is the sum over (F, A) and (F, B).
inline double mutual_information(const Eigen::ArrayXXd& a, const Eigen::ArrayXXd& b) {
  detail::check_same_size(a, b, "mutual information (MI)");
  std::vector<uint32_t> joint(256 * 256, 0);
  std::array<double, 256> pa{}, pb{};
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const int la = detail::grey_level(a.data()[i], "mutual information (MI)");
    const int lb = detail::grey_level(b.data()[i], "mutual information (MI)");
    ++joint[static_cast<std::size_t>(la * 256 + lb)];
    pa[static_cast<std::size_t>(la)] += 1.0;
    pb[static_cast<std::size_t>(lb)] += 1.0;
  }
  const double n = static_cast<double>(a.size());
  double mi = 0.0;
  for (int i = 0; i < 256; ++i) {
    if (pa[static_cast<std::size_t>(i)] == 0.0) continue;
    for (int j = 0; j < 256; ++j) {
      const double nij = joint[static_cast<std::size_t>(i * 256 + j)];
      if (nij > 0.0) {
        mi += nij / n * std::log(nij * n / (pa[static_cast<std::size_t>(i)] * pb[static_cast<std::size_t>(j)]));
      }
    }
  }
  return std::max(mi, 0.0);
}

/// SCD, the sum of the correlations of differences: corr(A, F - B) + corr(B, F - A). NaN when a correlation
/// is undefined (a constant image or difference image), as the classic code gives.
inline double scd(const Eigen::ArrayXXd& a, const Eigen::ArrayXXd& b, const Eigen::ArrayXXd& fused) {
  detail::check_same_size(a, fused, "SCD");
  detail::check_same_size(b, fused, "SCD");
  return detail::correlation_with_difference(a, fused, b) + detail::correlation_with_difference(b, fused, a);
}

}  // namespace tdfusion::metrics


#pragma once
// SSIM as scikit-image's structural_similarity computes it with its defaults: 7 x 7 uniform window,
// K1 = 0.01, K2 = 0.03, sample covariances (N / (N - 1), N = 49), and the mean of the SSIM map over the pixels
// whose window lies fully inside the image (the map without a 3-pixel border, so the padding never matters).
// The data range sets C1 = (K1 R)^2 and C2 = (K2 R)^2: the two protocols differ here (spec section 8).

#include "tdfusion/metrics/detail/filters.hpp"

#include <Eigen/Core>

#include <vector>

namespace tdfusion::metrics {

inline constexpr int kSsimWindow = 7;

/// Mean SSIM of x and y (the same size, at least 7 x 7). `data_range`: 255 for 8-bit data; 2 reproduces the
/// old scikit-image default for float images (dtype range -1..1), which the CDDFuse evaluator relied on.
inline double ssim(const Eigen::ArrayXXd& x, const Eigen::ArrayXXd& y, double data_range) {
  detail::check_same_size(x, y, "SSIM");
  detail::check_min_size(x, kSsimWindow, "SSIM");
  const std::vector<double> taps(kSsimWindow, 1.0 / kSsimWindow);
  const double n = kSsimWindow * kSsimWindow;
  const double cov_norm = n / (n - 1.0);
  const detail::Array ux = detail::filter_valid(x, taps), uy = detail::filter_valid(y, taps);
  const detail::Array uxx = detail::filter_valid(x.square(), taps), uyy = detail::filter_valid(y.square(), taps);
  const detail::Array uxy = detail::filter_valid(x * y, taps);
  const double c1 = (0.01 * data_range) * (0.01 * data_range), c2 = (0.03 * data_range) * (0.03 * data_range);
  const detail::Array vx = cov_norm * (uxx - ux * ux), vy = cov_norm * (uyy - uy * uy);
  const detail::Array vxy = cov_norm * (uxy - ux * uy);
  const detail::Array map =
      ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
  return map.mean();
}

}  // namespace tdfusion::metrics

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

namespace detail {

/// Mean SSIM, one output column at a time. load(image, k) gives input column k as an Eigen expression, so that
/// the paper evaluator's np.uint8 truncation can be applied on the fly.
template <class Load>
double ssim_streamed(const Array& x, const Array& y, double data_range, const Load& load) {
  check_same_size(x, y, "SSIM");
  check_min_size(x, kSsimWindow, "SSIM");
  const std::vector<double> taps(kSsimWindow, 1.0 / kSsimWindow);
  const double n = kSsimWindow * kSsimWindow;
  const double cov = n / (n - 1.0);  // sample covariance
  const double c1 = (0.01 * data_range) * (0.01 * data_range), c2 = (0.03 * data_range) * (0.03 * data_range);
  const Eigen::Index rows = x.rows(), out_cols = x.cols() - kSsimWindow + 1;
  Eigen::ArrayXd hx(rows), hy(rows), hxx(rows), hyy(rows), hxy(rows);
  Eigen::ArrayXd ux, uy, uxx, uyy, uxy;
  double sum = 0.0;
  for (Eigen::Index c = 0; c < out_cols; ++c) {
    horizontal_pass([&](Eigen::Index k) { return load(x, k); }, c, taps, hx);
    horizontal_pass([&](Eigen::Index k) { return load(y, k); }, c, taps, hy);
    horizontal_pass([&](Eigen::Index k) { return load(x, k).square(); }, c, taps, hxx);
    horizontal_pass([&](Eigen::Index k) { return load(y, k).square(); }, c, taps, hyy);
    horizontal_pass([&](Eigen::Index k) { return load(x, k) * load(y, k); }, c, taps, hxy);
    vertical_pass(hx, taps, ux);
    vertical_pass(hy, taps, uy);
    vertical_pass(hxx, taps, uxx);
    vertical_pass(hyy, taps, uyy);
    vertical_pass(hxy, taps, uxy);
    // scikit-image's expression: ((2 ux uy + C1)(2 vxy + C2)) / ((ux^2 + uy^2 + C1)(vx + vy + C2)).
    sum += (((2.0 * ux * uy + c1) * (2.0 * (cov * (uxy - ux * uy)) + c2)) /
            ((ux * ux + uy * uy + c1) * (cov * (uxx - ux * ux) + cov * (uyy - uy * uy) + c2)))
               .sum();
  }
  return sum / static_cast<double>((rows - kSsimWindow + 1) * out_cols);
}

}  // namespace detail

/// Mean SSIM of x and y (the same size, at least 7 x 7). `data_range`: 255 for 8-bit data; 2 reproduces the
/// old scikit-image default for float images (dtype range -1..1), which the CDDFuse evaluator relied on.
inline double ssim(const Eigen::ArrayXXd& x, const Eigen::ArrayXXd& y, double data_range) {
  return detail::ssim_streamed(x, y, data_range,
                               [](const detail::Array& image, Eigen::Index k) { return image.col(k); });
}

/// SSIM of np.uint8(x) and np.uint8(y) (values truncated towards zero, as the TDFusion evaluator passes them);
/// identical to ssim() on integer grey levels.
inline double ssim_uint8(const Eigen::ArrayXXd& x, const Eigen::ArrayXXd& y, double data_range) {
  return detail::ssim_streamed(x, y, data_range,
                               [](const detail::Array& image, Eigen::Index k) { return image.col(k).floor(); });
}

}  // namespace tdfusion::metrics


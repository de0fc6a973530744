#pragma once
// Qabf (Xydeas and Petrovic 2000): how much edge strength and orientation of the sources survives in the fused
// image, weighted by the sources' edge strengths. The classic Python port (MMIF-CDDFuse Evaluator.Qabf), kept
// with its quirks:
//   - Sobel responses by convolve2d 'same' with zero padding, so the image border sees artificial edges;
//   - angle atan(Sy / Sx), pi/2 where Sx == 0 (also when Sy == 0: flat pixels get angle pi/2);
//   - strength ratio G = min(gA, gF) / max(gA, gF), except G = gF where gA == gF (so 0 for two flat pixels, and
//     the raw gradient, not 1, for equal non-zero strengths);
//   - orientation agreement A = 1 - |aA - aF| / (pi/2), without wrapping the angle difference.

#include "tdfusion/metrics/detail/filters.hpp"

#include <Eigen/Core>

#include <cmath>


namespace tdfusion::metrics {

/// Qabf's sigmoid constants (spec section 8).
struct QabfConstants {
  static constexpr double kTg = 0.9994, kKg = -15.0, kDg = 0.5;
  static constexpr double kTa = 0.9879, kKa = -22.0, kDa = 0.8;
};

namespace detail {

/// Sobel strength and angle of one image, one column at a time, exactly as scipy.signal.convolve2d(img, h,
/// mode='same') with zero padding gives them for the classic kernels h3 = [[-1,0,1],[-2,0,2],[-1,0,1]] (sx) and
/// h1 = [[1,2,1],[0,0,0],[-1,-2,-1]] (sy). Convolution flips the kernels, so sx = left minus right and
/// sy = below minus above; the sign convention cancels in Qabf, which compares angles computed the same way.
/// With V(k) = [1 2 1] down column k and D(k) = below minus above in column k (zero outside the image):
///   sx(., c) = V(c - 1) - V(c + 1),   sy(., c) = D(c - 1) + 2 D(c) + D(c + 1).
class SobelColumns {
 public:
  explicit SobelColumns(const Array& image) : image_(image), rows_(image.rows()) {}

  /// Fills strength g and angle a (atan(sy / sx), pi/2 where sx == 0) of column c.
  void column(Eigen::Index c, Eigen::ArrayXd& g, Eigen::ArrayXd& a) {
    smooth(c - 1, v_left_);
    smooth(c + 1, v_right_);
    difference(c - 1, d_left_);
    difference(c, d_centre_);
    difference(c + 1, d_right_);
    sx_ = v_left_ - v_right_;
    sy_ = d_left_ + 2.0 * d_centre_ + d_right_;
    g = (sx_.square() + sy_.square()).sqrt();
    a.resize(rows_);
    const double half_pi = std::acos(-1.0) / 2.0;
    for (Eigen::Index r = 0; r < rows_; ++r) a[r] = sx_[r] == 0.0 ? half_pi : std::atan(sy_[r] / sx_[r]);
  }

 private:
  bool outside(Eigen::Index k) const { return k < 0 || k >= image_.cols(); }

  void smooth(Eigen::Index k, Eigen::ArrayXd& out) const {  // col[r-1] + 2 col[r] + col[r+1]
    out.setZero(rows_);
    if (outside(k)) return;
    const auto col = image_.col(k);
    out = 2.0 * col;
    if (rows_ > 1) {
      out.head(rows_ - 1) += col.tail(rows_ - 1);
      out.tail(rows_ - 1) += col.head(rows_ - 1);
    }
  }

  void difference(Eigen::Index k, Eigen::ArrayXd& out) const {  // col[r+1] - col[r-1]
    out.setZero(rows_);
    if (outside(k) || rows_ < 2) return;
    const auto col = image_.col(k);
    out.head(rows_ - 1) += col.tail(rows_ - 1);
    out.tail(rows_ - 1) -= col.head(rows_ - 1);
  }

  const Array& image_;
  Eigen::Index rows_;
  Eigen::ArrayXd v_left_, v_right_, d_left_, d_centre_, d_right_, sx_, sy_;
};

/// Per-pixel edge preservation Q^{SF} of source S in F (the product of the two sigmoids), for one column.
inline Eigen::ArrayXd edge_preservation(const Eigen::ArrayXd& g_source, const Eigen::ArrayXd& a_source,
                                        const Eigen::ArrayXd& g_fused, const Eigen::ArrayXd& a_fused) {
  const double half_pi = std::acos(-1.0) / 2.0;
  Eigen::ArrayXd ratio(g_source.size());
  for (Eigen::Index r = 0; r < ratio.size(); ++r) {
    const double gs = g_source[r], gf = g_fused[r];
    ratio[r] = gs > gf ? gf / gs : gs == gf ? gf : gs / gf;  // the classic G = gF where gA == gF
  }
  const Eigen::ArrayXd agreement = 1.0 - (a_source - a_fused).abs() / half_pi;
  return (QabfConstants::kTg / (1.0 + (QabfConstants::kKg * (ratio - QabfConstants::kDg)).exp())) *
         (QabfConstants::kTa / (1.0 + (QabfConstants::kKa * (agreement - QabfConstants::kDa)).exp()));
}

}  // namespace detail

/// Qabf = sum(Q^{AF} gA + Q^{BF} gB) / sum(gA + gB); NaN when neither source has any edge (0 / 0).
inline double qabf(const Eigen::ArrayXXd& a, const Eigen::ArrayXXd& b, const Eigen::ArrayXXd& fused) {
  detail::check_same_size(a, fused, "Qabf");
  detail::check_same_size(b, fused, "Qabf");
  detail::SobelColumns sobel_a(a), sobel_b(b), sobel_f(fused);
  Eigen::ArrayXd ga, aa, gb, ab, gf, af;
  double numerator = 0.0, denominator = 0.0;
  for (Eigen::Index c = 0; c < fused.cols(); ++c) {
    sobel_a.column(c, ga, aa);
    sobel_b.column(c, gb, ab);
    sobel_f.column(c, gf, af);
    numerator +=
        (detail::edge_preservation(ga, aa, gf, af) * ga + detail::edge_preservation(gb, ab, gf, af) * gb).sum();
    denominator += (ga + gb).sum();
  }
  return numerator / denominator;
}

}  // namespace tdfusion::metrics


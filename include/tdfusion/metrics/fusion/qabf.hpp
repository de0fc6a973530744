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

struct EdgeMap {
  Array strength;  ///< g = sqrt(Sx^2 + Sy^2)
  Array angle;     ///< atan(Sy / Sx), pi/2 where Sx == 0
};

inline EdgeMap edge_map(const Array& image) {
  Array sx, sy;
  sobel_same(image, sx, sy);
  EdgeMap map;
  map.strength = (sx.square() + sy.square()).sqrt();
  map.angle.resize(image.rows(), image.cols());
  const double half_pi = std::acos(-1.0) / 2.0;
  for (Eigen::Index i = 0; i < image.size(); ++i) {
    const double x = sx.data()[i];
    map.angle.data()[i] = x == 0.0 ? half_pi : std::atan(sy.data()[i] / x);
  }
  return map;
}

/// Per-pixel edge preservation Q^{SF} of source S in F (the product of the two sigmoids).
inline double edge_preservation(double g_source, double a_source, double g_fused, double a_fused) {
  const double half_pi = std::acos(-1.0) / 2.0;
  const double g_ratio = g_source > g_fused    ? g_fused / g_source
                         : g_source == g_fused ? g_fused
                                               : g_source / g_fused;
  const double a_agreement = 1.0 - std::abs(a_source - a_fused) / half_pi;
  const double qg = QabfConstants::kTg / (1.0 + std::exp(QabfConstants::kKg * (g_ratio - QabfConstants::kDg)));
  const double qa = QabfConstants::kTa / (1.0 + std::exp(QabfConstants::kKa * (a_agreement - QabfConstants::kDa)));
  return qg * qa;
}

}  // namespace detail

/// Qabf = sum(Q^{AF} gA + Q^{BF} gB) / sum(gA + gB); NaN when neither source has any edge (0 / 0).
inline double qabf(const Eigen::ArrayXXd& a, const Eigen::ArrayXXd& b, const Eigen::ArrayXXd& fused) {
  detail::check_same_size(a, fused, "Qabf");
  detail::check_same_size(b, fused, "Qabf");
  const detail::EdgeMap ea = detail::edge_map(a), eb = detail::edge_map(b), ef = detail::edge_map(fused);
  double numerator = 0.0, denominator = 0.0;
  for (Eigen::Index i = 0; i < fused.size(); ++i) {
    const double ga = ea.strength.data()[i], gb = eb.strength.data()[i];
    const double gf = ef.strength.data()[i], af = ef.angle.data()[i];
    numerator += detail::edge_preservation(ga, ea.angle.data()[i], gf, af) * ga +
                 detail::edge_preservation(gb, eb.angle.data()[i], gf, af) * gb;
    denominator += ga + gb;
  }
  return numerator / denominator;
}

}  // namespace tdfusion::metrics

#pragma once
// VIF: pixel-domain multi-scale visual information fidelity (VIF-P, Sheikh and Bovik), the classic vifp_mscale
// formulation that the fusion evaluators port (MMIF-CDDFuse utils/Evaluator.py, compare_viff):
//   scale s = 1..4: Gaussian window of size N = 2^(5-s) + 1 (17, 9, 5, 3), sigma = N / 5;
//   for s > 1 both images are first filtered ('valid') with THIS scale's window and decimated by 2;
//   local statistics by 'valid' filtering; num / den summed over all pixels of all scales.
// The clamps are applied in the classic order (see vif_accumulate); a NaN ratio (den = 0: a reference without
// any local variance) is reported as 1, as the classic Python port does.

#include "tdfusion/metrics/detail/filters.hpp"

#include <Eigen/Core>

#include <cmath>
#include <vector>

namespace tdfusion::metrics {

/// VIF's fixed constants.
inline constexpr double kVifNoiseVariance = 2.0;  ///< sigma_nsq
inline constexpr double kVifEps = 1e-10;
/// The smallest image side for which all four VIF scales are defined ('valid' filtering and decimation
/// shrink 41 pixels to 17 -> 13 -> 7 -> 3 at the window sizes 17, 9, 5, 3).
inline constexpr Eigen::Index kVifMinSize = 41;

namespace detail {

struct VifSums {
  double num = 0.0;
  double den = 0.0;
};

/// Adds one scale's terms. mu1/mu2: local means of reference and distorted image; e11, e22, e12: local means
/// of ref^2, dist^2, ref*dist. Per pixel, in the classic order:
///   s1, s2 clamped at 0;  g = s12 / (s1 + eps);  sv = s2 - g s12;
///   s1 < eps -> g = 0, sv = s2, s1 = 0;   s2 < eps -> g = 0, sv = 0;   g < 0 -> sv = s2, g = 0;   sv <= eps -> eps.
inline void vif_accumulate(const Array& mu1, const Array& mu2, const Array& e11, const Array& e22, const Array& e12,
                           VifSums& sums) {
  const double* m1 = mu1.data();
  const double* m2 = mu2.data();
  const double* p11 = e11.data();
  const double* p22 = e22.data();
  const double* p12 = e12.data();
  double num = 0.0, den = 0.0;
  for (Eigen::Index i = 0; i < mu1.size(); ++i) {
    double s1 = p11[i] - m1[i] * m1[i];
    double s2 = p22[i] - m2[i] * m2[i];
    const double s12 = p12[i] - m1[i] * m2[i];
    if (s1 < 0.0) s1 = 0.0;
    if (s2 < 0.0) s2 = 0.0;
    double g = s12 / (s1 + kVifEps);
    double sv = s2 - g * s12;
    if (s1 < kVifEps) {
      g = 0.0;
      sv = s2;
      s1 = 0.0;
    }
    if (s2 < kVifEps) {
      g = 0.0;
      sv = 0.0;
    }
    if (g < 0.0) {
      sv = s2;
      g = 0.0;
    }
    if (sv <= kVifEps) sv = kVifEps;
    num += std::log10(1.0 + g * g * s1 / (sv + kVifNoiseVariance));
    den += std::log10(1.0 + s1 / kVifNoiseVariance);
  }
  sums.num += num;
  sums.den += den;
}

/// VIF of each reference against one distorted image; the distorted image's statistics are shared.
inline std::vector<double> vif_against(const std::vector<const Array*>& references, const Array& distorted) {
  check_min_size(distorted, kVifMinSize, "VIF");
  for (const Array* reference : references) check_same_size(*reference, distorted, "VIF");
  std::vector<Array> refs;
  for (const Array* reference : references) refs.push_back(*reference);
  Array dist = distorted;
  std::vector<VifSums> sums(refs.size());
  for (int scale = 1; scale <= 4; ++scale) {
    const int size = (1 << (5 - scale)) + 1;
    const std::vector<double> taps = gaussian_taps(size, size / 5.0);
    if (scale > 1) {
      dist = decimate(filter_valid(dist, taps));
      for (Array& ref : refs) ref = decimate(filter_valid(ref, taps));
    }
    const Array mu2 = filter_valid(dist, taps);
    const Array e22 = filter_valid(dist.square(), taps);
    for (std::size_t k = 0; k < refs.size(); ++k) {
      const Array mu1 = filter_valid(refs[k], taps);
      const Array e11 = filter_valid(refs[k].square(), taps);
      const Array e12 = filter_valid(refs[k] * dist, taps);
      vif_accumulate(mu1, mu2, e11, e22, e12, sums[k]);
    }
  }
  std::vector<double> result;
  for (const VifSums& s : sums) {
    const double ratio = s.num / s.den;
    result.push_back(std::isnan(ratio) ? 1.0 : ratio);
  }
  return result;
}

}  // namespace detail

/// VIF-P of `distorted` (the fused image) against `reference` (a source image). Both at least 41 x 41.
inline double vif(const Eigen::ArrayXXd& reference, const Eigen::ArrayXXd& distorted) {
  return detail::vif_against({&reference}, distorted)[0];
}

}  // namespace tdfusion::metrics

#pragma once
// VIF: pixel-domain multi-scale visual information fidelity (VIF-P, Sheikh and Bovik), the classic vifp_mscale
// formulation that the fusion evaluators port (MMIF-CDDFuse utils/Evaluator.py, compare_viff):
//   scale s = 1..4: Gaussian window of size N = 2^(5-s) + 1 (17, 9, 5, 3), sigma = N / 5;
//   for s > 1 both images are first filtered ('valid') with THIS scale's window and decimated by 2;
//   local statistics by 'valid' filtering; num / den summed over all pixels of all scales.
// The clamps are applied in the classic order (see vif_terms); a NaN ratio (den = 0: a reference without
// any local variance) is reported as 1, as the classic Python port does.
// Conditioning: in flat regions of the smoothed scales the variances are round-off (~1e-10, E[x^2] - mu^2 of
// values ~200), right at eps, and g = s12 / s1 can then be large; so two correct implementations that only sum
// in another order (2-D vs separable windows) agree to ~1e-7 relative on such images (TNO 22), not to 1e-15.

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

/// One reference's terms of one output column. mu1/mu2: local means of reference and distorted image; e11, e22,
/// e12: local means of ref^2, dist^2, ref*dist. Per pixel, in the classic order:
///   s1, s2 clamped at 0;  g = s12 / (s1 + eps);  sv = s2 - g s12;
///   s1 < eps -> g = 0, sv = s2, s1 = 0;   s2 < eps -> g = 0, sv = 0;   g < 0 -> sv = s2, g = 0;   sv <= eps -> eps.
/// num_arg / den_arg receive 1 + g^2 s1 / (sv + sigma_nsq) and 1 + s1 / sigma_nsq.
inline void vif_terms(const Eigen::ArrayXd& mu1, const Eigen::ArrayXd& mu2, const Eigen::ArrayXd& e11,
                      const Eigen::ArrayXd& e22, const Eigen::ArrayXd& e12, Eigen::ArrayXd& num_arg,
                      Eigen::ArrayXd& den_arg) {
  num_arg.resize(mu1.size());
  den_arg.resize(mu1.size());
  for (Eigen::Index i = 0; i < mu1.size(); ++i) {
    double s1 = e11[i] - mu1[i] * mu1[i];
    double s2 = e22[i] - mu2[i] * mu2[i];
    const double s12 = e12[i] - mu1[i] * mu2[i];
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
    num_arg[i] = 1.0 + g * g * s1 / (sv + kVifNoiseVariance);
    den_arg[i] = 1.0 + s1 / kVifNoiseVariance;
  }
}

/// VIF of each reference against one distorted image; the distorted image's statistics are shared.
/// The classic code sums log10 terms; the ratio num / den does not depend on the base, so natural logs
/// (vectorised) are summed instead.
inline std::vector<double> vif_against(const std::vector<const Array*>& references, const Array& distorted) {
  check_min_size(distorted, kVifMinSize, "VIF");
  for (const Array* reference : references) check_same_size(*reference, distorted, "VIF");
  const std::size_t count = references.size();
  std::vector<Array> refs;  // the decimated references of scales > 1
  Array dist;
  std::vector<VifSums> sums(count);
  Eigen::ArrayXd hd, hdd, mu2, e22, hr, hrr, hrd, mu1, e11, e12, num_arg, den_arg;
  for (int scale = 1; scale <= 4; ++scale) {
    const int size = (1 << (5 - scale)) + 1;
    const std::vector<double> taps = gaussian_taps(size, size / 5.0);
    if (scale == 2) {
      dist = filter_decimate(distorted, taps);
      for (const Array* reference : references) refs.push_back(filter_decimate(*reference, taps));
    } else if (scale > 2) {
      dist = filter_decimate(dist, taps);
      for (Array& ref : refs) ref = filter_decimate(ref, taps);
    }
    const Array& d = scale == 1 ? distorted : dist;
    const Eigen::Index out_cols = d.cols() - size + 1;
    for (Eigen::Index c = 0; c < out_cols; ++c) {
      horizontal_pass([&](Eigen::Index k) { return d.col(k); }, c, taps, hd);
      horizontal_pass([&](Eigen::Index k) { return d.col(k).square(); }, c, taps, hdd);
      vertical_pass(hd, taps, mu2);
      vertical_pass(hdd, taps, e22);
      for (std::size_t k = 0; k < count; ++k) {
        const Array& r = scale == 1 ? *references[k] : refs[k];
        horizontal_pass([&](Eigen::Index j) { return r.col(j); }, c, taps, hr);
        horizontal_pass([&](Eigen::Index j) { return r.col(j).square(); }, c, taps, hrr);
        horizontal_pass([&](Eigen::Index j) { return r.col(j) * d.col(j); }, c, taps, hrd);
        vertical_pass(hr, taps, mu1);
        vertical_pass(hrr, taps, e11);
        vertical_pass(hrd, taps, e12);
        vif_terms(mu1, mu2, e11, e22, e12, num_arg, den_arg);
        sums[k].num += num_arg.log().sum();
        sums[k].den += den_arg.log().sum();
      }
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


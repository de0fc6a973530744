#pragma once
// Summaries of repeated runs (e.g. one result per seed): the mean with its Student-t confidence interval.

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tdfusion::metrics {

/// The p-quantile of Student's t distribution with `dof` degrees of freedom (e.g. 2.7764 for p = 0.975 and 4
/// degrees of freedom): bisection on the distribution function, itself Simpson's rule on the density, to about
/// 1e-9 for p up to 0.999.
inline double student_t_quantile(double p, int64_t dof) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "tdfusion: student_t_quantile needs p in (0, 1), got ", p);
  TORCH_CHECK(dof > 0, "tdfusion: student_t_quantile needs positive degrees of freedom, got ", dof);
  if (p < 0.5) return -student_t_quantile(1.0 - p, dof);
  const double nu = static_cast<double>(dof);
  constexpr double kPi = 3.14159265358979323846;
  const double log_scale = std::lgamma((nu + 1) / 2) - std::lgamma(nu / 2) - 0.5 * std::log(nu * kPi);
  auto density = [&](double t) { return std::exp(log_scale - (nu + 1) / 2 * std::log1p(t * t / nu)); };
  auto distribution = [&](double x) {  // P(T <= x) for x >= 0
    constexpr int kIntervals = 4000;  // even
    const double h = x / kIntervals;
    double sum = density(0.0) + density(x);
    for (int i = 1; i < kIntervals; ++i) sum += (i % 2 == 1 ? 4.0 : 2.0) * density(i * h);
    return 0.5 + sum * h / 3.0;
  };
  double low = 0.0, high = 1.0;
  while (distribution(high) < p) high *= 2.0;
  for (int i = 0; i < 60; ++i) {
    const double middle = 0.5 * (low + high);
    (distribution(middle) < p ? low : high) = middle;
  }
  return 0.5 * (low + high);
}

/// The mean of n values and its two-sided confidence interval mean ± t(1 - (1 - level) / 2, n - 1) · s / √n
/// (s the sample standard deviation); with fewer than two values the interval is undefined (NaN).
struct MeanInterval {
  double mean = std::numeric_limits<double>::quiet_NaN();
  double low = std::numeric_limits<double>::quiet_NaN();
  double high = std::numeric_limits<double>::quiet_NaN();
  int64_t count = 0;
};

inline MeanInterval mean_interval(const std::vector<double>& values, double level = 0.95) {
  TORCH_CHECK(level > 0.0 && level < 1.0, "tdfusion: mean_interval needs a level in (0, 1), got ", level);
  MeanInterval result;
  result.count = static_cast<int64_t>(values.size());
  if (values.empty()) return result;
  double sum = 0.0;
  for (const double v : values) sum += v;
  result.mean = sum / static_cast<double>(values.size());
  if (values.size() < 2) return result;
  double squares = 0.0;
  for (const double v : values) squares += (v - result.mean) * (v - result.mean);
  const double n = static_cast<double>(values.size());
  const double half = student_t_quantile(1.0 - (1.0 - level) / 2.0, result.count - 1) * std::sqrt(squares / (n - 1) / n);
  result.low = result.mean - half;
  result.high = result.mean + half;
  return result;
}

}  // namespace tdfusion::metrics

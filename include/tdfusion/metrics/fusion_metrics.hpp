#pragma once
// Fusion metrics and the two community evaluation protocols of spec section 8.
//
// Every metric works on 8-bit grey images held as H x W Eigen::ArrayXXd with values 0..255, in double
// precision; `to_grey8` makes them from image tensors. The individual metrics live in metrics/fusion/:
//   entropy (EN), standard_deviation (SD), spatial_frequency (SF), average_gradient (AG),
//   mutual_information (MI, one pair), scd (SCD), vif (VIF, one pair), qabf (Qabf), ssim (SSIM, one pair).
// `evaluate_fusion` computes a protocol's row. Numbers are comparable only within one protocol:
//   cddfuse  (the MMIF-CDDFuse evaluator, used by most peer tables): all nine metrics; MI, VIF and SSIM are
//            SUMS of the (ir, fused) and (vi, fused) terms; SSIM with data range 2 (old scikit-image float default).
//   tdfusion (the TDFusion paper's evaluator): EN, SF, SCD, VIF, Qabf, SSIM; VIF and SSIM are MEANS of the two
//            terms; SSIM on 8-bit data (np.uint8 truncation of the values) with data range 255.

#include "tdfusion/metrics/detail/parallel.hpp"
#include "tdfusion/metrics/fusion/qabf.hpp"
#include "tdfusion/metrics/fusion/ssim.hpp"
#include "tdfusion/metrics/fusion/statistics.hpp"
#include "tdfusion/metrics/fusion/vif.hpp"

#include <torch/torch.h>

#include <Eigen/Core>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>


namespace tdfusion::metrics {

enum class Protocol {
  cddfuse,   ///< MMIF-CDDFuse evaluator: EN SD SF AG MI SCD VIF Qabf SSIM, pair terms summed
  tdfusion,  ///< the paper's evaluator: EN SF SCD VIF Qabf SSIM, pair terms averaged
};

/// "cddfuse" or "tdfusion".
inline std::string protocol_name(Protocol protocol) {
  return protocol == Protocol::cddfuse ? "cddfuse" : "tdfusion";
}

/// Inverse of protocol_name.
inline Protocol parse_protocol(const std::string& name) {
  if (name == "cddfuse") return Protocol::cddfuse;
  if (name == "tdfusion") return Protocol::tdfusion;
  throw std::invalid_argument("tdfusion: unknown metric protocol '" + name + "' (use cddfuse or tdfusion)");
}

/// One sentence that says how a protocol's numbers were computed, for table captions.
inline std::string protocol_description(Protocol protocol) {
  if (protocol == Protocol::cddfuse) {
    return "protocol cddfuse (MMIF-CDDFuse evaluator): MI, VIF and SSIM are sums of the (ir, fused) and "
           "(vi, fused) terms, MI in nats, SSIM with data range 2";
  }
  return "protocol tdfusion (TDFusion paper evaluator): VIF and SSIM are means of the (ir, fused) and "
         "(vi, fused) terms, SSIM on 8-bit data with data range 255";
}

/// The metrics of a protocol, in table order.
inline std::vector<std::string> metric_names(Protocol protocol) {
  if (protocol == Protocol::cddfuse) return {"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"};
  return {"EN", "SF", "SCD", "VIF", "Qabf", "SSIM"};
}

/// One image's metrics, in metric_names order.
struct MetricRow {
  std::vector<std::pair<std::string, double>> values;

  /// The value of metric `name`; throws when the row has no such metric.
  double at(const std::string& name) const {
    for (const auto& [metric, value] : values) {
      if (metric == name) return value;
    }
    throw std::out_of_range("tdfusion: the metric row has no metric '" + name + "'");
  }
};

/// The metrics of `protocol` for one fused image. ir, vi, fused: H x W grey values in [0, 255] (see to_grey8),
/// all the same size, at least 41 x 41 (VIF's four scales). `threads`: 1 computes the metrics one after another;
/// more (0: all cores) computes independent ones concurrently, which helps a single large image (the folder
/// driver parallelises over images instead).
inline MetricRow evaluate_fusion(const Eigen::ArrayXXd& ir, const Eigen::ArrayXXd& vi, const Eigen::ArrayXXd& fused,
                                 Protocol protocol, int threads = 1) {
  detail::check_same_size(ir, fused, "evaluate_fusion (infrared vs fused)");
  detail::check_same_size(vi, fused, "evaluate_fusion (visible vs fused)");
  detail::check_min_size(fused, kVifMinSize, "evaluate_fusion (VIF's four scales)");
  for (const auto* image : {&ir, &vi, &fused}) {
    if (!((*image >= 0.0) && (*image <= 255.0)).all()) {  // NaN fails both comparisons
      throw std::invalid_argument("tdfusion: evaluate_fusion expects grey values in [0, 255] (see to_grey8)");
    }
  }
  const bool cddfuse = protocol == Protocol::cddfuse;
  const double ssim_range = cddfuse ? 2.0 : 255.0;
  const int workers = detail::resolve_threads(threads);

  double en = 0, sd = 0, sf = 0, ag = 0, mi = 0, scd_value = 0, vif_ir = 0, vif_vi = 0, q = 0, ssim_ir = 0, ssim_vi = 0;
  std::vector<std::function<void()>> tasks;
  tasks.emplace_back([&] {
    en = entropy(fused);
    sf = spatial_frequency(fused);
    scd_value = scd(ir, vi, fused);
    if (cddfuse) {
      sd = standard_deviation(fused);
      ag = average_gradient(fused);
      mi = mutual_information(fused, ir) + mutual_information(fused, vi);
    }
  });
  if (workers > 1) {  // separately: the fused image's VIF statistics are computed twice, in parallel
    tasks.emplace_back([&] { vif_ir = vif(ir, fused); });
    tasks.emplace_back([&] { vif_vi = vif(vi, fused); });
  } else {
    tasks.emplace_back([&] {
      const std::vector<double> both = detail::vif_against({&ir, &vi}, fused);
      vif_ir = both[0];
      vif_vi = both[1];
    });
  }
  tasks.emplace_back([&] { q = qabf(ir, vi, fused); });
  // The paper's evaluator hands SSIM np.uint8(image): truncation, a no-op on integer grey levels.
  tasks.emplace_back([&] { ssim_ir = cddfuse ? ssim(fused, ir, ssim_range) : ssim_uint8(fused, ir, ssim_range); });
  tasks.emplace_back([&] { ssim_vi = cddfuse ? ssim(fused, vi, ssim_range) : ssim_uint8(fused, vi, ssim_range); });
  detail::parallel_for(tasks.size(), workers, [&](std::size_t i) { tasks[i](); });

  MetricRow row;
  if (cddfuse) {
    row.values = {{"EN", en}, {"SD", sd}, {"SF", sf}, {"AG", ag}, {"MI", mi}, {"SCD", scd_value},
                  {"VIF", vif_ir + vif_vi}, {"Qabf", q}, {"SSIM", ssim_ir + ssim_vi}};
  } else {
    row.values = {{"EN", en}, {"SF", sf}, {"SCD", scd_value}, {"VIF", (vif_ir + vif_vi) / 2.0},
                  {"Qabf", q}, {"SSIM", (ssim_ir + ssim_vi) / 2.0}};
  }
  return row;
}

namespace detail {

/// Round-half-to-even of n / 1000 for n >= 0 (numpy's np.round on the exact value).
inline int round_thousandths(int n) {
  const int quotient = n / 1000, remainder = n % 1000;
  return quotient + ((remainder > 500 || (remainder == 500 && (quotient & 1))) ? 1 : 0);
}

template <class T>
Eigen::ArrayXXd grey8_from(const T* data, int64_t channels, int64_t height, int64_t width, bool levels_given) {
  const int64_t plane = height * width;
  auto level = [&](int64_t index) {
    const double v = static_cast<double>(data[index]);
    TORCH_CHECK(std::isfinite(v), "tdfusion: to_grey8 got a NaN or infinite value");
    if (levels_given) return static_cast<int>(v);
    return static_cast<int>(std::nearbyint(std::min(std::max(v, 0.0), 1.0) * 255.0));
  };
  Eigen::ArrayXXd grey(height, width);
  for (int64_t r = 0; r < height; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      const int64_t i = r * width + c;
      const int value = channels == 1
                            ? level(i)
                            : round_thousandths(299 * level(i) + 587 * level(plane + i) + 114 * level(2 * plane + i));
      grey(r, c) = value;
    }
  }
  return grey;
}

}  // namespace detail

/// The 8-bit grey image the metrics take (spec section 8), from an image tensor: H x W, 1 x H x W or 3 x H x W,
/// floating point in [0, 1] (as io::read_image returns) or uint8 levels. Floating values are first quantised
/// per channel as an 8-bit file stores them (clamp to [0, 1], round(v * 255)); three channels then become
/// 0.299 R + 0.587 G + 0.114 B, rounded half to even on the exact value (identical channels give the channel).
/// The CDDFuse evaluator gets there through OpenCV's float32 cvtColor and np.round; the two can differ by one
/// level on the rare pixels where the exact luma ends in .5.
inline Eigen::ArrayXXd to_grey8(const torch::Tensor& image) {
  TORCH_CHECK(image.defined(), "tdfusion: to_grey8 got an undefined tensor");
  TORCH_CHECK(image.dim() == 2 || (image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3)),
              "tdfusion: to_grey8 expects H x W, 1 x H x W or 3 x H x W, got shape ", image.sizes());
  const torch::Tensor chw = image.dim() == 2 ? image.unsqueeze(0) : image;
  const int64_t channels = chw.size(0), height = chw.size(1), width = chw.size(2);
  TORCH_CHECK(height > 0 && width > 0, "tdfusion: to_grey8 got an empty image, shape ", image.sizes());
  // Plain loops rather than tensor ops: this runs inside the folder driver's worker threads, where ATen's own
  // intra-op threads would oversubscribe the cores.
  torch::Tensor cpu = chw.detach().to(torch::kCPU).contiguous();
  if (cpu.scalar_type() == torch::kFloat) {
    return detail::grey8_from(cpu.data_ptr<float>(), channels, height, width, /*levels_given=*/false);
  }
  if (cpu.scalar_type() == torch::kByte) {
    return detail::grey8_from(cpu.data_ptr<uint8_t>(), channels, height, width, /*levels_given=*/true);
  }
  TORCH_CHECK(cpu.is_floating_point(),
              "tdfusion: to_grey8 expects floating-point values in [0, 1] or uint8 levels, got ", cpu.dtype());
  cpu = cpu.to(torch::kDouble);
  return detail::grey8_from(cpu.data_ptr<double>(), channels, height, width, false);
}

}  // namespace tdfusion::metrics


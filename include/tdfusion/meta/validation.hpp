#pragma once
// Evaluation of the trainer on a validation split: the task loss and the task's metrics (mIoU or AP, see
// metrics/task_evaluation.hpp) of T on F's fused images, and the fusion metrics of one protocol (spec
// section 8) of those fused images against their sources. Both are computed on the images the task network
// sees, i.e. at the data set's task size; sources and fused images are quantised to 8 bits as an image file
// would store them.

#include "tdfusion/metrics/detail/parallel.hpp"
#include "tdfusion/metrics/fusion_metrics.hpp"
#include "tdfusion/metrics/task_evaluation.hpp"

#include <torch/torch.h>

#include <Eigen/Core>

#include <array>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace tdfusion::meta {

struct ValidationOptions {
  TORCH_ARG(int64_t, every_epochs) = 1;  ///< during fit: validate after every n-th epoch
  TORCH_ARG(bool, fusion_metrics) = true;
  TORCH_ARG(metrics::Protocol, protocol) = metrics::Protocol::tdfusion;
  TORCH_ARG(int, threads) = 0;  ///< fusion-metric threads; 0: all cores
  TORCH_ARG(metrics::TaskEvaluationOptions, task) = {};
};

/// What one validation pass measured.
struct ValidationReport {
  int64_t epoch = -1;    ///< the epoch just finished, counted from 0 (-1: before any training)
  int64_t samples = 0;   ///< validation images
  double task_loss = 0;  ///< mean task loss per image
  metrics::Protocol protocol = metrics::Protocol::tdfusion;
  metrics::MetricRow fusion;  ///< mean fusion metrics of `protocol` (empty when disabled)
  metrics::TaskMetrics task;  ///< the task's metrics (empty for a task without any)
};

/// One line: images, task loss, the task's headline metrics and the fusion metrics.
inline std::string format_validation(const ValidationReport& r) {
  std::ostringstream out;
  out << "validation (" << r.samples << " images): task loss " << r.task_loss;
  for (const auto& [name, value] : r.task.summary.values) out << ", " << name << " " << value;
  if (!r.fusion.values.empty()) {
    out << "; fusion metrics (" << metrics::protocol_name(r.protocol) << ")";
    for (const auto& [name, value] : r.fusion.values) out << " " << name << " " << value;
  }
  return out.str();
}

namespace detail {

/// Running means of the fusion metrics over (ir, vi, fused) grey triplets, computed on all cores in chunks
/// (a whole validation set of decoded doubles would not need to fit in memory).
class FusionMetricMeans {
 public:
  FusionMetricMeans(metrics::Protocol protocol, int threads) : protocol_(protocol), threads_(threads) {}

  /// Adds image n of three N x 1 x H x W batches in [0, 1].
  void add(const torch::Tensor& ir, const torch::Tensor& vi, const torch::Tensor& fused) {
    for (int64_t n = 0; n < fused.size(0); ++n) {
      pending_.push_back({metrics::to_grey8(ir[n]), metrics::to_grey8(vi[n]), metrics::to_grey8(fused[n])});
      TORCH_CHECK(pending_.back()[2].rows() >= metrics::kVifMinSize && pending_.back()[2].cols() >= metrics::kVifMinSize,
                  "tdfusion: validation images are ", fused.size(2), " x ", fused.size(3), ", smaller than the ",
                  metrics::kVifMinSize, " x ", metrics::kVifMinSize,
                  " that VIF's four scales need; use a larger task size or ValidationOptions().fusion_metrics(false)");
    }
    if (pending_.size() >= 8 * static_cast<size_t>(metrics::detail::resolve_threads(threads_))) flush();
  }

  metrics::MetricRow mean() {
    flush();
    metrics::MetricRow row;
    for (size_t m = 0; m < names_.size(); ++m) row.values.emplace_back(names_[m], sums_[m] / static_cast<double>(count_));
    return row;
  }

 private:
  void flush() {
    std::vector<metrics::MetricRow> rows(pending_.size());
    metrics::detail::parallel_for(pending_.size(), threads_, [&](size_t i) {
      rows[i] = metrics::evaluate_fusion(pending_[i][0], pending_[i][1], pending_[i][2], protocol_);
    });
    for (const metrics::MetricRow& row : rows) {
      if (sums_.empty()) {
        for (const auto& [name, value] : row.values) names_.push_back(name);
        sums_.assign(names_.size(), 0.0);
      }
      for (size_t m = 0; m < names_.size(); ++m) sums_[m] += row.values[m].second;
      ++count_;
    }
    pending_.clear();
  }

  metrics::Protocol protocol_;
  int threads_;
  std::vector<std::array<Eigen::ArrayXXd, 3>> pending_;
  std::vector<std::string> names_;
  std::vector<double> sums_;
  int64_t count_ = 0;
};

}  // namespace detail

}  // namespace tdfusion::meta

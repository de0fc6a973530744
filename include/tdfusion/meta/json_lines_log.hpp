#pragma once
// JsonLinesLog: a training callback that appends every report to a JSON-lines file, one object per line,
// flushed as written, so that a run killed at any point keeps its loss curves. Needs nlohmann/json (as the
// metric reports do); not part of the umbrella header's dependency-free core.

#include "tdfusion/meta/options.hpp"
#include "tdfusion/meta/validation.hpp"
#include "tdfusion/metrics/report.hpp"

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

namespace tdfusion::meta {

class JsonLinesLog {
 public:
  /// Appends to `path` (created if missing), so a resumed run continues its log.
  explicit JsonLinesLog(const std::string& path) : out_(std::make_shared<std::ofstream>(path, std::ios::app)) {
    TORCH_CHECK(out_->good(), "tdfusion: cannot open log file ", path, ": ", std::strerror(errno));
  }

  void operator()(const MetaStepReport& r) const {
    write({{"kind", "meta"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss},
           {"task_loss", r.task_loss}, {"hypergradient_max", r.hypergradient_max}});
  }
  void operator()(const TrainStepReport& r) const {
    write({{"kind", "train"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss},
           {"task_loss", r.task_loss}});
  }
  void operator()(const FusionStepReport& r) const {
    write({{"kind", "fusion"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss}});
  }
  void operator()(const EpochReport& r) const {
    write({{"kind", "epoch"}, {"epoch", r.epoch}, {"fusion_loss", r.fusion_loss}, {"task_loss", r.task_loss},
           {"learning_rate", r.learning_rate}});
  }
  void operator()(const ValidationReport& r) const {
    write({{"kind", "validation"},
           {"epoch", r.epoch},
           {"samples", r.samples},
           {"task_loss", r.task_loss},
           {"task_metrics", metrics::to_json(r.task.summary)},
           {"task_metrics_per_class", metrics::to_json(r.task.per_class)},
           {"protocol", metrics::protocol_name(r.protocol)},
           {"fusion_metrics", metrics::to_json(r.fusion)}});
  }

 private:
  void write(const nlohmann::json& record) const { *out_ << record.dump() << std::endl; }
  std::shared_ptr<std::ofstream> out_;  // shared: callbacks are copied into fit()
};

}  // namespace tdfusion::meta

// The summary over seeds (means, t-intervals, Delta, the verdict rule), results.md and the figure.
#include "claim_experiment.hpp"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

namespace claim {

namespace {

/// The verdict rule, fixed before the full run (README): the claim is reproduced when Delta > 0 on at least
/// 80% of the seeds (4 of 5) and the 95% interval of Delta lies above 0; refuted in this setting when a
/// constant-weight arm differs clearly from 0.5 / 0.5 (its paired 95% interval excludes 0: the weights
/// matter) yet the mean Delta is <= 0; inconclusive otherwise. It needs at least 5 seeds.
constexpr size_t kVerdictSeeds = 5;
constexpr double kPositiveShare = 0.8;

bool has(const Json& object, const std::string& key) { return object.is_object() && object.contains(key); }

Json interval_json(const std::vector<double>& values) {
  const td::metrics::MeanInterval m = td::metrics::mean_interval(values);
  return {{"mean", m.mean}, {"ci95", {m.low, m.high}}, {"seeds", m.count}, {"values", values}};
}

/// Per seed, `arm`'s mIoU minus the fixed 0.5 / 0.5 arm's (seeds that ran both).
std::vector<double> paired_differences(const Json& seeds, const std::string& arm) {
  std::vector<double> differences;
  for (const auto& seed : seeds) {
    const auto& arms = seed.at("arms");
    if (has(arms, arm) && has(arms, "fixed")) {
      differences.push_back(arms.at(arm).at("miou").get<double>() - arms.at("fixed").at("miou").get<double>());
    }
  }
  return differences;
}

bool excludes_zero(const Json& interval) {
  const auto& ci = interval.at("ci95");
  return !ci[0].is_null() && !ci[1].is_null() && (ci[0].get<double>() > 0 || ci[1].get<double>() < 0);
}

std::string number(const Json& value, int precision = 4) {
  if (value.is_null() || std::isnan(value.get<double>())) return "-";
  std::ostringstream out;
  out << std::fixed << std::setprecision(precision) << value.get<double>();
  return out.str();
}

std::string interval(const Json& summary) {
  return "[" + number(summary.at("ci95")[0]) + ", " + number(summary.at("ci95")[1]) + "]";
}

/// The Markdown tables of one setting.
void setting_markdown(std::ostringstream& out, const Json& setting) {
  const Json& summary = setting.at("summary");
  out << "| arm | mIoU (fresh task network), mean | 95% interval | seeds | per seed | mIoU of T trained alongside |\n"
      << "|:--|--:|--:|--:|:--|--:|\n";
  for (const auto& [arm, s] : summary.at("arms").items()) {
    std::string per_seed;
    for (const auto& v : s.at("values")) per_seed += (per_seed.empty() ? "" : ", ") + number(v, 3);
    out << "| " << arm << " | " << number(s.at("mean")) << " | " << interval(s) << " | " << s.at("seeds") << " | "
        << per_seed << " | " << (has(s, "alongside") ? number(s.at("alongside").at("mean")) : "-") << " |\n";
  }
  const Json& delta = summary.at("delta");
  out << "\nDelta = mIoU(learned) - mIoU(fixed 0.5/0.5) per seed: mean " << number(delta.at("mean")) << ", 95% interval "
      << interval(delta) << ", positive on " << summary.at("positive_seeds") << " of " << delta.at("seeds")
      << " seeds.\n";
  for (const auto& [arm, c] : summary.at("constant_weights").items()) {
    out << "Constant weights: mIoU(" << arm << ") - mIoU(fixed) mean " << number(c.at("mean")) << ", 95% interval "
        << interval(c) << " (" << c.at("seeds") << " seeds).\n";
  }
  if (has(summary, "mechanism")) {
    out << "\nMechanism (learned arm, test images, mean over seeds): mean weight on the infrared image inside each "
           "class's masks, with the pair in its order and with the inputs swapped.\n\n| | ";
    const Json& m = summary.at("mechanism");
    for (const auto& [name, v] : m.at("w_ir").items()) out << name << " | ";
    out << "\n|:--|";
    for (size_t i = 0; i < m.at("w_ir").size(); ++i) out << "--:|";
    out << "\n";
    for (const char* key : {"w_ir", "w_ir_swapped"}) {
      out << "| " << key << " | ";
      for (const auto& [name, v] : m.at(key).items()) out << number(v) << " | ";
      out << "\n";
    }
  }
}

}  // namespace

Json summarise(const Json& seeds, bool with_verdict) {
  Json summary;
  std::vector<std::string> order;
  for (const auto& seed : seeds)
    for (const auto& [arm, record] : seed.at("arms").items())
      if (std::find(order.begin(), order.end(), arm) == order.end()) order.push_back(arm);
  summary["arms"] = Json::object();
  for (const std::string& arm : order) {
    std::vector<double> miou, alongside;
    for (const auto& seed : seeds) {
      if (!has(seed.at("arms"), arm)) continue;
      const auto& r = seed.at("arms").at(arm);
      miou.push_back(r.at("miou").get<double>());
      if (has(r, "alongside")) alongside.push_back(r.at("alongside").at("miou").get<double>());
    }
    Json s = interval_json(miou);
    if (!alongside.empty()) s["alongside"] = interval_json(alongside);
    summary["arms"][arm] = s;
  }
  const std::vector<double> delta = paired_differences(seeds, "learned");
  summary["delta"] = interval_json(delta);
  summary["delta_mean"] = summary["delta"]["mean"];
  summary["ci95"] = summary["delta"]["ci95"];
  summary["positive_seeds"] = std::count_if(delta.begin(), delta.end(), [](double d) { return d > 0; });
  bool weights_matter = false;
  summary["constant_weights"] = Json::object();
  for (const char* arm : {"fixed_0.2", "fixed_0.8"}) {
    const std::vector<double> d = paired_differences(seeds, arm);
    if (d.empty()) continue;
    summary["constant_weights"][arm] = interval_json(d);
    weights_matter = weights_matter || excludes_zero(summary["constant_weights"][arm]);
  }
  summary["weights_matter"] = weights_matter;
  // Mechanism: each class's mean weight averaged over the seeds whose test images have that class.
  Json mechanism, seeds_with;
  for (const auto& seed : seeds) {
    if (!has(seed.at("arms"), "learned")) continue;
    const auto& m = seed.at("arms").at("learned").at("mechanism");
    for (const char* key : {"w_ir", "w_ir_swapped"}) {
      for (const auto& [name, v] : m.at(key).items()) {
        mechanism[key][name] = (mechanism[key].contains(name) ? mechanism[key][name].get<double>() : 0.0) + v.get<double>();
        seeds_with[key][name] = (seeds_with[key].contains(name) ? seeds_with[key][name].get<double>() : 0.0) + 1.0;
      }
    }
  }
  for (auto& [key, classes] : mechanism.items())
    for (auto& [name, v] : classes.items()) v = v.get<double>() / seeds_with[key][name].get<double>();
  if (!mechanism.is_null()) summary["mechanism"] = mechanism;
  if (with_verdict) {
    const auto positive = summary["positive_seeds"].get<size_t>();
    const Json& ci = summary["ci95"];
    std::string verdict;
    if (delta.size() < kVerdictSeeds) {
      verdict = "none: the rule needs at least 5 seeds with both arms, this run has " + std::to_string(delta.size());
    } else if (static_cast<double>(positive) >= kPositiveShare * static_cast<double>(delta.size()) &&
               ci[0].get<double>() > 0) {
      verdict = "reproduces the claim";
    } else if (weights_matter && summary["delta_mean"].get<double>() <= 0) {
      verdict = "refutes the claim in this setting";
    } else {
      verdict = "inconclusive";
    }
    summary["verdict"] = verdict;
  }
  return summary;
}

std::string markdown(const Json& results) {
  std::ostringstream out;
  const Json& config = results.at("config");
  out << "# TDFusion's claim: learned vs fixed fusion loss, scored by a fresh task network\n\n"
      << "Configuration: " << config.dump() << "\n\n## Synthetic scenes\n\n";
  setting_markdown(out, results);
  out << "\n**Verdict** (rule fixed before the run): " << results.at("summary").at("verdict").get<std::string>() << ".\n"
      << "\n## MSRS (60 real pairs, masks filled from the detection boxes, 45 train / 15 test)\n\n";
  if (has(results.at("msrs"), "skipped")) {
    out << "Skipped: " << results.at("msrs").at("skipped").get<std::string>() << "\n";
  } else {
    setting_markdown(out, results.at("msrs"));
  }
  out << "\nFigure (synthetic test scenes of seed " << results.at("figure").at("seed") << "), columns: "
      << results.at("figure").at("columns").dump() << ".\n";
  return out.str();
}

void write_figure(const std::string& path, const Setting& s, std::vector<std::pair<std::string, ArmModels>> models,
                  int64_t scenes) {
  torch::NoGradGuard no_grad;
  const int64_t n = std::min<int64_t>(scenes, s.test.ir.size(0));
  const torch::Tensor ir = s.test.ir.narrow(0, 0, n), vi = s.test.vi.narrow(0, 0, n);
  std::vector<torch::Tensor> columns = {ir, vi, s.test.mask.narrow(0, 0, n).unsqueeze(1).to(torch::kFloat) /
                                                    static_cast<double>(s.classes - 1)};
  for (auto& [name, m] : models) {
    if (m.lpn) columns.push_back(ir_weights(m.lpn, ir, vi, 0).unsqueeze(1));
  }
  for (auto& [name, m] : models) {
    const td::EvalMode eval(*m.fusion);
    columns.push_back(m.fusion->forward(ir, vi));
  }
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<torch::Tensor> tiles;
    for (const auto& c : columns) tiles.push_back(torch::constant_pad_nd(c[i].clamp(0, 1), {2, 2, 2, 2}, 1.0));
    rows.push_back(torch::cat(tiles, 2));
  }
  td::io::write_image(path, torch::cat(rows, 1));
}

}  // namespace claim

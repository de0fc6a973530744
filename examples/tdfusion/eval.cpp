// `tdfusion eval`: fusion metrics of fused folders against their sources under one of the two community
// protocols, optionally with the task metrics of a trained run's task network; tables, Markdown, JSON, CSV
// and a chart.
#include "cli.hpp"

#include <tdfusion/io/atomic_file.hpp>
#include <tdfusion/io/checkpoint.hpp>
#include <tdfusion/meta/run_folder.hpp>
#include <tdfusion/metrics/bar_chart.hpp>
#include <tdfusion/metrics/evaluate_task.hpp>
#include <tdfusion/metrics/report.hpp>
#include <tdfusion/task/registry.hpp>

#include <filesystem>
#include <iostream>

namespace tdfusion::cli {

namespace {

namespace fs = std::filesystem;

struct EvalArgs {
  std::string ir, vi, protocol = "tdfusion", json, csv, markdown, chart, dataset, task_run, labels;
  std::vector<std::string> fused;  // DIR or LABEL=DIR
};

/// Adds the task metrics of the task network trained in `run` (its config.json and checkpoint.pt) to every table.
void add_task_metrics(std::vector<metrics::EvaluationTable>& tables, const std::string& run, const std::string& labels) {
  const meta::RunConfig config = meta::read_run_config((fs::path(run) / "config.json").string());
  const auto [height, width] = config.task_size.empty() ? std::pair<int64_t, int64_t>{0, 0}
                                                        : parse_size(config.task_size, "task_size of " + run);
  task::with_task(config.task, [&](auto tag) {
    using Task = typename decltype(tag)::type;
    Task net = task::make_task<Task>(config.classes);
    io::CheckpointState state;
    state.modules = {{"task", net.ptr()}};
    io::load_checkpoint((fs::path(run) / "checkpoint.pt").string(), state);
    for (auto& table : tables) {
      const metrics::TaskMetrics result = metrics::evaluate_task(net, table, labels, height, width);
      table.task = result.summary;
      table.task_per_class = result.per_class;
      table.task_description = config.task + " trained in " + run + " (input " +
                               (config.task_size.empty() ? std::string("each image's size") : config.task_size) +
                               "), labels " + labels;
    }
    return 0;
  });
}

/// The methods to evaluate: "LABEL=DIR", or DIR labelled by its name (by its parent's for a folder named
/// after a data set, as in peer_results/<method>/tno).
std::vector<std::pair<std::string, std::string>> methods_of(const std::vector<std::string>& fused) {
  std::vector<std::pair<std::string, std::string>> methods;
  for (const std::string& entry : fused) {
    const auto eq = entry.find('=');
    if (eq != std::string::npos) {
      methods.emplace_back(entry.substr(0, eq), entry.substr(eq + 1));
      continue;
    }
    const fs::path path = fs::path(entry).lexically_normal();
    const fs::path name = path.filename().empty() ? path.parent_path().filename() : path.filename();
    const bool generic = name == "tno" || name == "msrs" || name == "roadscene" || name == "llvip" || name == "m3fd" ||
                         name == "fused";
    methods.emplace_back(generic ? path.parent_path().filename().string() : name.string(), entry);
  }
  return methods;
}

int run_eval(const EvalArgs& args, int threads) {
  const auto options = metrics::FolderEvaluationOptions().protocol(metrics::parse_protocol(args.protocol)).threads(threads);
  std::vector<metrics::EvaluationTable> tables = metrics::evaluate_methods(args.ir, args.vi, methods_of(args.fused), options);
  if (!args.task_run.empty()) add_task_metrics(tables, args.task_run, args.labels);
  for (const auto& table : tables) std::cout << metrics::format_table(table) << '\n';
  const std::string markdown = metrics::format_markdown_comparison(tables, 4, args.dataset);
  if (tables.size() > 1) std::cout << markdown << '\n';
  if (!args.markdown.empty()) io::write_text_atomically(args.markdown, markdown);
  if (!args.json.empty()) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& table : tables) all.push_back(metrics::to_json(table));
    io::write_text_atomically(args.json, (tables.size() == 1 ? all[0] : all).dump(2) + "\n");
  }
  if (!args.csv.empty()) {
    std::string csv;
    for (size_t i = 0; i < tables.size(); ++i) {
      std::string part = metrics::format_csv(tables[i]);
      if (i > 0) part = part.substr(part.find('\n') + 1);  // one header line for all methods
      csv += part;
    }
    io::write_text_atomically(args.csv, csv);
  }
  if (!args.chart.empty()) metrics::write_comparison_chart(args.chart, tables);
  return 0;
}

}  // namespace

Subcommand add_eval(CLI::App& app, const int& threads) {
  auto args = std::make_shared<EvalArgs>();
  CLI::App* cmd = app.add_subcommand("eval", "fusion metrics of one or more fused folders (both community protocols)");
  cmd->add_option("--ir", args->ir, "infrared source folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--vi", args->vi, "visible source folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--fused", args->fused, "fused folder(s), DIR or LABEL=DIR; several give a comparison")->required();
  cmd->add_option("--protocol", args->protocol, "cddfuse (nine metrics, MI/VIF/SSIM summed) or tdfusion (the paper's)")
      ->check(CLI::IsMember({"cddfuse", "tdfusion"}))->capture_default_str();
  cmd->add_option("--json", args->json, "write the per-image results as JSON");
  cmd->add_option("--csv", args->csv, "write the per-image results as CSV");
  cmd->add_option("--markdown", args->markdown, "write the comparison as a Markdown table");
  cmd->add_option("--chart", args->chart, "write the comparison as a PNG bar chart");
  cmd->add_option("--dataset", args->dataset, "data set name for the Markdown caption");
  CLI::Option* task_run = cmd->add_option("--task-run", args->task_run,
                                          "a `tdfusion train` folder: add its task network's metrics (mIoU or AP)")
                              ->check(CLI::ExistingDirectory);
  cmd->add_option("--labels", args->labels, "the task labels of the images (YOLO .txt or class-id PNG), with --task-run")
      ->needs(task_run)
      ->check(CLI::ExistingDirectory);
  task_run->needs(cmd->get_option("--labels"));
  return {cmd, [args, &threads] { return run_eval(*args, threads); }};
}

}  // namespace tdfusion::cli

// TDFusion's one claim, tested so that it can fail: does a fusion loss meta-learned from the task loss serve
// the downstream task better than the predefined 0.5 / 0.5 loss?
//
//   build/examples/claim_experiment --seeds 0,1,2,3,4 --out DIR       # the full run (README: wall time)
//   build/examples/claim_experiment --quick --seeds 0,1 --out DIR     # a smoke run of a minute or two
//
// Per seed and data setting, every arm starts from one warm start (LightFusion F and SmallSegNet T trained a
// few epochs with the fixed loss), then trains with the same budget on the same phase-B samples:
//   learned     LPN (last convolution zero-initialised: it starts at exactly 0.5 / 0.5), bilevel, meta steps
//   fixed       FixedWeights 0.5 / 0.5 (the predefined loss)
//   fixed_0.2, fixed_0.8   infrared weight 0.2 / 0.8 (on the --constant-seeds: do the weights matter at all?)
// Scored by the paper's protocol: F frozen, the training and test images fused, a fresh task network (the
// same initial weights for all arms of a seed) trained on the fused training images and scored (mIoU) on the
// held-out ones; ir_only and vi_only feed it one modality. The task network trained alongside is reported
// too. Settings: synthetic scenes (64 training, 128 test scenes, 64 x 64, crops 48) on every seed; the 60
// MSRS pairs (masks filled from det_labels/fusion boxes, 45 / 15, at 60 x 80) on the --msrs-seeds. Each seed's arms do not
// depend on the other seeds run, so several processes can share one DIR, each with its own --seeds.
//
// Every finished (setting, seed, arm) is written to DIR at once and skipped on restart; DIR/config.json
// guards against mixing results of other budgets. Results depend only on the seeds, the options and the
// thread count (default 1).
#include "claim_experiment.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

namespace {

namespace fs = std::filesystem;
using claim::Json;

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  TORCH_CHECK(in.is_open(), "tdfusion: cannot read '", path.string(), "'");
  try {
    return Json::parse(in);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "tdfusion: '", path.string(), "' is not valid JSON (", e.what(),
                "); delete it to recompute that part");
  }
  return {};
}

void write_text(const fs::path& path, const std::string& text) { tdfusion::io::write_text_atomically(path.string(), text); }

/// The source tree's commit, with "-dirty" when tracked files differ from it; "unknown" without git.
std::string source_commit() {
  auto run = [](const std::string& command) {
    std::string text;
    if (FILE* pipe = popen(command.c_str(), "r")) {
      char buffer[256];
      while (fgets(buffer, sizeof buffer, pipe)) text += buffer;
      if (pclose(pipe) != 0) return std::string();
    }
    return text;
  };
  const std::string git = "git -C '" TDFUSION_SOURCE_DIR "' ";
  std::string commit = run(git + "rev-parse HEAD 2>/dev/null");
  if (commit.empty()) return "unknown";
  commit.pop_back();  // newline
  return commit + (run(git + "status --porcelain --untracked-files=no 2>/dev/null").empty() ? "" : "-dirty");
}

/// One setting of one seed: the warm start, then every arm, each skipped when its result file exists.
Json run_seed(const claim::Setting& setting, const claim::Budget& budget, uint64_t seed,
              const std::vector<claim::Arm>& arms, const fs::path& dir) {
  fs::create_directories(dir);
  const fs::path warm = dir / "warm_start.pt";
  if (!fs::exists(warm)) {
    const auto start = std::chrono::steady_clock::now();
    claim::warm_start(setting, budget, seed, warm.string());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    write_text(dir / "warm_start.json", Json{{"seconds", seconds}}.dump(2) + "\n");
  }
  Json record = {{"seed", seed}, {"warm_start_seconds", read_json(dir / "warm_start.json").at("seconds")},
                 {"arms", Json::object()}};
  for (const claim::Arm& arm : arms) {
    const fs::path file = dir / (arm.name + ".json");
    if (fs::exists(file)) {
      std::cout << setting.name << " seed " << seed << " " << arm.name << ": done before, read from " << file.string()
                << std::endl;
    } else {
      const Json result = claim::run_arm(arm, setting, budget, seed, warm.string(), (dir / (arm.name + ".pt")).string());
      write_text(file, result.dump(2) + "\n");
    }
    record["arms"][arm.name] = read_json(file);
    std::cout << setting.name << " seed " << seed << " " << arm.name << ": mIoU " << record["arms"][arm.name]["miou"]
              << std::endl;
  }
  return record;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<uint64_t> seeds = {0, 1, 2, 3, 4};
  std::string out, msrs = TDFUSION_SHARED_DIR "/data/msrs";
  bool quick = false;
  int threads = 1;
  std::vector<uint64_t> msrs_seeds = {0, 1, 2}, constant_seeds = {0, 1, 2};
  claim::Budget budget;
  CLI::App app("TDFusion's claim: learned vs fixed fusion loss, scored by a fresh task network on held-out data");
  app.add_option("--seeds", seeds, "comma-separated seeds")->delimiter(',')->capture_default_str();
  app.add_option("--out", out, "output folder (finished parts are kept and skipped on restart)")->required();
  app.add_flag("--quick", quick, "a smoke run of a minute or two: tiny data and budgets");
  app.add_option("--msrs", msrs, "MSRS folder with ir/, vi/ and det_labels/fusion/")->capture_default_str();
  app.add_option("--msrs-seeds", msrs_seeds, "the seeds (of --seeds) that also run MSRS")->delimiter(',')
      ->capture_default_str();
  app.add_option("--constant-seeds", constant_seeds, "the seeds (of --seeds) that also run fixed_0.2 / fixed_0.8")
      ->delimiter(',')->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (results depend on it)")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--warm-epochs", budget.warm_epochs, "epochs of the shared warm start")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--epochs", budget.epochs, "epochs per arm after the warm start")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--meta-steps", budget.meta_steps, "meta steps per epoch")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--meta-lr", budget.meta_lr, "step of the max-normalised G update")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--score-epochs", budget.score_epochs, "epochs of the fresh task network that scores an arm")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (quick) {
    budget.warm_epochs = 1;
    budget.epochs = 1;
    budget.meta_steps = 2;
    budget.score_epochs = 2;
  }
  tdfusion::reuse_freed_memory();
  tdfusion::use_cpu_threads(threads);

  try {
    const auto start = std::chrono::steady_clock::now();
    fs::create_directories(out);
    // What each (setting, seed, arm) result depends on; the seed lists only choose which of them run.
    const Json config = {{"quick", quick}, {"threads", threads}, {"budget", claim::to_json(budget)}};
    const fs::path config_path = fs::path(out) / "config.json";
    if (fs::exists(config_path)) {
      TORCH_CHECK(read_json(config_path) == config, "tdfusion: '", out, "' holds results of other options (",
                  config_path.string(), ": ", read_json(config_path).dump(), "; now: ", config.dump(),
                  "); use another --out");
    } else {
      write_text(config_path, config.dump(2) + "\n");
    }
    Json results = {{"config", config}, {"seeds", Json::array()}};
    results["config"]["commit"] = source_commit();
    results["config"]["seeds"] = seeds;
    results["config"]["msrs_seeds"] = msrs_seeds;
    results["config"]["constant_seeds"] = constant_seeds;
    auto listed = [](const std::vector<uint64_t>& list, uint64_t seed) {
      return std::find(list.begin(), list.end(), seed) != list.end();
    };
    for (const uint64_t seed : seeds) {
      const fs::path dir = fs::path(out) / "synthetic" / ("seed" + std::to_string(seed));
      results["seeds"].push_back(run_seed(claim::synthetic_setting(seed, quick), budget, seed,
                                          claim::arms_for(listed(constant_seeds, seed)), dir));
    }
    results["summary"] = claim::summarise(results["seeds"], /*with_verdict=*/true);

    results["msrs"] = {{"seeds", Json::array()}};
    for (const uint64_t seed : seeds) {
      if (!listed(msrs_seeds, seed)) continue;
      std::string why;
      const claim::Setting setting =
          claim::msrs_setting(msrs, (fs::path(out) / "msrs" / "masks").string(), seed, quick, &why);
      if (setting.name.empty()) {
        std::cout << "msrs: skipped: " << why << std::endl;
        results["msrs"] = {{"skipped", why}};
        break;
      }
      const fs::path dir = fs::path(out) / "msrs" / ("seed" + std::to_string(seed));
      results["msrs"]["seeds"].push_back(run_seed(setting, budget, seed, claim::arms_for(false), dir));
    }
    if (results["msrs"].contains("seeds")) results["msrs"]["summary"] = claim::summarise(results["msrs"]["seeds"], false);

    // The figure: test scenes of the first seed, every fusion arm's network.
    const claim::Setting figure_setting = claim::synthetic_setting(seeds.front(), quick);
    std::vector<std::pair<std::string, claim::ArmModels>> models;
    Json columns = {"infrared", "visible", "mask (background, warm, textured)", "learned w_ir"};
    for (const claim::Arm& arm : claim::arms_for(listed(constant_seeds, seeds.front()))) {
      if (arm.kind != claim::Arm::kLearned && arm.kind != claim::Arm::kFixed) continue;
      const fs::path model = fs::path(out) / "synthetic" / ("seed" + std::to_string(seeds.front())) / (arm.name + ".pt");
      models.emplace_back(arm.name, claim::load_arm_models(arm, model.string()));
      columns.push_back("fused " + arm.name);
    }
    claim::write_figure((fs::path(out) / "figure.png").string(), figure_setting, models, 4);
    results["figure"] = {{"seed", seeds.front()}, {"file", "figure.png"}, {"columns", columns}};
    // Compute time: the sum over the warm starts and arms (whichever invocations ran them), and this invocation.
    double compute_seconds = 0;
    for (const Json* list : {&results["seeds"], results["msrs"].contains("seeds") ? &results["msrs"]["seeds"] : nullptr}) {
      for (const auto& seed : list ? *list : Json::array()) {
        compute_seconds += seed["warm_start_seconds"].get<double>();
        for (const auto& [arm, record] : seed["arms"].items()) compute_seconds += record["seconds"].get<double>();
      }
    }
    results["compute_seconds"] = compute_seconds;
    results["invocation_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    write_text(fs::path(out) / "results.json", results.dump(2) + "\n");
    const std::string md = claim::markdown(results);
    write_text(fs::path(out) / "results.md", md);
    std::cout << '\n' << md << "\nwrote " << (fs::path(out) / "results.json").string() << ", results.md and figure.png\n";
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "claim_experiment: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

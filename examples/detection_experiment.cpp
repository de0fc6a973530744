// The paper's claim tested on real images: does a learned, task-driven fusion loss give a detector better
// held-out accuracy than a predefined loss, or than one modality alone?
//
//   build/examples/detection_experiment --data ../shared/data/msrs --out detection-experiment [--seeds 3]
//
// Data: the 60 MSRS pairs of ../shared/data/msrs with their real detection boxes (det_labels/fusion: person,
// bicycle, car). Split by a fixed rule: the pairs sorted by name, every 4th one (indices 3, 7, ..., 59) held out
// for testing (15 pairs), the other 45 for training. Every arm trains the same task network (SmallDetector)
// from the same initial weights, with the same budget (epochs, phase-B steps, learning rates, StepLR, sample
// stream) and seed:
//   (a) tdfusion    LightFusion + LPN (the learned loss) + detector, the bilevel optimiser
//   (b) fixed loss  LightFusion + FixedWeights (0.5 / 0.5) + detector, the same optimiser (no phase A)
//   (c) infrared    the detector alone on the infrared images
//   (d) visible     the detector alone on the visible luminance
// Reported on the held-out pairs: AP50 and AP50:95 (COCO-style, 101 points) of the detector at the task size,
// and for (a) and (b) the fusion metrics (tdfusion protocol) of the full-resolution fused images. Also written:
// results.json, results.md (the tables printed), and figure.png: for three held-out pairs, infrared, visible,
// the learned weight map w_A of the infrared image, fused (a) and fused (b).
#include <tdfusion/tdfusion.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

namespace {

namespace fs = std::filesystem;
using namespace tdfusion;

struct Config {
  std::string data, out = "detection-experiment", arms = "abcd";
  // Defaults sized for two CPU cores in under an hour: a detector from scratch on 45 images needs many epochs
  // (its class loss sits on a plateau for about 100 of them at this learning rate), so phase A gets 4 meta
  // steps per epoch instead of the release's 200.
  int64_t seeds = 1, epochs = 150, meta_steps = 4, lr_step = 120, crop = 128, task_height = 192, task_width = 256,
          holdout_every = 4, figure_pairs = 3;
  double lr = 3e-3;
};

struct ArmResult {
  std::string arm;
  uint64_t seed = 0;
  metrics::TaskMetrics detection;
  metrics::MetricRow fusion;  ///< (a) and (b) only
  double seconds = 0;
};

using Clock = std::chrono::steady_clock;
double since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

data::PairedFolderOptions folder_options(const Config& c, bool flip) {
  return data::PairedFolderOptions()
      .task_height(c.task_height).task_width(c.task_width).crop_size(c.crop)
      .label_dir((fs::path(c.data) / "det_labels" / "fusion").string()).require_labels(true).num_classes(3)
      .flip(flip);
}

struct Split {
  data::DetectionFolder train, test;
};

Split make_split(const Config& c) {
  const data::DetectionFolder all(c.data, folder_options(c, /*flip=*/true));
  const data::HoldoutSplit split = data::every_nth_holdout(all.size(), static_cast<size_t>(c.holdout_every));
  return {all.subset(split.train), data::DetectionFolder(c.data, folder_options(c, false)).subset(split.held_out)};
}

/// The task network every arm starts from: seeded first, so its initial weights are the same in all arms.
task::SmallDetector initial_detector(uint64_t seed) {
  torch::manual_seed(seed);
  return task::SmallDetector(task::SmallDetectorOptions().num_classes(3));
}

meta::BilevelOptions bilevel_options(const Config& c, uint64_t seed) {
  return meta::BilevelOptions().epochs(c.epochs).meta_steps_per_epoch(c.meta_steps).fusion_lr(c.lr).task_lr(c.lr)
      .lr_step_epochs(c.lr_step).seed(seed);
}

/// Fusion metrics (tdfusion protocol) of full-resolution fused images of the held-out pairs, as `tdfusion fuse`
/// writes them and `tdfusion eval` reads them (8-bit grey of the colour-restored output).
metrics::MetricRow full_resolution_fusion_metrics(fusion::LightFusion& net, const data::DetectionFolder& test) {
  std::vector<metrics::MetricRow> rows(test.size());
  for (size_t i = 0; i < test.size(); ++i) {
    const auto& pair = test.pairs()[i];
    const torch::Tensor ir = io::read_image(pair.ir), vi = io::read_image(pair.vi);
    rows[i] = metrics::evaluate_fusion(metrics::to_grey8(ir), metrics::to_grey8(vi),
                                       metrics::to_grey8(fusion::fuse_images(net, ir, vi)),
                                       metrics::Protocol::tdfusion, /*threads=*/0);
  }
  metrics::MetricRow mean;
  for (size_t m = 0; m < rows[0].values.size(); ++m) {
    double sum = 0;
    for (const auto& row : rows) sum += row.values[m].second;
    mean.values.emplace_back(rows[0].values[m].first, sum / static_cast<double>(rows.size()));
  }
  return mean;
}

/// Arms (a) and (b): the bilevel optimiser with a loss generator.
template <class LossGenerator>
ArmResult fusion_arm(const std::string& name, const Config& c, const Split& split, uint64_t seed,
                     fusion::LightFusion* trained = nullptr, lossgen::Lpn* trained_lpn = nullptr) {
  const auto start = Clock::now();
  task::SmallDetector detector = initial_detector(seed);
  fusion::LightFusion net;
  LossGenerator loss_generator;
  meta::BilevelOptimizer<fusion::LightFusion, LossGenerator, task::SmallDetector> trainer(
      net, loss_generator, detector, bilevel_options(c, seed));
  trainer.fit(split.train, [&](const meta::EpochReport& r) {
    std::cout << "  " << name << " seed " << seed << " epoch " << r.epoch + 1 << "/" << c.epochs << ": fusion loss "
              << r.fusion_loss << ", task loss " << r.task_loss << std::endl;
  });
  ArmResult result{name, seed, {}, {}, 0};
  result.detection = trainer.validate(split.test, meta::ValidationOptions().fusion_metrics(false)).task;
  result.fusion = full_resolution_fusion_metrics(net, split.test);
  result.seconds = since(start);
  if (trained) *trained = net;
  if constexpr (std::is_same_v<LossGenerator, lossgen::Lpn>) {
    if (trained_lpn) *trained_lpn = loss_generator;
  }
  return result;
}

/// Arms (c) and (d): the detector alone on one modality, with the phase-B budget of arms (a) and (b): the same
/// Adam steps on the same samples (the counters phase B sees there), the same learning-rate schedule.
ArmResult single_modality_arm(const std::string& name, bool infrared, const Config& c, const Split& split,
                              uint64_t seed) {
  const auto start = Clock::now();
  task::SmallDetector detector = initial_detector(seed);
  torch::optim::Adam adam(detector->parameters(), torch::optim::AdamOptions(c.lr));
  const auto size = static_cast<uint64_t>(split.train.size());
  uint64_t counter = 0;
  for (int64_t epoch = 0; epoch < c.epochs; ++epoch) {
    torch::manual_seed(seed + static_cast<uint64_t>(epoch));
    const double lr = c.lr * std::pow(0.1, static_cast<double>(epoch / c.lr_step));
    for (auto& group : adam.param_groups()) static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
    counter += 2 * static_cast<uint64_t>(c.meta_steps);  // the samples of phase A in arm (a)
    double epoch_loss = 0;
    for (uint64_t step = 0; step < size; ++step) {
      const auto batch = split.train.get(counter++);
      const torch::Tensor loss = detector->loss(infrared ? batch.ir : batch.vi, batch.target);
      epoch_loss += loss.item<double>() / static_cast<double>(size);
      adam.zero_grad();
      loss.backward();
      adam.step();
    }
    std::cout << "  " << name << " seed " << seed << " epoch " << epoch + 1 << "/" << c.epochs << ": task loss "
              << epoch_loss << std::endl;
  }
  torch::NoGradGuard no_grad;
  metrics::TaskEvaluation<task::SmallDetectorImpl> evaluation;
  for (uint64_t i = 0; i < split.test.size(); ++i) {
    const auto batch = split.test.get(i);
    evaluation.add(*detector, infrared ? batch.ir : batch.vi, batch.target);
  }
  return {name, seed, evaluation.result(), {}, since(start)};
}

/// figure.png: one row per held-out pair: infrared, visible, w_A, fused (a), fused (b), each at half size.
void write_figure(const std::string& path, const Split& split, fusion::LightFusion& learned, fusion::LightFusion& fixed,
                  lossgen::Lpn& lpn, int64_t pairs) {
  torch::NoGradGuard no_grad;
  const EvalMode lpn_eval(*lpn);
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < std::min<int64_t>(pairs, static_cast<int64_t>(split.test.size())); ++i) {
    const auto& pair = split.test.pairs()[static_cast<size_t>(i)];
    const torch::Tensor ir = io::read_grey(pair.ir), vi = io::read_grey(pair.vi);
    const torch::Tensor w_ir = lpn->forward(ir.unsqueeze(0), vi.unsqueeze(0))[0].narrow(0, 0, 1);
    const fusion::FuseImagesOptions raw = fusion::FuseImagesOptions().min_max(false);
    std::vector<torch::Tensor> tiles = {ir, vi, w_ir, fusion::fuse_images(learned, ir, vi, raw),
                                        fusion::fuse_images(fixed, ir, vi, raw)};
    for (auto& tile : tiles) {
      tile = nn::resize_bilinear(tile.unsqueeze(0), ir.size(1) / 2, ir.size(2) / 2)[0];
      tile = torch::constant_pad_nd(tile, {2, 2, 2, 2}, 1.0);  // white frame
    }
    rows.push_back(torch::cat(tiles, 2));
  }
  io::write_image(path, torch::cat(rows, 1).clamp(0, 1));
}

std::string format(double value, int precision = 4) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(precision) << value;
  return out.str();
}

/// Mean and (with several seeds) sample standard deviation, as "m" or "m ± s".
std::string mean_sd(const std::vector<double>& values) {
  double mean = 0;
  for (double v : values) mean += v / static_cast<double>(values.size());
  if (values.size() < 2) return format(mean);
  double var = 0;
  for (double v : values) var += (v - mean) * (v - mean) / static_cast<double>(values.size() - 1);
  return format(mean) + " ± " + format(std::sqrt(var));
}

std::string results_table(const std::vector<ArmResult>& results, const std::vector<std::string>& arms,
                          const Config& c, const Split& split) {
  const std::vector<std::string> fusion_names = metrics::metric_names(metrics::Protocol::tdfusion);
  std::ostringstream out;
  out << "Held-out MSRS pairs: " << split.test.size() << " of " << split.test.size() + split.train.size() << " (every "
      << c.holdout_every
      << "-th in sorted order); detector SmallDetector at " << c.task_height << "x" << c.task_width << ", "
      << c.epochs << " epochs, lr " << c.lr << " (StepLR every " << c.lr_step << " epochs), " << c.meta_steps
      << " meta steps per epoch in (a); " << c.seeds << " seed(s), mean" << (c.seeds > 1 ? " ± sd" : "")
      << ". Fusion metrics: protocol tdfusion, full resolution.\n\n| arm | AP50 | AP50:95 |";
  for (const auto& name : fusion_names) out << " " << name << " |";
  out << " minutes |\n|:--|--:|--:|";
  for (size_t i = 0; i < fusion_names.size(); ++i) out << "--:|";
  out << "--:|\n";
  for (const std::string& arm : arms) {
    std::vector<double> ap50, ap, minutes;
    std::vector<std::vector<double>> fusion(fusion_names.size());
    for (const ArmResult& r : results) {
      if (r.arm != arm) continue;
      ap50.push_back(r.detection.summary.at("AP50"));
      ap.push_back(r.detection.summary.at("AP50:95"));
      minutes.push_back(r.seconds / 60.0);
      for (size_t m = 0; m < fusion_names.size() && !r.fusion.values.empty(); ++m) {
        fusion[m].push_back(r.fusion.at(fusion_names[m]));
      }
    }
    if (ap50.empty()) continue;
    out << "| " << arm << " | " << mean_sd(ap50) << " | " << mean_sd(ap) << " |";
    for (const auto& values : fusion) out << " " << (values.empty() ? "-" : mean_sd(values)) << " |";
    out << " " << mean_sd(minutes) << " |\n";
  }
  return out.str();
}

nlohmann::json to_json(const ArmResult& r) {
  return {{"arm", r.arm},
          {"seed", r.seed},
          {"detection", metrics::to_json(r.detection.summary)},
          {"detection_per_class", metrics::to_json(r.detection.per_class)},
          {"fusion", metrics::to_json(r.fusion)},
          {"seconds", r.seconds}};
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  c.data = TDFUSION_SHARED_DIR "/data/msrs";
  int threads = 0;
  CLI::App app("TDFusion's claim on real MSRS detection data: learned vs fixed fusion loss vs single modalities");
  app.add_option("--data", c.data, "MSRS folder with ir/, vi/ and det_labels/fusion/")->capture_default_str();
  app.add_option("--out", c.out, "output folder")->capture_default_str();
  app.add_option("--seeds", c.seeds, "seeds 0 .. n-1")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--epochs", c.epochs)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--meta-steps", c.meta_steps, "meta steps per epoch in arm (a)")->capture_default_str();
  app.add_option("--lr-step", c.lr_step, "StepLR period (epochs)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--lr", c.lr, "Adam learning rate of F and T")->capture_default_str();
  app.add_option("--crop", c.crop, "fusion crop side")->capture_default_str();
  app.add_option("--task-height", c.task_height)->capture_default_str();
  app.add_option("--task-width", c.task_width)->capture_default_str();
  app.add_option("--arms", c.arms, "which arms to run, e.g. ad")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  CLI11_PARSE(app, argc, argv);
  reuse_freed_memory();
  use_cpu_threads(threads);

  try {
    if (!fs::is_directory(fs::path(c.data) / "det_labels" / "fusion")) {
      std::cerr << "detection_experiment: no MSRS data with detection labels at '" << c.data
                << "' (expected ir/, vi/ and det_labels/fusion/; see ../shared/data/SOURCES.md)\n";
      return 1;
    }
    fs::create_directories(c.out);
    const Split split = make_split(c);
    std::cout << "train " << split.train.size() << " pairs, held out " << split.test.size() << " (";
    for (const auto& pair : split.test.pairs()) std::cout << pair.stem << (&pair == &split.test.pairs().back() ? ")\n" : " ");
    const auto start = Clock::now();
    const std::vector<std::string> arms = {"(a) tdfusion: learned loss (LPN)", "(b) fixed 0.5/0.5 loss",
                                           "(c) infrared only", "(d) visible only"};
    std::vector<ArmResult> results;
    fusion::LightFusion learned{nullptr}, fixed{nullptr};
    lossgen::Lpn lpn{nullptr};
    for (int64_t s = 0; s < c.seeds; ++s) {
      const auto seed = static_cast<uint64_t>(s);
      const size_t first = results.size();
      auto wanted = [&](char arm) { return c.arms.find(arm) != std::string::npos; };
      if (wanted('a')) {
        results.push_back(fusion_arm<lossgen::Lpn>(arms[0], c, split, seed, s == 0 ? &learned : nullptr,
                                                   s == 0 ? &lpn : nullptr));
      }
      if (wanted('b')) results.push_back(fusion_arm<lossgen::FixedWeights>(arms[1], c, split, seed, s == 0 ? &fixed : nullptr));
      if (wanted('c')) results.push_back(single_modality_arm(arms[2], true, c, split, seed));
      if (wanted('d')) results.push_back(single_modality_arm(arms[3], false, c, split, seed));
      for (size_t i = first; i < results.size(); ++i) {
        std::cout << results[i].arm << ", seed " << seed << ": AP50 " << results[i].detection.summary.at("AP50")
                  << ", AP50:95 " << results[i].detection.summary.at("AP50:95") << std::endl;
      }
    }
    const std::string table = results_table(results, arms, c, split);
    const double minutes = since(start) / 60.0;
    std::ostringstream summary;
    summary << table << "\nWall time of the whole experiment: " << format(minutes, 1) << " minutes on "
            << torch::get_num_threads() << " threads.\n";
    std::cout << '\n' << summary.str();
    nlohmann::json all = {{"config", {{"epochs", c.epochs}, {"meta_steps", c.meta_steps}, {"lr", c.lr},
                                      {"lr_step", c.lr_step}, {"crop", c.crop}, {"task_height", c.task_height},
                                      {"task_width", c.task_width}, {"seeds", c.seeds},
                                      {"holdout_every", c.holdout_every}, {"threads", torch::get_num_threads()}}},
                          {"minutes", minutes}, {"runs", nlohmann::json::array()}};
    for (const ArmResult& r : results) all["runs"].push_back(to_json(r));
    io::write_text_atomically((fs::path(c.out) / "results.json").string(), all.dump(2) + "\n");
    io::write_text_atomically((fs::path(c.out) / "results.md").string(), summary.str());
    std::cout << "wrote " << (fs::path(c.out) / "results.md").string() << " and results.json\n";
    if (learned && fixed) {
      write_figure((fs::path(c.out) / "figure.png").string(), split, learned, fixed, lpn, c.figure_pairs);
      std::cout << "wrote " << (fs::path(c.out) / "figure.png").string() << '\n';
    }
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "detection_experiment: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

// `tdfusion train`: bilevel training on a folder of pairs (label PNGs or YOLO boxes) or on synthetic scenes,
// in a run folder (config.json, checkpoint.pt, log.jsonl, fusion.pth); --nproc trains data-parallel.
#include "cli.hpp"

#include <tdfusion/data/concat_dataset.hpp>
#include <tdfusion/data/paired_folder.hpp>
#include <tdfusion/data/synthetic_scenes.hpp>
#include <tdfusion/distributed/launcher.hpp>
#include <tdfusion/distributed/process_group.hpp>
#include <tdfusion/io/atomic_file.hpp>
#include <tdfusion/lossgen/fixed_weights.hpp>
#include <tdfusion/lossgen/lpn.hpp>
#include <tdfusion/meta/bilevel_optimizer.hpp>
#include <tdfusion/meta/json_lines_log.hpp>
#include <tdfusion/meta/progress_bar.hpp>
#include <tdfusion/meta/run_folder.hpp>
#include <tdfusion/task/registry.hpp>

#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>

namespace tdfusion::cli {

namespace {

namespace fs = std::filesystem;

struct TrainArgs {
  meta::RunConfig run;  // what is trained (config.json)
  std::string out = "tdfusion-run", device = "cpu";
  int64_t epochs = 10;
  bool resume = false;
  // Data-parallel processes: --nproc N on one machine, or --world-size/--rank/--master-* on each of several.
  int64_t nproc = 1, world_size = 1, rank = 0;
  std::string master_addr = "127.0.0.1";
  uint16_t master_port = 29500;
};

/// The run's folder pairs without labels, for F's phase-B steps.
data::ConcatDataset<data::PairedFolder> fusion_data(const meta::RunConfig& run) {
  std::vector<data::PairedFolder> folders;
  for (const std::string& root : run.fusion_data)
    folders.emplace_back(root, data::PairedFolderOptions().crop_size(run.crop).seed(run.seed).ignore_labels(true));
  return data::ConcatDataset<data::PairedFolder>(folders);
}

template <class Fusion, class LossGenerator, class Task, class Dataset>
int train(const TrainArgs& args, const Dataset& dataset, const std::optional<Dataset>& validation) {
  const meta::RunConfig& run = args.run;
  const torch::Device device(args.device);
  const c10::DeviceGuard on_device(device);  // a process's own GPU is its current one (NCCL, allocations)
  const std::string checkpoint = (fs::path(args.out) / "checkpoint.pt").string();
  auto options = meta::BilevelOptions()
                     .epochs(args.epochs).meta_steps_per_epoch(run.meta_steps).batch_pairs(run.batch)
                     .fusion_lr(run.fusion_lr).task_lr(run.task_lr).meta_lr(run.meta_lr).lr_step_epochs(run.lr_step)
                     .seed(run.seed).device(device).checkpoint_path(checkpoint);
  torch::manual_seed(run.seed);
  meta::BilevelOptimizer<Fusion, LossGenerator, Task> trainer(Fusion(), LossGenerator(),
                                                             task::make_task<Task>(run.classes), options);
  if (!run.fusion_data.empty()) trainer.set_fusion_data(fusion_data(run));
  if (args.resume) {
    trainer.load(checkpoint);
    std::cout << "resuming " << checkpoint << " at epoch " << trainer.epoch() + 1 << std::endl;
  }
  if (args.world_size > 1) {
    distributed::Rendezvous rendezvous;
    rendezvous.host = args.master_addr;
    rendezvous.port = args.master_port;
    rendezvous.rank = static_cast<int>(args.rank);
    rendezvous.world_size = static_cast<int>(args.world_size);
    rendezvous.device = device;
    trainer.set_communicator(distributed::ProcessGroupCommunicator::connect(rendezvous));
    std::cout << "process " << args.rank << " of " << args.world_size << " joined " << args.master_addr << ":"
              << args.master_port << std::endl;
  }
  if (validation) trainer.set_validation(*validation);
  if (args.rank != 0) {  // only rank 0 writes files and reports
    trainer.fit(dataset);
    return 0;
  }
  // Everything checked out (data, labels, a resumed checkpoint): now the run folder may change.
  io::write_text_atomically((fs::path(args.out) / "config.json").string(), meta::to_json(run).dump(2) + "\n");
  trainer.fit(dataset, meta::ProgressBar(), meta::JsonLinesLog((fs::path(args.out) / "log.jsonl").string()));
  const std::string weights = (fs::path(args.out) / "fusion.pth").string();
  io::write_torch_state_dict(weights, io::released_layout(*trainer.fusion()));
  std::cout << "fusion weights: " << weights << " (use with: tdfusion fuse --weights " << weights << ")\n";
  return 0;
}

/// Trains `Task` on the data the run names: a folder (with a held-out part for --val-every) or synthetic scenes.
template <class Task>
int train_task(const TrainArgs& args) {
  using Target = typename Task::ContainedType::Target;
  const meta::RunConfig& run = args.run;
  const auto [task_h, task_w] = run.task_size.empty() ? std::pair<int64_t, int64_t>{0, 0}
                                                      : parse_size(run.task_size, "--task-size");
  auto with_losses = [&args](const auto& dataset, const auto& validation) {
    const bool light = args.run.fusion == "light", fixed = args.run.loss == "fixed";
    if (light && fixed) return train<fusion::LightFusion, lossgen::FixedWeights, Task>(args, dataset, validation);
    if (light) return train<fusion::LightFusion, lossgen::Lpn, Task>(args, dataset, validation);
    if (fixed) return train<fusion::ReFusion, lossgen::FixedWeights, Task>(args, dataset, validation);
    return train<fusion::ReFusion, lossgen::Lpn, Task>(args, dataset, validation);
  };
  if (run.data.empty()) {
    const int64_t s = run.scene_size;
    auto options = data::SyntheticScenesOptions().count(run.scenes).scene_height(s).scene_width(s)
                       .task_height(task_h > 0 ? task_h : s).task_width(task_w > 0 ? task_w : s)
                       .crop_size(run.crop).seed(run.seed);
    if (run.batch > run.scenes)
      throw UsageError("--batch " + std::to_string(run.batch) + " exceeds the " + std::to_string(run.scenes) +
                       " synthetic scenes");
    std::cout << "training on " << run.scenes << " synthetic scenes of " << s << "x" << s << std::endl;
    return with_losses(data::SyntheticScenesFor<Target>(options), std::optional<data::SyntheticScenesFor<Target>>());
  }
  auto options = data::PairedFolderOptions().crop_size(run.crop).num_classes(run.classes).seed(run.seed)
                     .label_dir(run.labels).require_labels(true).task_height(task_h).task_width(task_w);
  const data::PairedFolderFor<Target> folder(run.data, options);  // checks every file up front
  if (run.batch > static_cast<int64_t>(folder.size()))
    throw UsageError("--batch " + std::to_string(run.batch) + " exceeds the " + std::to_string(folder.size()) +
                     " pairs in " + run.data);
  if (run.val_every == 0) {
    std::cout << "training on " << folder.size() << " pairs in " << run.data << std::endl;
    return with_losses(folder, std::optional<data::PairedFolderFor<Target>>());
  }
  const data::HoldoutSplit split = data::every_nth_holdout(folder.size(), static_cast<size_t>(run.val_every));
  std::cout << "training on " << split.train.size() << " pairs in " << run.data << ", validating on "
            << split.held_out.size() << " (every " << run.val_every << "-th pair in sorted order, from "
            << folder.pairs()[split.held_out.front()].stem << ")" << std::endl;
  const data::PairedFolderFor<Target> held_out(run.data, options.flip(false));
  return with_losses(folder.subset(split.train), std::make_optional(held_out.subset(split.held_out)));
}

int run_process(const TrainArgs& args) {
  return task::with_task(args.run.task, [&](auto tag) { return train_task<typename decltype(tag)::type>(args); });
}

/// Checks the options against each other and against the run folder, before anything is written (the
/// data, its labels and a resumed checkpoint are checked when they are read, before config.json is written).
void check_run(const TrainArgs& args, const meta::RunFolder& folder) {
  const meta::RunConfig& run = args.run;
  if (run.data.empty() && run.val_every > 0) throw UsageError("--val-every needs --data (a folder to split)");
  const int64_t processes = std::max(args.nproc, args.world_size);
  if (run.batch % processes != 0)
    throw UsageError("--batch " + std::to_string(run.batch) + " is not a multiple of the " +
                     std::to_string(processes) + " processes");
  if (!run.task_size.empty()) parse_size(run.task_size, "--task-size");
  const bool exists = fs::exists(folder.checkpoint());
  if (args.resume) {
    if (!exists) throw UsageError("--resume: " + folder.checkpoint() + " does not exist");
    const std::string differences = meta::config_differences(meta::read_run_config(folder.config()), run);
    if (!differences.empty()) throw UsageError("cannot resume " + args.out + ": " + differences);
  } else if (exists) {
    throw UsageError(args.out + " already holds a run (" + folder.checkpoint() +
                     "); continue it with --resume or choose another --out");
  }
}

/// `--nproc N`: this process becomes rank 0 of N on 127.0.0.1 and starts ranks 1 .. N-1 as copies of itself.
int launch(TrainArgs args, const std::vector<std::string>& command_line) {
  args.world_size = args.nproc;
  args.master_port = distributed::free_port();
  const torch::Device requested(args.device);
  args.device = distributed::local_rank_device(requested, 0, args.nproc).str();
  distributed::LocalRanks ranks(args.nproc, [&](int64_t rank) {
    std::vector<std::string> words;
    for (size_t i = 0; i < command_line.size(); ++i) {
      const std::string& word = command_line[i];
      if (word == "--nproc" || word == "--device") {
        ++i;  // and its value
      } else if (word.rfind("--nproc=", 0) != 0 && word.rfind("--device=", 0) != 0) {
        words.push_back(word);
      }
    }
    for (const std::string& word :
         {std::string("--world-size"), std::to_string(args.nproc), std::string("--rank"), std::to_string(rank),
          std::string("--master-port"), std::to_string(args.master_port), std::string("--device"),
          distributed::local_rank_device(requested, rank, args.nproc).str()}) {
      words.push_back(word);
    }
    return words;
  });
  const int result = run_process(args);
  TORCH_CHECK(ranks.wait() && result == 0, "tdfusion: a training process failed (see its message above)");
  return 0;
}

int run_train(const TrainArgs& args, const std::vector<std::string>& command_line) {
  if (args.nproc > 1 && args.world_size > 1)
    throw UsageError("--nproc starts its own processes; do not combine it with --world-size");
  if (args.nproc > 1) {
    try {  // every local rank gets its device before any starts
      for (int64_t rank = 0; rank < args.nproc; ++rank)
        distributed::local_rank_device(torch::Device(args.device), rank, args.nproc);
    } catch (const c10::Error& error) {
      throw UsageError(error.what_without_backtrace());
    }
  }
  // The run folder belongs to rank 0 (of this machine, with --nproc); other ranks only read the data.
  std::optional<meta::RunFolder> folder;
  if (args.rank == 0) {
    folder.emplace(args.out);
    check_run(args, *folder);
  }
  if (args.nproc > 1) return launch(args, command_line);
  return run_process(args);
}

}  // namespace

Subcommand add_train(CLI::App& app, std::vector<std::string> command_line) {
  auto args = std::make_shared<TrainArgs>();
  meta::RunConfig& run = args->run;
  run = {"refusion", "lpn", "small-seg", 9, "", 128, "", "", {}, 32, 128, 0, 1, 20, 10, 1e-4, 1e-4, 0.0, 0};
  const auto positive = CLI::Range(int64_t{1}, int64_t{1} << 20);
  const CLI::Validator rate = learning_rate_validator();
  CLI::App* cmd = app.add_subcommand("train", "bilevel training on a folder of pairs or on synthetic scenes");
  cmd->add_option("--data", run.data, "folder with ir/ and vi/ (default: synthetic scenes)")->check(CLI::ExistingDirectory);
  cmd->add_option("--fusion-data", run.fusion_data,
                  "extra folder(s) of pairs (ir/, vi/) without labels on which F also trains in phase B")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out", args->out, "run folder: config.json, checkpoint.pt, log.jsonl, fusion.pth")->capture_default_str();
  cmd->add_option("--fusion", run.fusion)->check(CLI::IsMember({"refusion", "light"}))->capture_default_str();
  cmd->add_option("--loss", run.loss, "lpn (learned) or fixed (0.5/0.5)")->check(CLI::IsMember({"lpn", "fixed"}))->capture_default_str();
  cmd->add_option("--task", run.task, "segmentation (small-seg, segformer) or detection (small-det, yolov8)")
      ->check(CLI::IsMember(task::task_names()))->capture_default_str();
  cmd->add_option("--labels", run.labels, "label folder: class-id PNGs or YOLO .txt (default: DATA/label)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--classes", run.classes, "classes (segmentation: background included)")
      ->check(CLI::Range(int64_t{1}, int64_t{65536}))->capture_default_str();
  cmd->add_option("--epochs", args->epochs)->check(positive)->capture_default_str();
  cmd->add_option("--lr-step", run.lr_step, "epochs between the tenfold learning-rate decays (StepLR)")
      ->check(positive)->capture_default_str();
  cmd->add_option("--meta-steps", run.meta_steps, "meta steps per epoch (release: 200)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20))->capture_default_str();
  cmd->add_option("--fusion-lr", run.fusion_lr)->check(rate)->capture_default_str();
  cmd->add_option("--task-lr", run.task_lr)->check(rate)->capture_default_str();
  cmd->add_option("--meta-lr", run.meta_lr, "loss-generator step (default: the fusion learning rate)")->check(rate);
  cmd->add_option("--crop", run.crop, "fusion crop side")->check(CLI::Range(int64_t{8}, int64_t{4096}))->capture_default_str();
  cmd->add_option("--task-size", run.task_size, "task input HxW (default: the image size)");
  cmd->add_option("--scenes", run.scenes, "synthetic scenes (without --data)")
      ->check(CLI::Range(int64_t{1}, int64_t{100000}))->capture_default_str();
  cmd->add_option("--scene-size", run.scene_size, "synthetic scene side")
      ->check(CLI::Range(int64_t{16}, int64_t{4096}))->capture_default_str();
  cmd->add_option("--seed", run.seed)->capture_default_str();
  cmd->add_option("--device", args->device, "cpu, cuda or cuda:N")->capture_default_str()->check(device_validator());
  cmd->add_flag("--resume", args->resume, "continue the run in --out (same options; only --epochs may grow)");
  cmd->add_option("--batch", run.batch, "pairs per step over all processes (each adds its modality swap)")
      ->check(CLI::Range(int64_t{1}, int64_t{256}))->capture_default_str();
  cmd->add_option("--nproc", args->nproc, "data-parallel processes on this machine (Gloo on 127.0.0.1)")
      ->check(CLI::Range(int64_t{1}, int64_t{64}))->capture_default_str();
  cmd->add_option("--world-size", args->world_size, "processes over all machines (with --rank, --master-addr)")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  cmd->add_option("--rank", args->rank, "this process's rank, 0 .. world-size - 1")->check(CLI::Range(int64_t{0}, int64_t{4095}));
  cmd->add_option("--master-addr", args->master_addr, "host of rank 0 (the TCP store)");
  cmd->add_option("--master-port", args->master_port, "port of the TCP store on rank 0");
  cmd->add_option("--val-every", run.val_every, "hold out every n-th pair (sorted by name) and validate on them after each epoch")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  return {cmd, [args, command_line = std::move(command_line)] {
            if (args->run.data.empty())
              args->run.classes = task::is_detection_task(args->run.task) ? data::kSceneDetectionClasses : data::kSceneClasses;
            if (args->rank >= args->world_size) throw UsageError("--rank must be below --world-size");
            return run_train(*args, command_line);
          }};
}

}  // namespace tdfusion::cli

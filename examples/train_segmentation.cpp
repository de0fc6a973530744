// Trains the whole TDFusion system (fusion net, learnable loss, segmentation net) with the bilevel optimiser,
// on synthetic scenes (default: runs anywhere) or on a folder of pairs with label PNGs
// (DIR/ir, DIR/vi, DIR/label, matched by file stem), and prints the losses.
//
//   build/examples/train_segmentation --epochs 2
//   build/examples/train_segmentation --data /path/to/MSRS/train --classes 9 --fusion refusion --task segformer
//       --task-size 240x320 --crop 256 --checkpoint run.ckpt [--resume]
#include <tdfusion/data/paired_folder.hpp>
#include <tdfusion/tdfusion.hpp>

#include <CLI/CLI.hpp>

#include <filesystem>
#include <iostream>

namespace {

struct Args {
  std::string data, fusion = "light", loss = "lpn", task = "small", checkpoint, device = "cpu", task_size;
  int64_t epochs = 3, meta_steps = 20, classes = 9, crop = 96, scenes = 32, scene_size = 96;
  double fusion_lr = 1e-3, task_lr = 1e-3, meta_lr = 0.0;
  uint64_t seed = 0;
  bool resume = false, verbose = false;
};

std::pair<int64_t, int64_t> parse_size(const std::string& text) {
  const auto x = text.find('x');
  if (x == std::string::npos) throw CLI::ValidationError("--task-size", "expected HxW, e.g. 240x320, got " + text);
  return {std::stoll(text.substr(0, x)), std::stoll(text.substr(x + 1))};
}

template <class Task>
Task make_task(const Args& args) {
  if constexpr (std::is_same_v<Task, tdfusion::task::SegFormer>) {
    return Task(tdfusion::task::SegFormerOptions().num_classes(args.classes));
  } else {
    return Task(tdfusion::task::SmallSegNetOptions().num_classes(args.classes));
  }
}

template <class Fusion, class LossGenerator, class Task, class Dataset>
void train(const Args& args, const Dataset& dataset) {
  auto options = tdfusion::meta::BilevelOptions()
                     .epochs(args.epochs)
                     .meta_steps_per_epoch(args.meta_steps)
                     .fusion_lr(args.fusion_lr)
                     .task_lr(args.task_lr)
                     .meta_lr(args.meta_lr)
                     .seed(args.seed)
                     .device(torch::Device(args.device))
                     .checkpoint_path(args.checkpoint);
  torch::manual_seed(args.seed);
  tdfusion::meta::BilevelOptimizer<Fusion, LossGenerator, Task> trainer(Fusion(), LossGenerator(),
                                                                          make_task<Task>(args), options);
  if (args.resume) {
    trainer.load(args.checkpoint);
    std::cout << "resumed from " << args.checkpoint << " at epoch " << trainer.epoch() << '\n';
  }
  trainer.fit(dataset, tdfusion::meta::PrintLosses(std::cout, args.verbose));
}

template <class Fusion, class LossGenerator, class Dataset>
void pick_task(const Args& args, const Dataset& dataset) {
  if (args.task == "segformer") return train<Fusion, LossGenerator, tdfusion::task::SegFormer>(args, dataset);
  train<Fusion, LossGenerator, tdfusion::task::SmallSegNet>(args, dataset);
}

template <class Fusion, class Dataset>
void pick_loss(const Args& args, const Dataset& dataset) {
  if (args.loss == "fixed") return pick_task<Fusion, tdfusion::lossgen::FixedWeights>(args, dataset);
  pick_task<Fusion, tdfusion::lossgen::Lpn>(args, dataset);
}

template <class Dataset>
void pick_fusion(const Args& args, const Dataset& dataset) {
  if (args.fusion == "refusion") return pick_loss<tdfusion::fusion::ReFusion>(args, dataset);
  pick_loss<tdfusion::fusion::LightFusion>(args, dataset);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Train TDFusion (fusion network + learnable loss + segmentation network)");
  Args args;
  app.add_option("--data", args.data, "folder with ir/, vi/ and label/ (default: synthetic scenes)")->check(CLI::ExistingDirectory);
  app.add_option("--fusion", args.fusion, "fusion policy")->check(CLI::IsMember({"refusion", "light"}))->capture_default_str();
  app.add_option("--loss", args.loss, "loss generator: lpn (learned) or fixed (0.5/0.5)")->check(CLI::IsMember({"lpn", "fixed"}))->capture_default_str();
  app.add_option("--task", args.task, "segmentation network")->check(CLI::IsMember({"segformer", "small"}))->capture_default_str();
  app.add_option("--classes", args.classes, "segmentation classes, background included")->capture_default_str();
  app.add_option("--epochs", args.epochs)->capture_default_str();
  app.add_option("--meta-steps", args.meta_steps, "meta steps per epoch (the release: 200)")->capture_default_str();
  app.add_option("--fusion-lr", args.fusion_lr)->capture_default_str();
  app.add_option("--task-lr", args.task_lr)->capture_default_str();
  app.add_option("--meta-lr", args.meta_lr, "loss-generator step (0: the fusion learning rate)")->capture_default_str();
  app.add_option("--crop", args.crop, "fusion crop size")->capture_default_str();
  app.add_option("--task-size", args.task_size, "task input HxW (default: the image size)");
  app.add_option("--scenes", args.scenes, "number of synthetic scenes")->capture_default_str();
  app.add_option("--scene-size", args.scene_size, "synthetic scene side")->capture_default_str();
  app.add_option("--seed", args.seed)->capture_default_str();
  app.add_option("--device", args.device, "cpu or cuda")->capture_default_str();
  app.add_option("--checkpoint", args.checkpoint, "checkpoint file, written atomically after every epoch");
  app.add_flag("--resume", args.resume, "continue the run saved in --checkpoint");
  app.add_flag("--verbose", args.verbose, "print every meta step");
  CLI11_PARSE(app, argc, argv);

  try {
    if (args.resume && args.checkpoint.empty()) throw CLI::ValidationError("--resume", "needs --checkpoint");
    if (args.data.empty()) {
      args.classes = tdfusion::data::kSceneClasses;
      auto options = tdfusion::data::SyntheticScenesOptions()
                         .count(args.scenes).scene_height(args.scene_size).scene_width(args.scene_size)
                         .task_height(args.scene_size).task_width(args.scene_size).crop_size(args.crop).seed(args.seed);
      if (!args.task_size.empty()) {
        const auto [h, w] = parse_size(args.task_size);
        options.task_height(h).task_width(w);
      }
      std::cout << "training on " << args.scenes << " synthetic scenes of " << args.scene_size << "x" << args.scene_size << '\n';
      pick_fusion(args, tdfusion::data::SyntheticScenes(options));
    } else {
      auto options = tdfusion::data::PairedFolderOptions().crop_size(args.crop).num_classes(args.classes)
                         .seed(args.seed).require_labels(true);
      if (!args.task_size.empty()) {
        const auto [h, w] = parse_size(args.task_size);
        options.task_height(h).task_width(w);
      }
      tdfusion::data::PairedFolder folder(args.data, options);
      std::cout << "training on " << folder.size() << " pairs in " << args.data << '\n';
      pick_fusion(args, folder);
    }
  } catch (const CLI::Error& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

// Trains the whole TDFusion system for segmentation: a fusion network, the learnable loss (LPN) and a
// segmentation network, with the bilevel optimiser. Data: built-in synthetic scenes (default), or a folder of
// pairs with class-id label PNGs (DIR/ir, DIR/vi, DIR/label, matched by file stem).
//
//   build/examples/train_segmentation                       light policies on synthetic scenes (CPU minutes)
//   build/examples/train_segmentation --paper --data MSRS/train --classes 9 --task-size 240x320 --crop 256
//       --epochs 40 --meta-steps 200 --lr 1e-4 --checkpoint msrs.ckpt [--resume]      the paper's networks
//
// The `tdfusion train` command offers the same with every policy combination, logging and progress bars.
#include <tdfusion/tdfusion.hpp>

#include <CLI/CLI.hpp>

#include <iostream>

namespace {

struct Args {
  std::string data, checkpoint, device = "cpu";
  int64_t epochs = 3, meta_steps = 20, classes = 9, crop = 96, task_height = 0, task_width = 0;
  double lr = 1e-3;
  bool paper = false, resume = false;
};

template <class Fusion, class Task, class Dataset>
void train(const Args& args, const Dataset& dataset, int64_t classes) {
  using namespace tdfusion;
  const auto options = meta::BilevelOptions()
                           .epochs(args.epochs).meta_steps_per_epoch(args.meta_steps)
                           .fusion_lr(args.lr).task_lr(args.lr)
                           .device(torch::Device(args.device)).checkpoint_path(args.checkpoint);
  meta::BilevelOptimizer<Fusion, lossgen::Lpn, Task> trainer(Fusion(), lossgen::Lpn(),
                                                             Task(typename Task::ContainedType::Options().num_classes(classes)),
                                                             options);
  if (args.resume) {
    trainer.load(args.checkpoint);
    std::cout << "resumed " << args.checkpoint << " at epoch " << trainer.epoch() << '\n';
  }
  trainer.fit(dataset, meta::PrintLosses(std::cout));
}

template <class Dataset>
void train_with(const Args& args, const Dataset& dataset, int64_t classes) {
  using namespace tdfusion;
  if (args.paper) return train<fusion::ReFusion, task::SegFormer>(args, dataset, classes);
  train<fusion::LightFusion, task::SmallSegNet>(args, dataset, classes);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Train TDFusion (fusion network + learnable loss + segmentation network)");
  Args args;
  app.add_option("--data", args.data, "folder with ir/, vi/ and label/ (default: synthetic scenes)");
  app.add_flag("--paper", args.paper, "the paper's networks (ReFusion + SegFormer) instead of the light ones");
  app.add_option("--classes", args.classes, "segmentation classes of --data, background included")->capture_default_str();
  app.add_option("--epochs", args.epochs)->capture_default_str();
  app.add_option("--meta-steps", args.meta_steps, "meta steps per epoch (the release: 200)")->capture_default_str();
  app.add_option("--lr", args.lr, "Adam learning rate of the fusion and task networks")->capture_default_str();
  app.add_option("--crop", args.crop, "fusion crop side")->capture_default_str();
  app.add_option("--task-height", args.task_height, "task input height (0: the image's)");
  app.add_option("--task-width", args.task_width, "task input width (0: the image's)");
  app.add_option("--device", args.device, "cpu or cuda")->capture_default_str();
  app.add_option("--checkpoint", args.checkpoint, "checkpoint file, written atomically after every epoch");
  app.add_flag("--resume", args.resume, "continue the run saved in --checkpoint");
  CLI11_PARSE(app, argc, argv);

  try {
    using namespace tdfusion::data;
    if (args.resume && args.checkpoint.empty()) throw std::invalid_argument("--resume needs --checkpoint");
    torch::manual_seed(0);
    if (args.data.empty()) {
      auto options = SyntheticScenesOptions().count(32).scene_height(96).scene_width(96).crop_size(args.crop);
      options.task_height(args.task_height > 0 ? args.task_height : 96).task_width(args.task_width > 0 ? args.task_width : 96);
      std::cout << "training on 32 synthetic scenes of 96x96\n";
      train_with(args, SyntheticScenes(options), kSceneClasses);
    } else {
      const PairedFolder folder(args.data, PairedFolderOptions().crop_size(args.crop).num_classes(args.classes)
                                               .require_labels(true).task_height(args.task_height).task_width(args.task_width));
      std::cout << "training on " << folder.size() << " pairs in " << args.data << '\n';
      train_with(args, folder, args.classes);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

#pragma once
// The parts of the claim experiment (design and usage in main.cpp).

#include <tdfusion/tdfusion.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace claim {

namespace td = tdfusion;
using Json = nlohmann::ordered_json;  // keeps the arms in their reporting order
using Batch = td::data::PairBatch<torch::Tensor>;

/// Task-size images in a fixed order, unflipped, with their masks: N x 1 x H x W (ir, vi) and N x H x W.
struct LabelledImages {
  torch::Tensor ir, vi, mask;
};

/// One data setting for one seed: the training draws of the bilevel optimiser and the fixed split the arms
/// are scored on.
struct Setting {
  std::string name;                      ///< "synthetic" or "msrs"
  std::vector<std::string> class_names;  ///< segmentation classes, background (id 0) included
  int64_t classes = 0;                   ///< class_names.size()
  size_t train_size = 0;
  /// Training draw `counter`: pair counter % train_size with the crop and flip drawn from the counter.
  std::function<Batch(uint64_t)> sample;
  LabelledImages train, test;
};

/// Training budget of every arm of a setting, and of the fresh task network that scores it.
struct Budget {
  int64_t warm_epochs = 3;   ///< F and T with the fixed loss, shared by all arms
  int64_t epochs = 6;        ///< per arm, after the warm start
  int64_t meta_steps = 16;   ///< per epoch, learned arm only
  double fusion_lr = 1e-3, task_lr = 1e-3;
  double inner_lr = 1e-3;    ///< beta of the fast-weight step
  /// Step of the max-normalised G update: its largest entry moves by exactly this much per meta step, so
  /// meta_lr x epochs x meta_steps bounds how far G can move; 4e-3 x 96 steps allows what 1e-3 x 384 did in a
  /// longer pilot, where G reached w_ir 0.9 on warm objects.
  double meta_lr = 4e-3;
  /// Epochs of the fresh task network trained on an arm's fused images. After 20 it had not learnt the textured
  /// class from any input (IoU 0, even on the visible images alone) and scored F's warm start at mIoU 0.58;
  /// after 60 at 0.84 (synthetic seed 0).
  int64_t score_epochs = 60;
  int64_t score_batch = 8;
  double score_lr = 3e-3;
  int64_t task_width = 16;   ///< SmallSegNet width, for T and the scoring network
};

Json to_json(const Budget& budget);

/// An arm: a fusion loss (learned, or fixed with the infrared weight ir_weight), or a single modality fed to
/// the scoring network directly (ir_only / vi_only: no fusion network).
struct Arm {
  std::string name;
  double ir_weight = 0.5;  ///< kFixed only
  enum Kind { kLearned, kFixed, kInfrared, kVisible } kind = kFixed;
};

/// The arms in reporting order: learned, fixed (0.5), ir_only, vi_only, then fixed_0.2 and fixed_0.8 when
/// `constant_arms`.
std::vector<Arm> arms_for(bool constant_arms);

/// Trains F and T with the fixed 0.5 / 0.5 loss for budget.warm_epochs and saves them to `path`, unless the
/// file exists already.
void warm_start(const Setting& setting, const Budget& budget, uint64_t seed, const std::string& path);

/// Runs one arm from the warm start at `warm_path` and scores it (the paper's protocol and the task network
/// trained alongside); saves its networks to `model_path`. Returns the arm's record for results.json.
Json run_arm(const Arm& arm, const Setting& setting, const Budget& budget, uint64_t seed,
                       const std::string& warm_path, const std::string& model_path);

/// The networks of a fusion arm, as run_arm saved them (`lpn` only for the learned arm).
struct ArmModels {
  td::fusion::LightFusion fusion;
  td::lossgen::Lpn lpn{nullptr};
};
ArmModels load_arm_models(const Arm& arm, const std::string& model_path);

/// G's weight on the infrared image, N x H x W, for images given as (first, second) inputs of G; `infrared`
/// is 0 when the infrared image is the first input, 1 when it is the second.
torch::Tensor ir_weights(td::lossgen::Lpn& lpn, const torch::Tensor& first, const torch::Tensor& second, int64_t infrared);

/// The learned weights inside each class's test masks: mean w_ir with the pair in its order, and with the
/// inputs swapped (content-aware weights are the same both ways).
Json mechanism(td::lossgen::Lpn& lpn, const Setting& setting);

/// The synthetic setting of `seed`: `train_count` training and `test_count` test scenes (disjoint seeds).
Setting synthetic_setting(uint64_t seed, bool quick);

/// The MSRS setting of `seed`: the 60 pairs under `root`, masks filled from the boxes of det_labels/fusion
/// (written to `mask_dir`), the every-4th hold-out split. Empty name when `root` has no such data (`why` says).
Setting msrs_setting(const std::string& root, const std::string& mask_dir, uint64_t seed, bool quick,
                     std::string* why);

/// The whole results.json summary of one setting: per arm mean and 95% interval, Delta per seed and its
/// interval, the constant-weight contrasts and (for the synthetic setting) the verdict.
Json summarise(const Json& seeds, bool with_verdict);

/// results.md from the results.json object.
std::string markdown(const Json& results);

/// The figure: for `scenes` test scenes of `setting`, infrared, visible, mask, learned w_ir and the fused image
/// of each fusion arm in `models` (name, networks; holders, so the copy shares them), written as a PNG grid.
void write_figure(const std::string& path, const Setting& setting,
                  std::vector<std::pair<std::string, ArmModels>> models, int64_t scenes);

}  // namespace claim

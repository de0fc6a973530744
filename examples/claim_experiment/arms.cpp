// The arms: the shared warm start, the bilevel training of each fusion loss, and the scores of the paper's
// protocol (a fresh task network trained on the arm's fused images) and of the task network trained alongside.
#include "claim_experiment.hpp"

#include <chrono>
#include <filesystem>
#include <iostream>
#include <type_traits>

namespace claim {

namespace {

namespace fs = std::filesystem;
using td::fusion::LightFusion;
using td::task::SmallSegNet;

/// The scoring network's initial weights come from the seed too, apart from F's and T's.
constexpr uint64_t kScoringSeedOffset = 1000003;
/// Phase A draws from a stream of its own, so that every arm's phase B sees the same samples: its counters
/// start this many passes over the data further on (counter % size still names the pair).
constexpr uint64_t kMetaStreamPasses = uint64_t{1} << 32;

td::meta::BilevelOptions bilevel_options(const Budget& b, uint64_t seed) {
  return td::meta::BilevelOptions().fusion_lr(b.fusion_lr).task_lr(b.task_lr).inner_lr(b.inner_lr).meta_lr(b.meta_lr)
      .seed(seed);
}

SmallSegNet task_network(const Setting& s, const Budget& b) {
  return SmallSegNet(td::task::SmallSegNetOptions().num_classes(s.classes).width(b.task_width));
}

/// One phase-B pass (epoch `epoch`): every pair once, in the epoch's order drawn from the seed.
template <class Trainer>
std::pair<double, double> phase_b(Trainer& trainer, const Setting& s, uint64_t seed, int64_t epoch) {
  const uint64_t n = s.train_size;
  double fusion_loss = 0, task_loss = 0;
  for (uint64_t k = 0; k < n; ++k) {
    const auto report =
        trainer.train_step(s.sample(td::data::shuffled_counter(static_cast<uint64_t>(epoch) * n + k, n, seed)));
    fusion_loss += report.fusion_loss / static_cast<double>(n);
    task_loss += report.task_loss / static_cast<double>(n);
  }
  return {fusion_loss, task_loss};
}

torch::Tensor fuse_all(LightFusion& fusion, const LabelledImages& images) {
  torch::NoGradGuard no_grad;
  const td::EvalMode eval(*fusion);
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < images.ir.size(0); i += 16) {
    const int64_t n = std::min<int64_t>(16, images.ir.size(0) - i);
    parts.push_back(fusion->forward(images.ir.narrow(0, i, n), images.vi.narrow(0, i, n)));
  }
  return torch::cat(parts, 0);
}

/// The task network's mIoU, pixel accuracy and per-class IoU on images and their masks.
Json evaluate(SmallSegNet& net, const torch::Tensor& images, const torch::Tensor& masks) {
  torch::NoGradGuard no_grad;
  const td::EvalMode eval(*net);
  td::metrics::TaskEvaluation<td::task::SmallSegNetImpl> evaluation;
  for (int64_t i = 0; i < images.size(0); i += 16) {
    const int64_t n = std::min<int64_t>(16, images.size(0) - i);
    evaluation.add(*net, images.narrow(0, i, n), masks.narrow(0, i, n));
  }
  const td::metrics::TaskMetrics m = evaluation.result();
  return {{"miou", m.summary.at("mIoU")}, {"pixel_accuracy", m.summary.at("pixel_accuracy")},
          {"iou", td::metrics::to_json(m.per_class)}};
}

/// The paper's protocol: a fresh task network (initial weights from the seed, the same for every arm) trained
/// on `train` images for budget.score_epochs (each epoch in its own order, mirrored every other epoch), scored
/// on the test images.
Json score(const torch::Tensor& train, const torch::Tensor& test, const Setting& s, const Budget& b,
                     uint64_t seed) {
  torch::manual_seed(seed + kScoringSeedOffset);
  SmallSegNet net = task_network(s, b);
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(b.score_lr));
  const auto n = static_cast<uint64_t>(train.size(0));
  double last_loss = 0;
  for (int64_t epoch = 0; epoch < b.score_epochs; ++epoch) {
    const std::vector<uint64_t> order = td::data::epoch_permutation(n, seed, static_cast<uint64_t>(epoch));
    last_loss = 0;
    for (uint64_t i = 0; i < n; i += static_cast<uint64_t>(b.score_batch)) {
      const uint64_t end = std::min<uint64_t>(n, i + static_cast<uint64_t>(b.score_batch));
      const torch::Tensor index =
          torch::tensor(std::vector<int64_t>(order.begin() + static_cast<int64_t>(i), order.begin() + static_cast<int64_t>(end)));
      torch::Tensor images = train.index_select(0, index), masks = s.train.mask.index_select(0, index);
      if (epoch % 2 == 1) {
        images = images.flip({-1});
        masks = masks.flip({-1});
      }
      const torch::Tensor loss = net->loss(images, masks);
      adam.zero_grad();
      loss.backward();
      adam.step();
      last_loss += loss.item<double>() * static_cast<double>(end - i) / static_cast<double>(n);
    }
  }
  Json record = evaluate(net, test, s.test.mask);
  record["final_train_loss"] = last_loss;
  return record;
}

/// Mean weight on the infrared image over the first 16 test images (the learned loss's overall balance).
double mean_ir_weight(td::lossgen::Lpn& lpn, const LabelledImages& test) {
  const int64_t n = std::min<int64_t>(16, test.ir.size(0));
  return ir_weights(lpn, test.ir.narrow(0, 0, n), test.vi.narrow(0, 0, n), 0).mean().item<double>();
}

/// Trains F and T from the warm start for budget.epochs with the loss generator `g` (learned when it has
/// parameters); returns the per-epoch log.
template <class LossGenerator>
Json train_arm(const std::string& label, LightFusion fusion, LossGenerator g, SmallSegNet task,
                         const Setting& s, const Budget& b, uint64_t seed) {
  constexpr bool kLearned = std::is_same_v<LossGenerator, td::lossgen::Lpn>;
  td::meta::BilevelOptimizer<LightFusion, LossGenerator, SmallSegNet> trainer(fusion, g, task, bilevel_options(b, seed));
  const uint64_t n = s.train_size;
  auto meta_draw = [&, draw = uint64_t{0}]() mutable {
    return s.sample(n * kMetaStreamPasses + td::data::shuffled_counter(draw++, n, seed + 1));
  };
  Json log = Json::array();
  for (int64_t epoch = b.warm_epochs; epoch < b.warm_epochs + b.epochs; ++epoch) {
    Json entry = {{"epoch", epoch + 1}};
    if constexpr (kLearned) {
      double task_loss = 0, hypergradient = 0;
      for (int64_t m = 0; m < b.meta_steps; ++m) {
        const Batch meta_train = meta_draw(), meta_test = meta_draw();
        const td::meta::MetaStepReport r = trainer.meta_step(meta_train, meta_test);
        task_loss += r.task_loss / static_cast<double>(b.meta_steps);
        hypergradient += r.hypergradient_max / static_cast<double>(b.meta_steps);
      }
      entry["meta_task_loss"] = task_loss;
      entry["hypergradient_max"] = hypergradient;
    }
    const auto [fusion_loss, task_loss] = phase_b(trainer, s, seed, epoch);
    entry["fusion_loss"] = fusion_loss;
    entry["task_loss"] = task_loss;
    if constexpr (kLearned) entry["w_ir_mean"] = mean_ir_weight(g, s.test);
    std::cout << "  " << s.name << " seed " << seed << " " << label << " epoch " << epoch + 1 << ": " << entry.dump()
              << std::endl;
    log.push_back(entry);
  }
  return log;
}

td::io::CheckpointState networks(LightFusion& fusion, SmallSegNet* task, td::lossgen::Lpn* lpn) {
  td::io::CheckpointState state;
  state.modules.emplace_back("fusion", fusion.ptr());
  if (task) state.modules.emplace_back("task", task->ptr());
  if (lpn && *lpn) state.modules.emplace_back("lpn", lpn->ptr());
  return state;
}

}  // namespace

Json to_json(const Budget& b) {
  return {{"warm_epochs", b.warm_epochs}, {"epochs", b.epochs},       {"meta_steps", b.meta_steps},
          {"fusion_lr", b.fusion_lr},     {"task_lr", b.task_lr},     {"inner_lr", b.inner_lr},
          {"meta_lr", b.meta_lr},         {"score_epochs", b.score_epochs}, {"score_batch", b.score_batch},
          {"score_lr", b.score_lr},       {"task_width", b.task_width}};
}

std::vector<Arm> arms_for(bool constant_arms) {
  std::vector<Arm> arms = {{"learned", 0.5, Arm::kLearned},
                           {"fixed", 0.5, Arm::kFixed},
                           {"ir_only", 0.5, Arm::kInfrared},
                           {"vi_only", 0.5, Arm::kVisible}};
  if (constant_arms) {
    arms.push_back({"fixed_0.2", 0.2, Arm::kFixed});
    arms.push_back({"fixed_0.8", 0.8, Arm::kFixed});
  }
  return arms;
}

void warm_start(const Setting& s, const Budget& b, uint64_t seed, const std::string& path) {
  if (fs::exists(path)) return;
  torch::manual_seed(seed);
  LightFusion fusion;
  SmallSegNet task = task_network(s, b);
  td::meta::BilevelOptimizer<LightFusion, td::lossgen::FixedWeights, SmallSegNet> trainer(
      fusion, td::lossgen::FixedWeights(0.5), task, bilevel_options(b, seed));
  for (int64_t epoch = 0; epoch < b.warm_epochs; ++epoch) {
    const auto [fusion_loss, task_loss] = phase_b(trainer, s, seed, epoch);
    std::cout << "  " << s.name << " seed " << seed << " warm start epoch " << epoch + 1 << ": fusion loss "
              << fusion_loss << ", task loss " << task_loss << std::endl;
  }
  td::io::save_checkpoint(path, networks(fusion, &task, nullptr));
}

Json run_arm(const Arm& arm, const Setting& s, const Budget& b, uint64_t seed, const std::string& warm_path,
                       const std::string& model_path) {
  const auto start = std::chrono::steady_clock::now();
  torch::manual_seed(seed);  // each (seed, arm) alike whether it runs first in its process or after others
  Json record;
  if (arm.kind == Arm::kInfrared || arm.kind == Arm::kVisible) {
    const bool ir = arm.kind == Arm::kInfrared;
    record = score(ir ? s.train.ir : s.train.vi, ir ? s.test.ir : s.test.vi, s, b, seed);
  } else {
    LightFusion fusion;
    SmallSegNet task = task_network(s, b);
    td::io::CheckpointState warm = networks(fusion, &task, nullptr);
    td::io::load_checkpoint(warm_path, warm);
    td::lossgen::Lpn lpn{nullptr};
    Json log;
    if (arm.kind == Arm::kLearned) {
      lpn = td::lossgen::Lpn(td::lossgen::LpnOptions().zero_init_output(true));
      log = train_arm(arm.name, fusion, lpn, task, s, b, seed);
    } else {
      log = train_arm(arm.name, fusion, td::lossgen::FixedWeights(arm.ir_weight), task, s, b, seed);
    }
    const torch::Tensor fused_test = fuse_all(fusion, s.test);
    record = score(fuse_all(fusion, s.train), fused_test, s, b, seed);
    record["alongside"] = evaluate(task, fused_test, s.test.mask);
    if (lpn) record["mechanism"] = mechanism(lpn, s);
    record["log"] = log;
    td::io::save_checkpoint(model_path, networks(fusion, &task, &lpn));
  }
  record["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return record;
}

ArmModels load_arm_models(const Arm& arm, const std::string& model_path) {
  ArmModels models;
  if (arm.kind == Arm::kLearned) models.lpn = td::lossgen::Lpn(td::lossgen::LpnOptions().zero_init_output(true));
  td::io::CheckpointState state = networks(models.fusion, nullptr, &models.lpn);
  td::io::load_checkpoint(model_path, state);
  return models;
}

torch::Tensor ir_weights(td::lossgen::Lpn& lpn, const torch::Tensor& first, const torch::Tensor& second,
                         int64_t infrared) {
  torch::NoGradGuard no_grad;
  const td::EvalMode eval(*lpn);
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < first.size(0); i += 8) {
    const int64_t n = std::min<int64_t>(8, first.size(0) - i);
    parts.push_back(lpn->forward(first.narrow(0, i, n), second.narrow(0, i, n)).select(1, infrared));
  }
  return torch::cat(parts, 0);
}

Json mechanism(td::lossgen::Lpn& lpn, const Setting& s) {
  const torch::Tensor w_ir = ir_weights(lpn, s.test.ir, s.test.vi, 0);
  const torch::Tensor w_ir_swapped = ir_weights(lpn, s.test.vi, s.test.ir, 1);
  Json in_order, swapped;
  for (int64_t c = 0; c < s.classes; ++c) {
    const torch::Tensor inside = s.test.mask == c;
    if (!inside.any().item<bool>()) continue;  // a class without test pixels has no mean
    const std::string& name = s.class_names[static_cast<size_t>(c)];
    in_order[name] = w_ir.masked_select(inside).mean().item<double>();
    swapped[name] = w_ir_swapped.masked_select(inside).mean().item<double>();
  }
  return {{"w_ir", in_order}, {"w_ir_swapped", swapped}};
}

}  // namespace claim

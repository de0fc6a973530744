// The bilevel optimiser: exact hypergradients, the second-order pitfall, fast weights, snapshots, training.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/data/concat_dataset.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/lossgen/fixed_weights.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/bilevel_optimizer.hpp"
#include "tdfusion/data/synthetic_scenes.hpp"
#include "tdfusion/metrics/task_evaluation.hpp"
#include "tdfusion/task/detection.hpp"
#include "tdfusion/task/segmentation.hpp"

#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include <unistd.h>

namespace {

using namespace tdfusion;
using SegBatch = data::PairBatch<torch::Tensor>;

/// A small deterministic batch: a bright "warm" square visible in ir only, a texture in vi only.
SegBatch tiny_batch(int64_t size, uint64_t seed, torch::Dtype dtype) {
  torch::manual_seed(seed);
  SegBatch b;
  b.ir = torch::rand({1, 1, size, size}, dtype) * 0.3;
  b.vi = torch::rand({1, 1, size, size}, dtype) * 0.3;
  b.ir.slice(2, 1, size / 2).slice(3, 1, size / 2) += 0.6;
  b.vi.slice(2, size / 2, size - 1).slice(3, size / 2, size - 1) += 0.5 * torch::rand({size / 2 - 1, size / 2 - 1}, dtype);
  b.target = torch::zeros({1, size, size}, torch::kLong);
  b.target.slice(1, 1, size / 2).slice(2, 1, size / 2) = 1;
  b.target.slice(1, size / 2, size - 1).slice(2, size / 2, size - 1) = 2;
  b.ir_crop = b.ir.slice(2, 0, size - 2).slice(3, 2, size).contiguous();
  b.vi_crop = b.vi.slice(2, 0, size - 2).slice(3, 2, size).contiguous();
  return b;
}

std::vector<torch::Tensor> snapshot(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> copies;
  for (const auto& t : tensors) copies.push_back(t.detach().clone());
  return copies;
}

bool all_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

/// Worst relative error of the analytic hypergradient dL_task/dphi against central finite differences in double
/// precision (tests/support.hpp: along the normalised gradient and its `coordinates` largest entries).
template <class Trainer>
double hypergradient_error(Trainer& trainer, const SegBatch& train, const SegBatch& test, int coordinates) {
  const auto phi = trainer.loss_generator()->parameters();
  const auto grads = gradients(trainer.meta_objective(train, test), phi);
  return test::worst_directional_error(
      phi, grads, [&] { return trainer.meta_objective(train, test).template item<double>(); }, coordinates);
}

meta::BilevelOptions double_options() {
  return meta::BilevelOptions().dtype(torch::kFloat64).inner_lr(0.5).task_lookahead(false);
}

}  // namespace

TEST_CASE("hypergradient of ReFusion + LPN + SegFormer matches finite differences in double precision") {
  torch::manual_seed(1);
  task::SegFormerOptions seg;
  seg.num_classes(3);
  meta::BilevelOptimizer<fusion::ReFusion, lossgen::Lpn, task::SegFormer> trainer(
      fusion::ReFusion(), lossgen::Lpn(), task::SegFormer(seg), double_options());
  const auto train = tiny_batch(32, 1, torch::kFloat64), test = tiny_batch(32, 2, torch::kFloat64);
  CHECK(hypergradient_error(trainer, train, test, 3) < 1e-4);
}

TEST_CASE("hypergradient of the light policies matches finite differences in double precision") {
  torch::manual_seed(2);
  task::SmallSegNetOptions seg;
  seg.num_classes(3);
  meta::BilevelOptimizer<fusion::LightFusion, lossgen::Lpn, task::SmallSegNet> trainer(
      fusion::LightFusion(), lossgen::Lpn(), task::SmallSegNet(seg), double_options());
  const auto train = tiny_batch(16, 3, torch::kFloat64), test = tiny_batch(16, 4, torch::kFloat64);
  CHECK(hypergradient_error(trainer, train, test, 4) < 1e-4);
}

TEST_CASE("a meta step changes the loss generator only through second-order terms") {
  auto run = [](bool second_order) {
    torch::manual_seed(3);
    task::SmallSegNetOptions seg;
    seg.num_classes(3);
    meta::BilevelOptimizer<fusion::LightFusion, lossgen::Lpn, task::SmallSegNet> trainer(
        fusion::LightFusion(), lossgen::Lpn(), task::SmallSegNet(seg),
        meta::BilevelOptions().second_order(second_order).inner_lr(0.1).meta_lr(0.01));
    const auto before = snapshot(trainer.loss_generator()->parameters());
    const auto fusion_before = snapshot(trainer.fusion()->parameters());
    const auto task_before = snapshot(trainer.task()->parameters());
    const auto report = trainer.meta_step(tiny_batch(16, 5, torch::kFloat32), tiny_batch(16, 6, torch::kFloat32));
    // Fast weights are never written into the fusion network; the task network's look-ahead is undone.
    CHECK(all_equal(fusion_before, trainer.fusion()->parameters()));
    CHECK(all_equal(task_before, trainer.task()->parameters()));
    return std::make_pair(all_equal(before, trainer.loss_generator()->parameters()), report.hypergradient_max);
  };
  const auto [unchanged_second, grad_second] = run(true);
  CHECK_FALSE(unchanged_second);
  CHECK(grad_second > 0.0);
  const auto [unchanged_first, grad_first] = run(false);
  CHECK(unchanged_first);  // the first-order shortcut gives G no gradient at all
  CHECK(grad_first == 0.0);
}

TEST_CASE("fast weights are new tensors; the weights they come from are untouched") {
  torch::manual_seed(4);
  fusion::LightFusion net;
  const ParamDict theta = net->named_parameters();
  std::vector<torch::Tensor> grads;
  std::vector<int64_t> versions;
  for (const auto& item : theta) {
    grads.push_back(torch::ones_like(item.value()));
    versions.push_back(item.value()._version());
  }
  const auto before = snapshot(theta.values());
  const ParamDict fast = meta::SgdFastWeights().fast_weights(theta, grads, 0.25);
  REQUIRE(fast.size() == theta.size());
  for (size_t i = 0; i < theta.size(); ++i) {
    CHECK(fast[i].key() == theta[i].key());
    CHECK(!fast[i].value().is_same(theta[i].value()));
    CHECK(theta[i].value()._version() == versions[i]);
    CHECK(torch::allclose(fast[i].value(), before[i] - 0.25));
  }
}

TEST_CASE("the task network's snapshot survives a look-ahead with batch-norm buffers") {
  torch::manual_seed(5);
  task::SegFormerOptions seg;
  seg.num_classes(3);
  meta::BilevelOptimizer<fusion::LightFusion, lossgen::Lpn, task::SegFormer> trainer(
      fusion::LightFusion(), lossgen::Lpn(), task::SegFormer(seg),
      meta::BilevelOptions().task_lr(1e-2));
  const auto params = snapshot(trainer.task()->parameters());
  const auto buffers = snapshot(trainer.task()->buffers());
  trainer.meta_step(tiny_batch(32, 7, torch::kFloat32), tiny_batch(32, 8, torch::kFloat32));
  CHECK(all_equal(params, trainer.task()->parameters()));
  CHECK(all_equal(buffers, trainer.task()->buffers()));
}

TEST_CASE("bad batches fail with clear messages") {
  meta::BilevelOptimizer<fusion::LightFusion, lossgen::FixedWeights, task::SmallSegNet> trainer{
      fusion::LightFusion(), lossgen::FixedWeights(), task::SmallSegNet()};
  auto expect_error = [&](SegBatch batch, const std::string& fragment) {
    try {
      trainer.train_step(batch);
      FAIL("no error for a batch with ", fragment);
    } catch (const c10::Error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(fragment) != std::string::npos, e.what());
    }
  };
  const SegBatch good = tiny_batch(16, 9, torch::kFloat32);
  SegBatch b = good;
  b.vi = torch::rand({1, 1, 16, 15});
  expect_error(b, "differ in size");
  b = good;
  b.ir = torch::rand({1, 3, 16, 16});
  expect_error(b, "must have 1 channel");
  b = good;
  b.vi_crop = good.vi_crop.clone();
  b.vi_crop[0][0][3][3] = std::nan("");
  expect_error(b, "NaN or infinite");
  b = good;
  b.ir = torch::rand({0, 1, 16, 16});
  b.vi = torch::rand({0, 1, 16, 16});
  expect_error(b, "empty batch");
  CHECK_THROWS_WITH_AS(trainer.meta_step(good, good), doctest::Contains("nothing to meta-learn"), c10::Error);
}

namespace {

using LightTrainer = meta::BilevelOptimizer<fusion::LightFusion, lossgen::Lpn, task::SmallSegNet>;

data::SyntheticScenes small_scenes() {
  return data::SyntheticScenes(data::SyntheticScenesOptions().count(8).scene_height(48).scene_width(48)
                                   .task_height(48).task_width(48).crop_size(40).seed(3));
}

LightTrainer light_trainer(meta::BilevelOptions options) {
  torch::manual_seed(11);
  return LightTrainer(fusion::LightFusion(), lossgen::Lpn(),
                      task::SmallSegNet(task::SmallSegNetOptions().num_classes(data::kSceneClasses)),
                      options.fusion_lr(3e-3).task_lr(3e-3).meta_lr(1e-3).meta_steps_per_epoch(2).seed(5));
}

}  // namespace

TEST_CASE("a short CPU training run on synthetic scenes lowers the task loss and the fusion loss") {
  LightTrainer trainer = light_trainer(meta::BilevelOptions().epochs(8));
  std::vector<meta::EpochReport> epochs;
  int64_t meta_steps = 0;
  trainer.fit(small_scenes(), [&](const meta::EpochReport& r) { epochs.push_back(r); },
              [&](const meta::MetaStepReport&) { ++meta_steps; });
  REQUIRE(epochs.size() == 8);
  CHECK(meta_steps == 16);
  MESSAGE("task loss " << epochs.front().task_loss << " -> " << epochs.back().task_loss << ", fusion loss "
                       << epochs.front().fusion_loss << " -> " << epochs.back().fusion_loss);
  CHECK(epochs.back().task_loss < 0.8 * epochs.front().task_loss);
  CHECK(epochs.back().fusion_loss < 0.8 * epochs.front().fusion_loss);
}

TEST_CASE("a callback returning true stops training early; fit says why it stopped") {
  LightTrainer trainer = light_trainer(meta::BilevelOptions().epochs(5));
  int64_t calls = 0;
  const meta::FitResult stopped = trainer.fit(small_scenes(), [&](const meta::TrainStepReport&) { return ++calls == 3; });
  CHECK(calls == 3);
  CHECK(trainer.epoch() == 0);  // the interrupted epoch does not count
  CHECK(stopped.stop == meta::FitStop::callback);
  CHECK(stopped.epoch == 0);
  REQUIRE(stopped.last_train_step.has_value());
  CHECK(stopped.last_train_step->step == 2);
  CHECK(stopped.last_train_step->steps == 8);
  CHECK(stopped.last_train_step->epochs == 5);
  CHECK(stopped.last_meta_step.has_value());
  CHECK_FALSE(stopped.last_epoch.has_value());

  LightTrainer full = light_trainer(meta::BilevelOptions().epochs(2));
  const meta::FitResult done = full.fit(small_scenes());
  CHECK(done.stop == meta::FitStop::completed);
  CHECK(done.epoch == 2);
  REQUIRE(done.last_epoch.has_value());
  CHECK(done.last_epoch->epoch == 1);
  CHECK(done.last_meta_step->step == 1);
  CHECK(done.last_meta_step->steps == 2);
  CHECK_FALSE(done.last_validation.has_value());
}

namespace {

/// Breaks the fusion policy's contract: forward_with reads the module's own weights instead of the ParamView.
class OwnWeightsFusionImpl : public torch::nn::Module {
 public:
  OwnWeightsFusionImpl() { conv_ = register_module("conv", nn::Conv(2, 1, 3, 1, /*bias=*/true)); }
  torch::Tensor forward_with(const ParamView&, const torch::Tensor& ir, const torch::Tensor& vi) const {
    return torch::sigmoid(conv_->forward_with(ParamView(*conv_), torch::cat({ir, vi}, 1)));
  }
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) { return forward_with(ParamView(*this), ir, vi); }

 private:
  nn::Conv conv_{nullptr};
};
TORCH_MODULE(OwnWeightsFusion);

}  // namespace

TEST_CASE("a fusion policy whose forward_with ignores its ParamView stops at the first meta step") {
  torch::manual_seed(3);
  meta::BilevelOptimizer<OwnWeightsFusion, lossgen::Lpn, task::SmallSegNet> trainer(
      OwnWeightsFusion(), lossgen::Lpn(), task::SmallSegNet(task::SmallSegNetOptions().num_classes(data::kSceneClasses)),
      meta::BilevelOptions().epochs(1).meta_steps_per_epoch(2));
  const auto generator = snapshot(trainer.loss_generator()->parameters());
  int64_t meta_steps = 0;
  const std::string message = [&] {
    try {
      trainer.fit(small_scenes(), [&](const meta::MetaStepReport&) { ++meta_steps; });
    } catch (const c10::Error& error) {
      return std::string(error.what_without_backtrace());
    }
    return std::string("(no error)");
  }();
  CHECK(message.find("forward_with ignores the ParamView it is given") != std::string::npos);
  CHECK(message.find("first meta step") != std::string::npos);
  CHECK(meta_steps == 0);
  CHECK(all_equal(generator, trainer.loss_generator()->parameters()));  // G was not updated
}

TEST_CASE("each epoch visits every pair once, in an order of its own drawn from the seed") {
  const uint64_t size = 7;
  std::set<std::vector<uint64_t>> orders;
  for (uint64_t epoch = 0; epoch < 4; ++epoch) {
    std::vector<uint64_t> items;
    for (uint64_t p = 0; p < size; ++p) {
      const uint64_t counter = data::shuffled_counter(epoch * size + p, size, 9);
      CHECK(counter / size == epoch);  // the data set's own randomness sees (epoch, item)
      items.push_back(counter % size);
    }
    CHECK(std::set<uint64_t>(items.begin(), items.end()).size() == size);
    orders.insert(items);
    CHECK(data::shuffled_counter(epoch * size + 3, size, 9) == data::shuffled_counter(epoch * size + 3, size, 9));
  }
  CHECK(orders.size() == 4);
  CHECK(data::shuffled_counter(5, size, 9) != data::shuffled_counter(5, size, 10));
  CHECK(data::shuffled_counter(5, 1, 9) == 5);
}

TEST_CASE("ConcatDataset serves the items of its parts in turn, each part seeing its own counters") {
  const auto part = [](int64_t count, uint64_t seed) {
    return data::SyntheticScenes(data::SyntheticScenesOptions().count(count).scene_height(16).scene_width(16)
                                     .task_height(16).task_width(16).crop_size(8).seed(seed));
  };
  const data::ConcatDataset<data::SyntheticScenes> both({part(2, 1), part(3, 2)});
  REQUIRE(both.size() == 5);
  for (uint64_t counter : {0, 1, 2, 4, 6, 9}) {
    const uint64_t epoch = counter / 5, item = counter % 5;
    const auto expected = item < 2 ? part(2, 1).get(epoch * 2 + item) : part(3, 2).get(epoch * 3 + item - 2);
    const auto got = both.get(counter);
    CHECK(torch::equal(got.ir, expected.ir));
    CHECK(torch::equal(got.vi_crop, expected.vi_crop));
  }
}

TEST_CASE("pairs without labels give F one more pass of fusion steps per epoch, interleaved") {
  LightTrainer trainer = light_trainer(meta::BilevelOptions().epochs(1).meta_steps_per_epoch(0));
  trainer.set_fusion_data(data::SyntheticScenes(data::SyntheticScenesOptions().count(4).scene_height(48)
                                                    .scene_width(48).crop_size(40).seed(8)));
  std::string order;
  trainer.fit(small_scenes(), [&](const meta::TrainStepReport&) { order += 'L'; },
              [&](const meta::FusionStepReport& r) {
                CHECK(std::isfinite(r.fusion_loss));
                order += 'F';
              });
  CHECK(order == "LFLLFLLFLLFL");  // 8 labelled and 4 fusion-only steps, spread evenly
  // F took the extra steps: it ends elsewhere than after the labelled steps alone.
  LightTrainer labelled_only = light_trainer(meta::BilevelOptions().epochs(1).meta_steps_per_epoch(0));
  labelled_only.fit(small_scenes());
  CHECK(!all_equal(labelled_only.fusion()->parameters(), trainer.fusion()->parameters()));
}

TEST_CASE("resuming from a checkpoint continues the same run") {
  const auto dir = std::filesystem::temp_directory_path() / ("tdfusion_resume_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "run.ckpt").string();
  const data::SyntheticScenes fusion_data(data::SyntheticScenesOptions().count(3).scene_height(48).scene_width(48)
                                              .crop_size(40).seed(8));

  LightTrainer straight = light_trainer(meta::BilevelOptions().epochs(2));
  straight.set_fusion_data(fusion_data);
  straight.fit(small_scenes());

  LightTrainer first = light_trainer(meta::BilevelOptions().epochs(1).checkpoint_path(path));
  first.set_fusion_data(fusion_data);
  first.fit(small_scenes());
  REQUIRE(std::filesystem::exists(path));
  LightTrainer resumed = light_trainer(meta::BilevelOptions().epochs(2));
  resumed.set_fusion_data(fusion_data);
  resumed.load(path);
  CHECK(resumed.epoch() == 1);
  CHECK(resumed.sample_counter() == first.sample_counter());
  resumed.fit(small_scenes());

  auto close = [](const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!torch::allclose(a[i], b[i], 1e-5, 1e-7)) return false;
    return a.size() == b.size();
  };
  CHECK(close(straight.fusion()->parameters(), resumed.fusion()->parameters()));
  CHECK(close(straight.loss_generator()->parameters(), resumed.loss_generator()->parameters()));
  CHECK(close(straight.task()->parameters(), resumed.task()->parameters()));
  std::filesystem::remove_all(dir);
}

TEST_CASE("validation reports the task loss, mIoU and fusion metrics of the fused validation images") {
  LightTrainer trainer = light_trainer(meta::BilevelOptions().epochs(1));
  const data::SyntheticScenes scenes = small_scenes();
  trainer.fit(scenes);
  trainer.task()->train();
  const auto fusion_before = snapshot(trainer.fusion()->parameters());
  const auto task_before = snapshot(trainer.task()->parameters());
  const meta::ValidationReport report =
      trainer.validate(scenes, meta::ValidationOptions().protocol(metrics::Protocol::cddfuse));
  CHECK(all_equal(fusion_before, trainer.fusion()->parameters()));
  CHECK(all_equal(task_before, trainer.task()->parameters()));
  CHECK(trainer.fusion()->is_training());  // modes are restored
  CHECK(trainer.task()->is_training());

  // The same quantities composed by hand from the networks and the metric functions.
  torch::NoGradGuard no_grad;
  trainer.fusion()->eval();
  trainer.task()->eval();
  double loss = 0.0;
  metrics::ConfusionMatrix confusion(data::kSceneClasses);
  std::vector<double> sums(9, 0.0);
  for (uint64_t i = 0; i < scenes.size(); ++i) {
    const SegBatch b = scenes.get(i);
    const torch::Tensor fused = trainer.fusion()->forward(b.ir, b.vi);
    loss += trainer.task()->loss(fused, b.target).item<double>();
    metrics::update(confusion, trainer.task()->forward(fused), b.target);
    const metrics::MetricRow row = metrics::evaluate_fusion(metrics::to_grey8(b.ir[0]), metrics::to_grey8(b.vi[0]),
                                                            metrics::to_grey8(fused[0]), metrics::Protocol::cddfuse);
    for (size_t m = 0; m < sums.size(); ++m) sums[m] += row.values[m].second;
  }
  const double n = static_cast<double>(scenes.size());
  CHECK(report.epoch == 0);
  CHECK(report.samples == static_cast<int64_t>(scenes.size()));
  CHECK(report.task_loss == doctest::Approx(loss / n).epsilon(1e-12));
  REQUIRE(report.task.summary.values.size() == 2);
  CHECK(report.task.summary.at("mIoU") == doctest::Approx(confusion.mean_iou()).epsilon(1e-12));
  CHECK(report.task.summary.at("pixel_accuracy") == doctest::Approx(confusion.pixel_accuracy()).epsilon(1e-12));
  CHECK(report.task.per_class.at("IoU[2]") == doctest::Approx(confusion.iou()[2]).epsilon(1e-12));
  REQUIRE(report.fusion.values.size() == 9);
  for (size_t m = 0; m < sums.size(); ++m) {
    CHECK_MESSAGE(report.fusion.values[m].second == doctest::Approx(sums[m] / n).epsilon(1e-12),
                  report.fusion.values[m].first);
  }
  CHECK(meta::format_validation(report).find("mIoU") != std::string::npos);
}

TEST_CASE("fit validates every n-th epoch, and a validation callback can stop training") {
  LightTrainer trainer = light_trainer(meta::BilevelOptions().epochs(4).meta_steps_per_epoch(0));
  trainer.set_validation(small_scenes(), meta::ValidationOptions().every_epochs(2).fusion_metrics(false));
  std::vector<int64_t> validated;
  trainer.fit(small_scenes(), [&](const meta::ValidationReport& r) {
    CHECK(r.fusion.values.empty());
    CHECK(r.task.summary.values.size() == 2);
    validated.push_back(r.epoch);
  });
  CHECK(validated == std::vector<int64_t>{1, 3});

  LightTrainer stopped = light_trainer(meta::BilevelOptions().epochs(4).meta_steps_per_epoch(0));
  stopped.set_validation(small_scenes(), meta::ValidationOptions().fusion_metrics(false));
  stopped.fit(small_scenes(), [](const meta::ValidationReport&) { return true; });
  CHECK(stopped.epoch() == 1);  // the validated epoch counts; training stops after it
  CHECK_THROWS_WITH_AS(stopped.set_validation(small_scenes(), meta::ValidationOptions().every_epochs(0)),
                       doctest::Contains("every_epochs must be positive"), c10::Error);
}

TEST_CASE("validation of a detection task reports COCO-style AP of the detector's boxes") {
  using DetTrainer = meta::BilevelOptimizer<fusion::LightFusion, lossgen::FixedWeights, task::SmallDetector>;
  torch::manual_seed(12);
  DetTrainer trainer(fusion::LightFusion(), lossgen::FixedWeights(),
                     task::SmallDetector(task::SmallDetectorOptions().num_classes(data::kSceneDetectionClasses)),
                     meta::BilevelOptions().epochs(8).fusion_lr(3e-3).task_lr(1e-2));
  const data::SyntheticDetectionScenes scenes(data::SyntheticScenesOptions().count(6).scene_height(64).scene_width(64)
                                                  .task_height(64).task_width(64).crop_size(48).seed(4));
  trainer.fit(scenes);
  const meta::ValidationReport report = trainer.validate(scenes);
  std::vector<std::string> names;
  for (const auto& value : report.task.summary.values) names.push_back(value.first);
  CHECK(names == std::vector<std::string>{"AP50", "AP50:95", "P", "R"});
  CHECK(report.task.per_class.values.size() == static_cast<size_t>(data::kSceneDetectionClasses));
  CHECK(report.fusion.values.size() == 6);  // the tdfusion protocol by default

  // The evaluator fed by hand with the detector's boxes (ultralytics' validation thresholds).
  torch::NoGradGuard no_grad;
  trainer.fusion()->eval();
  metrics::DetectionEvaluator evaluator(data::kSceneDetectionClasses);
  for (uint64_t i = 0; i < scenes.size(); ++i) {
    const auto b = scenes.get(i);
    const torch::Tensor d = trainer.task()->detect(trainer.fusion()->forward(b.ir, b.vi), 0.001, 0.7, 300)[0];
    const torch::Tensor gt = b.target.image_boxes(0);
    const torch::Tensor xyxy = task::xywh_to_xyxy(gt.narrow(1, 1, 4)) * 64.0;
    evaluator.add_image(metrics::boxes_from_tensors(d.narrow(1, 0, 4), d.select(1, 5), d.select(1, 4)),
                        metrics::boxes_from_tensors(xyxy, gt.select(1, 0)));
  }
  const metrics::DetectionMetrics expected = evaluator.compute();
  MESSAGE("validation AP50 " << report.task.summary.at("AP50") << ", AP50:95 " << report.task.summary.at("AP50:95"));
  REQUIRE(expected.map50 > 0.0);  // some boxes are found, so the comparison is not between two zeros
  CHECK(report.task.summary.at("AP50") == doctest::Approx(expected.map50).epsilon(1e-12));
  CHECK(report.task.summary.at("AP50:95") == doctest::Approx(expected.map50_95).epsilon(1e-12));
}

TEST_CASE("an LPN with a zero-initialised last convolution starts at the fixed loss and the meta step moves it") {
  torch::manual_seed(12);
  const SegBatch train = tiny_batch(16, 5, torch::kFloat), test = tiny_batch(16, 6, torch::kFloat);
  CHECK_FALSE(torch::equal(lossgen::Lpn()->forward(train.ir, train.vi), torch::full({1, 2, 16, 16}, 0.5)));
  lossgen::Lpn lpn(lossgen::LpnOptions().zero_init_output(true));
  CHECK(torch::equal(lpn->forward(train.ir, train.vi), torch::full({1, 2, 16, 16}, 0.5)));

  std::map<std::string, torch::Tensor> initial;
  for (const auto& p : lpn->named_parameters()) initial[p.key()] = p.value().detach().clone();
  LightTrainer trainer(fusion::LightFusion(), lpn, task::SmallSegNet(task::SmallSegNetOptions().num_classes(3)),
                       meta::BilevelOptions().meta_lr(1e-2));
  const meta::MetaStepReport report = trainer.meta_step(train, test);
  CHECK(report.hypergradient_max > 0.0);
  // The first step reaches the last convolution only (everything before it sees zero weights after it), and
  // moves its largest entry by exactly meta_lr.
  for (const auto& p : lpn->named_parameters()) {
    const double change = (p.value() - initial.at(p.key())).abs().max().item<double>();
    if (p.key() == "project_out_1.weight") {
      CHECK(change == doctest::Approx(1e-2).epsilon(1e-5));
    } else {
      CHECK_MESSAGE(change == 0.0, p.key());
    }
  }
  CHECK((lpn->forward(train.ir, train.vi) - 0.5).abs().max().item<double>() > 0.0);
}

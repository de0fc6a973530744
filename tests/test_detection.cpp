// Detection task policies: CIoU, DFL, NMS and the task-aligned assigner against hand computations; YOLOv8-n
// and SmallDetector shapes, parameter counts, decoding, training, double backward; YOLO label files; box
// geometry under crops, flips and resizes; detection targets in batches; and the detector's hypergradient
// through the bilevel optimiser against finite differences.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/core/autograd.hpp"
#include "tdfusion/data/synthetic_scenes.hpp"
#include "tdfusion/data/yolo_labels.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/bilevel_optimizer.hpp"
#include "tdfusion/task/detection.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

namespace {

using namespace tdfusion::test;

using namespace tdfusion;
using task::DetectionTarget;
using DetBatch = data::PairBatch<DetectionTarget>;

// The task-policy API the meta optimiser consumes.
static_assert(traits::check_task_policy<task::Yolov8Detector>());
static_assert(traits::check_task_policy<task::SmallDetector>());
static_assert(std::is_same_v<task::SmallDetectorImpl::Target, DetectionTarget>);


torch::Tensor boxes_of(std::initializer_list<std::initializer_list<double>> rows) {
  std::vector<torch::Tensor> parts;
  for (const auto& r : rows) parts.push_back(torch::tensor(std::vector<double>(r), torch::kDouble));
  return torch::stack(parts);
}

/// Tight (cx, cy, w, h) of the true pixels of an H x W mask, normalised.
torch::Tensor tight_box(const torch::Tensor& mask) {
  const torch::Tensor rows = mask.any(1).nonzero(), cols = mask.any(0).nonzero();
  const double y0 = rows.min().item<double>(), y1 = rows.max().item<double>() + 1;
  const double x0 = cols.min().item<double>(), x1 = cols.max().item<double>() + 1;
  const double h = static_cast<double>(mask.size(0)), w = static_cast<double>(mask.size(1));
  return torch::tensor({(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h}, torch::kDouble);
}

/// A synthetic scene as a detection batch of one (task input = the scene, crops = a centred window).
DetBatch scene_batch(int64_t size, uint64_t seed, int64_t crop, torch::Dtype dtype) {
  const data::SyntheticScene s = data::make_synthetic_scene(size, size, seed);
  DetBatch b;
  b.ir = s.ir.unsqueeze(0).to(dtype);
  b.vi = s.vi.unsqueeze(0).to(dtype);
  b.target = DetectionTarget::from_images({s.boxes});
  const int64_t offset = (size - crop) / 2;
  b.ir_crop = b.ir.narrow(2, offset, crop).narrow(3, offset, crop).contiguous();
  b.vi_crop = b.vi.narrow(2, offset, crop).narrow(3, offset, crop).contiguous();
  return b;
}

/// SmallDetector whose loss can hold the assigner's decisions fixed. The YOLOv8 loss treats its soft
/// targets as constants although they move with the predictions, so its gradient is the derivative of the
/// loss with the assignment held fixed; a finite-difference check must hold it fixed too.
class FrozenAssignmentDetectorImpl : public torch::nn::Cloneable<FrozenAssignmentDetectorImpl> {
 public:
  using Target = DetectionTarget;
  explicit FrozenAssignmentDetectorImpl(task::SmallDetectorOptions options = {}) : options_(options) { reset(); }
  /// The loss options are the SmallDetector's (`options.loss()`).
  void reset() override { net_ = register_module("net", task::SmallDetector(options_)); }
  torch::Tensor forward(const torch::Tensor& image) { return net_->forward(image); }
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) {
    const torch::Tensor head = net_->forward(fused);
    const task::DetectionLayout layout = net_->layout(fused.size(2), fused.size(3));
    if (!frozen_) assignment_ = task::yolov8_assign(head, layout, target);
    return task::yolov8_loss_given(head, layout, assignment_, options_.loss()).total;
  }
  void freeze(bool on) { frozen_ = on; }
  task::SmallDetector& net() { return net_; }

 private:
  task::SmallDetectorOptions options_;
  task::SmallDetector net_{nullptr};
  task::Assignment assignment_;
  bool frozen_ = false;
};
TORCH_MODULE(FrozenAssignmentDetector);

}  // namespace

TEST_CASE("CIoU of boxes computed by hand") {
  // (0,0,2,2) vs (1,1,3,3): intersection 1, union 4 + 4 - 1 = 7, IoU 1/7; enclosing box 3 x 3, c^2 = 18;
  // centres (1,1) and (2,2), rho^2 = 2; same aspect, v = 0.  CIoU = 1/7 - 2/18 = 0.0317460317.
  // (0,0,4,2) vs (0,0,2,2): intersection 4, union 8, IoU 0.5; enclosing 4 x 2, c^2 = 20; centres (2,1) and
  // (1,1), rho^2 = 1; v = 4/pi^2 (atan(1) - atan(2))^2 = 0.0419564615, alpha = v / (v + 0.5) = 0.0774166644;
  // CIoU = 0.5 - 1/20 - alpha v = 0.4467518707.
  const torch::Tensor a = boxes_of({{0, 0, 2, 2}, {0, 0, 4, 2}});
  const torch::Tensor b = boxes_of({{1, 1, 3, 3}, {0, 0, 2, 2}});
  const torch::Tensor ciou = task::bbox_ciou(a, b);
  CHECK(ciou[0].item<double>() == doctest::Approx(1.0 / 7 - 2.0 / 18).epsilon(1e-6));
  CHECK(ciou[1].item<double>() == doctest::Approx(0.4467518707).epsilon(1e-6));
  CHECK(task::bbox_ciou(a, a)[1].item<double>() == doctest::Approx(1.0).epsilon(1e-6));
  // Symmetric, and broadcasts: 2 x 1 x 4 against 1 x 2 x 4 -> 2 x 2.
  CHECK(task::bbox_ciou(b, a)[1].item<double>() == doctest::Approx(0.4467518707).epsilon(1e-6));
  CHECK(task::bbox_ciou(a.unsqueeze(1), b.unsqueeze(0)).sizes() == torch::IntArrayRef({2, 2}));
  // Plain IoU matrix: (0,0,2,2) vs (1,1,3,3) = 1/7, vs (0,0,2,2) = 1; (0,0,4,2) vs (0,0,2,2) = 0.5.
  const torch::Tensor iou = task::box_iou(a, b);
  CHECK(iou[0][0].item<double>() == doctest::Approx(1.0 / 7));
  CHECK(iou[0][1].item<double>() == doctest::Approx(1.0));
  CHECK(iou[1][1].item<double>() == doctest::Approx(0.5));
}

TEST_CASE("DFL loss and decoding of a known distribution") {
  // Logits 0 except bin 2 = ln 7 and bin 3 = ln 3: unnormalised weights 7, 3 and fourteen 1s, Z = 24.
  torch::Tensor logits = torch::zeros({1, 16}, torch::kDouble);
  logits[0][2] = std::log(7.0);
  logits[0][3] = std::log(3.0);
  // Target 2.3: -(0.7 ln(7/24) + 0.3 ln(3/24)) = 1.4863330394.
  CHECK(task::dfl_loss(logits, torch::tensor({2.3}, torch::kDouble))[0].item<double>() ==
        doctest::Approx(1.4863330394).epsilon(1e-9));
  // Uniform logits: ln 16 whatever the target; targets past the last bin are clamped to 14.99.
  const torch::Tensor uniform = torch::zeros({2, 16}, torch::kDouble);
  const torch::Tensor flat = task::dfl_loss(uniform, torch::tensor({7.5, 40.0}, torch::kDouble));
  CHECK(flat[0].item<double>() == doctest::Approx(std::log(16.0)).epsilon(1e-12));
  CHECK(flat[1].item<double>() == doctest::Approx(std::log(16.0)).epsilon(1e-12));
  // Decoding: the expectation sum_i i p_i = (2 * 7 + 3 * 3 + (120 - 5)) / 24 = 5.75 on every side.
  const torch::Tensor four = logits.repeat({1, 4});  // 1 x 64: the same distribution on l, t, r, b
  const torch::Tensor sides = task::dfl_decode(four, 16);
  CHECK(sides.sizes() == torch::IntArrayRef({1, 4}));
  CHECK(torch::allclose(sides, torch::full({1, 4}, 5.75, torch::kDouble)));
  // Distances <-> boxes round trip around an anchor.
  const torch::Tensor anchor = torch::tensor({{10.0, 20.0}}, torch::kDouble);
  const torch::Tensor box = task::dist_to_bbox(torch::tensor({{1.0, 2.0, 3.0, 4.0}}, torch::kDouble), anchor);
  CHECK(torch::equal(box, torch::tensor({{9.0, 18.0, 13.0, 24.0}}, torch::kDouble)));
  CHECK(torch::equal(task::bbox_to_dist(anchor, box, 14.99), torch::tensor({{1.0, 2.0, 3.0, 4.0}}, torch::kDouble)));
}

TEST_CASE("NMS on a handful of boxes") {
  // E overlaps A with IoU 95 / 105 = 0.905 and B with 85.5 / 114.5 = 0.747; C is A's twin of another class;
  // D is apart. Visiting order by score: E, A, B, C, D.
  const torch::Tensor boxes = boxes_of({{0, 0, 10, 10},      // A 0.9 class 0
                                        {1, 1, 11, 11},      // B 0.8 class 0
                                        {0, 0, 10, 10},      // C 0.7 class 1
                                        {20, 20, 30, 30},    // D 0.6 class 0
                                        {0.5, 0, 10.5, 10}}  // E 0.95 class 0
  );
  const torch::Tensor scores = torch::tensor({0.9, 0.8, 0.7, 0.6, 0.95}, torch::kDouble);
  const torch::Tensor classes = torch::tensor({0, 0, 1, 0, 0}, torch::kLong);
  auto as_vector = [](const torch::Tensor& t) { return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel()); };
  CHECK(as_vector(task::batched_nms(boxes, scores, classes, 0.7)) == std::vector<int64_t>{4, 2, 3});
  CHECK(as_vector(task::batched_nms(boxes, scores, classes, 0.75)) == std::vector<int64_t>{4, 1, 2, 3});
  CHECK(as_vector(task::nms(boxes, scores, 0.7)) == std::vector<int64_t>{4, 3});  // class-agnostic: E drops C too
  CHECK(task::nms(torch::zeros({0, 4}), torch::zeros({0}), 0.5).numel() == 0);
}

TEST_CASE("task-aligned assigner on a 4 x 4 grid") {
  // One level, stride 8, a 32 x 32 image: 16 anchors with centres (4 + 8 col, 4 + 8 row), row-major.
  const torch::Tensor anchors = std::get<0>(task::make_anchors({{4, 4}}, {8}, torch::kDouble)) * 8;
  auto anchor_at = [](int64_t x, int64_t y) { return (y - 4) / 8 * 4 + (x - 4) / 8; };

  SUBCASE("one box: top-k among the anchors inside it, targets normalised by the best metric") {
    // Box (0,0,24,16), class 1 of 2: inside are the centres x in {4, 12, 20}, y in {4, 12} (6 anchors).
    // Every predicted box equals it (CIoU 1), so the metric is sqrt(score); the best outside anchor
    // (score 0.99) is never a candidate.
    torch::Tensor scores = torch::zeros({1, 16, 2}, torch::kDouble);
    for (int64_t i = 0; i < 16; ++i) scores[0][i][1] = 0.05 * static_cast<double>(i + 1);
    scores[0][anchor_at(28, 28)][1] = 0.99;
    const torch::Tensor gt = torch::tensor({0.0, 0.0, 24.0, 16.0}, torch::kDouble);
    const torch::Tensor pred = gt.view({1, 1, 4}).expand({1, 16, 4});
    const torch::Tensor labels = torch::ones({1, 1}, torch::kLong), valid = torch::ones({1, 1}, torch::kBool);
    // Inside anchors and their scores: (4,4) .05, (12,4) .10, (20,4) .15, (4,12) .25, (12,12) .30, (20,12) .35.
    const auto top3 = task::task_aligned_assign(scores, pred, anchors, labels, gt.view({1, 1, 4}), valid,
                                                task::TaskAlignedAssignerOptions().topk(3));
    std::vector<int64_t> expected_fg{anchor_at(4, 12), anchor_at(12, 12), anchor_at(20, 12)};
    CHECK(top3.foreground.sum().item<int64_t>() == 3);
    for (int64_t i : expected_fg) {
      CHECK(top3.foreground[0][i].item<bool>());
      CHECK(top3.labels[0][i].item<int64_t>() == 1);
      CHECK(torch::equal(top3.boxes[0][i], gt));
      CHECK(top3.scores[0][i][0].item<double>() == 0.0);
    }
    // Target = sqrt(s) / sqrt(s_max) * best CIoU (1): sqrt(.25/.35), sqrt(.30/.35), 1.
    CHECK(top3.scores[0][anchor_at(4, 12)][1].item<double>() == doctest::Approx(std::sqrt(0.25 / 0.35)));
    CHECK(top3.scores[0][anchor_at(12, 12)][1].item<double>() == doctest::Approx(std::sqrt(0.30 / 0.35)));
    CHECK(top3.scores[0][anchor_at(20, 12)][1].item<double>() == doctest::Approx(1.0));
    CHECK(top3.scores.sum().item<double>() ==
          doctest::Approx(std::sqrt(0.25 / 0.35) + std::sqrt(0.30 / 0.35) + 1.0));
    // Default top-10: all 6 inside anchors, the weakest at sqrt(.05 / .35).
    const auto top10 = task::task_aligned_assign(scores, pred, anchors, labels, gt.view({1, 1, 4}), valid);
    CHECK(top10.foreground.sum().item<int64_t>() == 6);
    CHECK_FALSE(top10.foreground[0][anchor_at(28, 28)].item<bool>());
    CHECK(top10.scores[0][anchor_at(4, 4)][1].item<double>() == doctest::Approx(std::sqrt(0.05 / 0.35)));
  }

  SUBCASE("two boxes: a shared anchor goes to the box it overlaps most; padding boxes are ignored") {
    // g1 = (0,0,16,16) class 0 holds x, y in {4, 12}; g2 = (8,0,24,16) class 1 holds x in {12, 20}, y in {4, 12}.
    // Anchors (12,4) and (12,12) are in both. Predictions: every anchor predicts g1, except (12,4) which
    // predicts g2. CIoU(g1, g2) = 1/3 - 8^2 / (24^2 + 16^2) = 1/3 - 1/13 = 10/39 (same aspect, v = 0).
    // So (12,12) goes to g1 (overlap 1 vs 10/39) and (12,4) to g2. All scores 0.5.
    // Targets: g1's positives (4,4), (4,12), (12,12) all have metric sqrt(.5): target 1 each.
    // g2's positives: (12,4) overlap 1 -> target 1; (20,4), (20,12) overlap 10/39 -> (10/39)^6.
    const torch::Tensor g1 = torch::tensor({0.0, 0.0, 16.0, 16.0}, torch::kDouble);
    const torch::Tensor g2 = torch::tensor({8.0, 0.0, 24.0, 16.0}, torch::kDouble);
    torch::Tensor pred = g1.view({1, 1, 4}).repeat({1, 16, 1});
    pred[0][anchor_at(12, 4)] = g2;
    const torch::Tensor scores = torch::full({1, 16, 2}, 0.5, torch::kDouble);
    // A third, padding slot with a box that would otherwise claim everything.
    const torch::Tensor gts = torch::stack({g1, g2, torch::tensor({0.0, 0.0, 32.0, 32.0}, torch::kDouble)}).unsqueeze(0);
    const torch::Tensor labels = torch::tensor({{0, 1, 0}}, torch::kLong);
    const torch::Tensor valid = torch::tensor({{true, true, false}});
    const auto out = task::task_aligned_assign(scores, pred, anchors, labels, gts, valid);
    CHECK(out.foreground.sum().item<int64_t>() == 6);
    const double far = std::pow(10.0 / 39.0, 6);
    struct Expect { int64_t x, y, label, gt; double score; };
    for (const Expect& e : {Expect{4, 4, 0, 0, 1.0}, Expect{4, 12, 0, 0, 1.0}, Expect{12, 12, 0, 0, 1.0},
                            Expect{12, 4, 1, 1, 1.0}, Expect{20, 4, 1, 1, far}, Expect{20, 12, 1, 1, far}}) {
      const int64_t i = anchor_at(e.x, e.y);
      CAPTURE(e.x);
      CAPTURE(e.y);
      CHECK(out.foreground[0][i].item<bool>());
      CHECK(out.labels[0][i].item<int64_t>() == e.label);
      CHECK(out.gt_index[0][i].item<int64_t>() == e.gt);
      CHECK(out.scores[0][i][e.label].item<double>() == doctest::Approx(e.score).epsilon(1e-5));
      CHECK(out.scores[0][i][1 - e.label].item<double>() == 0.0);
    }
    // No box at all: everything is background.
    const auto none = task::task_aligned_assign(scores, pred, anchors, torch::zeros({1, 0}, torch::kLong),
                                                torch::zeros({1, 0, 4}, torch::kDouble), torch::zeros({1, 0}, torch::kBool));
    CHECK(none.foreground.sum().item<int64_t>() == 0);
    CHECK(none.scores.sizes() == torch::IntArrayRef({1, 16, 2}));
  }
}

TEST_CASE("detector output shapes, padding to multiples of 32, parameter counts") {
  torch::manual_seed(0);
  // YOLOv8n at 80 classes with RGB input: ultralytics reports 3,157,200 parameters, 16 of which are the
  // fixed DFL projection (a constant here), hence 3,157,184. With 1 input channel the stem loses
  // 16 x 9 x 2 = 288 weights. With 3 classes the class branches narrow from max(64, min(80, 100)) = 80 to
  // max(64, 3) = 64 channels: per level with input x, (80 - 64)(9x + 2) + (80^2 - 64^2) 9 + 2 (80 - 64)
  // + (80 * 80 + 80) - (64 * 3 + 3) = 144 x + 27,085, over x = 64, 128, 256: 145,767.
  // So 1 channel and 3 classes: 3,157,184 - 288 - 145,767 = 3,011,129.
  task::Yolov8Detector coco(task::Yolov8DetectorOptions().num_classes(80).in_channels(3));
  CHECK(count_parameters(*coco) == 3157184);
  task::Yolov8Detector yolo(task::Yolov8DetectorOptions().num_classes(3));
  CHECK(count_parameters(*yolo) == 3011129);
  task::SmallDetector small(task::SmallDetectorOptions().num_classes(3));
  MESSAGE("SmallDetector parameters: " << count_parameters(*small));
  CHECK(count_parameters(*small) < 250000);
  // ultralytics' names.
  const auto names = yolo->named_parameters();
  CHECK(names.contains("model.0.conv.weight"));
  CHECK(names.contains("model.2.m.0.cv1.bn.bias"));
  CHECK(names.contains("model.9.cv2.conv.weight"));
  CHECK(names.contains("model.22.cv3.2.2.bias"));
  CHECK(yolo->named_buffers().contains("model.22.cv2.0.1.bn.running_var"));

  // 64 x 96: 8 x 12 + 4 x 6 + 2 x 3 = 126 cells, 4 x 16 + 3 = 67 channels. 50 x 70 pads to the same.
  for (auto* net : {static_cast<torch::nn::Module*>(yolo.get()), static_cast<torch::nn::Module*>(small.get())}) {
    const bool is_yolo = net == yolo.get();
    auto forward = [&](const torch::Tensor& x) { return is_yolo ? yolo->forward(x) : small->forward(x); };
    CHECK(forward(torch::rand({2, 1, 64, 96})).sizes() == torch::IntArrayRef({2, 67, 126}));
    CHECK(forward(torch::rand({1, 1, 50, 70})).sizes() == torch::IntArrayRef({1, 67, 126}));
  }
  CHECK(contains(error_message([&] { yolo->forward(torch::rand({1, 3, 64, 64})); }), "must have 1 channel"));
  CHECK(yolo->layout(50, 70).input_height == 64);
  CHECK(yolo->layout(50, 70).input_width == 96);

  // detect(): N x 6 rows inside the image, integral classes, at most max_det; the mode is restored.
  yolo->train();
  const auto detections = yolo->detect(torch::rand({2, 1, 50, 70}), 0.0, 0.7, 7);
  REQUIRE(detections.size() == 2);
  CHECK(yolo->is_training());
  for (const auto& d : detections) {
    CHECK(d.dim() == 2);
    CHECK(d.size(1) == 6);
    CHECK(d.size(0) <= 7);
    CHECK(d.narrow(1, 0, 4).min().item<double>() >= 0.0);
    CHECK(d.select(1, 2).max().item<double>() <= 70.0);
    CHECK(d.select(1, 3).max().item<double>() <= 50.0);
    CHECK(torch::equal(d.select(1, 5), d.select(1, 5).round()));
  }
}

TEST_CASE("decoding a crafted head output: DFL expectation, strides, confidence, class-aware NMS") {
  // A 32 x 32 input: cells 4 x 4 (stride 8), 2 x 2 (16), 1 x 1 (32) = 21; 2 classes; 66 channels.
  task::DetectionLayout layout;
  layout.num_classes = 2;
  layout.input_height = layout.input_width = 32;
  layout.image_height = 30;
  layout.image_width = 31;
  torch::Tensor head = torch::zeros({1, 66, 21});
  head.narrow(1, 64, 2).fill_(-10.0);  // every class probability ~ 4.5e-5
  // A peaked distribution at bin k on all four sides: expectation k (up to e^-30).
  auto set_box = [&](int64_t cell, int64_t k) {
    for (int64_t side = 0; side < 4; ++side) head[0][side * 16 + k][cell] = 30.0;
  };
  // Cell 5 = level 0, row 1, col 1: centre (1.5, 1.5) cells = (12, 12) px; sides 1 cell -> (4, 4, 20, 20).
  set_box(5, 1);
  head[0][64 + 1][5] = 3.0;  // class 1, p = 0.9526
  // Cell 6 (centre (20, 12) px), sides 1 cell -> (12, 4, 28, 20), same class: IoU with the first
  // 8 x 16 / (2 x 256 - 128) = 1/3, so NMS at 0.3 drops it and NMS at 0.5 keeps it.
  set_box(6, 1);
  head[0][64 + 1][6] = 2.0;  // class 1, p = 0.8808
  // Cell 20 = the stride-32 cell, centre (16, 16); sides 1 cell = 32 px -> (-16, -16, 48, 48), clipped to the image.
  set_box(20, 1);
  head[0][64 + 0][20] = 1.0;  // class 0, p = 0.7311
  const auto at_03 = task::decode_detections(head, layout, 0.25, 0.3)[0];
  REQUIRE(at_03.size(0) == 2);
  CHECK(torch::allclose(at_03[0], torch::tensor({4.0f, 4.0f, 20.0f, 20.0f, 0.95257413f, 1.0f}), 1e-5, 1e-5));
  CHECK(torch::allclose(at_03[1], torch::tensor({0.0f, 0.0f, 31.0f, 30.0f, 0.73105858f, 0.0f}), 1e-5, 1e-5));
  // ... whereas at 0.5 both class-1 boxes stay; above 0.9 confidence only the first.
  CHECK(task::decode_detections(head, layout, 0.25, 0.5)[0].size(0) == 3);
  CHECK(task::decode_detections(head, layout, 0.9, 0.5)[0].size(0) == 1);
  CHECK(task::decode_detections(head, layout, 0.25, 0.5, 2)[0].size(0) == 2);
}

TEST_CASE("the YOLOv8 loss: finite, differentiable twice in the image, trainable, scaled by the batch") {
  torch::manual_seed(1);
  // Objects of 30-50 px: YOLOv8's initial boxes span 15 cells (120 px at stride 8), and the assigner's
  // metric CIoU^6 gives objects much smaller than that almost no target at the start.
  const data::SyntheticScene scene =
      data::make_synthetic_scene(96, 96, 11, data::SyntheticSceneOptions().min_object_size(0.3).max_object_size(0.5));
  REQUIRE(scene.boxes.size(0) >= 2);
  const torch::Tensor image = ((scene.ir + scene.vi) / 2).unsqueeze(0);
  const DetectionTarget target = DetectionTarget::from_images({scene.boxes});
  task::SmallDetector small(task::SmallDetectorOptions().num_classes(2));

  // Bad targets name the problem.
  DetectionTarget bad = target;
  bad.boxes = target.boxes.clone();
  bad.boxes[0][1] = 2.0;
  CHECK(contains(error_message([&] { small->loss(image, bad); }), "class id outside [0, 2)"));
  CHECK(contains(error_message([&] { small->loss(torch::cat({image, image}), target); }), "is for 1 images but the batch has 2"));
  // No boxes: class loss only, still a graph.
  const auto empty = small->loss_parts(image, DetectionTarget::from_images({torch::zeros({0, 5})}));
  CHECK(std::isfinite(empty.total.item<double>()));
  CHECK(empty.box.item<double>() == 0.0);
  CHECK(empty.total.requires_grad());

  // Double backward through both detectors (the bilevel optimiser's second-order path).
  {
    task::SmallDetector small64(task::SmallDetectorOptions().num_classes(2));
    task::Yolov8Detector yolo(task::Yolov8DetectorOptions().num_classes(2));
    small64->to(torch::kDouble);
    yolo->to(torch::kDouble);
    for (int which = 0; which < 2; ++which) {
      const torch::Tensor x = torch::cat({image, image.flip({-1})}).to(torch::kDouble).requires_grad_(true);
      const DetectionTarget t = DetectionTarget::from_images({scene.boxes, task::flip_boxes_horizontal(scene.boxes)});
      const auto parts = which == 0 ? small64->loss_parts(x, t) : yolo->loss_parts(x, t);
      CAPTURE(which);
      CHECK(parts.box.item<double>() > 0.0);  // anchors assigned from the start
      const torch::Tensor g = gradients(parts.total, {x}, {/*retain_graph=*/true, /*create_graph=*/true})[0];
      const torch::Tensor gg = gradients(g.square().sum(), {x})[0];
      CHECK(g.abs().max().item<double>() > 0.0);
      CHECK(torch::isfinite(gg).all().item<bool>());
      CHECK(gg.abs().max().item<double>() > 0.0);
    }
  }

  // Adam steps on the scene. The loss first rises: at the start the assigner's soft targets are near zero
  // (initial boxes are 15 cells wide and the metric is CIoU^6), so the class loss is that of an empty image;
  // as the boxes shrink onto the objects the targets grow (ultralytics starts alike). Then every term falls.
  torch::optim::Adam adam(small->parameters(), torch::optim::AdamOptions(1e-2));
  std::vector<task::DetectionLossParts> history;
  for (int step = 0; step < 150; ++step) {
    history.push_back(small->loss_parts(image, target));
    REQUIRE(std::isfinite(history.back().total.item<double>()));
    adam.zero_grad();
    history.back().total.backward();
    adam.step();
  }
  const auto& first = history.front();
  const auto& warm = history[10];
  const auto& last = history.back();
  MESSAGE("SmallDetector over 150 Adam steps: total " << first.total.item<double>() << " -> "
          << warm.total.item<double>() << " (step 10) -> " << last.total.item<double>() << "; box "
          << warm.box.item<double>() << " -> " << last.box.item<double>() << ", cls " << warm.cls.item<double>()
          << " -> " << last.cls.item<double>() << ", dfl " << warm.dfl.item<double>() << " -> "
          << last.dfl.item<double>() << ", target sum " << first.score_sum.item<double>() << " -> "
          << warm.score_sum.item<double>() << " -> " << last.score_sum.item<double>());
  CHECK(first.total.item<double>() == doctest::Approx(7.5 * first.box.item<double>() + 0.5 * first.cls.item<double>() +
                                                      1.5 * first.dfl.item<double>()));
  CHECK(last.total.item<double>() < 0.5 * warm.total.item<double>());
  CHECK(last.box.item<double>() < 0.5 * warm.box.item<double>());
  CHECK(last.dfl.item<double>() < warm.dfl.item<double>());
  CHECK(last.cls.item<double>() < warm.cls.item<double>());
  CHECK(last.score_sum.item<double>() > 2 * first.score_sum.item<double>());
  // The trained detector finds objects: at least two ground-truth boxes matched at IoU > 0.7 by a
  // detection of their class.
  const torch::Tensor found = small->detect(image, 0.25, 0.7)[0];
  const torch::Tensor truth = task::xywh_to_xyxy(scene.boxes.narrow(1, 1, 4)) * 96.0;
  const torch::Tensor iou = task::box_iou(truth, found.narrow(1, 0, 4));
  const torch::Tensor same_class = scene.boxes.select(1, 0).unsqueeze(1) == found.select(1, 5).unsqueeze(0);
  const int64_t matched = ((iou > 0.7) & same_class).any(1).sum().item<int64_t>();
  MESSAGE("detections: " << found.size(0) << ", ground truth matched at IoU > 0.7: " << matched << " of "
          << truth.size(0));
  CHECK(matched >= 2);

  // ultralytics' normalisation: per image (by the target sum, once it exceeds 1) times the batch size,
  // so two copies of the image give twice the loss of one.
  const auto one = small->loss_parts(image, target);
  REQUIRE(one.score_sum.item<double>() > 1.0);
  const auto two = small->loss_parts(torch::cat({image, image}), DetectionTarget::from_images({scene.boxes, scene.boxes}));
  CHECK(two.total.item<double>() == doctest::Approx(2 * one.total.item<double>()).epsilon(1e-4));
  CHECK(two.cls.item<double>() == doctest::Approx(one.cls.item<double>()).epsilon(1e-4));
}

TEST_CASE("YOLO label files") {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("tdfusion_yolo_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = (dir / name).string();
    std::ofstream(path) << text;
    return path;
  };

  // Whitespace runs, a blank line, CRLF endings, a trailing line without newline.
  const std::string good = write("good.txt", "0  0.5 0.25\t0.1  0.2  \r\n\n2 1 0 0.3 0.4\r\n1 0.1 0.2 0.3 0.4");
  const torch::Tensor labels = data::read_yolo_labels(good, 3);
  REQUIRE(labels.sizes() == torch::IntArrayRef({3, 5}));
  CHECK(labels.dtype() == torch::kFloat);
  CHECK(torch::allclose(labels, torch::tensor({{0.0f, 0.5f, 0.25f, 0.1f, 0.2f}, {2.0f, 1.0f, 0.0f, 0.3f, 0.4f},
                                               {1.0f, 0.1f, 0.2f, 0.3f, 0.4f}})));
  CHECK(data::read_yolo_labels(write("empty.txt", ""), 3).sizes() == torch::IntArrayRef({0, 5}));
  CHECK(data::read_yolo_labels(write("blank.txt", "\n  \n"), 3).sizes() == torch::IntArrayRef({0, 5}));

  // Each error names the file and the line.
  struct Bad { const char* name; const char* text; int line; const char* fragment; };
  for (const Bad& bad : {Bad{"class.txt", "0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n", 2, "class id 3 is not an integer in [0, 3)"},
                         Bad{"fraction.txt", "1.5 0.5 0.5 0.1 0.1\n", 1, "class id 1.5"},
                         Bad{"negative.txt", "\n\n0 -0.1 0.5 0.1 0.1\n", 3, "cx = -0.1 is outside [0, 1]"},
                         Bad{"large.txt", "0 0.5 0.5 0.1 0.1\n0 0.5 1.2 0.1 0.1\n", 2, "cy = 1.2 is outside [0, 1]"},
                         Bad{"columns.txt", "0 0.5 0.5 0.1\n", 1, "expected 5 values (class cx cy w h), got 4"},
                         Bad{"columns6.txt", "0 0.5 0.5 0.1 0.1 0.1\n", 1, "got 6"},
                         Bad{"word.txt", "0 0.5 abc 0.1 0.1\n", 1, "cy 'abc' is not a number"},
                         Bad{"nan.txt", "0 0.5 0.5 nan 0.1\n", 1, "w 'nan' is not a number"},
                         Bad{"suffix.txt", "0 0.5 0.5 0.1 0.1x\n", 1, "h '0.1x' is not a number"}}) {
    const std::string path = write(bad.name, bad.text);
    const std::string message = error_message([&] { data::read_yolo_labels(path, 3); });
    CAPTURE(message);
    CHECK(contains(message, path + ":" + std::to_string(bad.line) + ":"));
    CHECK(contains(message, bad.fragment));
  }
  CHECK(contains(error_message([&] { data::read_yolo_labels((dir / "missing.txt").string(), 3); }), "missing.txt"));
  std::filesystem::remove_all(dir);

  // A real file of the MSRS detection labels (spaces in runs), when the shared data is there.
  const std::filesystem::path msrs = std::filesystem::path(TDFUSION_SHARED_DIR) / "data/msrs/det_labels/fusion/00004N.txt";
  if (std::filesystem::exists(msrs)) {
    const torch::Tensor real = data::read_yolo_labels(msrs.string(), 3);
    CHECK(real.size(0) >= 5);
    CHECK(torch::allclose(real[0], torch::tensor({0.0f, 0.8360722f, 0.5727371f, 0.0821659f, 0.3035201f})));
  }
}

TEST_CASE("boxes follow their image through flips, crops and resizes") {
  // A 40 x 60 mask with a 10 x 20 rectangle at rows 10..19, columns 5..24.
  torch::Tensor mask = torch::zeros({40, 60}, torch::kBool);
  mask.narrow(0, 10, 10).narrow(1, 5, 20).fill_(true);
  const torch::Tensor box = torch::cat({torch::tensor({1.0}, torch::kDouble), tight_box(mask)}).unsqueeze(0);
  CHECK(torch::allclose(box, torch::tensor({{1.0, 15.0 / 60, 15.0 / 40, 20.0 / 60, 10.0 / 40}}, torch::kDouble)));

  // Flip: columns 35..54, cx = 45 / 60 = 1 - 15 / 60.
  const torch::Tensor flipped = task::flip_boxes_horizontal(box);
  CHECK(torch::allclose(flipped.narrow(1, 1, 4), tight_box(mask.flip({1})).unsqueeze(0)));
  CHECK(flipped[0][0].item<double>() == 1.0);  // the class column is kept
  CHECK(torch::allclose(task::flip_boxes_horizontal(flipped), box));

  // Resize (nearest, 2x and to 100 x 150): the normalised box is the same, up to a pixel of the new size.
  for (const auto& size : std::vector<std::pair<int64_t, int64_t>>{{80, 120}, {100, 150}}) {
    const torch::Tensor resized = data::detail::resize_labels(mask.unsqueeze(0).to(torch::kLong), size.first, size.second)[0];
    CHECK(torch::allclose(task::resize_boxes(box).narrow(1, 1, 4), tight_box(resized.to(torch::kBool)).unsqueeze(0),
                          0.0, 1.0 / static_cast<double>(size.first)));
  }

  // Crop rows 5..34, columns 10..49 (30 x 40): the rectangle keeps columns 10..24 (15 of 20 = 75 %).
  const torch::Tensor cropped = task::crop_boxes(box, 40, 60, 5, 10, 30, 40);
  REQUIRE(cropped.size(0) == 1);
  CHECK(torch::allclose(cropped.narrow(1, 1, 4), tight_box(mask.narrow(0, 5, 30).narrow(1, 10, 40)).unsqueeze(0)));
  CHECK(torch::allclose(cropped, torch::tensor({{1.0, 7.5 / 40, 10.0 / 30, 15.0 / 40, 10.0 / 30}}, torch::kDouble)));
  CHECK(task::crop_boxes(box, 40, 60, 5, 10, 30, 40, 0.8).size(0) == 0);  // 75 % visible < 80 %

  // By hand on a 100 x 200 image, window (top 40, left 100, 50 x 50): a box at x 80..120, y 30..70 keeps
  // x 100..120, y 40..70 (600 of 1600 px, 37.5 %); one fully inside moves; one outside goes.
  const torch::Tensor many = boxes_of({{0, 0.5, 0.5, 0.2, 0.4}, {2, 0.625, 0.6, 0.05, 0.1}, {1, 0.1, 0.1, 0.05, 0.05}});
  const torch::Tensor out = task::crop_boxes(many, 100, 200, 40, 100, 50, 50);
  CHECK(torch::allclose(out, boxes_of({{0, 0.2, 0.3, 0.4, 0.6}, {2, 0.5, 0.4, 0.2, 0.2}})));
  CHECK(task::crop_boxes(many, 100, 200, 40, 100, 50, 50, 0.4).size(0) == 1);
  // M x 6 batched boxes work alike (the leading columns are kept).
  const torch::Tensor batched = torch::cat({torch::full({3, 1}, 4.0, torch::kDouble), many}, 1);
  CHECK(torch::allclose(task::crop_boxes(batched, 100, 200, 40, 100, 50, 50).narrow(1, 1, 5), out));
}

TEST_CASE("detection targets in batches: concatenation, modality swap, devices") {
  const DetectionTarget a = DetectionTarget::from_images(
      {torch::zeros({0, 5}), torch::tensor({{1.0f, 0.5f, 0.5f, 0.2f, 0.2f}, {0.0f, 0.1f, 0.1f, 0.1f, 0.1f}})});
  CHECK(a.batch_size == 2);
  CHECK(a.boxes.sizes() == torch::IntArrayRef({2, 6}));
  CHECK(a.image_boxes(0).size(0) == 0);
  CHECK(torch::equal(a.image_boxes(1), torch::tensor({{1.0f, 0.5f, 0.5f, 0.2f, 0.2f}, {0.0f, 0.1f, 0.1f, 0.1f, 0.1f}})));
  const DetectionTarget b = DetectionTarget::from_images({torch::tensor({{2.0f, 0.3f, 0.3f, 0.1f, 0.1f}})});
  // Concatenation shifts b's indices past a's two images (the first of which has no box).
  const DetectionTarget ab = TargetTraits<DetectionTarget>::concat({a, b});
  CHECK(ab.batch_size == 3);
  CHECK(torch::equal(ab.boxes.select(1, 0), torch::tensor({1.0f, 1.0f, 2.0f})));
  CHECK(torch::equal(ab.image_boxes(2), b.image_boxes(0)));
  CHECK(TargetTraits<DetectionTarget>::to(ab, torch::kCPU).batch_size == 3);

  DetBatch batch = scene_batch(32, 3, 24, torch::kFloat);
  const int64_t k = batch.target.boxes.size(0);
  const DetBatch swapped = batch.with_modality_swap();
  CHECK(swapped.target.batch_size == 2);
  CHECK(swapped.target.boxes.size(0) == 2 * k);
  CHECK(torch::equal(swapped.target.image_boxes(1), batch.target.image_boxes(0)));
  const DetBatch moved = batch.to(torch::kCPU, torch::kDouble);
  CHECK(moved.ir.dtype() == torch::kDouble);
  CHECK(moved.target.boxes.size(0) == k);
}

namespace {

/// Worst relative error of the hypergradient of LightFusion + LPN + (SmallDetector with the given loss
/// options) against central finite differences along the normalised gradient and its 3 largest coordinates
/// (test_meta.cpp's approach), in double precision, with the assignment held fixed. Also reports the
/// derivative along the gradient with the assignment free to move.
double detection_hypergradient_error(task::DetectionLossOptions loss_options) {
  torch::manual_seed(7);
  using Trainer = meta::BilevelOptimizer<fusion::LightFusion, lossgen::Lpn, FrozenAssignmentDetector>;
  Trainer trainer(fusion::LightFusion(), lossgen::Lpn(),
                  FrozenAssignmentDetector(task::SmallDetectorOptions().num_classes(2).loss(loss_options)),
                  meta::BilevelOptions().dtype(torch::kFloat64).inner_lr(0.5).task_lookahead(false));
  const auto objects = data::SyntheticSceneOptions().min_object_size(0.35).max_object_size(0.5);
  auto batch = [&](uint64_t seed) {
    const data::SyntheticScene s = data::make_synthetic_scene(64, 64, seed, objects);
    DetBatch b;
    b.ir = s.ir.unsqueeze(0).to(torch::kFloat64);
    b.vi = s.vi.unsqueeze(0).to(torch::kFloat64);
    b.target = DetectionTarget::from_images({s.boxes});
    b.ir_crop = b.ir.narrow(2, 12, 40).narrow(3, 12, 40).contiguous();
    b.vi_crop = b.vi.narrow(2, 12, 40).narrow(3, 12, 40).contiguous();
    return b;
  };
  const DetBatch train = batch(21), test = batch(22);
  // A briefly trained detector, so that the assigner's targets are not all near zero.
  {
    task::SmallDetector& net = trainer.task()->net();
    torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-2));
    const torch::Tensor image = torch::cat({(test.ir + test.vi) / 2, (train.ir + train.vi) / 2});
    const DetectionTarget target = TargetTraits<DetectionTarget>::concat({test.target, train.target});
    for (int step = 0; step < 15; ++step) {
      adam.zero_grad();
      net->loss(image, target).backward();
      adam.step();
    }
    const auto parts = net->loss_parts(torch::cat({test.ir, test.vi}), test.with_modality_swap().target);
    MESSAGE("outer loss terms: box " << parts.box.item<double>() << ", cls " << parts.cls.item<double>() << ", dfl "
                                     << parts.dfl.item<double>() << ", target sum " << parts.score_sum.item<double>());
    REQUIRE(parts.box.item<double>() > 0.0);
  }

  const auto phi = trainer.loss_generator()->parameters();
  trainer.task()->freeze(false);
  const auto grads = gradients(trainer.meta_objective(train, test), phi);  // records the assignment
  trainer.task()->freeze(true);
  auto objective = [&] { return trainer.meta_objective(train, test).item<double>(); };
  const double worst = worst_directional_error(phi, grads, objective, 3);
  trainer.task()->freeze(false);
  MESSAGE("along the gradient with the assignment free to move: relative error "
          << worst_directional_error(phi, grads, objective, 0));

  // And a real meta step runs and leaves the detector as it was.
  std::vector<torch::Tensor> before;
  for (const auto& p : trainer.task()->parameters()) before.push_back(p.detach().clone());
  const auto report = trainer.meta_step(train, test);
  CHECK(std::isfinite(report.task_loss));
  CHECK(report.hypergradient_max > 0.0);
  const auto after = trainer.task()->parameters();
  for (size_t i = 0; i < before.size(); ++i) CHECK(torch::equal(before[i], after[i]));
  return worst;
}

}  // namespace

TEST_CASE("hypergradient of LightFusion + LPN + SmallDetector matches finite differences in double precision") {
  // The YOLOv8 loss differentiates with its assignment held fixed, as ultralytics does, and with CIoU's
  // aspect weight alpha held fixed too (computed without gradient). The finite differences hold the
  // assignment fixed; alpha they cannot, so the exact check runs without the CIoU term (DFL and classes
  // carry the box and class paths), and the full loss agrees to the size of alpha's variation.
  SUBCASE("without the CIoU term: exact") {
    CHECK(detection_hypergradient_error(task::DetectionLossOptions().box_gain(0.0)) < 1e-4);
  }
  SUBCASE("the full YOLOv8 loss: up to CIoU's constant alpha") {
    CHECK(detection_hypergradient_error(task::DetectionLossOptions()) < 1e-3);
  }
}

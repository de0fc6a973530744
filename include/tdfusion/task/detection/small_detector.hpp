#pragma once
// SmallDetector: a small anchor-free detector (about 200k parameters at the defaults) for CPU runs, tests and
// examples where YOLOv8-n (3M) would dominate the cost. It keeps YOLOv8's detection head (narrower) and its
// loss, so it trains on exactly the objective of the release's detector; the backbone is a plain strided
// CNN with a light top-down path. No batch norm: train and eval modes compute the same function, and SiLU
// keeps the task loss smooth in the image, which finite-difference checks of hypergradients rely on.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/task/detection/common.hpp"
#include "tdfusion/task/detection/head.hpp"
#include "tdfusion/task/detection/target.hpp"
#include "tdfusion/task/detection/yolo_loss.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace tdfusion::task {

struct SmallDetectorOptions {
  TORCH_ARG(int64_t, num_classes) = 6;
  TORCH_ARG(int64_t, in_channels) = 1;
  /// Base width w: stages of w, 2w (stride 4), 4w (P3), 6w (P4), 8w (P5); head branches 4w wide.
  TORCH_ARG(int64_t, width) = 8;
  TORCH_ARG(int64_t, reg_max) = 16;
  TORCH_ARG(double, pad_value) = 114.0 / 255.0;  ///< fill of the padding up to multiples of 32
  TORCH_ARG(DetectionLossOptions, loss) = {};
};

/// stem 3x3/2 -> 3x3/2 -> 3x3 -> 3x3/2 (P3) -> 3x3/2 (P4) -> 3x3/2 (P5); top-down: P4 + up(P5) and
/// P3 + up(P4') mixed by 1x1 convs; YOLOv8 head on (P3', P4', P5) at strides 8 / 16 / 32.
class SmallDetectorImpl : public torch::nn::Cloneable<SmallDetectorImpl> {
 public:
  using Target = DetectionTarget;
  using Options = SmallDetectorOptions;

  explicit SmallDetectorImpl(SmallDetectorOptions options = {}) : options_(std::move(options)) {
    TORCH_CHECK(options_.num_classes() > 0 && options_.in_channels() > 0 && options_.width() > 0 &&
                    options_.reg_max() > 1,
                "tdfusion: SmallDetector needs positive num_classes, in_channels and width and reg_max > 1, got ",
                options_.num_classes(), ", ", options_.in_channels(), ", ", options_.width(), ", ",
                options_.reg_max());
    reset();
  }

  void reset() override {
    const int64_t w = options_.width();
    auto block = [](int64_t in, int64_t out, int64_t k, int64_t s) { return ConvBlock(in, out, k, s, false); };
    stem_ = register_module("stem", block(options_.in_channels(), w, 3, 2));
    down1_ = register_module("down1", block(w, 2 * w, 3, 2));
    stage1_ = register_module("stage1", block(2 * w, 2 * w, 3, 1));
    down2_ = register_module("down2", block(2 * w, 4 * w, 3, 2));
    down3_ = register_module("down3", block(4 * w, 6 * w, 3, 2));
    down4_ = register_module("down4", block(6 * w, 8 * w, 3, 2));
    lateral4_ = register_module("lateral4", block(8 * w + 6 * w, 6 * w, 1, 1));
    lateral3_ = register_module("lateral3", block(6 * w + 4 * w, 4 * w, 1, 1));
    head_ = register_module("head", DetectHead(DetectHeadOptions(options_.num_classes(), {4 * w, 6 * w, 8 * w})
                                                   .reg_max(options_.reg_max())
                                                   .box_hidden(4 * w)
                                                   .cls_hidden(4 * w)
                                                   .batch_norm(false)));
  }

  /// Raw head outputs N x (4 reg_max + classes) x A of the input padded to multiples of 32 (see layout()).
  torch::Tensor forward(const torch::Tensor& image) {
    check_image_shape(image, "SmallDetector input", options_.in_channels());
    const torch::Tensor x = pad_to_multiple(image, 32, options_.pad_value());
    const torch::Tensor p3 = down2_->forward(stage1_->forward(down1_->forward(stem_->forward(x))));
    const torch::Tensor p4 = down3_->forward(p3);
    const torch::Tensor p5 = down4_->forward(p4);
    namespace F = torch::nn::functional;
    auto up = [](const torch::Tensor& t) {
      return F::interpolate(t, F::InterpolateFuncOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(torch::kNearest));
    };
    const torch::Tensor n4 = lateral4_->forward(torch::cat({up(p5), p4}, 1));
    const torch::Tensor n3 = lateral3_->forward(torch::cat({up(n4), p3}, 1));
    return head_->forward({n3, n4, p5});
  }

  /// The YOLOv8 loss and its components on a fused batch N x in_channels x H x W.
  DetectionLossParts loss_parts(const torch::Tensor& fused, const Target& target) {
    return yolov8_detection_loss(forward(fused), layout(fused.size(2), fused.size(3)), target, options_.loss());
  }

  /// The YOLOv8 task loss (scalar) on a fused batch against its boxes.
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) { return loss_parts(fused, target).total; }

  /// Per image, K x 6 detections (x1, y1, x2, y2, score, class) in pixels, without gradient.
  std::vector<torch::Tensor> detect(const torch::Tensor& image, double conf = 0.25, double iou = 0.7,
                                    int64_t max_det = 300) {
    torch::NoGradGuard no_grad;
    return decode_detections(forward(image), layout(image.size(2), image.size(3)), conf, iou, max_det);
  }

  /// Where the head's cells lie for an H x W input.
  DetectionLayout layout(int64_t height, int64_t width) const {
    return DetectionLayout::for_image(options_.num_classes(), options_.reg_max(), height, width);
  }

  const SmallDetectorOptions& options() const { return options_; }

 private:
  SmallDetectorOptions options_;
  ConvBlock stem_{nullptr}, down1_{nullptr}, stage1_{nullptr}, down2_{nullptr}, down3_{nullptr}, down4_{nullptr};
  ConvBlock lateral4_{nullptr}, lateral3_{nullptr};
  DetectHead head_{nullptr};
};
TORCH_MODULE(SmallDetector);

}  // namespace tdfusion::task

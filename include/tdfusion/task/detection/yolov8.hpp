#pragma once
// YOLOv8 (ultralytics, 2023), the detection network of the release (spec section 4), n scale at the defaults:
// CSP-Darknet backbone with C2f blocks and SPPF, PAN-FPN neck, decoupled anchor-free head with DFL at strides
// 8 / 16 / 32, trained from scratch on 1-channel fused images with the YOLOv8 loss (yolo_loss.hpp).
// The layers sit in a list named `model` at ultralytics' indices (model.0 ... model.22, the head being
// model.22; upsampling and concatenation hold no weights), so parameter names match an ultralytics
// state_dict of the same scale, input channels and classes key for key (the DFL projection is not a
// parameter here: ultralytics counts its 16 fixed weights, hence 3,157,184 = 3,157,200 - 16 at 80 classes).

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/eval_mode.hpp"
#include "tdfusion/task/detection/common.hpp"
#include "tdfusion/task/detection/head.hpp"
#include "tdfusion/task/detection/target.hpp"
#include "tdfusion/task/detection/yolo_loss.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace tdfusion::task {

struct Yolov8DetectorOptions {
  TORCH_ARG(int64_t, num_classes) = 6;  ///< M3FD: people, car, bus, motorcycle, lamp, truck
  TORCH_ARG(int64_t, in_channels) = 1;
  /// Scale (n: 0.33 / 0.25 / 1024; s: 0.33 / 0.5 / 1024; m: 0.67 / 0.75 / 768; l: 1 / 1 / 512; x: 1 / 1.25 / 512).
  TORCH_ARG(double, depth_multiple) = 0.33;
  TORCH_ARG(double, width_multiple) = 0.25;
  TORCH_ARG(int64_t, max_channels) = 1024;
  TORCH_ARG(int64_t, reg_max) = 16;
  /// Fill of the bottom-right padding up to a multiple of 32 (ultralytics' letterbox grey, 114 / 255).
  TORCH_ARG(double, pad_value) = 114.0 / 255.0;
  TORCH_ARG(DetectionLossOptions, loss) = {};
};

/// YOLOv8 bottleneck: two 3x3 ConvBlocks, with a residual connection when asked and shapes allow.
class Yolov8BottleneckImpl : public torch::nn::Cloneable<Yolov8BottleneckImpl> {
 public:
  Yolov8BottleneckImpl(int64_t in, int64_t out, bool shortcut) : in_(in), out_(out), shortcut_(shortcut) { reset(); }

  void reset() override {
    cv1_ = register_module("cv1", ConvBlock(in_, out_, 3));
    cv2_ = register_module("cv2", ConvBlock(out_, out_, 3));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    const torch::Tensor y = cv2_->forward(cv1_->forward(x));
    return shortcut_ && in_ == out_ ? x + y : y;
  }

 private:
  ConvBlock cv1_{nullptr}, cv2_{nullptr};
  int64_t in_, out_;
  bool shortcut_;
};
TORCH_MODULE(Yolov8Bottleneck);

/// C2f: 1x1 conv to 2c channels, split in two halves; n bottlenecks chained on the second half; every
/// intermediate map concatenated (2 + n) c and mixed by a 1x1 conv. c = out / 2.
class C2fImpl : public torch::nn::Cloneable<C2fImpl> {
 public:
  C2fImpl(int64_t in, int64_t out, int64_t n, bool shortcut) : in_(in), out_(out), n_(n), shortcut_(shortcut) {
    reset();
  }

  void reset() override {
    const int64_t c = out_ / 2;
    cv1_ = register_module("cv1", ConvBlock(in_, 2 * c, 1));
    cv2_ = register_module("cv2", ConvBlock((2 + n_) * c, out_, 1));
    m_ = register_module("m", torch::nn::ModuleList());
    for (int64_t i = 0; i < n_; ++i) m_->push_back(Yolov8Bottleneck(c, c, shortcut_));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    std::vector<torch::Tensor> y = cv1_->forward(x).chunk(2, 1);
    for (const auto& block : *m_) y.push_back(block->as<Yolov8Bottleneck>()->forward(y.back()));
    return cv2_->forward(torch::cat(y, 1));
  }

 private:
  ConvBlock cv1_{nullptr}, cv2_{nullptr};
  torch::nn::ModuleList m_{nullptr};
  int64_t in_, out_, n_;
  bool shortcut_;
};
TORCH_MODULE(C2f);

/// SPPF: 1x1 conv to in / 2, three chained 5x5 stride-1 max pools (receptive fields 5, 9, 13), the four
/// maps concatenated and mixed by a 1x1 conv.
class SppfImpl : public torch::nn::Cloneable<SppfImpl> {
 public:
  SppfImpl(int64_t in, int64_t out, int64_t kernel = 5) : in_(in), out_(out), kernel_(kernel) { reset(); }

  void reset() override {
    cv1_ = register_module("cv1", ConvBlock(in_, in_ / 2, 1));
    cv2_ = register_module("cv2", ConvBlock(in_ / 2 * 4, out_, 1));
    m_ = register_module("m", torch::nn::MaxPool2d(torch::nn::MaxPool2dOptions(kernel_).stride(1).padding(kernel_ / 2)));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    std::vector<torch::Tensor> y{cv1_->forward(x)};
    for (int i = 0; i < 3; ++i) y.push_back(m_->forward(y.back()));
    return cv2_->forward(torch::cat(y, 1));
  }

 private:
  ConvBlock cv1_{nullptr}, cv2_{nullptr};
  torch::nn::MaxPool2d m_{nullptr};
  int64_t in_, out_, kernel_;
};
TORCH_MODULE(Sppf);

/// Channel concatenation (a weightless layer, kept so that the layer indices match ultralytics').
class ConcatImpl : public torch::nn::Cloneable<ConcatImpl> {
 public:
  void reset() override {}
  torch::Tensor forward(const std::vector<torch::Tensor>& maps) { return torch::cat(maps, 1); }
};
TORCH_MODULE(Concat);

/// YOLOv8 detection task policy: `loss(fused, target)` for training, `forward(image)` for the raw head
/// outputs, `detect(image)` for boxes. Any input size: inputs are padded at the bottom-right to multiples of 32.
class Yolov8DetectorImpl : public torch::nn::Cloneable<Yolov8DetectorImpl> {
 public:
  using Target = DetectionTarget;
  using Options = Yolov8DetectorOptions;

  explicit Yolov8DetectorImpl(Yolov8DetectorOptions options = {}) : options_(std::move(options)) {
    const auto& o = options_;
    TORCH_CHECK(o.num_classes() > 0 && o.in_channels() > 0, "tdfusion: Yolov8Detector needs num_classes > 0 and "
                "in_channels > 0, got ", o.num_classes(), " and ", o.in_channels());
    TORCH_CHECK(o.depth_multiple() > 0 && o.width_multiple() > 0 && o.max_channels() > 0 && o.reg_max() > 1,
                "tdfusion: Yolov8Detector needs positive depth / width multiples and max_channels, and reg_max > 1");
    reset();
  }

  void reset() override {
    const auto& o = options_;
    // ultralytics' scaling: channels rounded up to multiples of 8 after the width multiple, repeats rounded.
    auto ch = [&](int64_t c) {
      const double scaled = static_cast<double>(std::min(c, o.max_channels())) * o.width_multiple();
      return static_cast<int64_t>(std::ceil(scaled / 8.0)) * 8;
    };
    auto depth = [&](int64_t n) { return std::max<int64_t>(std::lround(static_cast<double>(n) * o.depth_multiple()), 1); };
    const int64_t c1 = ch(64), c2 = ch(128), c3 = ch(256), c4 = ch(512), c5 = ch(1024);
    auto up = [] {
      return torch::nn::Upsample(
          torch::nn::UpsampleOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(torch::kNearest));
    };
    model_ = register_module("model", torch::nn::ModuleList());
    model_->push_back(ConvBlock(o.in_channels(), c1, 3, 2));          // 0  P1/2
    model_->push_back(ConvBlock(c1, c2, 3, 2));                       // 1  P2/4
    model_->push_back(C2f(c2, c2, depth(3), true));                   // 2
    model_->push_back(ConvBlock(c2, c3, 3, 2));                       // 3  P3/8
    model_->push_back(C2f(c3, c3, depth(6), true));                   // 4
    model_->push_back(ConvBlock(c3, c4, 3, 2));                       // 5  P4/16
    model_->push_back(C2f(c4, c4, depth(6), true));                   // 6
    model_->push_back(ConvBlock(c4, c5, 3, 2));                       // 7  P5/32
    model_->push_back(C2f(c5, c5, depth(3), true));                   // 8
    model_->push_back(Sppf(c5, c5, 5));                               // 9
    model_->push_back(up());                                          // 10
    model_->push_back(Concat());                                      // 11 with 6
    model_->push_back(C2f(c5 + c4, c4, depth(3), false));             // 12
    model_->push_back(up());                                          // 13
    model_->push_back(Concat());                                      // 14 with 4
    model_->push_back(C2f(c4 + c3, c3, depth(3), false));             // 15 P3 out
    model_->push_back(ConvBlock(c3, c3, 3, 2));                       // 16
    model_->push_back(Concat());                                      // 17 with 12
    model_->push_back(C2f(c3 + c4, c4, depth(3), false));             // 18 P4 out
    model_->push_back(ConvBlock(c4, c4, 3, 2));                       // 19
    model_->push_back(Concat());                                      // 20 with 9
    model_->push_back(C2f(c4 + c5, c5, depth(3), false));             // 21 P5 out
    model_->push_back(DetectHead(DetectHeadOptions(o.num_classes(), {c3, c4, c5}).reg_max(o.reg_max())));  // 22
  }

  /// Raw head outputs N x (4 reg_max + classes) x A of the input padded to multiples of 32 (see layout()).
  torch::Tensor forward(const torch::Tensor& image) {
    check_image_shape(image, "Yolov8Detector input", options_.in_channels());
    const torch::Tensor x = pad_to_multiple(image, 32, options_.pad_value());
    // Through the list, not cached holders: clone() swaps the list's contents.
    auto conv = [&](size_t i, const torch::Tensor& t) { return layer<ConvBlock>(i).forward(t); };
    auto c2f = [&](size_t i, const torch::Tensor& t) { return layer<C2f>(i).forward(t); };
    auto up = [&](size_t i, const torch::Tensor& t) { return layer<torch::nn::Upsample>(i).forward(t); };
    auto cat = [&](size_t i, const torch::Tensor& a, const torch::Tensor& b) { return layer<Concat>(i).forward({a, b}); };
    const torch::Tensor p3 = c2f(4, conv(3, c2f(2, conv(1, conv(0, x)))));
    const torch::Tensor p4 = c2f(6, conv(5, p3));
    const torch::Tensor p5 = layer<Sppf>(9).forward(c2f(8, conv(7, p4)));
    const torch::Tensor n4 = c2f(12, cat(11, up(10, p5), p4));
    const torch::Tensor out3 = c2f(15, cat(14, up(13, n4), p3));
    const torch::Tensor out4 = c2f(18, cat(17, conv(16, out3), n4));
    const torch::Tensor out5 = c2f(21, cat(20, conv(19, out4), p5));
    return layer<DetectHead>(22).forward({out3, out4, out5});
  }

  /// The YOLOv8 loss and its components on a fused batch N x in_channels x H x W.
  DetectionLossParts loss_parts(const torch::Tensor& fused, const Target& target) {
    return yolov8_detection_loss(forward(fused), layout(fused.size(2), fused.size(3)), target, options_.loss());
  }

  /// The YOLOv8 task loss (scalar) on a fused batch against its boxes.
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) { return loss_parts(fused, target).total; }

  /// Per image, K x 6 detections (x1, y1, x2, y2, score, class) in pixels; runs in eval mode (batch-norm
  /// running statistics) without gradient and restores the mode.
  std::vector<torch::Tensor> detect(const torch::Tensor& image, double conf = 0.25, double iou = 0.7,
                                    int64_t max_det = 300) {
    torch::NoGradGuard no_grad;
    const EvalMode eval(*this);
    return decode_detections(forward(image), layout(image.size(2), image.size(3)), conf, iou, max_det);
  }

  /// Where the head's cells lie for an H x W input.
  DetectionLayout layout(int64_t height, int64_t width) const {
    return DetectionLayout::for_image(options_.num_classes(), options_.reg_max(), height, width);
  }

  const Yolov8DetectorOptions& options() const { return options_; }
  DetectHeadImpl& head() { return layer<DetectHead>(22); }

 private:
  template <class Holder>
  typename Holder::ContainedType& layer(size_t index) {
    return *(*model_)[index]->template as<Holder>();
  }

  Yolov8DetectorOptions options_;
  torch::nn::ModuleList model_{nullptr};
};
TORCH_MODULE(Yolov8Detector);

}  // namespace tdfusion::task

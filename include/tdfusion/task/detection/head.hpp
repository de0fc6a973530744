#pragma once
// The building blocks every detector here shares: the YOLOv8 convolution block and the decoupled,
// anchor-free detection head with DFL box regression. Module names follow ultralytics (`conv`, `bn`,
// `cv2.{level}.{0,1,2}` for the box branch, `cv3...` for the class branch).

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace tdfusion::task {

/// Conv2d (padding k / 2) + BatchNorm (eps 1e-3, momentum 0.03, as ultralytics' initialize_weights sets) +
/// SiLU. Without batch norm the convolution has a bias instead, and train and eval modes compute the same
/// function (what the small CPU detector wants).
class ConvBlockImpl : public torch::nn::Cloneable<ConvBlockImpl> {
 public:
  ConvBlockImpl(int64_t in, int64_t out, int64_t kernel = 1, int64_t stride = 1, bool batch_norm = true)
      : in_(in), out_(out), kernel_(kernel), stride_(stride), batch_norm_(batch_norm) {
    reset();
  }

  void reset() override {
    namespace nn = torch::nn;
    conv_ = register_module(
        "conv", nn::Conv2d(nn::Conv2dOptions(in_, out_, kernel_).stride(stride_).padding(kernel_ / 2).bias(!batch_norm_)));
    if (batch_norm_) bn_ = register_module("bn", nn::BatchNorm2d(nn::BatchNormOptions(out_).eps(1e-3).momentum(0.03)));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = conv_->forward(x);
    if (batch_norm_) y = bn_->forward(y);
    return torch::silu(y);
  }

 private:
  torch::nn::Conv2d conv_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
  int64_t in_, out_, kernel_, stride_;
  bool batch_norm_;
};
TORCH_MODULE(ConvBlock);

struct DetectHeadOptions {
  DetectHeadOptions(int64_t num_classes, std::vector<int64_t> channels) : num_classes_(num_classes), channels_(std::move(channels)) {}
  TORCH_ARG(int64_t, num_classes);
  TORCH_ARG(std::vector<int64_t>, channels);                 ///< input channels of each level, finest first
  TORCH_ARG(std::vector<int64_t>, strides) = {8, 16, 32};    ///< pixels per cell of each level
  TORCH_ARG(int64_t, reg_max) = 16;                          ///< DFL bins per box side
  TORCH_ARG(int64_t, box_hidden) = 0;  ///< box-branch width; 0: YOLOv8's max(16, channels[0] / 4, 4 reg_max)
  TORCH_ARG(int64_t, cls_hidden) = 0;  ///< class-branch width; 0: YOLOv8's max(channels[0], min(classes, 100))
  TORCH_ARG(bool, batch_norm) = true;
  /// Image side the class-bias prior assumes (ultralytics: 640): bias = log(5 / classes / (side / stride)^2),
  /// i.e. about 5 objects per image at the start, so the initial class loss is not swamped by background.
  TORCH_ARG(double, prior_image_size) = 640.0;
};

/// Decoupled anchor-free head: per level, a box branch (two 3x3 ConvBlocks, 1x1 conv to 4 x reg_max DFL
/// logits) and a class branch (two 3x3 ConvBlocks, 1x1 conv to class logits). The output concatenates the
/// levels' cells: N x (4 reg_max + classes) x A, box logits first, A = sum of h_i w_i (row-major per level).
class DetectHeadImpl : public torch::nn::Cloneable<DetectHeadImpl> {
 public:
  explicit DetectHeadImpl(DetectHeadOptions options) : options_(std::move(options)) {
    const auto& o = options_;
    TORCH_CHECK(o.num_classes() > 0 && o.reg_max() > 1, "tdfusion: detection head needs num_classes > 0 and reg_max > 1, got ",
                o.num_classes(), " and ", o.reg_max());
    TORCH_CHECK(!o.channels().empty() && o.channels().size() == o.strides().size(),
                "tdfusion: detection head needs one stride per input level, got ", o.channels().size(), " levels and ",
                o.strides().size(), " strides");
    reset();
  }

  void reset() override {
    namespace nn = torch::nn;
    const auto& o = options_;
    const int64_t c2 = o.box_hidden() > 0 ? o.box_hidden() : std::max({int64_t{16}, o.channels()[0] / 4, 4 * o.reg_max()});
    const int64_t c3 = o.cls_hidden() > 0 ? o.cls_hidden() : std::max(o.channels()[0], std::min(o.num_classes(), int64_t{100}));
    cv2_ = register_module("cv2", nn::ModuleList());
    cv3_ = register_module("cv3", nn::ModuleList());
    for (size_t i = 0; i < o.channels().size(); ++i) {
      const int64_t ch = o.channels()[i];
      nn::Sequential box(ConvBlock(ch, c2, 3, 1, o.batch_norm()), ConvBlock(c2, c2, 3, 1, o.batch_norm()),
                         nn::Conv2d(nn::Conv2dOptions(c2, 4 * o.reg_max(), 1)));
      nn::Sequential cls(ConvBlock(ch, c3, 3, 1, o.batch_norm()), ConvBlock(c3, c3, 3, 1, o.batch_norm()),
                         nn::Conv2d(nn::Conv2dOptions(c3, o.num_classes(), 1)));
      // ultralytics' bias_init: box logits start at 1 (a flat distribution), classes at a low prior.
      torch::NoGradGuard no_grad;
      box[2]->as<nn::Conv2d>()->bias.fill_(1.0);
      const double cells = o.prior_image_size() / static_cast<double>(o.strides()[i]);
      cls[2]->as<nn::Conv2d>()->bias.fill_(std::log(5.0 / static_cast<double>(o.num_classes()) / (cells * cells)));
      cv2_->push_back(box);
      cv3_->push_back(cls);
    }
  }

  /// features[i]: N x channels[i] x h_i x w_i -> N x (4 reg_max + classes) x A raw logits.
  torch::Tensor forward(const std::vector<torch::Tensor>& features) {
    TORCH_CHECK(features.size() == cv2_->size(), "tdfusion: detection head expects ", cv2_->size(), " levels, got ",
                features.size());
    std::vector<torch::Tensor> levels;
    for (size_t i = 0; i < features.size(); ++i) {
      // Through the lists, not cached holders: clone() swaps a list's contents.
      const torch::Tensor box = (*cv2_)[i]->as<torch::nn::Sequential>()->forward(features[i]);
      const torch::Tensor cls = (*cv3_)[i]->as<torch::nn::Sequential>()->forward(features[i]);
      levels.push_back(torch::cat({box, cls}, 1).flatten(2));
    }
    return torch::cat(levels, 2);
  }

  const DetectHeadOptions& options() const { return options_; }

 private:
  DetectHeadOptions options_;
  torch::nn::ModuleList cv2_{nullptr}, cv3_{nullptr};
};
TORCH_MODULE(DetectHead);

}  // namespace tdfusion::task

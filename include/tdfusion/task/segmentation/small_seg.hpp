#pragma once
// SmallSegNet: a small CNN segmentation task policy (about 21k parameters at the defaults) for fast CPU runs,
// tests and examples where SegFormer-B0 (3.7M) would dominate the cost. No BatchNorm and no dropout, so train
// and eval modes compute the same function; GELU rather than ReLU keeps the task loss smooth in the image, which
// finite-difference checks of hypergradients rely on.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/nn/resize.hpp"
#include "tdfusion/task/segmentation/cross_entropy.hpp"

#include <torch/torch.h>

namespace tdfusion::task {

struct SmallSegNetOptions {
  TORCH_ARG(int64_t, num_classes) = 9;
  TORCH_ARG(int64_t, in_channels) = 1;
  TORCH_ARG(int64_t, width) = 16;           ///< channels at full resolution; 2 x width at half resolution
  TORCH_ARG(int64_t, ignore_index) = -100;  ///< label excluded from the loss (-100: none)
};

/// stem conv3x3 (full resolution) -> conv3x3 stride 2 -> dilated conv3x3 (context) -> bilinear upsample,
/// concatenated with the stem features (keeps thin structures) -> conv3x3 -> 1x1 classifier. Any H x W >= 1.
class SmallSegNetImpl : public torch::nn::Cloneable<SmallSegNetImpl> {
 public:
  using Target = torch::Tensor;  ///< N x H x W int64 class ids
  using Options = SmallSegNetOptions;

  explicit SmallSegNetImpl(SmallSegNetOptions options = {}) : options_(options) {
    TORCH_CHECK(options.num_classes() > 0 && options.in_channels() > 0 && options.width() > 0,
                "tdfusion: SmallSegNet needs positive num_classes, in_channels and width, got ", options.num_classes(),
                ", ", options.in_channels(), ", ", options.width());
    reset();
  }

  void reset() override {
    namespace nn = torch::nn;
    const int64_t w = options_.width();
    stem_ = register_module("stem", nn::Conv2d(nn::Conv2dOptions(options_.in_channels(), w, 3).padding(1)));
    down_ = register_module("down", nn::Conv2d(nn::Conv2dOptions(w, 2 * w, 3).stride(2).padding(1)));
    context_ = register_module("context", nn::Conv2d(nn::Conv2dOptions(2 * w, 2 * w, 3).padding(2).dilation(2)));
    fuse_ = register_module("fuse", nn::Conv2d(nn::Conv2dOptions(3 * w, w, 3).padding(1)));
    classifier_ = register_module("classifier", nn::Conv2d(nn::Conv2dOptions(w, options_.num_classes(), 1)));
  }

  /// Logits N x num_classes x H x W at the input's resolution.
  torch::Tensor forward(const torch::Tensor& image) {
    check_image_shape(image, "SmallSegNet input", options_.in_channels());
    const torch::Tensor full = torch::gelu(stem_->forward(image));
    const torch::Tensor half = torch::gelu(context_->forward(torch::gelu(down_->forward(full))));
    const torch::Tensor up = nn::resize_bilinear(half, image.size(2), image.size(3));
    return classifier_->forward(torch::gelu(fuse_->forward(torch::cat({full, up}, 1))));
  }

  /// Task loss on a fused batch N x in_channels x h x w against N x H x W labels (any H x W).
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) {
    return segmentation_loss(forward(fused), target, options_.ignore_index());
  }

  const SmallSegNetOptions& options() const { return options_; }

 private:
  SmallSegNetOptions options_;
  torch::nn::Conv2d stem_{nullptr}, down_{nullptr}, context_{nullptr}, fuse_{nullptr}, classifier_{nullptr};
};
TORCH_MODULE(SmallSegNet);

}  // namespace tdfusion::task

#pragma once
// LightFusion: a small plain CNN fusion policy for CPU budgets. The two images are stacked as channels,
// passed through a few 3x3 convolutions with LeakyReLU, and a sigmoid gives the fused image.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/nn/layers.hpp"

namespace tdfusion::fusion {

struct LightFusionOptions {
  TORCH_ARG(int64_t, width) = 16;  ///< feature channels
  TORCH_ARG(int64_t, depth) = 3;   ///< hidden 3x3 convolutions after the input convolution
};

class LightFusionImpl : public torch::nn::Module {
 public:
  explicit LightFusionImpl(LightFusionOptions options = {}) {
    TORCH_CHECK(options.depth() >= 0 && options.width() > 0, "tdfusion: LightFusion needs width > 0 and depth >= 0");
    layers_.push_back(register_module("conv0", nn::Conv(2, options.width(), 3, 1, /*bias=*/true)));
    for (int64_t i = 1; i <= options.depth(); ++i) {
      layers_.push_back(register_module("conv" + std::to_string(i), nn::Conv(options.width(), options.width(), 3, 1, true)));
    }
    layers_.push_back(register_module("conv_out", nn::Conv(options.width(), 1, 3, 1, true)));
  }

  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& ir, const torch::Tensor& vi) const {
    check_pair_shapes(ir, vi);
    torch::Tensor x = torch::cat({ir, vi}, 1);
    const auto names = named_children().keys();
    for (size_t i = 0; i + 1 < layers_.size(); ++i) {
      x = torch::leaky_relu(layers_[i]->forward_with(p.sub(names[i]), x), 0.01);
    }
    return torch::sigmoid(layers_.back()->forward_with(p.sub(names.back()), x));
  }

  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) { return forward_with(ParamView(*this), ir, vi); }

 private:
  std::vector<nn::Conv> layers_;
};
TORCH_MODULE(LightFusion);

/// Receptive radius of LightFusion (the halo fuse_tiled needs): one pixel per 3x3 convolution (conv0, depth
/// hidden ones, conv_out).
inline int64_t receptive_halo(const LightFusionOptions& options) { return options.depth() + 2; }

}  // namespace tdfusion::fusion

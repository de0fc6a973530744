#pragma once
// LPN: the paper's loss-generation network (spec section 4, about 44.5k parameters). It looks at the pair and
// emits per-pixel weights (w_ir, w_vi) = softmax over two channels, so w_ir + w_vi = 1 everywhere.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/nn/layers.hpp"

namespace tdfusion::lossgen {

struct LpnOptions {
  TORCH_ARG(int64_t, dim) = 16;
  TORCH_ARG(int64_t, heads) = 8;
  TORCH_ARG(double, ffn_expansion) = 2.0;
  TORCH_ARG(int64_t, encoder_depth) = 2;
  TORCH_ARG(int64_t, decoder_depth) = 2;
  /// Zero the last convolution's weights, so that G starts at exactly 0.5 / 0.5 everywhere (the fixed loss)
  /// and the meta step moves it from there. The release initialises that convolution like any other.
  TORCH_ARG(bool, zero_init_output) = false;
};

class LpnImpl : public torch::nn::Module {
 public:
  explicit LpnImpl(LpnOptions options = {}) {
    const int64_t d = options.dim(), h = options.heads();
    const double e = options.ffn_expansion();
    project_in_1_ = register_module("project_in_1", nn::conv3x3(1, d));
    project_in_2_ = register_module("project_in_2", nn::conv3x3(1, d));
    encoder1_ = nn::TransformerStack(*this, "encoder1", options.encoder_depth(), d, h, e);
    encoder2_ = nn::TransformerStack(*this, "encoder2", options.encoder_depth(), d, h, e);
    decoder_ = nn::TransformerStack(*this, "decoder", options.decoder_depth(), 2 * d, h, e);
    project_out_0_ = register_module("project_out_0", nn::conv3x3(2 * d, d));
    prelu_ = register_parameter("prelu", torch::full({1}, 0.25));
    project_out_1_ = register_module("project_out_1", nn::conv3x3(d, 2));
    if (options.zero_init_output()) {
      torch::NoGradGuard no_grad;
      project_out_1_->named_parameters()["weight"].zero_();
    }
  }

  /// Weights N x 2 x H x W: channel 0 weighs the infrared image, channel 1 the visible image.
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) {
    check_pair_shapes(ir, vi);
    const ParamView p(*this);
    const torch::Tensor a = encoder1_.forward_with(p, project_in_1_->forward_with(p.sub("project_in_1"), ir));
    const torch::Tensor b = encoder2_.forward_with(p, project_in_2_->forward_with(p.sub("project_in_2"), vi));
    torch::Tensor x = decoder_.forward_with(p, torch::cat({a, b}, 1));
    x = torch::prelu(project_out_0_->forward_with(p.sub("project_out_0"), x), prelu_);
    return torch::softmax(project_out_1_->forward_with(p.sub("project_out_1"), x), 1);
  }

 private:
  nn::Conv project_in_1_{nullptr}, project_in_2_{nullptr}, project_out_0_{nullptr}, project_out_1_{nullptr};
  nn::TransformerStack encoder1_, encoder2_, decoder_;
  torch::Tensor prelu_;
};
TORCH_MODULE(Lpn);

}  // namespace tdfusion::lossgen

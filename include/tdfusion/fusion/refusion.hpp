#pragma once
// ReFusion: the paper's fusion network (spec section 4). 59,856 parameters at the defaults, no biases,
// fully convolutional (any H x W). Parameter names follow the released state_dicts.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/fusion/afm.hpp"
#include "tdfusion/nn/layers.hpp"

namespace tdfusion::fusion {

struct ReFusionOptions {
  TORCH_ARG(int64_t, dim) = 16;
  TORCH_ARG(int64_t, heads) = 8;
  TORCH_ARG(double, ffn_expansion) = 2.0;
  TORCH_ARG(int64_t, encoder_depth) = 2;
  TORCH_ARG(int64_t, decoder_depth) = 2;
};

class ReFusionImpl : public torch::nn::Module {
 public:
  explicit ReFusionImpl(ReFusionOptions options = {}) : options_(options) {
    const int64_t d = options.dim(), h = options.heads();
    const double e = options.ffn_expansion();
    project_in_1_ = register_module("project_in_1", nn::conv3x3(1, d));
    project_in_2_ = register_module("project_in_2", nn::conv3x3(1, d));
    encoder1_ = nn::TransformerStack(*this, "encoder1", options.encoder_depth(), d, h, e);
    encoder2_ = nn::TransformerStack(*this, "encoder2", options.encoder_depth(), d, h, e);
    fm_ = register_module("FM", Afm(d, h));
    decoder_ = nn::TransformerStack(*this, "decoder", options.decoder_depth(), 2 * d, h, e);
    project_out_0_ = register_module("project_out_0", nn::conv3x3(2 * d, d));
    project_out_1_ = register_module("project_out_1", nn::conv3x3(d, 1));
  }

  /// Fuses with the weights in `p` (the module's own or fast weights). ir, vi: N x 1 x H x W in [0,1].
  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& ir, const torch::Tensor& vi) const {
    check_pair_shapes(ir, vi);
    // Each stage's inputs are temporaries or moved, so they are freed as soon as the stage is done with them.
    torch::Tensor x = fm_->forward_with(p.sub("FM"),
                                        encoder1_.forward_with(p, project_in_1_->forward_with(p.sub("project_in_1"), ir)),
                                        encoder2_.forward_with(p, project_in_2_->forward_with(p.sub("project_in_2"), vi)));
    x = decoder_.forward_with(p, std::move(x));
    x = torch::leaky_relu(project_out_0_->forward_with(p.sub("project_out_0"), x), 0.01);
    return torch::sigmoid(project_out_1_->forward_with(p.sub("project_out_1"), x));
  }

  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) { return forward_with(ParamView(*this), ir, vi); }

  const ReFusionOptions& options() const { return options_; }

 private:
  ReFusionOptions options_;
  nn::Conv project_in_1_{nullptr}, project_in_2_{nullptr}, project_out_0_{nullptr}, project_out_1_{nullptr};
  nn::TransformerStack encoder1_, encoder2_, decoder_;
  Afm fm_{nullptr};
};
TORCH_MODULE(ReFusion);

/// Receptive radius of ReFusion in pixels (the halo fuse_tiled needs): its longest chain of 3x3 convolutions.
/// project_in (1), two per transformer block (qkv_dwconv, ffn dwconv), two in AFM (qkv dwconv, then
/// project_E_d or project_E*_d), project_out_0 and project_out_1 (2): 1 + 2 * 2 + 2 + 2 * 2 + 2 = 13 at the
/// defaults. 1x1 convolutions, per-pixel ops and attention with image-wide matrices widen nothing.
inline int64_t receptive_halo(const ReFusionOptions& options) {
  return 1 + 2 * options.encoder_depth() + 2 + 2 * options.decoder_depth() + 2;
}

}  // namespace tdfusion::fusion

#pragma once
// SegFormer (Xie et al., NeurIPS 2021), the segmentation network of the release (spec section 4): a Mix
// Transformer encoder (MiT-B0 at the defaults) and the all-MLP decoder, trained from scratch on 1-channel
// fused images. Module names follow the original code under mmseg's `backbone.` / `decode_head.` prefixes, so a
// state_dict of that layout maps key for key. Every module is Cloneable: clone() gives the independent
// snapshot the meta step needs (copying a holder only aliases the network).

#include "tdfusion/core/checks.hpp"
#include "tdfusion/nn/resize.hpp"
#include "tdfusion/task/segmentation/cross_entropy.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace tdfusion::task {

struct SegFormerOptions {
  TORCH_ARG(int64_t, num_classes) = 9;  ///< MSRS: 9 classes including "unlabelled"
  TORCH_ARG(int64_t, in_channels) = 1;
  TORCH_ARG(std::vector<int64_t>, embed_dims) = {32, 64, 160, 256};
  TORCH_ARG(std::vector<int64_t>, depths) = {2, 2, 2, 2};
  TORCH_ARG(std::vector<int64_t>, num_heads) = {1, 2, 5, 8};
  TORCH_ARG(std::vector<int64_t>, sr_ratios) = {8, 4, 2, 1};
  TORCH_ARG(int64_t, mlp_ratio) = 4;
  TORCH_ARG(int64_t, decoder_dim) = 256;
  /// Stochastic depth, rising linearly to this rate over the blocks (0: deterministic; the original uses 0.1).
  TORCH_ARG(double, drop_path_rate) = 0.0;
  /// Channel dropout before the classifier (0: deterministic; the original uses 0.1).
  TORCH_ARG(double, decoder_dropout) = 0.0;
  TORCH_ARG(int64_t, ignore_index) = -100;  ///< label excluded from the loss (-100: none)
};

namespace detail {

// The original initialisation: linear weights N(0, 0.02) (its truncation at +-2 absolute never bites at that
// std), convolutions N(0, sqrt(2 / fan_out)), biases 0.
inline void init_linear(torch::nn::Linear& linear) {
  torch::NoGradGuard no_grad;
  linear->weight.normal_(0.0, 0.02);
  if (linear->bias.defined()) linear->bias.zero_();
}

inline void init_conv(torch::nn::Conv2d& conv) {
  torch::NoGradGuard no_grad;
  const auto& o = conv->options;
  const auto& k = *o.kernel_size();
  const double fan_out = static_cast<double>(k[0] * k[1] * o.out_channels() / o.groups());
  conv->weight.normal_(0.0, std::sqrt(2.0 / fan_out));
  if (conv->bias.defined()) conv->bias.zero_();
}

// N x L x C tokens <-> N x C x H x W maps.
inline torch::Tensor tokens_to_map(const torch::Tensor& x, int64_t h, int64_t w) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), h, w});
}
inline torch::Tensor map_to_tokens(const torch::Tensor& x) { return x.flatten(2).transpose(1, 2); }

// Stochastic depth: drops the whole residual branch per sample, rescaling the survivors.
inline torch::Tensor drop_path(const torch::Tensor& x, double rate, bool training) {
  if (rate <= 0.0 || !training) return x;
  const double keep = 1.0 - rate;
  const torch::Tensor mask = torch::empty({x.size(0), 1, 1}, x.options()).bernoulli_(keep).div_(keep);
  return x * mask;
}

}  // namespace detail

/// Overlapping patch embedding: strided convolution (kernel > stride) + LayerNorm. Returns N x L x C tokens.
class OverlapPatchEmbedImpl : public torch::nn::Cloneable<OverlapPatchEmbedImpl> {
 public:
  OverlapPatchEmbedImpl(int64_t in_channels, int64_t dim, int64_t kernel, int64_t stride)
      : in_channels_(in_channels), dim_(dim), kernel_(kernel), stride_(stride) {
    reset();
  }

  void reset() override {
    proj_ = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels_, dim_, kernel_)
                                                          .stride(stride_)
                                                          .padding(kernel_ / 2)));
    norm_ = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_})));
    detail::init_conv(proj_);
  }

  /// x: N x C_in x H x W -> tokens N x (h*w) x dim; `h`, `w` receive the output grid size.
  torch::Tensor forward(const torch::Tensor& x, int64_t& h, int64_t& w) {
    const torch::Tensor y = proj_->forward(x);
    h = y.size(2);
    w = y.size(3);
    return norm_->forward(detail::map_to_tokens(y));
  }

 private:
  torch::nn::Conv2d proj_{nullptr};
  torch::nn::LayerNorm norm_{nullptr};
  int64_t in_channels_, dim_, kernel_, stride_;
};
TORCH_MODULE(OverlapPatchEmbed);

/// Efficient self-attention: keys and values come from a sequence shortened by a strided sr x sr
/// convolution + LayerNorm, so the cost is L * L / sr^2 instead of L^2. A grid smaller than the window (small
/// images) is zero-padded up to it, giving one key/value token where the original network would fail.
class EfficientSelfAttentionImpl : public torch::nn::Cloneable<EfficientSelfAttentionImpl> {
 public:
  EfficientSelfAttentionImpl(int64_t dim, int64_t heads, int64_t sr_ratio)
      : dim_(dim), heads_(heads), sr_ratio_(sr_ratio) {
    TORCH_CHECK(heads > 0 && dim % heads == 0, "tdfusion: SegFormer attention dim ", dim,
                " cannot be split into ", heads, " heads");
    TORCH_CHECK(sr_ratio >= 1, "tdfusion: SegFormer spatial-reduction ratio must be >= 1, got ", sr_ratio);
    reset();
  }

  void reset() override {
    q_ = register_module("q", torch::nn::Linear(dim_, dim_));
    kv_ = register_module("kv", torch::nn::Linear(dim_, 2 * dim_));
    proj_ = register_module("proj", torch::nn::Linear(dim_, dim_));
    detail::init_linear(q_);
    detail::init_linear(kv_);
    detail::init_linear(proj_);
    if (sr_ratio_ > 1) {
      sr_ = register_module("sr", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim_, dim_, sr_ratio_).stride(sr_ratio_)));
      norm_ = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_})));
      detail::init_conv(sr_);
    }
  }

  /// x: N x (h*w) x C tokens of an h x w grid.
  torch::Tensor forward(const torch::Tensor& x, int64_t h, int64_t w) {
    const int64_t n = x.size(0), l = x.size(1), head_dim = dim_ / heads_;
    const torch::Tensor query = q_->forward(x).reshape({n, l, heads_, head_dim}).permute({0, 2, 1, 3});
    torch::Tensor source = x;
    if (sr_ratio_ > 1) {
      torch::Tensor grid = detail::tokens_to_map(x, h, w);
      if (h < sr_ratio_ || w < sr_ratio_) {
        const int64_t pad_w = std::max<int64_t>(sr_ratio_ - w, 0), pad_h = std::max<int64_t>(sr_ratio_ - h, 0);
        grid = torch::constant_pad_nd(grid, {0, pad_w, 0, pad_h});  // right and bottom
      }
      source = norm_->forward(detail::map_to_tokens(sr_->forward(grid)));
    }
    const torch::Tensor key_value = kv_->forward(source).reshape({n, -1, 2, heads_, head_dim}).permute({2, 0, 3, 1, 4});
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
    const torch::Tensor attn = torch::softmax(torch::matmul(query, key_value[0].transpose(-2, -1)) * scale, -1);
    return proj_->forward(torch::matmul(attn, key_value[1]).transpose(1, 2).reshape({n, l, dim_}));
  }

 private:
  torch::nn::Linear q_{nullptr}, kv_{nullptr}, proj_{nullptr};
  torch::nn::Conv2d sr_{nullptr};
  torch::nn::LayerNorm norm_{nullptr};
  int64_t dim_, heads_, sr_ratio_;
};
TORCH_MODULE(EfficientSelfAttention);

/// Holder of the Mix-FFN depthwise 3x3 convolution (its own level, so it is named `mlp.dwconv.dwconv`).
class DepthwiseConvImpl : public torch::nn::Cloneable<DepthwiseConvImpl> {
 public:
  explicit DepthwiseConvImpl(int64_t channels) : channels_(channels) { reset(); }

  void reset() override {
    dwconv_ = register_module(
        "dwconv", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels_, channels_, 3).padding(1).groups(channels_)));
    detail::init_conv(dwconv_);
  }

  torch::Tensor forward(const torch::Tensor& x, int64_t h, int64_t w) {
    return detail::map_to_tokens(dwconv_->forward(detail::tokens_to_map(x, h, w)));
  }

 private:
  torch::nn::Conv2d dwconv_{nullptr};
  int64_t channels_;
};
TORCH_MODULE(DepthwiseConv);

/// Mix-FFN: linear -> depthwise 3x3 conv (the positional cue that replaces position embeddings) -> GELU -> linear.
class MixFfnImpl : public torch::nn::Cloneable<MixFfnImpl> {
 public:
  MixFfnImpl(int64_t dim, int64_t hidden) : dim_(dim), hidden_(hidden) { reset(); }

  void reset() override {
    fc1_ = register_module("fc1", torch::nn::Linear(dim_, hidden_));
    dwconv_ = register_module("dwconv", DepthwiseConv(hidden_));
    fc2_ = register_module("fc2", torch::nn::Linear(hidden_, dim_));
    detail::init_linear(fc1_);
    detail::init_linear(fc2_);
  }

  torch::Tensor forward(const torch::Tensor& x, int64_t h, int64_t w) {
    return fc2_->forward(torch::gelu(dwconv_->forward(fc1_->forward(x), h, w)));
  }

 private:
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr};
  DepthwiseConv dwconv_{nullptr};
  int64_t dim_, hidden_;
};
TORCH_MODULE(MixFfn);

/// Pre-norm transformer block: x += attn(LN(x)); x += MixFFN(LN(x)) (LayerNorm eps 1e-6 as in the original).
class MitBlockImpl : public torch::nn::Cloneable<MitBlockImpl> {
 public:
  MitBlockImpl(int64_t dim, int64_t heads, int64_t mlp_ratio, int64_t sr_ratio, double drop_path)
      : dim_(dim), heads_(heads), mlp_ratio_(mlp_ratio), sr_ratio_(sr_ratio), drop_path_(drop_path) {
    reset();
  }

  void reset() override {
    norm1_ = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_}).eps(1e-6)));
    attn_ = register_module("attn", EfficientSelfAttention(dim_, heads_, sr_ratio_));
    norm2_ = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_}).eps(1e-6)));
    mlp_ = register_module("mlp", MixFfn(dim_, dim_ * mlp_ratio_));
  }

  torch::Tensor forward(torch::Tensor x, int64_t h, int64_t w) {
    x = x + detail::drop_path(attn_->forward(norm1_->forward(x), h, w), drop_path_, is_training());
    return x + detail::drop_path(mlp_->forward(norm2_->forward(x), h, w), drop_path_, is_training());
  }

 private:
  torch::nn::LayerNorm norm1_{nullptr}, norm2_{nullptr};
  EfficientSelfAttention attn_{nullptr};
  MixFfn mlp_{nullptr};
  int64_t dim_, heads_, mlp_ratio_, sr_ratio_;
  double drop_path_;
};
TORCH_MODULE(MitBlock);

/// Mix Transformer encoder. Stage i: overlapping patch embedding (7x7 stride 4 for the first stage, 3x3
/// stride 2 after), depths[i] blocks, LayerNorm. Returns the stage maps at 1/4, 1/8, 1/16, 1/32 resolution.
class MixTransformerImpl : public torch::nn::Cloneable<MixTransformerImpl> {
 public:
  explicit MixTransformerImpl(SegFormerOptions options = {}) : options_(std::move(options)) {
    const size_t stages = options_.embed_dims().size();
    TORCH_CHECK(stages > 0, "tdfusion: SegFormer needs at least one stage");
    TORCH_CHECK(options_.depths().size() == stages && options_.num_heads().size() == stages &&
                    options_.sr_ratios().size() == stages,
                "tdfusion: SegFormer embed_dims, depths, num_heads and sr_ratios must have one entry per stage, got ",
                stages, ", ", options_.depths().size(), ", ", options_.num_heads().size(), ", ",
                options_.sr_ratios().size());
    reset();
  }

  void reset() override {
    const auto& o = options_;
    int64_t total_blocks = 0;
    for (int64_t d : o.depths()) total_blocks += d;
    int64_t block_index = 0;
    patch_embeds_.clear();
    blocks_.clear();
    norms_.clear();
    for (size_t i = 0; i < o.embed_dims().size(); ++i) {
      const std::string stage = std::to_string(i + 1);
      const int64_t in = i == 0 ? o.in_channels() : o.embed_dims()[i - 1];
      const int64_t kernel = i == 0 ? 7 : 3, stride = i == 0 ? 4 : 2;
      patch_embeds_.push_back(
          register_module("patch_embed" + stage, OverlapPatchEmbed(in, o.embed_dims()[i], kernel, stride)));
      torch::nn::ModuleList list;
      for (int64_t j = 0; j < o.depths()[i]; ++j, ++block_index) {
        const double rate = total_blocks > 1 ? o.drop_path_rate() * block_index / (total_blocks - 1) : 0.0;
        list->push_back(MitBlock(o.embed_dims()[i], o.num_heads()[i], o.mlp_ratio(), o.sr_ratios()[i], rate));
      }
      blocks_.push_back(register_module("block" + stage, list));
      norms_.push_back(register_module(
          "norm" + stage, torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.embed_dims()[i]}).eps(1e-6))));
    }
  }

  /// image: N x in_channels x H x W -> one N x embed_dims[i] x h_i x w_i map per stage.
  std::vector<torch::Tensor> forward(const torch::Tensor& image) {
    std::vector<torch::Tensor> features;
    torch::Tensor x = image;
    for (size_t i = 0; i < patch_embeds_.size(); ++i) {
      int64_t h = 0, w = 0;
      torch::Tensor tokens = patch_embeds_[i]->forward(x, h, w);
      // Through the list, not cached holders: clone() swaps the list's contents in place.
      for (const auto& block : *blocks_[i]) tokens = block->as<MitBlock>()->forward(tokens, h, w);
      x = detail::tokens_to_map(norms_[i]->forward(tokens), h, w);
      features.push_back(x);
    }
    return features;
  }

  const SegFormerOptions& options() const { return options_; }

 private:
  SegFormerOptions options_;
  std::vector<OverlapPatchEmbed> patch_embeds_;
  std::vector<torch::nn::ModuleList> blocks_;
  std::vector<torch::nn::LayerNorm> norms_;
};
TORCH_MODULE(MixTransformer);

/// Per-pixel linear map of an N x C x h x w feature map (named `linear_cI.proj` as in the original).
class TokenLinearImpl : public torch::nn::Cloneable<TokenLinearImpl> {
 public:
  TokenLinearImpl(int64_t in, int64_t out) : in_(in), out_(out) { reset(); }

  void reset() override { proj_ = register_module("proj", torch::nn::Linear(in_, out_)); }

  torch::Tensor forward(const torch::Tensor& x) {
    return detail::tokens_to_map(proj_->forward(detail::map_to_tokens(x)), x.size(2), x.size(3));
  }

 private:
  torch::nn::Linear proj_{nullptr};
  int64_t in_, out_;
};
TORCH_MODULE(TokenLinear);

/// 1x1 convolution (no bias) + BatchNorm + ReLU: mmcv's ConvModule, hence the names `conv` and `bn`.
class ConvBnReluImpl : public torch::nn::Cloneable<ConvBnReluImpl> {
 public:
  ConvBnReluImpl(int64_t in, int64_t out) : in_(in), out_(out) { reset(); }

  void reset() override {
    conv_ = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_, out_, 1).bias(false)));
    bn_ = register_module("bn", torch::nn::BatchNorm2d(out_));
    detail::init_conv(conv_);
  }

  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(bn_->forward(conv_->forward(x))); }

 private:
  torch::nn::Conv2d conv_{nullptr};
  torch::nn::BatchNorm2d bn_{nullptr};
  int64_t in_, out_;
};
TORCH_MODULE(ConvBnRelu);

/// All-MLP decoder: every stage linearly mapped to decoder_dim and upsampled to the first stage's (1/4)
/// grid, concatenated deepest first, fused by ConvBnRelu, classified by a 1x1 convolution.
class SegFormerHeadImpl : public torch::nn::Cloneable<SegFormerHeadImpl> {
 public:
  explicit SegFormerHeadImpl(SegFormerOptions options = {}) : options_(std::move(options)) { reset(); }

  void reset() override {
    const auto& o = options_;
    const int64_t stages = static_cast<int64_t>(o.embed_dims().size());
    linears_.clear();
    for (int64_t i = 0; i < stages; ++i) {
      linears_.push_back(
          register_module("linear_c" + std::to_string(i + 1), TokenLinear(o.embed_dims()[i], o.decoder_dim())));
    }
    linear_fuse_ = register_module("linear_fuse", ConvBnRelu(stages * o.decoder_dim(), o.decoder_dim()));
    linear_pred_ = register_module("linear_pred",
                                  torch::nn::Conv2d(torch::nn::Conv2dOptions(o.decoder_dim(), o.num_classes(), 1)));
  }

  /// features: one map per stage, the first the largest. Returns logits on the first stage's grid.
  torch::Tensor forward(const std::vector<torch::Tensor>& features) {
    TORCH_CHECK(features.size() == linears_.size(), "tdfusion: SegFormer head expects ", linears_.size(),
                " feature maps, got ", features.size());
    const int64_t h = features[0].size(2), w = features[0].size(3);
    std::vector<torch::Tensor> maps;
    for (size_t i = features.size(); i-- > 0;) maps.push_back(nn::resize_bilinear(linears_[i]->forward(features[i]), h, w));
    const torch::Tensor fused = linear_fuse_->forward(torch::cat(maps, 1));
    return linear_pred_->forward(torch::feature_dropout(fused, options_.decoder_dropout(), is_training()));
  }

 private:
  ConvBnRelu linear_fuse_{nullptr};
  torch::nn::Conv2d linear_pred_{nullptr};
  SegFormerOptions options_;
  std::vector<TokenLinear> linears_;
};
TORCH_MODULE(SegFormerHead);

/// SegFormer segmentation task policy: `loss(fused, labels)` for training, `forward(image)` for prediction.
/// Any input size works; below 29 x 29 (MiT-B0) some stage grids are smaller than their reduction window and
/// get padded (see EfficientSelfAttention), at and above it the network computes exactly the original.
class SegFormerImpl : public torch::nn::Cloneable<SegFormerImpl> {
 public:
  using Target = torch::Tensor;  ///< N x H x W int64 class ids
  using Options = SegFormerOptions;

  explicit SegFormerImpl(SegFormerOptions options = {}) : options_(std::move(options)) {
    TORCH_CHECK(options_.num_classes() > 0, "tdfusion: SegFormer needs num_classes > 0, got ", options_.num_classes());
    TORCH_CHECK(options_.in_channels() > 0, "tdfusion: SegFormer needs in_channels > 0, got ", options_.in_channels());
    reset();
  }

  void reset() override {
    backbone_ = register_module("backbone", MixTransformer(options_));
    decode_head_ = register_module("decode_head", SegFormerHead(options_));
  }

  /// Decoder logits at 1/4 of the input resolution (what the loss resizes to the labels).
  torch::Tensor coarse_logits(const torch::Tensor& image) {
    check_image_shape(image, "SegFormer input", options_.in_channels());
    return decode_head_->forward(backbone_->forward(image));
  }

  /// Logits N x num_classes x H x W at the input's resolution.
  torch::Tensor forward(const torch::Tensor& image) {
    return nn::resize_bilinear(coarse_logits(image), image.size(2), image.size(3));
  }

  /// Task loss on a fused batch N x in_channels x h x w against N x H x W labels (any H x W).
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) {
    return segmentation_loss(coarse_logits(fused), target, options_.ignore_index());
  }

  const SegFormerOptions& options() const { return options_; }
  MixTransformer& backbone() { return backbone_; }
  SegFormerHead& decode_head() { return decode_head_; }

 private:
  SegFormerOptions options_;
  MixTransformer backbone_{nullptr};
  SegFormerHead decode_head_{nullptr};
};
TORCH_MODULE(SegFormer);

}  // namespace tdfusion::task

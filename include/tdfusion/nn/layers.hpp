#pragma once
// Functional building blocks of the paper's networks. Each block is a torch module that only *registers*
// its weights (so names match the released state_dicts) and computes its output from a ParamView, so the
// stateful and the fast-weight forward passes share one implementation.

#include "tdfusion/core/param_view.hpp"
#include "tdfusion/nn/attention_tiling.hpp"
#include "tdfusion/nn/kernels/ops.hpp"

#include <torch/torch.h>

#include <cmath>

namespace tdfusion::nn {

/// 2-D convolution, stride 1, "same" zero padding, optional bias, optional groups (depthwise when
/// groups == in_channels). Registered as `weight` (and `bias`), initialised like torch.nn.Conv2d.
class ConvImpl : public torch::nn::Module {
 public:
  ConvImpl(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t groups = 1, bool bias = false)
      : kernel_(kernel), groups_(groups), bias_(bias) {
    TORCH_CHECK(kernel % 2 == 1, "tdfusion: Conv needs an odd kernel size, got ", kernel);
    TORCH_CHECK(in_channels % groups == 0 && out_channels % groups == 0, "tdfusion: Conv channels ", in_channels,
                "->", out_channels, " are not divisible by groups ", groups);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_channels / groups * kernel * kernel));
    register_parameter("weight", torch::empty({out_channels, in_channels / groups, kernel, kernel}).uniform_(-bound, bound));
    if (bias) register_parameter("bias", torch::empty({out_channels}).uniform_(-bound, bound));
  }

  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& x) const {
    const torch::Tensor& w = p["weight"];
    torch::Tensor y;
    if (kernel_ == 1 && groups_ == 1) {
      y = ops::conv1x1(x, w);
    } else if (kernel_ == 3 && groups_ == x.size(1) && w.size(0) == groups_) {
      y = ops::depthwise3x3(x, w);
    } else if (groups_ == 1) {
      return ops::conv_same(x, w, bias_ ? p["bias"] : torch::Tensor());
    } else {
      return torch::conv2d(x, w, bias_ ? p["bias"] : torch::Tensor(), /*stride=*/1, /*padding=*/kernel_ / 2,
                           /*dilation=*/1, groups_);
    }
    return bias_ ? y + p["bias"].view({1, -1, 1, 1}) : y;
  }

 private:
  int64_t kernel_;
  int64_t groups_;
  bool bias_;
};
TORCH_MODULE(Conv);

inline Conv conv1x1(int64_t in, int64_t out) { return Conv(in, out, 1); }
inline Conv conv3x3(int64_t in, int64_t out) { return Conv(in, out, 3); }
inline Conv dwconv3x3(int64_t channels) { return Conv(channels, channels, 3, channels); }

/// Holds a per-channel affine pair (`weight` = 1, `bias` = 0): the `body` of the Restormer LayerNorm.
class AffineImpl : public torch::nn::Module {
 public:
  explicit AffineImpl(int64_t channels) {
    register_parameter("weight", torch::ones({channels}));
    register_parameter("bias", torch::zeros({channels}));
  }
};
TORCH_MODULE(Affine);

/// Per-pixel LayerNorm over channels (biased variance, eps 1e-5); weights live in `body.{weight,bias}`.
class LayerNormImpl : public torch::nn::Module {
 public:
  explicit LayerNormImpl(int64_t channels) { register_module("body", Affine(channels)); }

  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& x) const {
    return ops::channel_layer_norm(x, p["body.weight"], p["body.bias"], 1e-5);
  }
};
TORCH_MODULE(LayerNorm);

/// The attention matrix softmax(normalise(q) normalise(k)^T * t) of Restormer's channel attention, from the
/// Gram matrix S = q k^T of the raw rows and their L2 norms (ops::normalised_gram), for a caller that sums them
/// itself (a tiled pass). gram: ... x d x d; norms: ... x d; temperature broadcasts against gram.
inline torch::Tensor attention_matrix(const torch::Tensor& gram, const torch::Tensor& q_norm, const torch::Tensor& k_norm,
                                      const torch::Tensor& temperature) {
  return torch::softmax(ops::normalised_gram(gram, q_norm, k_norm) * temperature, -1);
}

/// The per-head attention matrices attn (N x heads x d x d) followed by the 1x1 projection W (C x C x 1 x 1, C =
/// heads d) as one N x C x C matrix per image, W blockdiag(attn): what the attention's output applies to v.
inline torch::Tensor attention_mixing(const torch::Tensor& attn, const torch::Tensor& projection) {
  const int64_t n = attn.size(0), heads = attn.size(1), d = attn.size(2), c = heads * d;
  TORCH_CHECK(projection.dim() == 4 && projection.size(0) == c && projection.size(1) == c,
              "tdfusion: attention projection must be ", c, " x ", c, " x 1 x 1, got ", projection.sizes());
  // Column block h of W (C x d) times attn_h: heads x C x d -> N x heads x C x d -> N x C x (heads d).
  const torch::Tensor blocks = projection.reshape({c, heads, d}).permute({1, 0, 2});
  return torch::matmul(blocks.unsqueeze(0), attn).permute({0, 2, 1, 3}).reshape({n, c, c});
}

/// The per-head attention matrices attn (N x heads x d x d) applied to v (N x C x H x W, C = heads d), followed
/// by the 1x1 projection W (C x C x 1 x 1) when one is given: attention_mixing(attn, W) times v, one pass over
/// the pixels instead of two.
inline torch::Tensor attend_values(const torch::Tensor& attn, const torch::Tensor& v, const torch::Tensor& projection) {
  const int64_t n = v.size(0), c = v.size(1), heads = attn.size(1), d = attn.size(2), pixels = v.size(2) * v.size(3);
  if (!projection.defined()) return ops::bmm(attn, v.reshape({n, heads, d, pixels})).reshape(v.sizes());
  return ops::bmm(attention_mixing(attn, projection).unsqueeze(1), v.reshape({n, 1, c, pixels})).reshape(v.sizes());
}

/// The attention matrices of Restormer's transposed ("channel") attention: per head, the softmax over rows of
/// the cosine similarities of q's and k's channels (L2-normalised along the pixels) times the temperature.
/// The long normalised q and k are never formed: the small Gram matrix is normalised instead
/// (ops::cosine_gram). q, k: N x C x H x W; temperature: heads x 1 x 1. Returns N x heads x C/heads x C/heads.
inline torch::Tensor attention_matrix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& temperature,
                                      int64_t heads) {
  const int64_t n = q.size(0), c = q.size(1), h = q.size(2), w = q.size(3);
  TORCH_CHECK(c % heads == 0, "tdfusion: ", c, " channels cannot be split into ", heads, " heads");
  if (AttentionTiling* hook = AttentionTiling::active()) return hook->matrix(q, k, temperature, heads);
  const torch::Tensor qh = q.reshape({n, heads, c / heads, h * w});
  const torch::Tensor kh = k.reshape({n, heads, c / heads, h * w});
  return torch::softmax(ops::cosine_gram(qh, kh) * temperature, -1);
}

/// Transposed ("channel") attention of Restormer, whose cost grows linearly with the pixel count (see
/// attention_matrix). q, k, v: N x C x H x W; temperature: heads x 1 x 1; projection: the following bias-free
/// 1x1 convolution's weight (C x C x 1 x 1), folded into the attention (attend_values), or undefined.
/// Returns N x C x H x W.
inline torch::Tensor channel_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const torch::Tensor& temperature, int64_t heads,
                                       const torch::Tensor& projection = {}) {
  return attend_values(attention_matrix(q, k, temperature, heads), v, projection);
}

/// Multi-Dconv head transposed attention (MDTA).
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads) : heads_(heads) {
    register_parameter("temperature", torch::ones({heads, 1, 1}));
    qkv_ = register_module("qkv", conv1x1(dim, 3 * dim));
    qkv_dwconv_ = register_module("qkv_dwconv", dwconv3x3(3 * dim));
    register_module("project_out", conv1x1(dim, dim));  // its weight is folded into channel_attention
  }

  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& x) const {
    return attend(p, qkv_dwconv_->forward_with(p.sub("qkv_dwconv"), qkv_->forward_with(p.sub("qkv"), x)));
  }

  /// The attention of the stacked q, k, v (N x 3C x H x W) and the output projection (folded into it).
  torch::Tensor attend(const ParamView& p, const torch::Tensor& qkv) const {
    const auto parts = qkv.chunk(3, 1);
    return channel_attention(parts[0], parts[1], parts[2], p["temperature"], heads_, p["project_out.weight"]);
  }

  /// On the fused inference path (ops::inference_fusable; LayerNorm ln_w, ln_b): the mixing matrices of
  /// forward_with(p, LN(x)) (attention_mixing), from one pass over x that stores neither q nor k
  /// (ops::attention_gram; under an AttentionTiling hook, which needs q and k themselves, those are made). The
  /// output, x + M v with v the third of the stacked values (value_weights), is then a fused kernel's.
  torch::Tensor fused_mixing(const ParamView& p, const torch::Tensor& x, const torch::Tensor& ln_w,
                             const torch::Tensor& ln_b) const {
    const torch::Tensor &w = p["qkv.weight"], &dw = p["qkv_dwconv.weight"];
    const int64_t c = x.size(1);
    const torch::Tensor w_qk = w.narrow(0, 0, 2 * c), dw_qk = dw.narrow(0, 0, 2 * c);
    torch::Tensor matrix;
    if (AttentionTiling::active() != nullptr) {  // the hook needs q and k themselves
      matrix = matrix_of(ops::norm_pointwise_depthwise(x, ln_w, ln_b, w_qk, dw_qk), p);
    } else {
      const auto sums = ops::attention_gram(x, ln_w, ln_b, w_qk, dw_qk, heads_);
      matrix = attention_matrix(sums[0], sums[1], sums[2], p["temperature"]);
    }
    return attention_mixing(matrix, p["project_out.weight"]);
  }

  /// The weights of v = dwconv3x3(W_v LN(x)) for C channels: {W_v, the depthwise kernels}.
  static std::pair<torch::Tensor, torch::Tensor> value_weights(const ParamView& p, int64_t c) {
    return {p["qkv.weight"].narrow(0, 2 * c, c), p["qkv_dwconv.weight"].narrow(0, 2 * c, c)};
  }

 private:
  /// The attention matrix of the stacked q and k (N x 2C x H x W).
  torch::Tensor matrix_of(const torch::Tensor& qk, const ParamView& p) const {
    const auto parts = qk.chunk(2, 1);
    return attention_matrix(parts[0], parts[1], p["temperature"], heads_);
  }

  int64_t heads_;
  Conv qkv_{nullptr}, qkv_dwconv_{nullptr};
};
TORCH_MODULE(Attention);

/// Gated-Dconv feed-forward network (GDFN) with exact (erf) GELU gating.
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, double expansion) {
    const auto hidden = static_cast<int64_t>(dim * expansion);
    project_in_ = register_module("project_in", conv1x1(dim, 2 * hidden));
    dwconv_ = register_module("dwconv", dwconv3x3(2 * hidden));
    project_out_ = register_module("project_out", conv1x1(hidden, dim));
  }

  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& x) const {
    const torch::Tensor expanded = dwconv_->forward_with(p.sub("dwconv"), project_in_->forward_with(p.sub("project_in"), x));
    return project_out_->forward_with(p.sub("project_out"), ops::gelu_gate(expanded));
  }

 private:
  Conv project_in_{nullptr}, dwconv_{nullptr}, project_out_{nullptr};
};
TORCH_MODULE(FeedForward);

/// Restormer transformer block: x += MDTA(LN(x)); x += GDFN(LN(x)).
class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(int64_t dim, int64_t heads, double ffn_expansion) {
    norm1_ = register_module("norm1", LayerNorm(dim));
    attn_ = register_module("attn", Attention(dim, heads));
    norm2_ = register_module("norm2", LayerNorm(dim));
    ffn_ = register_module("ffn", FeedForward(dim, ffn_expansion));
  }

  torch::Tensor forward_with(const ParamView& p, torch::Tensor x) const {
    // Inference on CPU: LayerNorm, 1x1 and depthwise convolutions fused into two passes over cache-sized tiles
    // (the same function): one for the attention's matrices, one for the rest of the block.
    const torch::Tensor &qkv_w = p["attn.qkv.weight"], &qkv_dw = p["attn.qkv_dwconv.weight"];
    const torch::Tensor &in_w = p["ffn.project_in.weight"], &in_dw = p["ffn.dwconv.weight"];
    const torch::Tensor& out_w = p["ffn.project_out.weight"];
    const torch::Tensor &ln1_w = p["norm1.body.weight"], &ln1_b = p["norm1.body.bias"];
    const torch::Tensor &ln2_w = p["norm2.body.weight"], &ln2_b = p["norm2.body.bias"];
    if (ops::inference_fusable({&x, &qkv_w, &qkv_dw, &in_w, &in_dw, &out_w, &ln1_w, &ln1_b, &ln2_w, &ln2_b})) {
      const torch::Tensor mixing = attn_->fused_mixing(p.sub("attn"), x, ln1_w, ln1_b);
      const auto [v_w, v_dw] = AttentionImpl::value_weights(p.sub("attn"), x.size(1));
      return ops::attention_feed_forward(x, ln1_w, ln1_b, v_w, v_dw, mixing, ln2_w, ln2_b, in_w, in_dw, out_w);
    }
    x = x + attn_->forward_with(p.sub("attn"), norm1_->forward_with(p.sub("norm1"), x));
    return x + ffn_->forward_with(p.sub("ffn"), norm2_->forward_with(p.sub("norm2"), x));
  }

 private:
  LayerNorm norm1_{nullptr}, norm2_{nullptr};
  Attention attn_{nullptr};
  FeedForward ffn_{nullptr};
};
TORCH_MODULE(TransformerBlock);

/// A registered list of transformer blocks named `<name>.0`, `<name>.1`, ... applied in order.
class TransformerStack {
 public:
  TransformerStack() = default;
  TransformerStack(torch::nn::Module& owner, const std::string& name, int64_t depth, int64_t dim, int64_t heads,
                   double ffn_expansion)
      : name_(name) {
    torch::nn::ModuleList list;
    for (int64_t i = 0; i < depth; ++i) {
      TransformerBlock block(dim, heads, ffn_expansion);
      list->push_back(block);
      blocks_.push_back(block);
    }
    owner.register_module(name, list);
  }

  torch::Tensor forward_with(const ParamView& p, torch::Tensor x) const {
    const ParamView mine = p.sub(name_);
    // Moved in, so that each block's input is freed as soon as the block is done with it.
    for (size_t i = 0; i < blocks_.size(); ++i) x = blocks_[i]->forward_with(mine.sub(std::to_string(i)), std::move(x));
    return x;
  }

 private:
  std::string name_;
  std::vector<TransformerBlock> blocks_;
};

}  // namespace tdfusion::nn

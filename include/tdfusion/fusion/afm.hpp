#pragma once
// AFM: the cross-modal fusion module of ReFusion (spec section 4). Each modality attends to the other with
// transposed attention, then a gated depthwise feed-forward mixes the concatenated features.

#include "tdfusion/nn/layers.hpp"

#include <string>
#include <utility>

namespace tdfusion::fusion {

class AfmImpl : public torch::nn::Module {
 public:
  AfmImpl(int64_t dim, int64_t heads) : heads_(heads) {
    register_parameter("temperature1", torch::ones({heads, 1, 1}));
    register_parameter("temperature2", torch::ones({heads, 1, 1}));
    qkv1_ = reg("qkv1", nn::conv1x1(dim, 3 * dim));
    qkv1_dwconv_ = reg("qkv1_dwconv", nn::dwconv3x3(3 * dim));
    qkv2_ = reg("qkv2", nn::conv1x1(dim, 3 * dim));
    qkv2_dwconv_ = reg("qkv2_dwconv", nn::dwconv3x3(3 * dim));
    reg("project_mid1", nn::conv1x1(dim, dim));  // weights only: folded into channel_attention
    reg("project_mid2", nn::conv1x1(dim, dim));
    // The gated half's weights, stacked for one gated feed-forward (gated_weights).
    reg("project_E", nn::conv1x1(2 * dim, 8 * dim));
    reg("project_E_d", nn::dwconv3x3(8 * dim));
    reg("project_E1", nn::conv1x1(dim, 4 * dim));
    reg("project_E1_d", nn::dwconv3x3(4 * dim));
    reg("project_E2", nn::conv1x1(dim, 4 * dim));
    reg("project_E2_d", nn::dwconv3x3(4 * dim));
    reg("project_out1", nn::conv1x1(4 * dim, 2 * dim));
    reg("project_out2", nn::conv1x1(4 * dim, 2 * dim));
  }

  /// x1, x2: N x dim x H x W features of the two modalities; returns N x 2dim x H x W.
  torch::Tensor forward_with(const ParamView& p, torch::Tensor x1, torch::Tensor x2) const {
    const bool fused = fusable(p, x1, x2);
    // Moved into the fused path, so that each input is freed as soon as its half of the output is written.
    const torch::Tensor out = fused ? fused_cross_attention(p, std::move(x1), std::move(x2)) : cross_attention(p, x1, x2);
    const GatedWeights w = gated_weights(p);
    const torch::Tensor none;  // no LayerNorm before the fused kernel here
    if (fused) return nn::ops::feed_forward_block(out, none, none, w.pointwise, w.depthwise, w.projection);
    const torch::Tensor expanded = nn::ops::depthwise3x3(nn::ops::conv1x1(out, w.pointwise), w.depthwise);
    return out + nn::ops::conv1x1(nn::ops::gelu_gate(expanded), w.projection);
  }

 private:
  /// [x1 + A(q2, k1) v1; x2 + A(q1, k2) v2]: cross attention, modality 1's values gathered with modality 2's
  /// queries and vice versa (A: nn::channel_attention with the projection project_mid folded in).
  torch::Tensor cross_attention(const ParamView& p, const torch::Tensor& x1, const torch::Tensor& x2) const {
    auto qkv = [&p](const nn::Conv& pointwise, const nn::Conv& depthwise, const std::string& name,
                    const torch::Tensor& x) {
      return depthwise->forward_with(p.sub(name + "_dwconv"), pointwise->forward_with(p.sub(name), x)).chunk(3, 1);
    };
    const auto qkv1 = qkv(qkv1_, qkv1_dwconv_, "qkv1", x1), qkv2 = qkv(qkv2_, qkv2_dwconv_, "qkv2", x2);
    return torch::cat(
        {x1 + nn::channel_attention(qkv2[0], qkv1[1], qkv1[2], p["temperature1"], heads_, p["project_mid1.weight"]),
         x2 + nn::channel_attention(qkv1[0], qkv2[1], qkv2[2], p["temperature2"], heads_, p["project_mid2.weight"])},
        1);
  }

  /// cross_attention on the fused inference path: the two attention matrices from one pass over both inputs
  /// (ops::cross_attention_gram; under an AttentionTiling hook, which needs q and k themselves, those are made),
  /// then each half of the output with its residual (ops::attention_output): none of q, k and v stored.
  torch::Tensor fused_cross_attention(const ParamView& p, torch::Tensor x1, torch::Tensor x2) const {
    const torch::Tensor none;  // no LayerNorm here
    const int64_t d = x1.size(1);
    const auto qk = [&](const std::string& name) {
      return std::make_pair(p[name + ".weight"].narrow(0, 0, 2 * d), p[name + "_dwconv.weight"].narrow(0, 0, 2 * d));
    };
    const auto [w1, dw1] = qk("qkv1");
    const auto [w2, dw2] = qk("qkv2");
    torch::Tensor matrix1, matrix2;
    if (nn::AttentionTiling::active() != nullptr) {
      const auto qk1 = nn::ops::norm_pointwise_depthwise(x1, none, none, w1, dw1).chunk(2, 1);
      const auto qk2 = nn::ops::norm_pointwise_depthwise(x2, none, none, w2, dw2).chunk(2, 1);
      matrix1 = nn::attention_matrix(qk2[0], qk1[1], p["temperature1"], heads_);
      matrix2 = nn::attention_matrix(qk1[0], qk2[1], p["temperature2"], heads_);
    } else {
      // {q2 k1^T, q1 k2^T, |q1|, |k1|, |q2|, |k2|}
      const auto sums = nn::ops::cross_attention_gram(x1, w1, dw1, x2, w2, dw2, heads_);
      matrix1 = nn::attention_matrix(sums[0], sums[4], sums[3], p["temperature1"]);
      matrix2 = nn::attention_matrix(sums[1], sums[2], sums[5], p["temperature2"]);
    }
    torch::Tensor out = torch::empty({x1.size(0), 2 * d, x1.size(2), x1.size(3)}, x1.options());
    auto output = [&](const std::string& name, torch::Tensor x, const torch::Tensor& matrix,
                      const std::string& projection, int64_t first) {
      nn::ops::attention_output(x, none, none, p[name + ".weight"].narrow(0, 2 * d, d),
                                p[name + "_dwconv.weight"].narrow(0, 2 * d, d),
                                nn::attention_mixing(matrix, p[projection + ".weight"]), out.narrow(1, first, d));
    };
    // Each input is freed as soon as its half of the output is written.
    output("qkv1", std::move(x1), matrix1, "project_mid1", 0);
    output("qkv2", std::move(x2), matrix2, "project_mid2", d);
    return out;
  }

  /// Inference on CPU (ops::inference_fusable), where the fused block kernels compute the same function.
  static bool fusable(const ParamView& p, const torch::Tensor& x1, const torch::Tensor& x2) {
    return nn::ops::inference_fusable(
        {&x1, &x2, &p["qkv1.weight"], &p["qkv1_dwconv.weight"], &p["qkv2.weight"], &p["qkv2_dwconv.weight"],
         &p["project_E.weight"], &p["project_E_d.weight"], &p["project_E1.weight"], &p["project_E1_d.weight"],
         &p["project_E2.weight"], &p["project_E2_d.weight"], &p["project_out1.weight"], &p["project_out2.weight"]});
  }

  /// The gated half as one gated feed-forward over out = [x1; x2]: a = W_E out, b = [W_E1 x1; W_E2 x2] =
  /// W_b out with a block-diagonal W_b, each through its depthwise convolution, then
  /// out + [W_out1, W_out2] (gelu(a) * b) = out + W_out1 (gelu(a1) b1) + W_out2 (gelu(a2) b2). One gate over
  /// [a; b] (ops::gelu_gate) has one gradient tensor, and inference runs it as kernels::feed_forward_block
  /// without LayerNorm, its intermediates (up to 16 dim channels) in cache. W_b's zero blocks cost 8 dim^2
  /// multiply-adds per pixel (3% of ReFusion's).
  struct GatedWeights {
    torch::Tensor pointwise, depthwise, projection;
  };
  static GatedWeights gated_weights(const ParamView& p) {
    const torch::Tensor &e1 = p["project_E1.weight"], &e2 = p["project_E2.weight"];
    const torch::Tensor zeros = torch::zeros(e1.sizes(), e1.options());
    const torch::Tensor w_b = torch::cat({torch::cat({e1, zeros}, 1), torch::cat({zeros, e2}, 1)}, 0);
    return {torch::cat({p["project_E.weight"], w_b}, 0),
            torch::cat({p["project_E_d.weight"], p["project_E1_d.weight"], p["project_E2_d.weight"]}, 0),
            torch::cat({p["project_out1.weight"], p["project_out2.weight"]}, 1)};
  }

  nn::Conv reg(const char* name, nn::Conv layer) { return register_module(name, layer); }

  int64_t heads_;
  nn::Conv qkv1_{nullptr}, qkv1_dwconv_{nullptr}, qkv2_{nullptr}, qkv2_dwconv_{nullptr};
};
TORCH_MODULE(Afm);

}  // namespace tdfusion::fusion

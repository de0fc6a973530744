#pragma once
// AFM: the cross-modal fusion module of ReFusion (spec section 4). Each modality attends to the other with
// transposed attention, then a gated depthwise feed-forward mixes the concatenated features.

#include "tdfusion/nn/layers.hpp"

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
    project_mid1_ = reg("project_mid1", nn::conv1x1(dim, dim));
    project_mid2_ = reg("project_mid2", nn::conv1x1(dim, dim));
    project_E_ = reg("project_E", nn::conv1x1(2 * dim, 8 * dim));
    project_E_d_ = reg("project_E_d", nn::dwconv3x3(8 * dim));
    project_E1_ = reg("project_E1", nn::conv1x1(dim, 4 * dim));
    project_E1_d_ = reg("project_E1_d", nn::dwconv3x3(4 * dim));
    project_E2_ = reg("project_E2", nn::conv1x1(dim, 4 * dim));
    project_E2_d_ = reg("project_E2_d", nn::dwconv3x3(4 * dim));
    project_out1_ = reg("project_out1", nn::conv1x1(4 * dim, 2 * dim));
    project_out2_ = reg("project_out2", nn::conv1x1(4 * dim, 2 * dim));
  }

  /// x1, x2: N x dim x H x W features of the two modalities; returns N x 2dim x H x W.
  torch::Tensor forward_with(const ParamView& p, torch::Tensor x1, torch::Tensor x2) const {
    auto conv = [&p](const nn::Conv& layer, const char* name, const torch::Tensor& x) {
      return layer->forward_with(p.sub(name), x);
    };
    const auto qkv1 = conv(qkv1_dwconv_, "qkv1_dwconv", conv(qkv1_, "qkv1", x1)).chunk(3, 1);
    const auto qkv2 = conv(qkv2_dwconv_, "qkv2_dwconv", conv(qkv2_, "qkv2", x2)).chunk(3, 1);
    // Cross attention: modality 1's values are gathered with modality 2's queries and vice versa.
    const torch::Tensor o1 = nn::channel_attention(qkv2[0], qkv1[1], qkv1[2], p["temperature1"], heads_);
    const torch::Tensor o2 = nn::channel_attention(qkv1[0], qkv2[1], qkv2[2], p["temperature2"], heads_);
    x1 = x1 + conv(project_mid1_, "project_mid1", o1);
    x2 = x2 + conv(project_mid2_, "project_mid2", o2);
    const torch::Tensor out = torch::cat({x1, x2}, 1);

    const auto gates = conv(project_E_d_, "project_E_d", conv(project_E_, "project_E", out)).chunk(2, 1);
    const torch::Tensor y1 =
        nn::ops::gelu_gate(gates[0], conv(project_E1_d_, "project_E1_d", conv(project_E1_, "project_E1", x1)));
    const torch::Tensor y2 =
        nn::ops::gelu_gate(gates[1], conv(project_E2_d_, "project_E2_d", conv(project_E2_, "project_E2", x2)));
    return out + conv(project_out1_, "project_out1", y1) + conv(project_out2_, "project_out2", y2);
  }

 private:
  nn::Conv reg(const char* name, nn::Conv layer) { return register_module(name, layer); }

  int64_t heads_;
  nn::Conv qkv1_{nullptr}, qkv1_dwconv_{nullptr}, qkv2_{nullptr}, qkv2_dwconv_{nullptr};
  nn::Conv project_mid1_{nullptr}, project_mid2_{nullptr}, project_E_{nullptr}, project_E_d_{nullptr};
  nn::Conv project_E1_{nullptr}, project_E1_d_{nullptr}, project_E2_{nullptr}, project_E2_d_{nullptr};
  nn::Conv project_out1_{nullptr}, project_out2_{nullptr};
};
TORCH_MODULE(Afm);

}  // namespace tdfusion::fusion

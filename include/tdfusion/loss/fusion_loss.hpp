#pragma once
// The learnable fusion loss of spec section 2:
//   L_int  = mean((w_A (A - F))^2) + mean((w_B (B - F))^2)      (the weight sits inside the square)
//   L_grad = mean|Sx(F) - Mx| + mean|Sy(F) - My|,  M = the signed source gradient of larger magnitude
//   L_f    = L_int + alpha * L_grad

#include "tdfusion/core/checks.hpp"

#include <torch/torch.h>

namespace tdfusion::loss {

/// Sobel cross-correlation with zero padding 1; `y_direction` picks [[-1,-2,-1],[0,0,0],[1,2,1]],
/// otherwise [[-1,0,1],[-2,0,2],[-1,0,1]]. x: N x 1 x H x W.
inline torch::Tensor sobel(const torch::Tensor& x, bool y_direction) {
  torch::Tensor kernel = torch::tensor({-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0}, x.options()).view({1, 1, 3, 3});
  if (y_direction) kernel = kernel.transpose(2, 3).contiguous();
  return torch::conv2d(x, kernel, /*bias=*/{}, /*stride=*/1, /*padding=*/1);
}

/// Per pixel, the signed value of `a` where |a| >= |b| (ties go to a), else of `b`.
inline torch::Tensor larger_magnitude(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::where(a.abs() >= b.abs(), a, b);
}

struct FusionLossTerms {
  torch::Tensor total;      ///< L_int + alpha * L_grad
  torch::Tensor intensity;  ///< L_int
  torch::Tensor gradient;   ///< L_grad
};

/// The fusion loss. fused, ir, vi: N x 1 x H x W; weights: N x 2 x H x W (channel 0 for ir, 1 for vi).
inline FusionLossTerms fusion_loss(const torch::Tensor& fused, const torch::Tensor& ir, const torch::Tensor& vi,
                                   const torch::Tensor& weights, double alpha = 1.0) {
  check_pair_shapes(ir, vi);
  TORCH_CHECK(fused.sizes() == ir.sizes(), "tdfusion: fused image shape ", fused.sizes(),
              " differs from the source shape ", ir.sizes());
  TORCH_CHECK(weights.dim() == 4 && weights.size(1) == 2 && weights.size(0) == ir.size(0) &&
                  weights.size(2) == ir.size(2) && weights.size(3) == ir.size(3),
              "tdfusion: loss weights must be N x 2 x H x W matching the images, got ", weights.sizes());
  const torch::Tensor w_ir = weights.narrow(1, 0, 1), w_vi = weights.narrow(1, 1, 1);
  FusionLossTerms terms;
  terms.intensity = (w_ir * (ir - fused)).pow(2).mean() + (w_vi * (vi - fused)).pow(2).mean();
  const torch::Tensor mx = larger_magnitude(sobel(ir, false), sobel(vi, false));
  const torch::Tensor my = larger_magnitude(sobel(ir, true), sobel(vi, true));
  terms.gradient = (sobel(fused, false) - mx).abs().mean() + (sobel(fused, true) - my).abs().mean();
  terms.total = terms.intensity + alpha * terms.gradient;
  return terms;
}

/// The fusion-loss policy of the paper: L_int with the generator's weights + alpha * L_grad (fusion_loss).
/// A policy of another form offers the same call: (fused, ir, vi, weights) -> scalar, differentiable in
/// fused and weights.
struct TdfusionLoss {
  TdfusionLoss() = default;
  /// @param gradient_weight  alpha, the weight of the gradient term (the paper: 1)
  explicit TdfusionLoss(double gradient_weight) : gradient_weight(gradient_weight) {}

  torch::Tensor operator()(const torch::Tensor& fused, const torch::Tensor& ir, const torch::Tensor& vi,
                           const torch::Tensor& weights) const {
    return fusion_loss(fused, ir, vi, weights, gradient_weight).total;
  }

  double gradient_weight = 1.0;
};

}  // namespace tdfusion::loss

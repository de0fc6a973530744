#pragma once
// Outer update policy of the meta step (the release's loss-generator update):
//   phi <- phi - lr * g / max|g|,  max|g| the largest absolute entry over *all* parameters' gradients.
// The step size is thereby independent of the hypergradient's scale, which spans orders of magnitude.

#include <torch/torch.h>

#include <vector>

namespace tdfusion::meta {

struct MaxNormalizedSgd {
  /// Updates `params` in place; returns max|g| (0 means no gradient reached the parameters: no update).
  double step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads, double lr) const {
    TORCH_CHECK(params.size() == grads.size(), "tdfusion: ", params.size(), " parameters but ", grads.size(),
                " gradients");
    torch::NoGradGuard no_grad;
    double max_abs = 0.0;
    for (const auto& g : grads) max_abs = std::max(max_abs, g.abs().max().item<double>());
    TORCH_CHECK(std::isfinite(max_abs), "tdfusion: the loss generator's hypergradient is not finite");
    if (max_abs == 0.0) return 0.0;
    for (size_t i = 0; i < params.size(); ++i) params[i].sub_(grads[i], lr / max_abs);
    return max_abs;
  }
};

}  // namespace tdfusion::meta

#pragma once
// FixedWeights: the "predefined loss" baseline of the ablation. Constant weights (0.5 / 0.5 by default),
// no parameters, so the meta step has nothing to learn and the bilevel optimiser skips it.

#include "tdfusion/core/checks.hpp"

#include <torch/torch.h>

namespace tdfusion::lossgen {

class FixedWeightsImpl : public torch::nn::Module {
 public:
  explicit FixedWeightsImpl(double ir_weight = 0.5) : ir_weight_(ir_weight) {
    TORCH_CHECK(ir_weight >= 0.0 && ir_weight <= 1.0, "tdfusion: FixedWeights needs an infrared weight in [0,1], got ",
                ir_weight);
  }

  /// Weights N x 2 x H x W: ir_weight and 1 - ir_weight everywhere.
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) {
    check_pair_shapes(ir, vi);
    return torch::cat({torch::full_like(ir, ir_weight_), torch::full_like(vi, 1.0 - ir_weight_)}, 1);
  }

 private:
  double ir_weight_;
};
TORCH_MODULE(FixedWeights);

}  // namespace tdfusion::lossgen

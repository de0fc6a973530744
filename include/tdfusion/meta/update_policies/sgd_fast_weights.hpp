#pragma once
// Inner update policy of the meta step: one plain SGD step that yields fast weights
// theta' = theta - lr * grad as new graph-carrying tensors (never written in place), so that theta' stays a
// differentiable function of the loss generator's parameters.

#include "tdfusion/core/param_view.hpp"

#include <torch/torch.h>

#include <vector>

namespace tdfusion::meta {

struct SgdFastWeights {
  ParamDict fast_weights(const ParamDict& weights, const std::vector<torch::Tensor>& grads, double lr) const {
    TORCH_CHECK(weights.size() == grads.size(), "tdfusion: ", weights.size(), " weights but ", grads.size(),
                " gradients");
    ParamDict fast;
    for (size_t i = 0; i < grads.size(); ++i) fast.insert(weights[i].key(), weights[i].value() - lr * grads[i]);
    return fast;
  }
};

}  // namespace tdfusion::meta

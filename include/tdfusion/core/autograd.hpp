#pragma once
// One wrapper around torch::autograd::grad with every argument named. The positional order of
// (outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused) is a classic trap: passing
// create_graph in the 4th slot silently drops the second-order terms the learnable loss learns through.

#include <torch/torch.h>

#include <vector>

namespace tdfusion {

struct GradOptions {
  bool retain_graph = false;  ///< keep the graph of `output` for another backward pass
  bool create_graph = false;  ///< make the gradients differentiable (needed for fast weights)
};

/// The vector-Jacobian product sum_j grad_outputs[j]^T d outputs[j] / d inputs. Inputs the outputs do not depend
/// on (e.g. unused parameters) get zeros, so callers can always pair gradients with parameters one to one.
inline std::vector<torch::Tensor> gradients(const std::vector<torch::Tensor>& outputs,
                                            const std::vector<torch::Tensor>& inputs,
                                            const std::vector<torch::Tensor>& grad_outputs, GradOptions options = {}) {
  std::vector<torch::Tensor> grads = torch::autograd::grad(/*outputs=*/outputs, /*inputs=*/inputs,
                                                           /*grad_outputs=*/grad_outputs,
                                                           /*retain_graph=*/options.retain_graph,
                                                           /*create_graph=*/options.create_graph,
                                                           /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = torch::zeros_like(inputs[i]);
  }
  return grads;
}

/// d output / d inputs of a scalar output (zeros for inputs it does not depend on).
inline std::vector<torch::Tensor> gradients(const torch::Tensor& output, const std::vector<torch::Tensor>& inputs,
                                            GradOptions options = {}) {
  TORCH_CHECK(output.numel() == 1, "tdfusion: gradients() needs a scalar output, got shape ", output.sizes());
  return gradients(std::vector<torch::Tensor>{output}, inputs, {}, options);
}

}  // namespace tdfusion

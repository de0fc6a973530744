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

/// d output / d inputs. Inputs the output does not depend on (e.g. unused parameters) get zeros,
/// so callers can always pair gradients with parameters one to one.
inline std::vector<torch::Tensor> gradients(const torch::Tensor& output, const std::vector<torch::Tensor>& inputs,
                                            GradOptions options = {}) {
  TORCH_CHECK(output.numel() == 1, "tdfusion: gradients() needs a scalar output, got shape ", output.sizes());
  std::vector<torch::Tensor> grads = torch::autograd::grad(/*outputs=*/{output}, /*inputs=*/inputs,
                                                           /*grad_outputs=*/{},
                                                           /*retain_graph=*/options.retain_graph,
                                                           /*create_graph=*/options.create_graph,
                                                           /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = torch::zeros_like(inputs[i]);
  }
  return grads;
}

}  // namespace tdfusion

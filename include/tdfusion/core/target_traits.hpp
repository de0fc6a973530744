#pragma once
// How a task's label type travels with its images: batched (concatenated along the batch) and moved to a
// device. The bilevel optimiser and the data sets need nothing else of a label type.

#include <torch/torch.h>

#include <vector>

namespace tdfusion {

/// Batching and moving of a task's label type `Target`. Specialise it for a custom label type with
///   static Target concat(const std::vector<Target>& parts);              // along the batch, in order
///   static Target to(const Target& target, const torch::Device& device);
/// torch::Tensor labels (e.g. N x H x W class maps) are concatenated along dimension 0.
template <class Target>
struct TargetTraits;

template <>
struct TargetTraits<torch::Tensor> {
  static torch::Tensor concat(const std::vector<torch::Tensor>& parts) { return torch::cat(parts, 0); }
  static torch::Tensor to(const torch::Tensor& target, const torch::Device& device) { return target.to(device); }
};

}  // namespace tdfusion

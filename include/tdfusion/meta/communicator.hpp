#pragma once
// What the bilevel optimiser needs from data-parallel training: the processes' count, this process's rank,
// and averaging / broadcasting tensors across processes. tdfusion::distributed::ProcessGroupCommunicator
// implements it with LibTorch's c10d process groups; the optimiser itself does not depend on c10d.

#include <torch/torch.h>

#include <vector>

namespace tdfusion::meta {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  /// Replaces every tensor, in place and on every process, by its mean over the processes.
  virtual void average(const std::vector<torch::Tensor>& tensors) = 0;
  /// Copies rank 0's values of `tensors` into every process's tensors, in place.
  virtual void broadcast(const std::vector<torch::Tensor>& tensors) = 0;
};

}  // namespace tdfusion::meta

#pragma once
// Inference on a module that may be training: eval mode for a scope, then the previous mode again.

#include <torch/torch.h>

namespace tdfusion {

/// Puts a module in eval mode for a scope, then restores its training flag (also when an exception leaves).
class EvalMode {
 public:
  explicit EvalMode(torch::nn::Module& module) : module_(module), was_training_(module.is_training()) { module.eval(); }
  ~EvalMode() { module_.train(was_training_); }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  torch::nn::Module& module_;
  bool was_training_;
};

}  // namespace tdfusion

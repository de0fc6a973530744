#pragma once
// The extension point of channel attention. Restormer's channel attention is global: its matrices sum over
// every pixel of the image. A caller that evaluates a network piecewise (fusion::fuse_tiled) must therefore
// supply the image-wide matrices itself; nn::channel_attention asks the hook installed on its thread for them.
// It lives here, below the attention it serves, so that the building blocks stay unaware of tiling: only this
// one thread-local pointer check is paid when no hook is installed.

#include <torch/torch.h>

#include <cstdint>

namespace tdfusion::nn {

/// Per-thread replacement of channel_attention's matrix, installed by a Scope for the duration of one
/// computation.
class AttentionTiling {
 public:
  virtual ~AttentionTiling() = default;

  /// Called by channel_attention instead of computing the attention matrix (N x heads x d x d, d = C / heads)
  /// from q and k itself, with the same arguments (heads already validated).
  virtual torch::Tensor matrix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& temperature,
                               int64_t heads) = 0;

  /// The hook installed on this thread, or nullptr.
  static AttentionTiling* active() { return slot(); }

  /// Installs a hook on this thread until destruction, then restores the previous one (scopes nest).
  class Scope {
   public:
    explicit Scope(AttentionTiling& hook) : previous_(slot()) { slot() = &hook; }
    ~Scope() { slot() = previous_; }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    AttentionTiling* previous_;
  };

 private:
  static AttentionTiling*& slot() {
    thread_local AttentionTiling* hook = nullptr;
    return hook;
  }
};

}  // namespace tdfusion::nn

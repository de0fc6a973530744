#pragma once
// Options of the bilevel optimiser. Defaults are the authors' release (spec section 3).

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace tdfusion::meta {

struct BilevelOptions {
  TORCH_ARG(int64_t, epochs) = 40;                 ///< the release trains 40 (the paper says 50)
  TORCH_ARG(int64_t, meta_steps_per_epoch) = 200;  ///< M: phase-A steps per epoch
  TORCH_ARG(double, fusion_lr) = 1e-4;             ///< Adam learning rate of the fusion network
  TORCH_ARG(double, task_lr) = 1e-4;               ///< Adam learning rate of the task network
  TORCH_ARG(double, inner_lr) = 0.0;               ///< beta of the fast-weight step; 0: F's current lr
  TORCH_ARG(double, meta_lr) = 0.0;                ///< step of the max-normalised G update; 0: F's current lr
  TORCH_ARG(int64_t, lr_step_epochs) = 10;         ///< StepLR period for F and T
  TORCH_ARG(double, lr_gamma) = 0.1;               ///< StepLR factor
  TORCH_ARG(bool, modality_swap) = true;           ///< append every pair with ir and vi exchanged
  /// Pairs per step over all processes (the release: 1); with a Communicator each process takes its share.
  TORCH_ARG(int64_t, batch_pairs) = 1;
  TORCH_ARG(bool, task_lookahead) = true;          ///< one Adam step of T before the outer loss, then restore
  /// Differentiate through the inner gradient (create_graph). Off, the loss generator gets no gradient at
  /// all: it learns only through second-order terms. Kept as an option to demonstrate exactly that.
  TORCH_ARG(bool, second_order) = true;
  TORCH_ARG(torch::Device, device) = torch::kCPU;  ///< where the networks live; batches are moved there
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
  TORCH_ARG(uint64_t, seed) = 0;                   ///< seeds torch's generator at every epoch start
  /// Visit the data in a new order every epoch, drawn from the seed (data/sample_order.hpp); false keeps the
  /// data set's own order.
  TORCH_ARG(bool, shuffle) = true;
  TORCH_ARG(std::string, checkpoint_path) = "";    ///< written atomically after every epoch when not empty
};

/// Where a step report sits in training: epoch `epoch` of `epochs` (counted from 0), step `step` of the
/// `steps` of its kind in that epoch.
struct StepPosition {
  int64_t epoch = 0, epochs = 0, step = 0, steps = 0;
};

/// What one phase-A (meta) step did.
struct MetaStepReport : StepPosition {
  double fusion_loss = 0.0;        ///< inner L_f on the meta-train batch (with G's weights)
  double task_loss = 0.0;          ///< outer task loss of F with fast weights on the meta-test batch
  double hypergradient_max = 0.0;  ///< max|dL_task/dphi| over G's parameters
};

/// What one phase-B step did.
struct TrainStepReport : StepPosition {
  double fusion_loss = 0.0, task_loss = 0.0;
};

/// What one phase-B step of F on a pair without labels did (see BilevelOptimizer::set_fusion_data).
struct FusionStepReport : StepPosition {
  double fusion_loss = 0.0;
};

/// Means over an epoch's phase B (the fusion loss over all of F's steps, the task loss over T's).
struct EpochReport {
  int64_t epoch = 0;   ///< the epoch just finished, counted from 0
  int64_t epochs = 0;  ///< epochs to train in all
  double fusion_loss = 0.0, task_loss = 0.0, learning_rate = 0.0;
};

}  // namespace tdfusion::meta

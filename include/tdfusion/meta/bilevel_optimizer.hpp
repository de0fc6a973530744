#pragma once
// BilevelOptimizer: the alternating bilevel optimisation of TDFusion (spec section 3), composed at compile
// time from a fusion policy F(theta), a loss-generator policy G(phi), a task policy T(psi) and two update
// policies of its own.
//
// Per epoch:
//   Phase A (meta_steps_per_epoch steps, skipped when G has no parameters), on consecutive batches
//   (meta-train, meta-test):
//     1. snapshot T; look-ahead Adam step of T on T(F_theta(meta-train).detach())
//     2. inner:  L_f(F_theta(crop), G_phi(crop)); theta' = InnerUpdate(theta, dL_f/dtheta) with create_graph,
//                so theta' is a differentiable function of phi
//     3. outer:  L_task = T(F_theta'(meta-test)); g = dL_task/dphi (second order, through theta');
//                phi <- OuterUpdate(phi, g); restore T's snapshot
//   Phase B (one pass over the data, G frozen):
//     4. Adam step of F on L_f(F_theta(crop), G_phi(crop).detach())
//     5. Adam step of T on T(F_theta(image).detach())
//     with set_fusion_data, also one pass of step 4 alone over pairs without labels, interleaved evenly
//   StepLR on F's and T's learning rates; beta (inner and G step) follows F's current rate by default.
//
// Usage:
//   using Trainer = tdfusion::meta::BilevelOptimizer<fusion::ReFusion, lossgen::Lpn, task::SegFormer>;
//   Trainer trainer(fusion::ReFusion(), lossgen::Lpn(), task::SegFormer(), BilevelOptions().epochs(2));
//   const FitResult result = trainer.fit(dataset, meta::PrintLosses(std::cout));
//
// A dataset is any object with `size_t size() const` and `PairBatch<Target> get(uint64_t counter) const`:
// the optimiser draws samples with an ever-increasing counter (saved in checkpoints), so a dataset that
// derives its randomness from the counter makes runs reproducible and resumable. A step takes
// options.batch_pairs() consecutive draws; with options.shuffle() each epoch of draws visits the data set in
// an order drawn from the seed (data/sample_order.hpp).
//
// Data parallelism (set_communicator): every process takes its share of each step's samples, and the
// optimiser averages what the combined batch would sum, so N processes compute the same updates as one
// process with batch_pairs() pairs: the task network's gradients (look-ahead and phase B), the fusion
// network's (phase B), the inner gradient that forms theta' (its value; each process differentiates its own
// share), the outer gradient dL_task/dtheta', and the hypergradient. Rank 0 writes checkpoints and decides
// when a callback stops training.

#include "tdfusion/core/autograd.hpp"
#include "tdfusion/core/eval_mode.hpp"
#include "tdfusion/core/param_view.hpp"
#include "tdfusion/core/traits.hpp"
#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/data/sample_order.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/loss/fusion_loss.hpp"
#include "tdfusion/meta/callbacks.hpp"
#include "tdfusion/meta/communicator.hpp"
#include "tdfusion/meta/options.hpp"
#include "tdfusion/meta/update_policies/max_normalized_sgd.hpp"
#include "tdfusion/meta/update_policies/sgd_fast_weights.hpp"
#include "tdfusion/meta/validation.hpp"

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace tdfusion::meta {

/// Why fit() returned.
enum class FitStop {
  completed,  ///< options.epochs() epochs are done
  callback,   ///< a callback asked to stop (an interrupted epoch is neither counted nor checkpointed)
};

/// What fit() did: why it stopped, the epoch reached, and the last report of each kind (empty when none came).
struct FitResult {
  FitStop stop = FitStop::completed;
  int64_t epoch = 0;  ///< epochs completed in all (the trainer's epoch())
  std::optional<MetaStepReport> last_meta_step;
  std::optional<TrainStepReport> last_train_step;
  std::optional<FusionStepReport> last_fusion_step;
  std::optional<EpochReport> last_epoch;
  std::optional<ValidationReport> last_validation;
};

/// The bilevel optimiser of TDFusion.
/// @tparam FusionPolicy         the fusion network F(theta): a module holder with `forward(ir, vi)` and the
///                              functional `forward_with(const ParamView&, ir, vi) const` (core/traits.hpp)
/// @tparam LossGeneratorPolicy  the loss generator G(phi): a module holder whose `forward(ir, vi)` returns
///                              N x 2 x H x W per-pixel weights (lossgen::Lpn; lossgen::FixedWeights has none
///                              to learn, which turns phase A off)
/// @tparam TaskPolicy           the task network T(psi): a module holder with `using Target`, a TargetTraits
///                              specialisation for it, and `loss(fused, target)`
/// @tparam FusionLossPolicy     the form of the fusion loss: `Tensor operator()(fused, ir, vi, weights) const`
///                              (loss::TdfusionLoss, the paper's)
/// @tparam InnerUpdatePolicy    theta' from theta and dL_f/dtheta, differentiably (SgdFastWeights)
/// @tparam OuterUpdatePolicy    G's update from the hypergradient (MaxNormalizedSgd, the release's)
/// Defining TDFUSION_DISABLE_TYPE_CHECKS before including this header turns the readable compile-time checks
/// of the policies off (the compiler's own errors remain).
template <class FusionPolicy, class LossGeneratorPolicy, class TaskPolicy, class FusionLossPolicy = loss::TdfusionLoss,
          class InnerUpdatePolicy = SgdFastWeights, class OuterUpdatePolicy = MaxNormalizedSgd>
class BilevelOptimizer {
#ifndef TDFUSION_DISABLE_TYPE_CHECKS
  static_assert(traits::check_fusion_policy<FusionPolicy>());
  static_assert(traits::check_loss_generator_policy<LossGeneratorPolicy>());
  static_assert(traits::check_task_policy<TaskPolicy>());
  static_assert(traits::check_fusion_loss_policy<FusionLossPolicy>());
  static_assert(traits::check_inner_update_policy<InnerUpdatePolicy>());
  static_assert(traits::check_outer_update_policy<OuterUpdatePolicy>());
#endif

 public:
  using Target = typename traits::impl_t<TaskPolicy>::Target;
  using Batch = data::PairBatch<Target>;

  /// Takes the three networks (holders share their modules with the caller) and moves them to
  /// options.device() / options.dtype().
  /// @param fusion_loss   the fusion loss's form (e.g. loss::TdfusionLoss(alpha) for another gradient weight)
  BilevelOptimizer(FusionPolicy fusion, LossGeneratorPolicy loss_generator, TaskPolicy task,
                   BilevelOptions options = {}, FusionLossPolicy fusion_loss = {},
                   InnerUpdatePolicy inner_update = {}, OuterUpdatePolicy outer_update = {});

  /// Phase A: one meta step on a meta-train and a meta-test batch. Updates G only (T is restored). The first
  /// meta step checks that the task loss depends on the fast weights at all: a fusion policy whose
  /// forward_with reads its module's own weights instead of its ParamView would leave G's hypergradient at
  /// exactly 0, so training stops there with a message saying so.
  /// @param meta_train  the batch of the inner step (fast weights)
  /// @param meta_test   the batch of the outer task loss (another batch, as the release alternates them)
  MetaStepReport meta_step(const Batch& meta_train, const Batch& meta_test);

  /// Phase B: one Adam step of F (with G's frozen loss) and one of T.
  /// @param batch  task inputs with labels and fusion crops (the modality swap is appended when enabled)
  TrainStepReport train_step(const Batch& batch);

  /// Phase B without labels: one Adam step of F (with G's frozen loss) on N x 1 x h x w crops.
  FusionStepReport fusion_step(const torch::Tensor& ir_crop, const torch::Tensor& vi_crop);

  /// Trains from the current epoch to options.epochs(); see the class comment for datasets and
  /// callbacks.hpp for callbacks. Writes a checkpoint after every epoch when options.checkpoint_path() is set,
  /// then, with a validation set (set_validation), validates and hands callbacks a ValidationReport.
  /// @param dataset    any object with `size_t size() const` and `PairBatch<Target> get(uint64_t) const`
  /// @param callbacks  objects callable with some of the report types; returning true stops training
  /// @return why training stopped and the last report of each kind
  template <class Dataset, class... Callbacks>
  FitResult fit(const Dataset& dataset, Callbacks&&... callbacks);

  /// Evaluates F and T on every sample of `dataset` (counters 0 .. size-1, no modality swap), in inference
  /// mode: the mean task loss, the task's metrics and the fusion metrics (see validation.hpp). Changes nothing.
  template <class Dataset>
  ValidationReport validate(const Dataset& dataset, const ValidationOptions& options = {});

  /// Makes fit() validate on `dataset` (kept by value) after every options.every_epochs()-th epoch.
  /// @param dataset  held-out samples, as for fit(); all of them are evaluated each time
  /// @param options  how often, which fusion-metric protocol, task-metric settings
  template <class Dataset>
  void set_validation(Dataset dataset, ValidationOptions options = {});

  /// Gives phase B extra pairs without labels (kept by value; any data set with `size()` and `get(counter)`,
  /// of which only the fusion crops are used): every epoch, F also takes fusion_step on each draw of one pass
  /// over them, interleaved evenly with the labelled steps. G and T still learn from the labelled data only.
  template <class Dataset>
  void set_fusion_data(Dataset dataset);

  /// Trains data-parallel with the other processes of `communicator` (see the class comment): rank 0's
  /// networks are copied to every process now, and every step from here on is shared.
  void set_communicator(std::shared_ptr<Communicator> communicator);

  /// The next step's samples of this process: its share of options.batch_pairs() pairs, concatenated.
  template <class Dataset>
  Batch draw(const Dataset& dataset);

  /// The outer objective L_task(T(F_theta'(meta_test))) with theta' the inner step on meta_train, as a
  /// differentiable function of G's parameters (no look-ahead, nothing updated). Used by meta_step; public
  /// so that the hypergradient can be checked against finite differences.
  torch::Tensor meta_objective(const Batch& meta_train, const Batch& meta_test);

  /// Fuses a pair with the current fusion network (inference: no graph, eval mode).
  /// @param ir, vi  N x 1 x H x W luminance in [0, 1] (any device; moved to the networks')
  /// @return N x 1 x H x W on the networks' device
  torch::Tensor fuse(const torch::Tensor& ir, const torch::Tensor& vi);

  /// Atomically writes / reads all three networks, both Adam states, the epoch and the sample counter.
  void save(const std::string& path);
  void load(const std::string& path);

  FusionPolicy& fusion() { return fusion_; }
  LossGeneratorPolicy& loss_generator() { return loss_generator_; }
  TaskPolicy& task() { return task_; }
  const BilevelOptions& options() const { return options_; }
  int64_t epoch() const { return epoch_; }
  uint64_t sample_counter() const { return sample_counter_; }
  /// F's (and T's relative) learning rate of the current epoch after StepLR.
  double learning_rate_factor() const;

 private:
  struct MetaLosses {
    torch::Tensor inner_fusion_loss, outer_task_loss;
    std::vector<torch::Tensor> fast_weights;  ///< theta', a function of G's parameters
  };
  int rank() const { return communicator_ ? communicator_->rank() : 0; }
  int world_size() const { return communicator_ ? communicator_->world_size() : 1; }
  void average(const std::vector<torch::Tensor>& tensors) const;
  /// `values` averaged over the processes (the reports' losses of the combined batch).
  std::vector<double> averaged(std::vector<double> values) const;
  /// Rank 0's decision, on every process.
  bool agreed(bool stop) const;
  static std::vector<torch::Tensor> gradients_of(const torch::nn::Module& module);
  Batch prepare(const Batch& batch) const;
  /// Adam step of F on the fusion loss of prepared crops; returns the loss.
  double fusion_update(const torch::Tensor& ir_crop, const torch::Tensor& vi_crop);
  /// The fusion crops of this process's share of the next fusion-only step (set_fusion_data).
  std::pair<torch::Tensor, torch::Tensor> draw_fusion_crops();
  /// Whether dL_task/dtheta' has any non-zero entry: the first meta step's check of the fusion policy's
  /// contract (see meta_step).
  static bool depends_on_fast_weights(const std::vector<torch::Tensor>& outer);
  /// The counters of this process's share of the next step (options.batch_pairs() draws from `counter`).
  std::vector<uint64_t> step_counters(uint64_t counter, uint64_t size) const;
  MetaLosses meta_losses(const Batch& prepared_train, const Batch& prepared_test);
  void look_ahead(const Batch& prepared_train);
  std::vector<torch::Tensor> task_state() const;
  io::CheckpointState checkpoint_state();
  std::vector<torch::Tensor> trainable(const torch::nn::Module& module) const;
  void set_learning_rates();
  double beta(double option) const { return option > 0.0 ? option : options_.fusion_lr() * learning_rate_factor(); }

  FusionPolicy fusion_;
  LossGeneratorPolicy loss_generator_;
  TaskPolicy task_;
  BilevelOptions options_;
  FusionLossPolicy fusion_loss_;
  InnerUpdatePolicy inner_update_;
  OuterUpdatePolicy outer_update_;
  torch::optim::Adam fusion_optimizer_;
  torch::optim::Adam task_optimizer_;
  std::function<ValidationReport(BilevelOptimizer&)> validation_;
  std::shared_ptr<Communicator> communicator_;
  /// Pairs without labels for phase B (set_fusion_data): their number and their crops by counter.
  uint64_t fusion_data_size_ = 0;
  std::function<std::pair<torch::Tensor, torch::Tensor>(uint64_t)> fusion_data_crops_;
  int64_t validation_every_ = 1;
  bool fast_weights_checked_ = false;  ///< the first meta step's check of the policy contract is done
  int64_t epoch_ = 0;
  uint64_t sample_counter_ = 0;
  uint64_t fusion_sample_counter_ = 0;  ///< draws from the fusion-only data
};

}  // namespace tdfusion::meta

#include "tdfusion/meta/bilevel_optimizer_impl.hpp"

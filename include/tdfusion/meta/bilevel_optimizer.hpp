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
//   trainer.fit(dataset, meta::PrintLosses(std::cout));
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
#include <string>
#include <type_traits>
#include <vector>

namespace tdfusion::meta {

namespace detail {
template <class T, class = void>
struct is_inner_update : std::false_type {};
template <class T>
struct is_inner_update<T, std::void_t<decltype(std::declval<const T&>().fast_weights(
                              std::declval<const ParamDict&>(), std::declval<const std::vector<torch::Tensor>&>(),
                              0.0))>>
    : std::is_same<decltype(std::declval<const T&>().fast_weights(
                       std::declval<const ParamDict&>(), std::declval<const std::vector<torch::Tensor>&>(), 0.0)),
                   ParamDict> {};

template <class T, class = void>
struct is_outer_update : std::false_type {};
template <class T>
struct is_outer_update<T, std::void_t<decltype(std::declval<const T&>().step(
                              std::declval<const std::vector<torch::Tensor>&>(),
                              std::declval<const std::vector<torch::Tensor>&>(), 0.0))>> : std::true_type {};
}  // namespace detail

template <class FusionPolicy, class LossGeneratorPolicy, class TaskPolicy, class InnerUpdatePolicy = SgdFastWeights,
          class OuterUpdatePolicy = MaxNormalizedSgd>
class BilevelOptimizer {
  static_assert(traits::check_fusion_policy<FusionPolicy>());
  static_assert(traits::check_loss_generator_policy<LossGeneratorPolicy>());
  static_assert(traits::check_task_policy<TaskPolicy>());
  static_assert(detail::is_inner_update<InnerUpdatePolicy>::value,
                "tdfusion: the inner update policy lacks `tdfusion::ParamDict fast_weights(const ParamDict& weights, "
                "const std::vector<torch::Tensor>& grads, double lr) const`");
  static_assert(detail::is_outer_update<OuterUpdatePolicy>::value,
                "tdfusion: the outer update policy lacks `double step(const std::vector<torch::Tensor>& params, "
                "const std::vector<torch::Tensor>& grads, double lr) const`");

 public:
  using Target = typename traits::impl_t<TaskPolicy>::Target;
  using Batch = data::PairBatch<Target>;

  /// Takes the three networks (holders share their modules with the caller) and moves them to
  /// options.device() / options.dtype().
  BilevelOptimizer(FusionPolicy fusion, LossGeneratorPolicy loss_generator, TaskPolicy task,
                   BilevelOptions options = {}, InnerUpdatePolicy inner_update = {},
                   OuterUpdatePolicy outer_update = {});

  /// Phase A: one meta step on a meta-train and a meta-test batch. Updates G only (T is restored).
  MetaStepReport meta_step(const Batch& meta_train, const Batch& meta_test);

  /// Phase B: one Adam step of F (with G's frozen loss) and one of T.
  TrainStepReport train_step(const Batch& batch);

  /// Phase B without labels: one Adam step of F (with G's frozen loss) on N x 1 x h x w crops.
  FusionStepReport fusion_step(const torch::Tensor& ir_crop, const torch::Tensor& vi_crop);

  /// Trains from the current epoch to options.epochs(); see the class comment for datasets and
  /// callbacks.hpp for callbacks. Writes a checkpoint after every epoch when options.checkpoint_path() is set,
  /// then, with a validation set (set_validation), validates and hands callbacks a ValidationReport.
  template <class Dataset, class... Callbacks>
  void fit(const Dataset& dataset, Callbacks&&... callbacks);

  /// Evaluates F and T on every sample of `dataset` (counters 0 .. size-1, no modality swap), in inference
  /// mode: the mean task loss, the task's metrics and the fusion metrics (see validation.hpp). Changes nothing.
  template <class Dataset>
  ValidationReport validate(const Dataset& dataset, const ValidationOptions& options = {});

  /// Makes fit() validate on `dataset` (kept by value) after every options.every_epochs()-th epoch.
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
  int64_t epoch_ = 0;
  uint64_t sample_counter_ = 0;
  uint64_t fusion_sample_counter_ = 0;  ///< draws from the fusion-only data
};

}  // namespace tdfusion::meta

#include "tdfusion/meta/bilevel_optimizer_impl.hpp"

#pragma once
// Implementation of BilevelOptimizer; included at the bottom of bilevel_optimizer.hpp.

#include <cmath>
#include <tuple>
#include <utility>

namespace tdfusion::meta {

namespace detail {
template <class Holder>
Holder moved_to(Holder holder, const BilevelOptions& options) {
  holder->to(options.device(), options.dtype());
  return holder;
}

/// The loss's value (one device sync), after checking that it is finite.
inline double finite_loss(const torch::Tensor& loss, const char* what, int64_t epoch, uint64_t counter) {
  const double value = loss.item<double>();
  TORCH_CHECK(std::isfinite(value), "tdfusion: the ", what, " is not finite (", value, ") at epoch ", epoch,
              ", sample ", counter,
              "; training stopped before updating any weights (check the data and the learning rates)");
  return value;
}
}  // namespace detail

template <class F, class G, class T, class L, class I, class O>
BilevelOptimizer<F, G, T, L, I, O>::BilevelOptimizer(F fusion, G loss_generator, T task, BilevelOptions options,
                                                     L fusion_loss, I inner_update, O outer_update)
    : fusion_(detail::moved_to(std::move(fusion), options)),
      loss_generator_(detail::moved_to(std::move(loss_generator), options)),
      task_(detail::moved_to(std::move(task), options)),
      options_(std::move(options)),
      fusion_loss_(std::move(fusion_loss)),
      inner_update_(std::move(inner_update)),
      outer_update_(std::move(outer_update)),
      fusion_optimizer_(fusion_->parameters(), torch::optim::AdamOptions(options_.fusion_lr())),
      task_optimizer_(task_->parameters(), torch::optim::AdamOptions(options_.task_lr())) {
  TORCH_CHECK(options_.epochs() >= 0 && options_.meta_steps_per_epoch() >= 0,
              "tdfusion: epochs and meta_steps_per_epoch must not be negative");
  TORCH_CHECK(options_.fusion_lr() > 0 && options_.task_lr() > 0, "tdfusion: learning rates must be positive");
  TORCH_CHECK(options_.lr_step_epochs() > 0, "tdfusion: lr_step_epochs must be positive");
  TORCH_CHECK(options_.batch_pairs() > 0, "tdfusion: batch_pairs must be positive, got ", options_.batch_pairs());
  TORCH_CHECK(!fusion_->parameters().empty(), "tdfusion: the fusion network has no parameters to train");
}

template <class F, class G, class T, class L, class I, class O>
double BilevelOptimizer<F, G, T, L, I, O>::learning_rate_factor() const {
  return std::pow(options_.lr_gamma(), static_cast<double>(epoch_ / options_.lr_step_epochs()));
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::set_learning_rates() {
  const double factor = learning_rate_factor();
  for (auto& group : fusion_optimizer_.param_groups())
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(options_.fusion_lr() * factor);
  for (auto& group : task_optimizer_.param_groups())
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(options_.task_lr() * factor);
}

template <class F, class G, class T, class L, class I, class O>
typename BilevelOptimizer<F, G, T, L, I, O>::Batch BilevelOptimizer<F, G, T, L, I, O>::prepare(const Batch& batch) const {
  Batch moved = batch.to(options_.device(), options_.dtype());
  moved.check();
  return options_.modality_swap() ? moved.with_modality_swap() : moved;
}

template <class F, class G, class T, class L, class I, class O>
std::vector<torch::Tensor> BilevelOptimizer<F, G, T, L, I, O>::trainable(const torch::nn::Module& module) const {
  std::vector<torch::Tensor> params;
  for (const auto& p : module.parameters())
    if (p.requires_grad()) params.push_back(p);
  return params;
}

template <class F, class G, class T, class L, class I, class O>
typename BilevelOptimizer<F, G, T, L, I, O>::MetaLosses BilevelOptimizer<F, G, T, L, I, O>::meta_losses(
    const Batch& train, const Batch& test) {
  // Inner: the fusion loss with G's (graph-carrying) weights, differentiated w.r.t. theta with create_graph.
  const ParamDict theta = fusion_->named_parameters();
  const torch::Tensor weights = loss_generator_->forward(train.ir_crop, train.vi_crop);
  const torch::Tensor fused_crop = fusion_->forward_with(ParamView(theta), train.ir_crop, train.vi_crop);
  MetaLosses losses;
  losses.inner_fusion_loss = fusion_loss_(fused_crop, train.ir_crop, train.vi_crop, weights);
  std::vector<torch::Tensor> grads =
      gradients(losses.inner_fusion_loss, theta.values(),
                {/*retain_graph=*/true, /*create_graph=*/options_.second_order()});
  if (world_size() > 1) {
    // The combined batch's gradient as the value; the derivative in phi through this process's share (the
    // shares' derivatives are added up in the hypergradient's average).
    std::vector<torch::Tensor> mean;
    for (const auto& g : grads) mean.push_back(g.detach().clone());
    average(mean);
    for (size_t i = 0; i < grads.size(); ++i) grads[i] = grads[i] + (mean[i] - grads[i].detach());
  }
  const ParamDict fast = inner_update_.fast_weights(theta, grads, beta(options_.inner_lr()));
  losses.fast_weights = fast.values();
  // Outer: the task loss of F with fast weights on a different batch.
  const torch::Tensor fused = fusion_->forward_with(ParamView(fast), test.ir, test.vi);
  losses.outer_task_loss = task_->loss(fused, test.target);
  return losses;
}

template <class F, class G, class T, class L, class I, class O>
torch::Tensor BilevelOptimizer<F, G, T, L, I, O>::meta_objective(const Batch& meta_train, const Batch& meta_test) {
  return meta_losses(prepare(meta_train), prepare(meta_test)).outer_task_loss;
}

template <class F, class G, class T, class L, class I, class O>
std::vector<torch::Tensor> BilevelOptimizer<F, G, T, L, I, O>::task_state() const {
  std::vector<torch::Tensor> state = task_->parameters();
  for (const auto& b : task_->buffers()) state.push_back(b);
  return state;
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::look_ahead(const Batch& train) {
  torch::Tensor fused;
  {
    torch::NoGradGuard no_grad;
    fused = fusion_->forward(train.ir, train.vi);
  }
  const torch::Tensor loss = task_->loss(fused, train.target);
  detail::finite_loss(loss, "look-ahead task loss", epoch_, sample_counter_);
  task_optimizer_.zero_grad();
  loss.backward();
  average(gradients_of(*task_));
  task_optimizer_.step();
}

template <class F, class G, class T, class L, class I, class O>
MetaStepReport BilevelOptimizer<F, G, T, L, I, O>::meta_step(const Batch& meta_train, const Batch& meta_test) {
  const Batch train = prepare(meta_train), test = prepare(meta_test);
  // Snapshot T's weights (and buffers); the look-ahead step and the outer pass must leave no trace on them.
  std::vector<torch::Tensor> snapshot;
  for (const auto& t : task_state()) snapshot.push_back(t.detach().clone());
  auto restore_task = [&] {
    torch::NoGradGuard no_grad;
    const std::vector<torch::Tensor> state = task_state();
    for (size_t i = 0; i < state.size(); ++i) state[i].copy_(snapshot[i]);
  };
  if (options_.task_lookahead()) look_ahead(train);

  const MetaLosses losses = meta_losses(train, test);
  MetaStepReport report;
  report.task_loss = detail::finite_loss(losses.outer_task_loss, "outer task loss", epoch_, sample_counter_);
  const std::vector<torch::Tensor> phi = trainable(*loss_generator_);
  TORCH_CHECK(!phi.empty(), "tdfusion: the loss generator has no trainable parameters: there is nothing to meta-learn");
  // The hypergradient in two stages: dL_task/dtheta' (averaged over the processes), then back through theta'(phi).
  std::vector<torch::Tensor> outer = gradients(losses.outer_task_loss, losses.fast_weights, {/*retain_graph=*/true});
  average(outer);
  if (!fast_weights_checked_) {
    if (!depends_on_fast_weights(outer)) {
      restore_task();
      TORCH_CHECK(false, "tdfusion: the task loss does not depend on the fast weights: the fusion policy's "
                  "forward_with ignores the ParamView it is given (it must read every weight from that ParamView, "
                  "not from its module's own parameters), so the loss generator's hypergradient would be exactly 0 "
                  "and it would never learn; training stopped at the first meta step");
    }
    fast_weights_checked_ = true;
  }
  std::vector<torch::Tensor> through, directions;
  for (size_t i = 0; i < outer.size(); ++i) {
    if (!losses.fast_weights[i].requires_grad()) continue;  // without second-order terms theta' is a constant
    through.push_back(losses.fast_weights[i]);
    directions.push_back(outer[i]);
  }
  std::vector<torch::Tensor> hypergrad;
  if (through.empty()) {
    for (const auto& p : phi) hypergrad.push_back(torch::zeros_like(p));
  } else {
    hypergrad = gradients(through, phi, directions);
  }
  average(hypergrad);
  report.hypergradient_max = outer_update_.step(phi, hypergrad, beta(options_.meta_lr()));
  restore_task();
  task_optimizer_.zero_grad();
  report.epoch = epoch_;
  report.fusion_loss = losses.inner_fusion_loss.template item<double>();
  const std::vector<double> means = averaged({report.fusion_loss, report.task_loss});
  report.fusion_loss = means[0];
  report.task_loss = means[1];
  return report;
}

template <class F, class G, class T, class L, class I, class O>
double BilevelOptimizer<F, G, T, L, I, O>::fusion_update(const torch::Tensor& ir_crop, const torch::Tensor& vi_crop) {
  torch::Tensor weights;
  {
    torch::NoGradGuard no_grad;
    weights = loss_generator_->forward(ir_crop, vi_crop);
  }
  const torch::Tensor fused_crop = fusion_->forward(ir_crop, vi_crop);
  const torch::Tensor fusion_loss = fusion_loss_(fused_crop, ir_crop, vi_crop, weights);
  const double value = detail::finite_loss(fusion_loss, "fusion loss", epoch_, sample_counter_);
  fusion_optimizer_.zero_grad();
  fusion_loss.backward();
  average(gradients_of(*fusion_));
  fusion_optimizer_.step();
  return value;
}

template <class F, class G, class T, class L, class I, class O>
TrainStepReport BilevelOptimizer<F, G, T, L, I, O>::train_step(const Batch& raw) {
  const Batch batch = prepare(raw);
  TrainStepReport report;
  report.epoch = epoch_;
  report.fusion_loss = fusion_update(batch.ir_crop, batch.vi_crop);

  torch::Tensor fused;
  {
    torch::NoGradGuard no_grad;
    fused = fusion_->forward(batch.ir, batch.vi);
  }
  const torch::Tensor task_loss = task_->loss(fused, batch.target);
  report.task_loss = detail::finite_loss(task_loss, "task loss", epoch_, sample_counter_);
  task_optimizer_.zero_grad();
  task_loss.backward();
  average(gradients_of(*task_));
  task_optimizer_.step();
  if (world_size() > 1) {
    // Batch-norm statistics see only this process's share: keep every replica on rank 0's.
    communicator_->broadcast(task_->buffers());
    communicator_->broadcast(fusion_->buffers());
  }
  const std::vector<double> means = averaged({report.fusion_loss, report.task_loss});
  report.fusion_loss = means[0];
  report.task_loss = means[1];
  return report;
}

template <class F, class G, class T, class L, class I, class O>
FusionStepReport BilevelOptimizer<F, G, T, L, I, O>::fusion_step(const torch::Tensor& ir_crop,
                                                               const torch::Tensor& vi_crop) {
  torch::Tensor ir = ir_crop.to(options_.device(), options_.dtype()), vi = vi_crop.to(options_.device(), options_.dtype());
  check_pair(ir, vi);
  if (options_.modality_swap()) std::tie(ir, vi) = std::make_pair(torch::cat({ir, vi}, 0), torch::cat({vi, ir}, 0));
  FusionStepReport report;
  report.epoch = epoch_;
  report.fusion_loss = fusion_update(ir, vi);
  if (world_size() > 1) communicator_->broadcast(fusion_->buffers());
  report.fusion_loss = averaged({report.fusion_loss})[0];
  return report;
}

template <class F, class G, class T, class L, class I, class O>
template <class Dataset, class... Callbacks>
FitResult BilevelOptimizer<F, G, T, L, I, O>::fit(const Dataset& dataset, Callbacks&&... callbacks) {
#ifndef TDFUSION_DISABLE_TYPE_CHECKS
  static_assert(traits::check_dataset<Dataset, Batch>());
#endif
  const auto size = static_cast<int64_t>(dataset.size());
  TORCH_CHECK(size > 0, "tdfusion: the training dataset is empty");
  const int64_t steps = (size + options_.batch_pairs() - 1) / options_.batch_pairs();  // phase B: one pass
  const auto fusion_only_steps =
      static_cast<int64_t>((fusion_data_size_ + static_cast<uint64_t>(options_.batch_pairs()) - 1) /
                           static_cast<uint64_t>(options_.batch_pairs()));
  const int64_t meta_steps = trainable(*loss_generator_).empty() ? 0 : options_.meta_steps_per_epoch();
  FitResult result;
  // Hands a report to the callbacks; true (agreed by all processes) stops training.
  auto report = [&](auto& r, auto& last, int64_t step, int64_t of) {
    r.epochs = options_.epochs();
    r.step = step;
    r.steps = of;
    last = r;
    return agreed(notify(r, callbacks...));
  };
  auto finish = [&](FitStop why) {
    result.stop = why;
    result.epoch = epoch_;
    return result;
  };
  fusion_->train();
  task_->train();
  while (epoch_ < options_.epochs()) {
    torch::manual_seed(options_.seed() + static_cast<uint64_t>(epoch_));
    set_learning_rates();
    bool stop = false;
    for (int64_t step = 0; step < meta_steps && !stop; ++step) {
      const Batch meta_train = draw(dataset);
      const Batch meta_test = draw(dataset);
      MetaStepReport r = meta_step(meta_train, meta_test);
      stop = report(r, result.last_meta_step, step, meta_steps);
    }
    EpochReport epoch_report;
    epoch_report.epoch = epoch_;
    epoch_report.epochs = options_.epochs();
    epoch_report.learning_rate = options_.fusion_lr() * learning_rate_factor();
    // Labelled steps and fusion-only steps (set_fusion_data), interleaved evenly: a labelled step comes next
    // while the labelled steps done lag behind their share of the steps done.
    const int64_t total = steps + fusion_only_steps;
    int64_t labelled = 0, fusion_only = 0;
    for (int64_t k = 0; k < total && !stop; ++k) {
      if (fusion_only == fusion_only_steps || (labelled < steps && labelled * total <= k * steps)) {
        TrainStepReport r = train_step(draw(dataset));
        epoch_report.fusion_loss += r.fusion_loss / static_cast<double>(total);
        epoch_report.task_loss += r.task_loss / static_cast<double>(steps);
        stop = report(r, result.last_train_step, labelled++, steps);
      } else {
        const auto [ir, vi] = draw_fusion_crops();
        FusionStepReport r = fusion_step(ir, vi);
        epoch_report.fusion_loss += r.fusion_loss / static_cast<double>(total);
        stop = report(r, result.last_fusion_step, fusion_only++, fusion_only_steps);
      }
    }
    if (stop) return finish(FitStop::callback);  // an interrupted epoch is not counted and not checkpointed
    ++epoch_;
    if (!options_.checkpoint_path().empty() && rank() == 0) save(options_.checkpoint_path());
    result.last_epoch = epoch_report;
    if (agreed(notify(epoch_report, callbacks...))) return finish(FitStop::callback);
    // Rank 0 validates; the others wait for its verdict.
    if (validation_ && epoch_ % validation_every_ == 0) {
      if (rank() == 0) result.last_validation = validation_(*this);
      if (agreed(rank() == 0 && notify(*result.last_validation, callbacks...))) return finish(FitStop::callback);
    }
  }
  return finish(FitStop::completed);
}

template <class F, class G, class T, class L, class I, class O>
template <class Dataset>
ValidationReport BilevelOptimizer<F, G, T, L, I, O>::validate(const Dataset& dataset, const ValidationOptions& options) {
  static_assert(std::is_same_v<decltype(dataset.get(uint64_t{0})), Batch>,
                "tdfusion: the validation dataset lacks `PairBatch<Target> get(uint64_t counter) const` for this "
                "task's Target");
  const auto size = static_cast<uint64_t>(dataset.size());
  TORCH_CHECK(size > 0, "tdfusion: the validation dataset is empty");
  torch::NoGradGuard no_grad;
  const EvalMode fusion_eval(*fusion_), task_eval(*task_);
  ValidationReport report;
  report.epoch = epoch_ - 1;
  report.protocol = options.protocol();
  metrics::TaskEvaluation<traits::impl_t<T>> task_metrics(options.task());
  detail::FusionMetricMeans fusion_metrics(options.protocol(), options.threads());
  double loss_sum = 0.0;
  for (uint64_t i = 0; i < size; ++i) {
    Batch batch = dataset.get(i).to(options_.device(), options_.dtype());
    batch.check();
    const torch::Tensor fused = fusion_->forward(batch.ir, batch.vi);
    const int64_t n = fused.size(0);
    loss_sum += detail::finite_loss(task_->loss(fused, batch.target), "validation task loss", epoch_, i) *
                static_cast<double>(n);
    report.samples += n;
    task_metrics.add(*task_, fused, batch.target);
    if (options.fusion_metrics()) fusion_metrics.add(batch.ir, batch.vi, fused);
  }
  report.task_loss = loss_sum / static_cast<double>(report.samples);
  report.task = task_metrics.result();
  if (options.fusion_metrics()) report.fusion = fusion_metrics.mean();
  return report;
}

template <class F, class G, class T, class L, class I, class O>
template <class Dataset>
void BilevelOptimizer<F, G, T, L, I, O>::set_validation(Dataset dataset, ValidationOptions options) {
  TORCH_CHECK(options.every_epochs() > 0, "tdfusion: ValidationOptions every_epochs must be positive, got ",
              options.every_epochs());
  validation_every_ = options.every_epochs();
  validation_ = [dataset = std::move(dataset), options](BilevelOptimizer& trainer) {
    return trainer.validate(dataset, options);
  };
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::set_communicator(std::shared_ptr<Communicator> communicator) {
  TORCH_CHECK(communicator != nullptr, "tdfusion: set_communicator got a null communicator");
  TORCH_CHECK(options_.batch_pairs() % communicator->world_size() == 0, "tdfusion: batch_pairs (",
              options_.batch_pairs(), ") must be a multiple of the number of processes (", communicator->world_size(),
              ")");
  communicator_ = std::move(communicator);
  for (torch::nn::Module* module : {static_cast<torch::nn::Module*>(fusion_.get()),
                                    static_cast<torch::nn::Module*>(loss_generator_.get()),
                                    static_cast<torch::nn::Module*>(task_.get())}) {
    communicator_->broadcast(module->parameters());
    communicator_->broadcast(module->buffers());
  }
}

template <class F, class G, class T, class L, class I, class O>
std::vector<uint64_t> BilevelOptimizer<F, G, T, L, I, O>::step_counters(uint64_t counter, uint64_t size) const {
  const int64_t share = options_.batch_pairs() / world_size();
  std::vector<uint64_t> counters;
  for (int64_t j = 0; j < share; ++j) {
    const uint64_t draw = counter + static_cast<uint64_t>(rank() * share + j);
    counters.push_back(options_.shuffle() ? data::shuffled_counter(draw, size, options_.seed()) : draw);
  }
  return counters;
}

template <class F, class G, class T, class L, class I, class O>
template <class Dataset>
typename BilevelOptimizer<F, G, T, L, I, O>::Batch BilevelOptimizer<F, G, T, L, I, O>::draw(const Dataset& dataset) {
  std::vector<Batch> parts;
  for (const uint64_t counter : step_counters(sample_counter_, static_cast<uint64_t>(dataset.size()))) {
    parts.push_back(dataset.get(counter));
  }
  sample_counter_ += static_cast<uint64_t>(options_.batch_pairs());
  return data::concat(parts);
}

template <class F, class G, class T, class L, class I, class O>
template <class Dataset>
void BilevelOptimizer<F, G, T, L, I, O>::set_fusion_data(Dataset dataset) {
  TORCH_CHECK(dataset.size() > 0, "tdfusion: set_fusion_data got an empty data set");
  fusion_data_size_ = static_cast<uint64_t>(dataset.size());
  fusion_data_crops_ = [dataset = std::move(dataset)](uint64_t counter) {
    const auto sample = dataset.get(counter);
    return std::make_pair(sample.ir_crop, sample.vi_crop);
  };
}

template <class F, class G, class T, class L, class I, class O>
std::pair<torch::Tensor, torch::Tensor> BilevelOptimizer<F, G, T, L, I, O>::draw_fusion_crops() {
  std::vector<torch::Tensor> ir, vi;
  for (const uint64_t counter : step_counters(fusion_sample_counter_, fusion_data_size_)) {
    const auto crops = fusion_data_crops_(counter);
    ir.push_back(crops.first);
    vi.push_back(crops.second);
  }
  fusion_sample_counter_ += static_cast<uint64_t>(options_.batch_pairs());
  return {torch::cat(ir, 0), torch::cat(vi, 0)};
}

template <class F, class G, class T, class L, class I, class O>
bool BilevelOptimizer<F, G, T, L, I, O>::depends_on_fast_weights(const std::vector<torch::Tensor>& outer) {
  for (const torch::Tensor& g : outer) {
    if (g.ne(0).any().template item<bool>()) return true;
  }
  return false;
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::average(const std::vector<torch::Tensor>& tensors) const {
  if (world_size() > 1) communicator_->average(tensors);
}

template <class F, class G, class T, class L, class I, class O>
std::vector<double> BilevelOptimizer<F, G, T, L, I, O>::averaged(std::vector<double> values) const {
  if (world_size() == 1) return values;
  const torch::Tensor t = torch::tensor(values, torch::kDouble);
  communicator_->average({t});
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

template <class F, class G, class T, class L, class I, class O>
bool BilevelOptimizer<F, G, T, L, I, O>::agreed(bool stop) const {
  if (world_size() == 1) return stop;
  const torch::Tensor flag = torch::full({1}, stop ? 1.0 : 0.0, torch::kDouble);
  communicator_->broadcast({flag});
  return flag.item<double>() != 0.0;
}

template <class F, class G, class T, class L, class I, class O>
std::vector<torch::Tensor> BilevelOptimizer<F, G, T, L, I, O>::gradients_of(const torch::nn::Module& module) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : module.parameters()) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  return grads;
}

template <class F, class G, class T, class L, class I, class O>
torch::Tensor BilevelOptimizer<F, G, T, L, I, O>::fuse(const torch::Tensor& ir, const torch::Tensor& vi) {
  check_pair(ir, vi);
  torch::NoGradGuard no_grad;
  const EvalMode eval(*fusion_);
  return fusion_->forward(ir.to(options_.device(), options_.dtype()), vi.to(options_.device(), options_.dtype()));
}

template <class F, class G, class T, class L, class I, class O>
io::CheckpointState BilevelOptimizer<F, G, T, L, I, O>::checkpoint_state() {
  io::CheckpointState state;
  state.modules = {{"fusion", fusion_.ptr()}, {"loss_generator", loss_generator_.ptr()}, {"task", task_.ptr()}};
  state.optimizers = {{"fusion_optimizer", &fusion_optimizer_}, {"task_optimizer", &task_optimizer_}};
  state.counters = {{"epoch", epoch_}, {"sample_counter", static_cast<int64_t>(sample_counter_)}};
  if (fusion_data_crops_) state.counters["fusion_sample_counter"] = static_cast<int64_t>(fusion_sample_counter_);
  return state;
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::save(const std::string& path) {
  io::save_checkpoint(path, checkpoint_state());
}

template <class F, class G, class T, class L, class I, class O>
void BilevelOptimizer<F, G, T, L, I, O>::load(const std::string& path) {
  io::CheckpointState state = checkpoint_state();
  io::load_checkpoint(path, state);
  epoch_ = state.counters.at("epoch");
  sample_counter_ = static_cast<uint64_t>(state.counters.at("sample_counter"));
  if (fusion_data_crops_) fusion_sample_counter_ = static_cast<uint64_t>(state.counters.at("fusion_sample_counter"));
}

}  // namespace tdfusion::meta

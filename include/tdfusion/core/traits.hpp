#pragma once
// Compile-time "concepts" of the three policies, as C++17 detection traits. The bilevel optimiser checks
// them with static_asserts whose messages name the missing member, so a wrong policy fails to compile with
// a sentence instead of pages of template errors.
//
// The network policies are torch module holders (declared with TORCH_MODULE(Name) around a NameImpl module):
//   fusion policy          torch::Tensor forward_with(const ParamView&, const Tensor& ir, const Tensor& vi) const
//                          torch::Tensor forward(const Tensor& ir, const Tensor& vi)
//   loss-generator policy  torch::Tensor forward(const Tensor& ir, const Tensor& vi)  -> N x 2 x H x W weights
//   task policy            using Target = ...;  (with tdfusion::TargetTraits<Target> defined: concat and to)
//                          torch::Tensor loss(const Tensor& fused, const Target& target)  -> scalar
// The other policies are plain copyable objects:
//   fusion-loss policy     torch::Tensor operator()(fused, ir, vi, weights) const  -> scalar
//   inner update policy    ParamDict fast_weights(const ParamDict&, const std::vector<Tensor>& grads, double lr) const
//   outer update policy    double step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
//                                      double lr) const  -> the largest |gradient| it saw
// and a data set offers  size_t size() const  and  PairBatch<Target> get(uint64_t counter) const.
// writing-policies.md in examples/ walks through writing each of them.

#include "tdfusion/core/param_view.hpp"
#include "tdfusion/core/target_traits.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace tdfusion::traits {

template <class T, class = void>
struct is_module_holder : std::false_type {};
template <class T>
struct is_module_holder<T, std::void_t<typename T::ContainedType>>
    : std::is_base_of<torch::nn::Module, typename T::ContainedType> {};

/// The module type behind a holder (`ReFusion` -> `ReFusionImpl`).
template <class Holder>
using impl_t = typename Holder::ContainedType;

using Tensor = torch::Tensor;

template <class T, class = void>
struct has_forward_with : std::false_type {};
template <class T>
struct has_forward_with<T, std::void_t<decltype(std::declval<const T&>().forward_with(
                               std::declval<const ParamView&>(), std::declval<const Tensor&>(),
                               std::declval<const Tensor&>()))>>
    : std::is_convertible<decltype(std::declval<const T&>().forward_with(std::declval<const ParamView&>(),
                                                                         std::declval<const Tensor&>(),
                                                                         std::declval<const Tensor&>())),
                          Tensor> {};

template <class T, class = void>
struct has_pair_forward : std::false_type {};
template <class T>
struct has_pair_forward<T, std::void_t<decltype(std::declval<T&>().forward(std::declval<const Tensor&>(),
                                                                              std::declval<const Tensor&>()))>>
    : std::is_convertible<decltype(std::declval<T&>().forward(std::declval<const Tensor&>(),
                                                              std::declval<const Tensor&>())),
                          Tensor> {};

template <class T, class = void>
struct has_target_type : std::false_type {};
template <class T>
struct has_target_type<T, std::void_t<typename T::Target>> : std::true_type {};

template <class T, class = void>
struct has_target_traits : std::false_type {};
template <class T>
struct has_target_traits<
    T, std::void_t<decltype(TargetTraits<typename T::Target>::concat(
                       std::declval<const std::vector<typename T::Target>&>())),
                   decltype(TargetTraits<typename T::Target>::to(std::declval<const typename T::Target&>(),
                                                                 std::declval<const torch::Device&>()))>>
    : std::conjunction<
          std::is_same<decltype(TargetTraits<typename T::Target>::concat(
                           std::declval<const std::vector<typename T::Target>&>())),
                       typename T::Target>,
          std::is_same<decltype(TargetTraits<typename T::Target>::to(std::declval<const typename T::Target&>(),
                                                                     std::declval<const torch::Device&>())),
                       typename T::Target>> {};

template <class T, class = void>
struct has_task_loss : std::false_type {};
template <class T>
struct has_task_loss<T, std::void_t<decltype(std::declval<T&>().loss(std::declval<const Tensor&>(),
                                                                      std::declval<const typename T::Target&>()))>>
    : std::is_convertible<decltype(std::declval<T&>().loss(std::declval<const Tensor&>(),
                                                           std::declval<const typename T::Target&>())),
                          Tensor> {};

/// Checks a fusion policy at compile time: `static_assert(check_fusion_policy<P>())` fails with the message of
/// the first missing member. The check_* functions below work alike.
template <class Policy>
constexpr bool check_fusion_policy() {
  static_assert(is_module_holder<Policy>::value,
                "tdfusion: a fusion policy must be a torch module holder: declare `class NameImpl : public "
                "torch::nn::Module` and `TORCH_MODULE(Name)`, and pass `Name`");
  if constexpr (is_module_holder<Policy>::value) {
    static_assert(has_forward_with<impl_t<Policy>>::value,
                  "tdfusion: the fusion policy lacks `torch::Tensor forward_with(const tdfusion::ParamView& params, "
                  "const torch::Tensor& ir, const torch::Tensor& vi) const` (the fast-weight forward pass)");
    static_assert(has_pair_forward<impl_t<Policy>>::value,
                  "tdfusion: the fusion policy lacks `torch::Tensor forward(const torch::Tensor& ir, const "
                  "torch::Tensor& vi)`");
  }
  return true;
}

template <class Policy>
constexpr bool check_loss_generator_policy() {
  static_assert(is_module_holder<Policy>::value,
                "tdfusion: a loss-generator policy must be a torch module holder (TORCH_MODULE(Name))");
  if constexpr (is_module_holder<Policy>::value) {
    static_assert(has_pair_forward<impl_t<Policy>>::value,
                  "tdfusion: the loss-generator policy lacks `torch::Tensor forward(const torch::Tensor& ir, const "
                  "torch::Tensor& vi)` returning N x 2 x H x W per-pixel weights");
  }
  return true;
}

template <class Policy>
constexpr bool check_task_policy() {
  static_assert(is_module_holder<Policy>::value,
                "tdfusion: a task policy must be a torch module holder (TORCH_MODULE(Name))");
  if constexpr (is_module_holder<Policy>::value) {
    using Impl = impl_t<Policy>;
    static_assert(has_target_type<Impl>::value,
                  "tdfusion: the task policy lacks `using Target = ...;` (the type of its labels)");
    if constexpr (has_target_type<Impl>::value) {
      static_assert(has_target_traits<Impl>::value,
                    "tdfusion: the task policy's Target has no `tdfusion::TargetTraits<Target>` "
                    "specialisation with `static Target concat(const std::vector<Target>&)` and `static Target "
                    "to(const Target&, const torch::Device&)`");
      static_assert(has_task_loss<Impl>::value,
                    "tdfusion: the task policy lacks `torch::Tensor loss(const torch::Tensor& fused, const Target& "
                    "target)` returning the scalar task loss");
    }
  }
  return true;
}

template <class T, class = void>
struct has_fusion_loss_call : std::false_type {};
template <class T>
struct has_fusion_loss_call<T, std::void_t<decltype(std::declval<const T&>()(
                                   std::declval<const Tensor&>(), std::declval<const Tensor&>(),
                                   std::declval<const Tensor&>(), std::declval<const Tensor&>()))>>
    : std::is_convertible<decltype(std::declval<const T&>()(std::declval<const Tensor&>(), std::declval<const Tensor&>(),
                                                            std::declval<const Tensor&>(), std::declval<const Tensor&>())),
                          Tensor> {};

template <class T, class = void>
struct has_fast_weights : std::false_type {};
template <class T>
struct has_fast_weights<T, std::void_t<decltype(std::declval<const T&>().fast_weights(
                               std::declval<const ParamDict&>(), std::declval<const std::vector<Tensor>&>(), 0.0))>>
    : std::is_same<decltype(std::declval<const T&>().fast_weights(std::declval<const ParamDict&>(),
                                                                  std::declval<const std::vector<Tensor>&>(), 0.0)),
                   ParamDict> {};

template <class T, class = void>
struct has_outer_step : std::false_type {};
template <class T>
struct has_outer_step<T, std::void_t<decltype(std::declval<const T&>().step(
                             std::declval<const std::vector<Tensor>&>(), std::declval<const std::vector<Tensor>&>(),
                             0.0))>>
    : std::is_same<decltype(std::declval<const T&>().step(std::declval<const std::vector<Tensor>&>(),
                                                          std::declval<const std::vector<Tensor>&>(), 0.0)),
                   double> {};

template <class D, class = void>
struct has_dataset_size : std::false_type {};
template <class D>
struct has_dataset_size<D, std::void_t<decltype(std::declval<const D&>().size())>>
    : std::is_convertible<decltype(std::declval<const D&>().size()), size_t> {};

template <class D, class Batch, class = void>
struct has_dataset_get : std::false_type {};
template <class D, class Batch>
struct has_dataset_get<D, Batch, std::void_t<decltype(std::declval<const D&>().get(uint64_t{0}))>>
    : std::is_same<decltype(std::declval<const D&>().get(uint64_t{0})), Batch> {};

template <class Policy>
constexpr bool check_fusion_loss_policy() {
  static_assert(has_fusion_loss_call<Policy>::value,
                "tdfusion: the fusion-loss policy lacks `torch::Tensor operator()(const torch::Tensor& fused, const "
                "torch::Tensor& ir, const torch::Tensor& vi, const torch::Tensor& weights) const` returning the "
                "scalar fusion loss");
  return true;
}

template <class Policy>
constexpr bool check_inner_update_policy() {
  static_assert(has_fast_weights<Policy>::value,
                "tdfusion: the inner update policy lacks `tdfusion::ParamDict fast_weights(const ParamDict& weights, "
                "const std::vector<torch::Tensor>& grads, double lr) const`");
  return true;
}

template <class Policy>
constexpr bool check_outer_update_policy() {
  static_assert(has_outer_step<Policy>::value,
                "tdfusion: the outer update policy lacks `double step(const std::vector<torch::Tensor>& params, "
                "const std::vector<torch::Tensor>& grads, double lr) const` returning the largest |gradient|");
  return true;
}

/// Checks a data set for the optimiser whose batches are `Batch` (data::PairBatch<Target>).
template <class Dataset, class Batch>
constexpr bool check_dataset() {
  static_assert(has_dataset_size<Dataset>::value, "tdfusion: the dataset lacks `size_t size() const`");
  static_assert(has_dataset_get<Dataset, Batch>::value,
                "tdfusion: the dataset lacks `PairBatch<Target> get(uint64_t counter) const` for this task's Target");
  return true;
}

}  // namespace tdfusion::traits

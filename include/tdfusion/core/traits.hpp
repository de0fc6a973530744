#pragma once
// Compile-time "concepts" of the three policies, as C++17 detection traits. The bilevel optimiser checks
// them with static_asserts whose messages name the missing member, so a wrong policy fails to compile with
// a sentence instead of pages of template errors.
//
// Policies are torch module holders (declared with TORCH_MODULE(Name) around a NameImpl module):
//   fusion policy          torch::Tensor forward_with(const ParamView&, const Tensor& ir, const Tensor& vi) const
//                          torch::Tensor forward(const Tensor& ir, const Tensor& vi)
//   loss-generator policy  torch::Tensor forward(const Tensor& ir, const Tensor& vi)  -> N x 2 x H x W weights
//   task policy            using Target = ...;  (with data::TargetTraits<Target> defined)
//                          torch::Tensor loss(const Tensor& fused, const Target& target)  -> scalar

#include "tdfusion/core/param_view.hpp"
#include "tdfusion/data/pair_batch.hpp"

#include <torch/torch.h>

#include <type_traits>
#include <utility>

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
struct has_target_traits<T, std::void_t<decltype(data::TargetTraits<typename T::Target>::concat(
                                std::declval<const std::vector<typename T::Target>&>()))>> : std::true_type {};

template <class T, class = void>
struct has_task_loss : std::false_type {};
template <class T>
struct has_task_loss<T, std::void_t<decltype(std::declval<T&>().loss(std::declval<const Tensor&>(),
                                                                      std::declval<const typename T::Target&>()))>>
    : std::is_convertible<decltype(std::declval<T&>().loss(std::declval<const Tensor&>(),
                                                           std::declval<const typename T::Target&>())),
                          Tensor> {};

/// Checks a fusion policy; use as `static_assert(check_fusion_policy<P>())`-free statement: instantiate it.
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
                    "tdfusion: the task policy's Target has no `tdfusion::data::TargetTraits<Target>` "
                    "specialisation with `static Target concat(const std::vector<Target>&)` and `to(target, device)`");
      static_assert(has_task_loss<Impl>::value,
                    "tdfusion: the task policy lacks `torch::Tensor loss(const torch::Tensor& fused, const Target& "
                    "target)` returning the scalar task loss");
    }
  }
  return true;
}

}  // namespace tdfusion::traits

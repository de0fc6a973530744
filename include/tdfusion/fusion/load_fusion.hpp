#pragma once
// Fusion networks chosen at run time from their weights: a `torch.save` state_dict of ReFusion (the released
// layout) or of LightFusion (any width and depth) becomes the network it describes, with its weights loaded.

#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <torch/torch.h>

#include <istream>
#include <string>
#include <vector>

namespace tdfusion::fusion {

/// A fusion network of one of the built-in architectures, chosen at run time.
class AnyFusion {
 public:
  explicit AnyFusion(ReFusion net) : refusion_(std::move(net)) {}
  explicit AnyFusion(LightFusion net) : light_(std::move(net)) {}

  /// Calls `fn(net)` with the network's holder (ReFusion& or LightFusion&); both calls must return one type.
  template <class Fn>
  decltype(auto) visit(Fn&& fn) {
    return refusion_ ? fn(refusion_) : fn(light_);
  }

  bool is_refusion() const { return static_cast<bool>(refusion_); }

 private:
  ReFusion refusion_{nullptr};
  LightFusion light_{nullptr};
};

namespace detail {

/// LightFusion's options as a state_dict's shapes give them, after checking that every entry the network
/// would have is present with its shape: the network built from them is then no larger than the weights
/// already read (a forged width cannot make it allocate more).
inline LightFusionOptions light_fusion_options(const ParamDict& state, const std::string& name) {
  const torch::Tensor* first = state.find("conv0.weight");
  TORCH_CHECK(first != nullptr && first->dim() == 4 && first->size(0) > 0, "tdfusion: ", name,
              ": conv0.weight is not a 4-D convolution weight");
  const int64_t width = first->size(0);
  int64_t depth = 0;
  while (state.contains("conv" + std::to_string(depth + 1) + ".weight")) ++depth;
  auto expect = [&](const std::string& key, const std::vector<int64_t>& shape) {
    const torch::Tensor* found = state.find(key);
    TORCH_CHECK(found != nullptr, "tdfusion: ", name, " holds a LightFusion state_dict without '", key, "'");
    TORCH_CHECK(found->sizes() == torch::IntArrayRef(shape), "tdfusion: ", name, ": '", key, "' has shape ",
                found->sizes(), ", a LightFusion of width ", width, " expects ", torch::IntArrayRef(shape));
  };
  expect("conv0.weight", {width, 2, 3, 3});
  expect("conv0.bias", {width});
  for (int64_t i = 1; i <= depth; ++i) {
    expect("conv" + std::to_string(i) + ".weight", {width, width, 3, 3});
    expect("conv" + std::to_string(i) + ".bias", {width});
  }
  expect("conv_out.weight", {1, width, 3, 3});
  expect("conv_out.bias", {1});
  return LightFusionOptions().width(width).depth(depth);
}

}  // namespace detail

/// The network `state` describes, with its weights: ReFusion when it has ReFusion's cross-modal module
/// (`FM.temperature1`), else LightFusion with the width and depth of its convolutions. `name` names the
/// weights in messages.
inline AnyFusion fusion_from_state_dict(const ParamDict& state, const std::string& name) {
  if (state.contains("FM.temperature1")) {
    ReFusion net;
    io::load_state_dict(*net, state, name);
    return AnyFusion(net);
  }
  TORCH_CHECK(state.contains("conv0.weight"), "tdfusion: ", name,
              " holds neither a ReFusion nor a LightFusion state_dict (no FM.temperature1 or conv0.weight)");
  LightFusion net(detail::light_fusion_options(state, name));
  io::load_state_dict(*net, state, name);
  return AnyFusion(net);
}

/// Reads a `torch.save` state_dict file and builds its network (see fusion_from_state_dict).
inline AnyFusion load_fusion(const std::string& path) {
  return fusion_from_state_dict(io::read_torch_state_dict(path), path);
}

/// The same from a stream (e.g. weights embedded in a program); `name` names them in messages.
inline AnyFusion load_fusion(std::istream& bytes, const std::string& name) {
  return fusion_from_state_dict(io::read_torch_state_dict(bytes, name), name);
}

}  // namespace tdfusion::fusion

#pragma once
// Functional access to a network's weights.
//
// The meta step evaluates the fusion network with fast weights theta' = theta - beta * grad, which are
// graph-carrying tensors and cannot be registered as a module's parameters. Every trainable network in
// tdfusion therefore computes its forward pass from a ParamView: a name -> tensor dictionary keyed like
// `named_parameters()`, seen through a prefix so that a parent hands each child its own sub-tree.
// The stateful `forward` is the same function applied to the module's own parameters.

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>

namespace tdfusion {

/// Name -> tensor dictionary in the layout of `torch::nn::Module::named_parameters()`.
using ParamDict = torch::OrderedDict<std::string, torch::Tensor>;

/// A read-only view of a ParamDict below a name prefix ("encoder1.0." etc.).
class ParamView {
 public:
  /// Views a dictionary the caller keeps alive.
  explicit ParamView(const ParamDict& dict) : dict_(&dict) {}

  /// Views a module's own parameters (the stateful path); keeps the dictionary alive itself.
  explicit ParamView(const torch::nn::Module& module)
      : owned_(std::make_shared<ParamDict>(module.named_parameters(/*recurse=*/true))), dict_(owned_.get()) {}

  /// The tensor registered as `<prefix><name>`; a clear error names the missing key.
  const torch::Tensor& operator[](const std::string& name) const {
    const std::string key = prefix_ + name;
    const torch::Tensor* found = dict_->find(key);
    TORCH_CHECK(found != nullptr, "tdfusion: parameter '", key, "' is missing from the parameter dictionary");
    return *found;
  }

  /// The view of a child module: `sub("attn")["qkv.weight"]` reads `<prefix>attn.qkv.weight`.
  ParamView sub(const std::string& child) const {
    ParamView view = *this;
    view.prefix_ = prefix_ + child + ".";
    return view;
  }

 private:
  std::shared_ptr<ParamDict> owned_;
  const ParamDict* dict_;
  std::string prefix_;
};

}  // namespace tdfusion

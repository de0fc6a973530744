#pragma once
// Checkpoints of a training run: named modules, named optimizers and integer counters (epoch, sample
// counter, ...) in one file, written atomically, so a run can be stopped and resumed bit for bit.
//
// Layout (a torch::serialize archive, the format of torch::save):
//   format "tdfusion-checkpoint", version 1
//   modules/<name>            what Module::save writes (parameters and buffers by their registered names)
//   optimizers/<name>/state   what Optimizer::save writes
//   optimizers/<name>/lr      the learning rate of every parameter group (LibTorch 1.13's Optimizer::load
//                             restores the per-parameter state but not the group options)
//   counters/<name>           int64 scalars
//
// Loading copies values into the existing parameters and buffers (same tensors, so optimizers and
// parameter dictionaries that refer to them stay valid; each keeps its device and dtype) after checking
// every entry's presence and shape. torch's own Module::load would instead rebind parameters to the
// archive's storage or device without a shape check.

#include "tdfusion/io/atomic_file.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tdfusion::io {

inline constexpr const char* kCheckpointFormat = "tdfusion-checkpoint";
inline constexpr int64_t kCheckpointVersion = 1;

/// What a checkpoint holds. Names are the caller's choice (no '.' or '/'; each unique within its list).
/// The pointers are not owned and must outlive the save / load call.
struct CheckpointState {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> modules;
  std::vector<std::pair<std::string, torch::optim::Optimizer*>> optimizers;
  std::map<std::string, int64_t> counters;
};

namespace detail {

inline void check_entry_name(const std::string& name, const std::string& what, const std::string& path) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos && name.find('/') == std::string::npos,
              "tdfusion: checkpoint '", path, "': invalid ", what, " name '", name,
              "' (must be non-empty, without '.' or '/')");
}

inline std::string error_text(const std::exception& error) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) return torch_error->what_without_backtrace();
  return error.what();
}

/// The learning rate of every group, or an empty list when the optimizer's options do not expose one.
inline std::vector<double> group_learning_rates(const torch::optim::Optimizer& optimizer) {
  std::vector<double> rates;
  try {
    for (const auto& group : optimizer.param_groups()) rates.push_back(group.options().get_lr());
  } catch (const c10::Error&) {
    rates.clear();  // a custom optimizer without get_lr(): its options are then not part of the checkpoint
  }
  return rates;
}

inline torch::Device optimizer_device(const torch::optim::Optimizer& optimizer) {
  for (const auto& group : optimizer.param_groups()) {
    if (!group.params().empty()) return group.params().front().device();
  }
  return torch::kCPU;
}

/// A value read from the file, waiting to be copied into `destination` once everything has been checked.
struct PendingCopy {
  torch::Tensor destination, source;
};

/// Reads the entries Module::save wrote for `module` (recursively, under the same names) and checks that
/// each exists and has the module's shape. `where` is the entry's name in messages.
inline void stage_module(torch::serialize::InputArchive& archive, const torch::nn::Module& module,
                         const std::string& where, const std::string& path, std::vector<PendingCopy>& pending) {
  auto stage = [&](const std::string& key, const torch::Tensor& destination, bool is_buffer) {
    if (!destination.defined()) return;
    torch::Tensor source;
    bool found = false;
    try {
      found = archive.try_read(key, source, is_buffer);
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "tdfusion: checkpoint '", path, "': cannot read ", where, ".", key, ": ",
                  error_text(error));
    }
    TORCH_CHECK(found && source.defined(), "tdfusion: checkpoint '", path, "' has no ",
                is_buffer ? "buffer " : "parameter ", where, ".", key);
    TORCH_CHECK(source.sizes() == destination.sizes(), "tdfusion: checkpoint '", path, "': ", where, ".", key,
                " has shape ", source.sizes(), " but the module expects ", destination.sizes());
    pending.push_back({destination, source});
  };
  for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
    stage(parameter.key(), parameter.value(), /*is_buffer=*/false);
  }
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) {
    stage(buffer.key(), buffer.value(), /*is_buffer=*/true);
  }
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive child_archive;
    TORCH_CHECK(archive.try_read(child.key(), child_archive), "tdfusion: checkpoint '", path,
                "' has no submodule ", where, ".", child.key());
    stage_module(child_archive, *child.value(), where + "." + child.key(), path, pending);
  }
}

inline torch::serialize::InputArchive open_checkpoint(const std::string& path, const torch::Device& device) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path, device);
  } catch (const std::exception& error) {
    TORCH_CHECK(false, "tdfusion: '", path, "' is not a readable checkpoint: ", error_text(error));
  }
  c10::IValue format, version;
  TORCH_CHECK(archive.try_read("format", format) && format.isString() &&
                  format.toStringRef() == kCheckpointFormat,
              "tdfusion: '", path, "' is not a tdfusion checkpoint (no format tag)");
  TORCH_CHECK(archive.try_read("version", version) && version.isInt() &&
                  version.toInt() == kCheckpointVersion,
              "tdfusion: checkpoint '", path, "' has an unsupported version (expected ", kCheckpointVersion, ")");
  return archive;
}

inline torch::serialize::InputArchive sub_archive(torch::serialize::InputArchive& archive, const std::string& key,
                                                  const std::string& what, const std::string& path) {
  torch::serialize::InputArchive sub;
  TORCH_CHECK(archive.try_read(key, sub), "tdfusion: checkpoint '", path, "' has no ", what);
  return sub;
}

}  // namespace detail

/// Writes `state` to `path` atomically (an existing file is replaced only once the new one is complete).
inline void save_checkpoint(const std::string& path, const CheckpointState& state) {
  for (const auto& [name, module] : state.modules) {
    detail::check_entry_name(name, "module", path);
    TORCH_CHECK(module != nullptr, "tdfusion: checkpoint '", path, "': module '", name, "' is null");
  }
  for (const auto& [name, optimizer] : state.optimizers) {
    detail::check_entry_name(name, "optimizer", path);
    TORCH_CHECK(optimizer != nullptr, "tdfusion: checkpoint '", path, "': optimizer '", name, "' is null");
  }
  for (const auto& counter : state.counters) detail::check_entry_name(counter.first, "counter", path);

  write_file_atomically(path, [&](FileSink& sink) {
    torch::serialize::OutputArchive root;
    root.write("format", c10::IValue(std::string(kCheckpointFormat)));
    root.write("version", c10::IValue(kCheckpointVersion));

    torch::serialize::OutputArchive modules(root.compilation_unit());
    for (const auto& [name, module] : state.modules) {
      torch::serialize::OutputArchive archive(root.compilation_unit());
      module->save(archive);
      modules.write(name, archive);
    }
    root.write("modules", modules);

    torch::serialize::OutputArchive optimizers(root.compilation_unit());
    for (const auto& [name, optimizer] : state.optimizers) {
      torch::serialize::OutputArchive archive(root.compilation_unit());
      torch::serialize::OutputArchive optimizer_state(root.compilation_unit());
      optimizer->save(optimizer_state);
      archive.write("state", optimizer_state);
      const std::vector<double> rates = detail::group_learning_rates(*optimizer);
      if (!rates.empty()) archive.write("lr", torch::tensor(rates, torch::kDouble));
      optimizers.write(name, archive);
    }
    root.write("optimizers", optimizers);

    torch::serialize::OutputArchive counters(root.compilation_unit());
    for (const auto& [name, value] : state.counters) {
      counters.write(name, torch::tensor(value, torch::kLong));
    }
    root.write("counters", counters);

    root.save_to([&](const void* data, size_t size) { return sink.write(data, size); });
  });
}

/// Restores `state` from `path`: every listed module, optimizer and counter must be in the file (counters
/// in the file but not in `state.counters` are added to it). Modules and counters change only if the whole
/// file checks out; optimizers are loaded after that check, each with its state on its parameters' device.
inline void load_checkpoint(const std::string& path, CheckpointState& state) {
  TORCH_CHECK(std::filesystem::exists(path), "tdfusion: checkpoint '", path, "' does not exist");
  torch::serialize::InputArchive root = detail::open_checkpoint(path, torch::kCPU);

  // 1. Read and check everything before changing anything.
  std::vector<detail::PendingCopy> pending;
  torch::serialize::InputArchive modules = detail::sub_archive(root, "modules", "module section", path);
  for (const auto& [name, module] : state.modules) {
    TORCH_CHECK(module != nullptr, "tdfusion: checkpoint '", path, "': module '", name, "' is null");
    torch::serialize::InputArchive archive;
    TORCH_CHECK(modules.try_read(name, archive), "tdfusion: checkpoint '", path, "' has no module '", name, "'");
    detail::stage_module(archive, *module, name, path, pending);
  }

  torch::serialize::InputArchive counters = detail::sub_archive(root, "counters", "counter section", path);
  std::map<std::string, int64_t> loaded_counters;
  for (const std::string& key : counters.keys()) {
    torch::Tensor value;
    if (counters.try_read(key, value) && value.defined() && value.numel() == 1) {
      loaded_counters[key] = value.item<int64_t>();
    }
  }
  for (const auto& counter : state.counters) {
    TORCH_CHECK(loaded_counters.count(counter.first) == 1, "tdfusion: checkpoint '", path, "' has no counter '",
                counter.first, "'");
  }

  torch::serialize::InputArchive optimizers = detail::sub_archive(root, "optimizers", "optimizer section", path);
  for (const auto& [name, optimizer] : state.optimizers) {
    TORCH_CHECK(optimizer != nullptr, "tdfusion: checkpoint '", path, "': optimizer '", name, "' is null");
    torch::serialize::InputArchive archive;
    TORCH_CHECK(optimizers.try_read(name, archive), "tdfusion: checkpoint '", path, "' has no optimizer '", name,
                "'");
  }

  // 2. Optimizers: their state tensors must live where their parameters are, so the file is mapped to each
  // optimizer's device (read again only for a device other than the CPU).
  for (const auto& [name, optimizer] : state.optimizers) {
    const torch::Device device = detail::optimizer_device(*optimizer);
    torch::serialize::InputArchive device_root;
    torch::serialize::InputArchive* source = &root;
    if (!device.is_cpu()) {
      device_root = detail::open_checkpoint(path, device);
      source = &device_root;
    }
    torch::serialize::InputArchive section = detail::sub_archive(*source, "optimizers", "optimizer section", path);
    torch::serialize::InputArchive archive = detail::sub_archive(section, name, "optimizer '" + name + "'", path);
    try {
      torch::serialize::InputArchive optimizer_state;
      archive.read("state", optimizer_state);
      optimizer->load(optimizer_state);
      torch::Tensor rates;
      if (archive.try_read("lr", rates)) {
        auto& groups = optimizer->param_groups();
        TORCH_CHECK(rates.numel() == static_cast<int64_t>(groups.size()), "it has ", rates.numel(),
                    " parameter groups, the optimizer ", groups.size());
        for (size_t i = 0; i < groups.size(); ++i) {
          groups[i].options().set_lr(rates[static_cast<int64_t>(i)].item<double>());
        }
      }
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "tdfusion: checkpoint '", path, "': cannot load optimizer '", name,
                  "': ", detail::error_text(error));
    }
  }

  // 3. Modules and counters.
  {
    torch::NoGradGuard no_grad;
    for (auto& copy : pending) copy.destination.copy_(copy.source);
  }
  for (const auto& [key, value] : loaded_counters) state.counters[key] = value;
}

}  // namespace tdfusion::io

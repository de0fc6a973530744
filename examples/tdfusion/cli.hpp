#pragma once
// The `tdfusion` command's subcommands, one file each; main.cpp wires them into one CLI11 app.
// Exit codes: 0 success, 2 usage error (UsageError, CLI11's parse errors), 1 data or runtime error.

#include <tdfusion/fusion/load_fusion.hpp>

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tdfusion::cli {

/// A subcommand: its CLI11 app, and what runs when the user chose it (returns the exit code).
struct Subcommand {
  CLI::App* app;
  std::function<int()> run;
};

Subcommand add_fuse(CLI::App& app);
Subcommand add_train(CLI::App& app, std::vector<std::string> command_line);
Subcommand add_eval(CLI::App& app, const int& threads);
Subcommand add_demo(CLI::App& app);

/// A wrong option value or combination found after parsing: exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// "HxW" with positive sides; `option` names the option in the error.
std::pair<int64_t, int64_t> parse_size(const std::string& text, const std::string& option);

/// The state_dict file `weights` or, when it is empty, the built-in model named `model`.
fusion::AnyFusion load_model(const std::string& weights, const std::string& model);

/// The options choosing the fusion model: --model NAME (a built-in one; default: `model`'s value) or
/// --weights FILE.
void add_model_options(CLI::App* cmd, std::string& model, std::string& weights);

/// Accepts cpu, cuda and cuda:N (when CUDA is available).
CLI::Validator device_validator();

/// Accepts a finite learning rate in (0, 10].
CLI::Validator learning_rate_validator();

}  // namespace tdfusion::cli

// The fast CPU kernels against the plain LibTorch ops on the same inputs, at the channel counts of ReFusion.
//
//   build/benchmarks/bench_kernels --benchmark_counters_tabular=true
//
// Argument: the image side S (batch 1, S x S). Each op runs forward, or forward and backward ("/train"), or
// forward, backward with its graph, and backward through that gradient ("/meta": the gradient of the first
// input of |dL/dw|^2, L = |op|^2 and w the last input, as the meta step differentiates its fast weights).
// Counters: GFLOP/s of the convolution and matrix kernels for forward and train (2 FLOP per multiply-add; the
// plain runs count the same work), and for the fast runs FastOverPlain, the plain time divided by the fast time
// (above 1: faster).
#include "benchmark_main.hpp"

#include <benchmark/benchmark.h>

#include <tdfusion/core/autograd.hpp>
#include <tdfusion/nn/layers.hpp>

#include <functional>
#include <map>
#include <string>

namespace {

using namespace tdfusion;
namespace ops = tdfusion::nn::ops;

struct Kernel {
  std::function<torch::Tensor(const std::vector<torch::Tensor>&)> op;
  std::function<std::vector<torch::Tensor>(int64_t side)> inputs;
  int64_t multiply_adds_per_pixel;  ///< of the forward pass; a backward pass does twice that
};

const std::map<std::string, Kernel>& kernels() {
  static const std::map<std::string, Kernel> all = {
      {"conv1x1_16to48", {[](const auto& t) { return ops::conv1x1(t[0], t[1]); },
                          [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 16, s, s}), torch::rand({48, 16, 1, 1})}; },
                          16 * 48}},
      {"conv3x3_32to16", {[](const auto& t) { return ops::conv_same(t[0], t[1]); },
                          [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 32, s, s}), torch::rand({16, 32, 3, 3})}; },
                          32 * 16 * 9}},
      {"depthwise3x3_48", {[](const auto& t) { return ops::depthwise3x3(t[0], t[1]); },
                           [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 48, s, s}), torch::rand({48, 1, 3, 3})}; },
                           48 * 9}},
      {"layer_norm_16", {[](const auto& t) { return ops::channel_layer_norm(t[0], t[1], t[2]); },
                         [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 16, s, s}), torch::rand({16}), torch::rand({16})}; },
                         0}},
      {"gelu_gate_32", {[](const auto& t) { return ops::gelu_gate(t[0]); },
                        [](int64_t s) { return std::vector<torch::Tensor>{torch::randn({1, 64, s, s})}; },
                        0}},
      {"attention_16ch_8heads", {[](const auto& t) { return nn::channel_attention(t[0], t[1], t[2], t[3], 8); },
                                 [](int64_t s) {
                                   return std::vector<torch::Tensor>{torch::rand({1, 16, s, s}), torch::rand({1, 16, s, s}),
                                                                     torch::rand({1, 16, s, s}), torch::ones({8, 1, 1})};
                                 },
                                 2 * 16 * 2}},
  };
  return all;
}

enum class Mode { forward, train, meta };

/// Seconds per iteration of the plain runs, by (name, side, mode), for the fast runs' ratio.
std::map<std::tuple<std::string, int64_t, Mode>, double>& plain_seconds() {
  static std::map<std::tuple<std::string, int64_t, Mode>, double> seconds;
  return seconds;
}

void BM_Kernel(benchmark::State& state, const std::string& name, bool fast, Mode mode) {
  const Kernel& kernel = kernels().at(name);
  const int64_t side = state.range(0);
  torch::manual_seed(0);
  std::vector<torch::Tensor> inputs = kernel.inputs(side);
  for (auto& t : inputs) t.requires_grad_(mode != Mode::forward);
  const ops::FastKernels kernels_mode(fast);
  auto run = [&] {
    if (mode == Mode::forward) {
      torch::NoGradGuard no_grad;
      return kernel.op(inputs).sum();
    }
    const torch::Tensor y = kernel.op(inputs);
    if (mode == Mode::train) return gradients((y * y).sum(), inputs).front().sum();
    const torch::Tensor dw = gradients((y * y).sum(), inputs, {/*retain_graph=*/true, /*create_graph=*/true}).back();
    return gradients((dw * dw).sum(), {inputs.front()}).front().sum();
  };
  run();  // warm-up
  const double seconds = bench::mean_seconds(state, [&] { benchmark::DoNotOptimize(run()); });
  const double flop =
      2.0 * static_cast<double>(kernel.multiply_adds_per_pixel * side * side) * (mode == Mode::train ? 3.0 : 1.0);
  if (flop > 0 && mode != Mode::meta) state.counters["GFLOP/s"] = flop / seconds / 1e9;
  const auto key = std::make_tuple(name, side, mode);
  if (!fast) plain_seconds()[key] = seconds;
  const auto plain = plain_seconds().find(key);
  if (fast && plain != plain_seconds().end()) state.counters["FastOverPlain"] = plain->second / seconds;
}

void register_all() {
  for (const auto& [name, kernel] : kernels()) {
    for (const auto& [mode, suffix] : {std::pair{Mode::forward, ""}, {Mode::train, "/train"}, {Mode::meta, "/meta"}}) {
      for (const bool fast : {false, true}) {  // plain first, so that the fast run finds its reference
        const std::string label = "BM_" + name + suffix + (fast ? "/fast" : "/plain");
        benchmark::RegisterBenchmark(label.c_str(), BM_Kernel, name, fast, mode)
            ->Arg(128)->Arg(256)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return tdfusion::bench::run(argc, argv);
}

// The fast CPU kernels against the plain LibTorch ops on the same inputs, at the channel counts of ReFusion.
//
//   build/benchmarks/bench_kernels --benchmark_counters_tabular=true
//
// Argument: the image side S (batch 1, S x S). Each op runs forward, or forward and backward ("/train"). Counters:
// GFLOP/s of the convolution and matrix kernels (2 FLOP per multiply-add they report; the plain runs count the
// same work), and for the fast runs FastOverPlain, the plain time divided by the fast time (above 1: faster).
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
      {"depthwise3x3_48", {[](const auto& t) { return ops::depthwise3x3(t[0], t[1]); },
                           [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 48, s, s}), torch::rand({48, 1, 3, 3})}; },
                           48 * 9}},
      {"layer_norm_16", {[](const auto& t) { return ops::channel_layer_norm(t[0], t[1], t[2]); },
                         [](int64_t s) { return std::vector<torch::Tensor>{torch::rand({1, 16, s, s}), torch::rand({16}), torch::rand({16})}; },
                         0}},
      {"gelu_gate_32", {[](const auto& t) { return ops::gelu_gate(t[0], t[1]); },
                        [](int64_t s) { return std::vector<torch::Tensor>{torch::randn({1, 32, s, s}), torch::randn({1, 32, s, s})}; },
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

/// Seconds per iteration of the plain runs, by (name, side, train), for the fast runs' ratio.
std::map<std::tuple<std::string, int64_t, bool>, double>& plain_seconds() {
  static std::map<std::tuple<std::string, int64_t, bool>, double> seconds;
  return seconds;
}

void BM_Kernel(benchmark::State& state, const std::string& name, bool fast, bool train) {
  const Kernel& kernel = kernels().at(name);
  const int64_t side = state.range(0);
  torch::manual_seed(0);
  std::vector<torch::Tensor> inputs = kernel.inputs(side);
  for (auto& t : inputs) t.requires_grad_(train);
  const ops::FastKernels mode(fast);
  auto run = [&] {
    if (!train) {
      torch::NoGradGuard no_grad;
      return kernel.op(inputs).sum();
    }
    const torch::Tensor y = kernel.op(inputs);
    return gradients((y * y).sum(), inputs).front().sum();
  };
  run();  // warm-up
  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(run());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  seconds /= static_cast<double>(state.iterations());
  const double flop = 2.0 * static_cast<double>(kernel.multiply_adds_per_pixel * side * side) * (train ? 3.0 : 1.0);
  if (flop > 0) state.counters["GFLOP/s"] = flop / seconds / 1e9;
  const auto key = std::make_tuple(name, side, train);
  if (!fast) plain_seconds()[key] = seconds;
  const auto plain = plain_seconds().find(key);
  if (fast && plain != plain_seconds().end()) state.counters["FastOverPlain"] = plain->second / seconds;
}

void register_all() {
  for (const auto& [name, kernel] : kernels()) {
    for (const bool train : {false, true}) {
      for (const bool fast : {false, true}) {  // plain first, so that the fast run finds its reference
        const std::string label = "BM_" + name + (train ? "/train" : "") + (fast ? "/fast" : "/plain");
        benchmark::RegisterBenchmark(label.c_str(), BM_Kernel, name, fast, train)
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

#pragma once
// The main function of the benchmark programs and their timing loop: every core, freed memory kept for reuse
// (as the tdfusion command runs), LibTorch's thread count in the report's context.
#include <benchmark/benchmark.h>

#include <tdfusion/core/runtime.hpp>

#include <chrono>
#include <string>

namespace tdfusion::bench {

/// Calls `run` once per benchmark iteration and returns the mean seconds per call: what the programs' ratio
/// counters divide (warm-up calls are the caller's).
template <class Run>
double mean_seconds(benchmark::State& state, const Run& run) {
  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    run();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return seconds / static_cast<double>(state.iterations());
}

inline int run(int argc, char** argv) {
  reuse_freed_memory();
  use_cpu_threads();
  benchmark::AddCustomContext("torch_threads", std::to_string(torch::get_num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace tdfusion::bench

#pragma once
// The main function of the benchmark programs: every core, freed memory kept for reuse (as the tdfusion command
// runs), LibTorch's thread count in the report's context.
#include <benchmark/benchmark.h>

#include <tdfusion/core/runtime.hpp>

#include <string>

namespace tdfusion::bench {

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

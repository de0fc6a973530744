// Cost of exact tiled fusion (fusion::fuse_tiled) against the untiled forward pass, for ReFusion.
//
//   build/benchmarks/bench_tiled --benchmark_counters_tabular=true
//
// Arguments: image height, width, tile side (0: untiled), and 1 for tiles in parallel (one per thread, each
// single-threaded) or 0 for one after another (each on all threads). Tiled ReFusion runs about 8 / 2 + 1 = 5
// forward passes (one statistics pass per attention call, each stopped at that call, plus the output pass),
// each over the tiles' 16-pixel halos too; its memory is that of one tile per concurrent tile. Counter:
// megapixels per second.
#include "benchmark_main.hpp"

#include <benchmark/benchmark.h>

#include <tdfusion/fusion/refusion.hpp>
#include <tdfusion/fusion/tiled_fusion.hpp>

namespace {

using namespace tdfusion;

void BM_ReFusion(benchmark::State& state) {
  const int64_t height = state.range(0), width = state.range(1), tile = state.range(2);
  const bool parallel_tiles = state.range(3) != 0;
  torch::manual_seed(0);
  fusion::ReFusion net;
  const torch::Tensor ir = torch::rand({1, 1, height, width}), vi = torch::rand({1, 1, height, width});
  torch::NoGradGuard no_grad;
  auto fuse = [&] {
    return tile == 0 ? net->forward(ir, vi) : fusion::fuse_tiled(net, ir, vi, fusion::TiledFusionOptions().tile(tile).parallel_tiles(parallel_tiles));
  };
  if (height * width <= (1 << 20)) fuse();  // warm-up; a large image is its own
  for (auto _ : state) benchmark::DoNotOptimize(fuse());
  state.counters["MPixel/s"] =
      benchmark::Counter(static_cast<double>(height * width) / 1e6, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_ReFusion)
    ->ArgNames({"H", "W", "tile", "parallel"})
    ->Args({512, 512, 0, 0})
    ->Args({512, 512, 256, 0})
    ->Args({512, 512, 256, 1})
    ->Args({512, 512, 128, 0})
    ->Args({512, 512, 128, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// 3.1 megapixels: untiled would hold every layer's activations of the whole image at once.
BENCHMARK(BM_ReFusion)
    ->ArgNames({"H", "W", "tile", "parallel"})
    ->Args({2048, 1536, 512, 0})
    ->Args({2048, 1536, 512, 1})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

int main(int argc, char** argv) {
  return tdfusion::bench::run(argc, argv);
}

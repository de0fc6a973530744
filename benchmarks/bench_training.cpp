// Cost of the bilevel optimiser's steps and of fusion, for ReFusion and LightFusion, at several crop sizes.
//
//   build/benchmarks/bench_training --benchmark_counters_tabular=true
//
// Each benchmark runs on an S x S crop batch of one pair plus its modality swap (batch 2, as in the release),
// with the task input at the same size. Counters: megapixels per second (fusion) and, for the meta step, its
// time relative to a plain phase-B step measured in the same process (MetaOverPlain).
#include <benchmark/benchmark.h>

#include <tdfusion/tdfusion.hpp>

#include <chrono>
#include <map>
#include <thread>

namespace {

using namespace tdfusion;
using Batch = data::PairBatch<torch::Tensor>;

Batch batch_of(int64_t size) {
  torch::manual_seed(0);
  data::SyntheticScenes scenes(data::SyntheticScenesOptions().count(1).scene_height(size).scene_width(size)
                                   .task_height(size).task_width(size).crop_size(size).flip(false));
  return scenes.get(0);
}

template <class Fusion>
auto make_trainer() {
  torch::manual_seed(0);
  return meta::BilevelOptimizer<Fusion, lossgen::Lpn, task::SmallSegNet>(
      Fusion(), lossgen::Lpn(), task::SmallSegNet(task::SmallSegNetOptions().num_classes(data::kSceneClasses)));
}

/// Plain-step seconds per (network, size), so the meta benchmark can report its ratio to the plain step.
std::map<std::pair<std::string, int64_t>, double>& plain_step_seconds() {
  static std::map<std::pair<std::string, int64_t>, double> seconds;
  return seconds;
}

template <class Fusion>
void BM_PlainStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch batch = batch_of(state.range(0));
  trainer.train_step(batch);  // warm-up
  double total = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(trainer.train_step(batch));
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  plain_step_seconds()[{name, state.range(0)}] = total / static_cast<double>(state.iterations());
}

template <class Fusion>
void BM_MetaStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch train = batch_of(state.range(0)), test = batch_of(state.range(0));
  trainer.meta_step(train, test);  // warm-up
  double total = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(trainer.meta_step(train, test));
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const auto plain = plain_step_seconds().find({name, state.range(0)});
  if (plain != plain_step_seconds().end())
    state.counters["MetaOverPlain"] = total / static_cast<double>(state.iterations()) / plain->second;
}

template <class Fusion>
void BM_Fuse(benchmark::State& state) {
  auto trainer = make_trainer<Fusion>();
  const Batch batch = batch_of(state.range(0));
  const torch::Tensor ir = batch.ir, vi = batch.vi;
  trainer.fuse(ir, vi);
  for (auto _ : state) benchmark::DoNotOptimize(trainer.fuse(ir, vi));
  state.counters["MPixel/s"] =
      benchmark::Counter(static_cast<double>(ir.numel()) / 1e6, benchmark::Counter::kIsIterationInvariantRate);
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int64_t s : {128, 256, 512}) b->Arg(s);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

void BM_PlainStep_ReFusion(benchmark::State& state) { BM_PlainStep<fusion::ReFusion>(state, "ReFusion"); }
void BM_PlainStep_LightFusion(benchmark::State& state) { BM_PlainStep<fusion::LightFusion>(state, "LightFusion"); }
void BM_MetaStep_ReFusion(benchmark::State& state) { BM_MetaStep<fusion::ReFusion>(state, "ReFusion"); }
void BM_MetaStep_LightFusion(benchmark::State& state) { BM_MetaStep<fusion::LightFusion>(state, "LightFusion"); }
void BM_Fuse_ReFusion(benchmark::State& state) { BM_Fuse<fusion::ReFusion>(state); }
void BM_Fuse_LightFusion(benchmark::State& state) { BM_Fuse<fusion::LightFusion>(state); }

// Plain steps are registered first so that the meta-step ratios find them.
BENCHMARK(BM_PlainStep_ReFusion)->Apply(sizes);
BENCHMARK(BM_PlainStep_LightFusion)->Apply(sizes);
BENCHMARK(BM_MetaStep_ReFusion)->Apply(sizes);
BENCHMARK(BM_MetaStep_LightFusion)->Apply(sizes);
BENCHMARK(BM_Fuse_ReFusion)->Apply(sizes);
BENCHMARK(BM_Fuse_LightFusion)->Apply(sizes);

int main(int argc, char** argv) {
  // Debian's LibTorch may start with a single intra-op thread; use every core.
  tdfusion::use_cpu_threads();
  tdfusion::reuse_freed_memory();
  benchmark::AddCustomContext("torch_threads", std::to_string(torch::get_num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}

// Cost of the bilevel optimiser's steps and of fusion, for ReFusion and LightFusion, at several sizes.
//
//   build/benchmarks/bench_training --benchmark_counters_tabular=true
//
// Steps run on an S x S crop batch of one pair plus its modality swap (batch 2, as in the release), with the
// task input (SmallSegNet) at the same size; fusion runs on one S x S pair. Counters: GFLOP/s of the fast
// convolution and matrix kernels (their multiply-adds, 2 FLOP each, per second of the whole step: elementwise
// work and LibTorch's own ops count as time only), megapixels per second and milliseconds per megapixel
// (fusion; constant when the cost is linear in the pixel count), and for the meta step its time relative to
// a plain phase-B step measured in the same process (MetaOverPlain).
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

/// Times `step` over the benchmark's iterations (after one warm-up call); sets GFLOP/s from the multiply-adds
/// the fast kernels did meanwhile and returns seconds per iteration.
template <class Step>
double timed(benchmark::State& state, const Step& step) {
  step();
  double seconds = 0.0;
  const int64_t before = nn::kernels::multiply_adds().load();
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    step();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double multiply_adds = static_cast<double>(nn::kernels::multiply_adds().load() - before);
  state.counters["GFLOP/s"] = 2.0 * multiply_adds / seconds / 1e9;
  return seconds / static_cast<double>(state.iterations());
}

template <class Fusion>
void BM_PlainStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch batch = batch_of(state.range(0));
  plain_step_seconds()[{name, state.range(0)}] = timed(state, [&] { benchmark::DoNotOptimize(trainer.train_step(batch)); });
}

template <class Fusion>
void BM_MetaStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch train = batch_of(state.range(0)), test = batch_of(state.range(0));
  const double seconds = timed(state, [&] { benchmark::DoNotOptimize(trainer.meta_step(train, test)); });
  const auto plain = plain_step_seconds().find({name, state.range(0)});
  if (plain != plain_step_seconds().end()) state.counters["MetaOverPlain"] = seconds / plain->second;
}

template <class Fusion>
void BM_Fuse(benchmark::State& state) {
  auto trainer = make_trainer<Fusion>();
  const int64_t side = state.range(0);
  torch::manual_seed(0);
  const torch::Tensor ir = torch::rand({1, 1, side, side}), vi = torch::rand({1, 1, side, side});
  const double seconds = timed(state, [&] { benchmark::DoNotOptimize(trainer.fuse(ir, vi)); });
  const double megapixels = static_cast<double>(side * side) / 1e6;
  state.counters["MPixel/s"] = megapixels / seconds;
  state.counters["ms/MPixel"] = seconds * 1e3 / megapixels;
}

void step_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t s : {128, 256, 512}) b->Arg(s);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

// The meta step keeps the graph of a gradient: at 512 x 512 (two crops) ReFusion's exceeds 24 GB.
void meta_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t s : {128, 256}) b->Arg(s);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

// Largest first: the process's heap grows once to the largest image's needs and smaller ones reuse it, instead of
// each new maximum paying first-touch page faults inside its timed run.
void fusion_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t s : {2048, 1024, 512, 256, 128}) b->Arg(s);
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
BENCHMARK(BM_PlainStep_ReFusion)->Apply(step_sizes);
BENCHMARK(BM_PlainStep_LightFusion)->Apply(step_sizes);
BENCHMARK(BM_MetaStep_ReFusion)->Apply(meta_sizes);
BENCHMARK(BM_MetaStep_LightFusion)->Apply(step_sizes);
BENCHMARK(BM_Fuse_ReFusion)->Apply(fusion_sizes);
BENCHMARK(BM_Fuse_LightFusion)->Apply(fusion_sizes);

int main(int argc, char** argv) {
  tdfusion::use_cpu_threads();
  tdfusion::reuse_freed_memory();
  benchmark::AddCustomContext("torch_threads", std::to_string(torch::get_num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}

// Cost of the bilevel optimiser's steps and of fusion, for ReFusion and LightFusion, at several sizes.
//
//   build/benchmarks/bench_training --benchmark_counters_tabular=true
//
// Steps run on an S x S crop batch of one pair plus its modality swap (batch 2, as in the release), with the
// task input (SmallSegNet) at the same size; fusion runs on one S x S pair (BM_Fuse640x480: 480 x 640).
// Argument `fast`: 1 with the fast CPU kernels, 0 with the plain LibTorch ops (nn::ops::FastKernels(false)).
// Counters: GFLOP/s of the fast convolution and matrix kernels (their multiply-adds, 2 FLOP each, per second of
// the whole step: elementwise work and LibTorch's own ops count as time only), FastOverPlain (the plain run's
// time over the fast run's), megapixels per second and milliseconds per megapixel (fusion; constant when the
// cost is linear in the pixel count), and for the meta step its time relative to a phase-B step of the same
// kind (MetaOverPlain).
// BM_MetaStepDetector: the meta step of the detection experiment (examples/detection_experiment.cpp), with
// SmallDetector on two real MSRS pairs and their boxes (task input 192 x 256, argument W its width).

#include "benchmark_main.hpp"

#include <benchmark/benchmark.h>

#include <tdfusion/tdfusion.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <tuple>
#include <vector>

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

/// Seconds per iteration by (benchmark, network, size, fast kernels): for the ratios between runs.
std::map<std::tuple<std::string, std::string, int64_t, bool>, double>& seconds_of() {
  static std::map<std::tuple<std::string, std::string, int64_t, bool>, double> seconds;
  return seconds;
}

/// Times `step` over the benchmark's iterations (after one warm-up call) with the fast kernels on or off
/// (argument 1); sets GFLOP/s from the multiply-adds the fast kernels did meanwhile, and for a fast run
/// FastOverPlain, the plain run's time divided by this one's. Returns seconds per iteration.
template <class Step>
double timed(benchmark::State& state, const std::string& kind, const std::string& net, const Step& step) {
  const bool fast = state.range(1) != 0;
  const nn::ops::FastKernels mode(fast);
  step();  // warm-up
  const int64_t before = nn::kernels::multiply_adds().load();
  const double seconds = bench::mean_seconds(state, step);
  if (fast) {
    const double multiply_adds = static_cast<double>(nn::kernels::multiply_adds().load() - before);
    state.counters["GFLOP/s"] = 2.0 * multiply_adds / static_cast<double>(state.iterations()) / seconds / 1e9;
    const auto plain = seconds_of().find({kind, net, state.range(0), false});
    if (plain != seconds_of().end()) state.counters["FastOverPlain"] = plain->second / seconds;
  }
  seconds_of()[{kind, net, state.range(0), fast}] = seconds;
  return seconds;
}

template <class Fusion>
void BM_PlainStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch batch = batch_of(state.range(0));
  timed(state, "step", name, [&] { benchmark::DoNotOptimize(trainer.train_step(batch)); });
}

template <class Fusion>
void BM_MetaStep(benchmark::State& state, const std::string& name) {
  auto trainer = make_trainer<Fusion>();
  const Batch train = batch_of(state.range(0)), test = batch_of(state.range(0));
  const double seconds = timed(state, "meta", name, [&] { benchmark::DoNotOptimize(trainer.meta_step(train, test)); });
  const auto plain = seconds_of().find({"step", name, state.range(0), state.range(1) != 0});
  if (plain != seconds_of().end()) state.counters["MetaOverPlain"] = seconds / plain->second;
}

template <class Fusion>
void BM_MetaStepDetector(benchmark::State& state, const std::string& name) {
  const std::string msrs = std::string(TDFUSION_SHARED_DIR) + "/data/msrs";
  if (!std::filesystem::is_directory(msrs)) {
    state.SkipWithError((msrs + " is absent: this benchmark needs the real MSRS pairs").c_str());
    return;
  }
  const data::DetectionFolder folder(msrs, data::PairedFolderOptions()
                                               .task_height(192).task_width(state.range(0)).crop_size(128)
                                               .label_dir(msrs + "/det_labels/fusion").require_labels(true)
                                               .num_classes(3).flip(false));
  torch::manual_seed(0);
  meta::BilevelOptimizer<Fusion, lossgen::Lpn, task::SmallDetector> trainer(
      Fusion(), lossgen::Lpn(), task::SmallDetector(task::SmallDetectorOptions().num_classes(3)));
  const auto train = folder.get(0), test = folder.get(1);
  timed(state, "meta-detector", name, [&] { benchmark::DoNotOptimize(trainer.meta_step(train, test)); });
}

template <class Fusion>
void fuse(benchmark::State& state, const std::string& kind, const std::string& name, int64_t height, int64_t width) {
  auto trainer = make_trainer<Fusion>();
  torch::manual_seed(0);
  const torch::Tensor ir = torch::rand({1, 1, height, width}), vi = torch::rand({1, 1, height, width});
  const double seconds = timed(state, kind, name, [&] { benchmark::DoNotOptimize(trainer.fuse(ir, vi)); });
  const double megapixels = static_cast<double>(height * width) / 1e6;
  state.counters["MPixel/s"] = megapixels / seconds;
  state.counters["ms/MPixel"] = seconds * 1e3 / megapixels;
}

template <class Fusion>
void BM_Fuse(benchmark::State& state, const std::string& name) {
  fuse<Fusion>(state, "fuse", name, state.range(0), state.range(0));
}

/// Registers `fn` at (size, fast) pairs: the plain LibTorch ops at `plain` sizes first, then the fast kernels.
void add(const char* name, void (*fn)(benchmark::State&), const std::vector<int64_t>& plain,
         const std::vector<int64_t>& fast, const char* size_name = "S") {
  benchmark::internal::Benchmark* b = benchmark::RegisterBenchmark(name, fn)->ArgNames({size_name, "fast"});
  for (int64_t s : plain) b->Args({s, 0});
  for (int64_t s : fast) b->Args({s, 1});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void BM_PlainStep_ReFusion(benchmark::State& state) { BM_PlainStep<fusion::ReFusion>(state, "ReFusion"); }
void BM_PlainStep_LightFusion(benchmark::State& state) { BM_PlainStep<fusion::LightFusion>(state, "LightFusion"); }
void BM_MetaStep_ReFusion(benchmark::State& state) { BM_MetaStep<fusion::ReFusion>(state, "ReFusion"); }
void BM_MetaStep_LightFusion(benchmark::State& state) { BM_MetaStep<fusion::LightFusion>(state, "LightFusion"); }
void BM_MetaStepDetector_ReFusion(benchmark::State& state) { BM_MetaStepDetector<fusion::ReFusion>(state, "ReFusion"); }
void BM_MetaStepDetector_LightFusion(benchmark::State& state) {
  BM_MetaStepDetector<fusion::LightFusion>(state, "LightFusion");
}
void BM_Fuse_ReFusion(benchmark::State& state) { BM_Fuse<fusion::ReFusion>(state, "ReFusion"); }
void BM_Fuse_LightFusion(benchmark::State& state) { BM_Fuse<fusion::LightFusion>(state, "LightFusion"); }
// The size of an MSRS image, 480 rows of 640 (the argument S is the width).
void BM_Fuse640x480_ReFusion(benchmark::State& state) {
  fuse<fusion::ReFusion>(state, "fuse640x480", "ReFusion", 480, state.range(0));
}

// Plain steps come first, so that the meta-step ratios find them. The meta step keeps the graph of a
// gradient: at 512 x 512 (two crops) ReFusion's exceeds the 24 GB of the machines here. Fusion runs largest
// first: the process's heap grows once to the largest image's needs and smaller images reuse it, instead of
// each new maximum paying first-touch page faults inside its timed run.
void register_all() {
  add("BM_PlainStep_ReFusion", BM_PlainStep_ReFusion, {128, 256}, {128, 256, 512});
  add("BM_PlainStep_LightFusion", BM_PlainStep_LightFusion, {128}, {128, 256, 512});
  add("BM_MetaStep_ReFusion", BM_MetaStep_ReFusion, {128}, {128, 256});
  add("BM_MetaStep_LightFusion", BM_MetaStep_LightFusion, {128}, {128, 256, 512});
  add("BM_MetaStepDetector_ReFusion", BM_MetaStepDetector_ReFusion, {}, {256}, "W");
  add("BM_MetaStepDetector_LightFusion", BM_MetaStepDetector_LightFusion, {256}, {256}, "W");
  add("BM_Fuse_ReFusion", BM_Fuse_ReFusion, {512, 256}, {2048, 1024, 512, 256, 128});
  add("BM_Fuse_LightFusion", BM_Fuse_LightFusion, {512}, {2048, 1024, 512, 256, 128});
  add("BM_Fuse640x480_ReFusion", BM_Fuse640x480_ReFusion, {640}, {640});
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return tdfusion::bench::run(argc, argv);
}

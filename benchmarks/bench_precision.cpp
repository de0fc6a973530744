// BF16 against FP32 on this CPU: would a BF16 inference path be faster, and would it keep the metrics?
//
//   build/benchmarks/bench_precision --benchmark_counters_tabular=true
//
// BM_DotProductRate: the multiply-add rate of one core's register-only loop of AVX-512 FP32 FMAs
//   (vfmadd231ps, 16 multiply-adds each) and of AVX512-BF16 dot products (vdpbf16ps, 32 each): the hardware
//   ceiling of each precision (counter GMAC/s; skipped where the CPU lacks AVX-512 or AVX512-BF16).
// BM_Conv: the convolutions of ReFusion's decoder on an S x S image, FP32 on tdfusion's inference path (the
//   1x1 on the Eigen kernel, the 3x3 on oneDNN) against BF16 tensors on LibTorch's oneDNN BF16 kernels
//   (the conversions to and from BF16 not counted). Counters: GFLOP/s; Bf16OverFp32, the FP32 time over the
//   BF16 time (above 1: BF16 faster).
// BM_Fuse: `fusion::fuse_images` with the released ReFusion weights (../shared/fixtures) on MSRS 00004N
//   (640 x 480), FP32 on the fast kernels against the whole network converted to BF16 (LibTorch's ops). The
//   BF16 run also fuses the first ten MSRS pairs both ways and reports the largest change of any of the
//   nine CDDFuse-protocol metrics (MaxMetricChange, absolute; MaxRelMetricChange, relative to the FP32 value)
//   and of any 8-bit output level (MaxLevelChange).
#include "benchmark_main.hpp"

#include <benchmark/benchmark.h>

#include <tdfusion/data/paired_folder.hpp>
#include <tdfusion/fusion/fuse_images.hpp>
#include <tdfusion/fusion/refusion.hpp>
#include <tdfusion/io/image.hpp>
#include <tdfusion/io/torch_state_dict.hpp>
#include <tdfusion/metrics/fusion_metrics.hpp>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <string>

namespace {

using namespace tdfusion;
namespace fs = std::filesystem;

constexpr int kChains = 12;  // independent accumulators: enough to cover either instruction's latency

__attribute__((target("avx512f"))) float fma_loop(int64_t iterations) {
  __m512 acc[kChains];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512 x = _mm512_set1_ps(1e-8f), y = _mm512_set1_ps(1.0f);
  __asm__ volatile("" : "+v"(x), "+v"(y));  // opaque inputs: the loop can be neither folded nor hoisted
  for (int64_t i = 0; i < iterations; ++i) {
    for (auto& a : acc) a = _mm512_fmadd_ps(x, y, a);
  }
  float sum = 0;
  for (const auto& a : acc) sum += _mm512_reduce_add_ps(a);
  return sum;
}

__attribute__((target("avx512f,avx512bf16"))) float bf16_dot_loop(int64_t iterations) {
  __m512 acc[kChains];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0 in BF16
  __asm__ volatile("" : "+v"(x));
  for (int64_t i = 0; i < iterations; ++i) {
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, x);
  }
  float sum = 0;
  for (const auto& a : acc) sum += _mm512_reduce_add_ps(a);
  return sum;
}

void BM_DotProductRate(benchmark::State& state, bool bf16) {
  if (!__builtin_cpu_supports("avx512f") || (bf16 && !__builtin_cpu_supports("avx512bf16"))) {
    state.SkipWithError(bf16 ? "this CPU has no AVX512-BF16" : "this CPU has no AVX-512");
    return;
  }
  const int64_t iterations = 10'000'000;
  for (auto _ : state) benchmark::DoNotOptimize(bf16 ? bf16_dot_loop(iterations) : fma_loop(iterations));
  const double per_iteration = static_cast<double>(iterations * kChains * (bf16 ? 32 : 16));
  state.counters["GMAC/s"] = benchmark::Counter(per_iteration / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Seconds per iteration of the FP32 runs, by (benchmark, size), for the BF16 runs' ratio.
std::map<std::pair<std::string, int64_t>, double>& fp32_seconds() {
  static std::map<std::pair<std::string, int64_t>, double> seconds;
  return seconds;
}

/// Times `run` (after one warm-up call), records an FP32 time or reports a BF16 run's Bf16OverFp32.
template <class Run>
double timed(benchmark::State& state, const std::string& name, bool bf16, const Run& run) {
  run();  // warm-up
  const double seconds = bench::mean_seconds(state, [&] { benchmark::DoNotOptimize(run()); });
  const auto key = std::make_pair(name, state.range(0));
  if (!bf16) fp32_seconds()[key] = seconds;
  const auto fp32 = fp32_seconds().find(key);
  if (bf16 && fp32 != fp32_seconds().end()) state.counters["Bf16OverFp32"] = fp32->second / seconds;
  return seconds;
}

void BM_Conv(benchmark::State& state, const std::string& shape, int64_t in, int64_t out, int64_t kernel, bool bf16) {
  const int64_t side = state.range(0);
  torch::manual_seed(0);
  const auto type = bf16 ? torch::kBFloat16 : torch::kFloat;
  const torch::Tensor x = torch::randn({1, in, side, side}).to(type);
  const torch::Tensor w = (torch::randn({out, in, kernel, kernel}) * 0.1).to(type);
  const c10::InferenceMode inference;
  const double seconds = timed(state, shape, bf16, [&] {
    if (bf16) return torch::conv2d(x, w, {}, 1, kernel / 2);
    return kernel == 1 ? nn::ops::conv1x1(x, w) : nn::ops::conv_same(x, w);
  });
  state.counters["GFLOP/s"] = 2.0 * static_cast<double>(side * side * in * out * kernel * kernel) / seconds / 1e9;
}

fusion::ReFusion released_refusion(const std::string& weights, bool bf16) {
  fusion::ReFusion net;
  io::load_torch_state_dict(*net, weights);
  if (bf16) net->to(torch::kBFloat16);
  return net;
}

/// The largest metric and 8-bit level changes from `fp32` to `bf16` over the first `count` pairs of `msrs`.
void report_metric_changes(benchmark::State& state, fusion::ReFusion& fp32, fusion::ReFusion& bf16,
                           const std::string& msrs, size_t count) {
  std::vector<data::PairPaths> pairs = data::match_pairs(msrs + "/ir", msrs + "/vi", "MSRS");
  pairs.resize(std::min(pairs.size(), count));
  double worst = 0, worst_relative = 0, worst_level = 0;
  for (const data::PairPaths& pair : pairs) {
    const torch::Tensor ir = io::read_image(pair.ir), vi = io::read_image(pair.vi);
    const Eigen::ArrayXXd ir8 = metrics::to_grey8(ir), vi8 = metrics::to_grey8(vi);
    const Eigen::ArrayXXd a = metrics::to_grey8(fusion::fuse_images(fp32, ir, vi));
    const Eigen::ArrayXXd b = metrics::to_grey8(fusion::fuse_images(bf16, ir, vi));
    worst_level = std::max(worst_level, (a - b).abs().maxCoeff());
    const metrics::MetricRow ma = metrics::evaluate_fusion(ir8, vi8, a, metrics::Protocol::cddfuse, 0);
    const metrics::MetricRow mb = metrics::evaluate_fusion(ir8, vi8, b, metrics::Protocol::cddfuse, 0);
    for (const auto& [metric, value] : ma.values) {
      const double change = std::abs(mb.at(metric) - value);
      worst = std::max(worst, change);
      worst_relative = std::max(worst_relative, change / std::max(std::abs(value), 1e-12));
    }
  }
  state.counters["MaxMetricChange"] = worst;
  state.counters["MaxRelMetricChange"] = worst_relative;
  state.counters["MaxLevelChange"] = worst_level;
}

void BM_Fuse(benchmark::State& state, bool bf16) {
  const std::string weights = std::string(TDFUSION_SHARED_DIR) + "/fixtures/refusion-state-dict/refusion_state.pth";
  const std::string msrs = std::string(TDFUSION_SHARED_DIR) + "/data/msrs";
  if (!fs::is_regular_file(weights) || !fs::is_directory(msrs)) {
    state.SkipWithError((weights + " or " + msrs + " is absent: this benchmark needs the released weights and MSRS").c_str());
    return;
  }
  fusion::ReFusion net = released_refusion(weights, bf16);
  const torch::Tensor ir = io::read_image(msrs + "/ir/00004N.png"), vi = io::read_image(msrs + "/vi/00004N.png");
  timed(state, "fuse", bf16, [&] { return fusion::fuse_images(net, ir, vi); });
  if (bf16) {
    fusion::ReFusion fp32 = released_refusion(weights, false);
    report_metric_changes(state, fp32, net, msrs, 10);
  }
}

void register_all() {
  for (const bool bf16 : {false, true}) {
    benchmark::RegisterBenchmark(bf16 ? "BM_DotProductRate/bf16" : "BM_DotProductRate/fp32", BM_DotProductRate, bf16)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  for (const auto& [in, out, kernel] : {std::tuple<int64_t, int64_t, int64_t>{32, 170, 1}, {32, 16, 3}}) {
    const std::string shape = std::to_string(in) + "to" + std::to_string(out) + "_" + std::to_string(kernel) + "x" +
                              std::to_string(kernel);
    for (const bool bf16 : {false, true}) {  // FP32 first, so that the BF16 run finds its reference
      const std::string label = "BM_Conv/" + shape + (bf16 ? "/bf16" : "/fp32");
      benchmark::RegisterBenchmark(label.c_str(), BM_Conv, shape, in, out, kernel, bf16)
          ->Arg(256)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
  }
  for (const bool bf16 : {false, true}) {
    benchmark::RegisterBenchmark(bf16 ? "BM_Fuse640x480/bf16" : "BM_Fuse640x480/fp32", BM_Fuse, bf16)
        ->Arg(640)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return tdfusion::bench::run(argc, argv);
}

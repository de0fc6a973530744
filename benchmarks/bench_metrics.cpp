// Cost of the fusion metrics on the real test sets: all nine metrics of the cddfuse protocol on the 25 TNO pairs
// (SeAFusion's fused images) and the 60 MSRS pairs (SeAFusion, third-party run), on all cores.
//
//   build/benchmarks/bench_metrics --benchmark_counters_tabular=true
//
// Metrics/*: images decoded beforehand, metrics only. Folders/*: evaluate_folders, decoding included.
// Python/*: the NumPy/SciPy reference (tests/reference) on the same images with one process per core, its own
// wall time without interpreter start-up (reported as manual time; skipped without a suitable python3).
#include <benchmark/benchmark.h>

#include <tdfusion/io/image.hpp>
#include <tdfusion/metrics/evaluate_folders.hpp>
#include <tdfusion/metrics/fusion_metrics.hpp>

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace m = tdfusion::metrics;

struct DataSet {
  std::string ir, vi, fused;
};

DataSet data_set(const std::string& name) {
  const std::string root = std::string(TDFUSION_SHARED_DIR) + "/data/";
  if (name == "tno") return {root + "tno/ir", root + "tno/vi", root + "peer_results/SeAFusion/tno"};
  return {root + "msrs/ir", root + "msrs/vi", root + "peer_results/SeAFusion/msrs"};
}

struct Triplet {
  Eigen::ArrayXXd ir, vi, fused;
};

/// The decoded grey triplets of a data set, loaded once per process.
const std::vector<Triplet>& triplets(const std::string& name) {
  static std::map<std::string, std::vector<Triplet>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  const DataSet set = data_set(name);
  const auto ir = m::detail::list_images(set.ir, "ir"), vi = m::detail::list_images(set.vi, "vi");
  const auto fused = m::detail::list_images(set.fused, "fused");
  auto grey = [](const std::string& path) { return m::to_grey8(tdfusion::io::read_image(path)); };
  std::vector<Triplet> loaded;
  for (const auto& [stem, path] : fused) loaded.push_back({grey(ir.at(stem)), grey(vi.at(stem)), grey(path)});
  return cache.emplace(name, std::move(loaded)).first->second;
}

double megapixels(const std::vector<Triplet>& set) {
  double pixels = 0;
  for (const Triplet& t : set) pixels += static_cast<double>(t.fused.size());
  return pixels / 1e6;
}

void BM_Metrics(benchmark::State& state, const std::string& name) {
  const std::vector<Triplet>& set = triplets(name);
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    std::vector<m::MetricRow> rows(set.size());
    m::detail::parallel_for(set.size(), threads, [&](std::size_t i) {
      rows[i] = m::evaluate_fusion(set[i].ir, set[i].vi, set[i].fused, m::Protocol::cddfuse);
    });
    benchmark::DoNotOptimize(rows.data());
  }
  state.counters["images"] = static_cast<double>(set.size());
  state.counters["threads"] = m::detail::resolve_threads(threads);
  state.counters["MPix/s"] = benchmark::Counter(megapixels(set), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Folders(benchmark::State& state, const std::string& name) {
  const DataSet set = data_set(name);
  for (auto _ : state) {
    benchmark::DoNotOptimize(m::evaluate_folders(set.ir, set.vi, set.fused));
  }
  state.counters["threads"] = m::detail::resolve_threads(0);
}

void BM_Python(benchmark::State& state, const std::string& name) {
  const std::string python = TDFUSION_REFERENCE_PYTHON, script = TDFUSION_REFERENCE_SCRIPT;
  if (python.empty() || script.empty()) {
    state.SkipWithError("no python3 with numpy, scipy and PIL was found at configure time");
    return;
  }
  const DataSet set = data_set(name);
  const int jobs = m::detail::resolve_threads(0);
  const std::string out =
      (fs::temp_directory_path() / ("tdfusion-bench-python-" + std::to_string(::getpid()) + ".json")).string();
  const std::string command = python + " '" + script + "' --ir '" + set.ir + "' --vi '" + set.vi + "' --fused '" +
                              set.fused + "' --protocol cddfuse --jobs " + std::to_string(jobs) + " --json '" + out +
                              "'";
  for (auto _ : state) {
    if (std::system(command.c_str()) != 0) {
      state.SkipWithError(("failed: " + command).c_str());
      break;
    }
    std::ifstream file(out);
    state.SetIterationTime(nlohmann::json::parse(file).at("seconds").get<double>());
  }
  std::error_code ignored;
  fs::remove(out, ignored);
  state.counters["threads"] = jobs;
}

}  // namespace

BENCHMARK_CAPTURE(BM_Metrics, tno, std::string("tno"))->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Metrics, msrs, std::string("msrs"))->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Folders, tno, std::string("tno"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Folders, msrs, std::string("msrs"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Python, tno, std::string("tno"))->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Python, msrs, std::string("msrs"))->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();

// The `tdfusion` command as a user meets it: one 640x480 pair fused by a fresh process, against a fresh
// `tdfusion --help` (which loads the same libraries and nothing else). Each iteration runs both, one after
// the other, so drift of the machine hits both alike. Reported per iteration (means): the fusing process's
// wall time (the benchmark's time), `help_s`, `beyond_help_s` (their difference), the fusing process's peak
// resident memory `peak_MB` (the largest seen) and minor page faults `faults`. The pair is the shipped
// example MSRS 00537D (examples/data), so this runs in a clone without ../shared.
#include <benchmark/benchmark.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;

struct ProcessCost {
  double seconds = 0;
  double peak_mb = 0;
  double minor_faults = 0;
  bool succeeded = false;
};

/// Runs the command (stdout and stderr to /dev/null) and waits for it.
ProcessCost run_process(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  ProcessCost cost;
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = 0;
  if (posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ) == 0) {
    int status = 0;
    rusage usage{};
    if (wait4(pid, &status, 0, &usage) == pid) {
      cost.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      cost.peak_mb = static_cast<double>(usage.ru_maxrss) / 1024.0;
      cost.minor_faults = static_cast<double>(usage.ru_minflt);
      cost.succeeded = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
  }
  posix_spawn_file_actions_destroy(&actions);
  return cost;
}

void BM_FirstPair(benchmark::State& state, const std::string& model) {
  const std::string command = TDFUSION_COMMAND, pairs = TDFUSION_EXAMPLE_DATA;
  const fs::path out = fs::temp_directory_path() / ("tdfusion-bench-startup-" + std::to_string(getpid()) + ".png");
  const std::vector<std::string> help = {command, "--help"};
  const std::vector<std::string> fuse = {command, "fuse", "--model", model, "--ir", pairs + "/ir/msrs_00537D.png",
                                         "--vi", pairs + "/vi/msrs_00537D.png", "--out", out.string()};
  double help_seconds = 0, fuse_seconds = 0, faults = 0, peak_mb = 0;
  for (auto _ : state) {
    const ProcessCost base = run_process(help), cost = run_process(fuse);
    if (!base.succeeded || !cost.succeeded) {
      state.SkipWithError(("'" + command + "' failed; build it first").c_str());
      break;
    }
    state.SetIterationTime(cost.seconds);
    help_seconds += base.seconds;
    fuse_seconds += cost.seconds;
    faults += cost.minor_faults;
    peak_mb = std::max(peak_mb, cost.peak_mb);
  }
  fs::remove(out);
  const auto mean = benchmark::Counter::kAvgIterations;
  state.counters["help_s"] = benchmark::Counter(help_seconds, mean);
  state.counters["beyond_help_s"] = benchmark::Counter(fuse_seconds - help_seconds, mean);
  state.counters["faults"] = benchmark::Counter(faults, mean);
  state.counters["peak_MB"] = peak_mb;
}

BENCHMARK_CAPTURE(BM_FirstPair, refusion, std::string("refusion"))
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
BENCHMARK_CAPTURE(BM_FirstPair, light, std::string("light"))
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

}  // namespace

BENCHMARK_MAIN();

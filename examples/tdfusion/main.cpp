// The `tdfusion` command: fuse, train, eval, demo (git-style subcommands, one file each).
//
//   tdfusion fuse --ir ir.png --vi vi.png --out fused.png        one pair (any size; --tile N for huge images)
//   tdfusion fuse --ir DIR/ir --vi DIR/vi --out OUT/              whole folders, matched by file stem
//   tdfusion train --data DIR --out RUN/ [--task ...] [--resume]  bilevel training in a run folder
//   tdfusion eval --ir DIR --vi DIR --fused DIR [--fused ...]     fusion (and task) metrics, one table per method
//   tdfusion demo [--out DIR] [--data DIR] [--model M]            fuses the example pairs with a built-in model
#include "cli.hpp"

#include <tdfusion/core/runtime.hpp>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

/// Prints a message with one "tdfusion: " in front (library messages carry it already).
int fail(const std::string& message, int code) {
  const std::string prefix = "tdfusion: ";
  std::cerr << (message.rfind(prefix, 0) == 0 ? "" : prefix) << message << '\n';
  return code;
}

/// The command's work; returns the exit status.
int run(int argc, char** argv) {
  using namespace tdfusion;
  CLI::App app("tdfusion: task-driven infrared-visible image fusion with a learnable fusion loss");
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads (default: all cores)")
      ->check(CLI::Range(1, 1024).description("1 .. 1024"));
  const std::vector<cli::Subcommand> commands = {cli::add_fuse(app),
                                                 cli::add_train(app, std::vector<std::string>(argv, argv + argc)),
                                                 cli::add_eval(app, threads), cli::add_demo(app)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  const auto cores = static_cast<int>(std::thread::hardware_concurrency());
  if (cores > 0 && threads > cores) {
    return fail("--threads " + std::to_string(threads) + " exceeds the " + std::to_string(cores) +
                    " CPU threads of this machine",
                2);
  }
  // LibTorch takes its default thread count from OMP_NUM_THREADS: given there (unless the user set it), the
  // count needs no change, which would start a thread pool that busy-waits on a core for tens of milliseconds
  // while the first fusion runs (see use_cpu_threads).
  setenv("OMP_NUM_THREADS", std::to_string(threads > 0 ? threads : std::max(cores, 1)).c_str(), /*overwrite=*/0);
  reuse_freed_memory();
  use_cpu_threads(threads);
  try {
    for (const cli::Subcommand& command : commands) {
      if (*command.app) return command.run();
    }
  } catch (const cli::UsageError& e) {
    return fail(e.what(), 2);
  } catch (const CLI::ValidationError& e) {
    return fail(e.what(), 2);
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace(), 1);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  }
  return 0;
}

}  // namespace

// Ends without running static destructors: LibTorch's deregister its thousands of operators, 0.08-0.09 s of
// every command on this project's machines (`perf record`), and nothing here needs them: the commands' files
// are closed when `run` returns, and the output streams are flushed below.
int main(int argc, char** argv) {
  const int status = run(argc, argv);
  std::cout.flush();
  std::fflush(nullptr);
  std::_Exit(status);
}

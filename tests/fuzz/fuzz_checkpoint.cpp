// libFuzzer target: bytes -> io::load_checkpoint of a small network, its Adam state and a counter: tdfusion's
// checks of the zip records, pickles and TorchScript source, then LibTorch's loader on what passes them, then
// the shape and finiteness checks. Built with FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, which skips the
// records' CRC-32 check so that mutated records reach the parsers (the unit tests check the CRCs).
// Every input must load or be refused with one of tdfusion's sentences naming the file; a crash, a hang or
// another exception is a finding.
//
// Build (Debian 12: clang 14 and libfuzzer-14-dev; from the repository root):
//   clang++-14 -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION \
//       -Iinclude -isystem /usr/include/torch/csrc/api/include tests/fuzz/fuzz_checkpoint.cpp \
//       -o build/fuzz_checkpoint -ltorch -ltorch_cpu -lc10 -lz
// Run (new inputs go to the first folder; the file the target writes lives in /dev/shm):
//   mkdir -p build/fuzz-checkpoint && build/fuzz_checkpoint -max_total_time=1800 -timeout=10 -rss_limit_mb=1536 \
//       -malloc_limit_mb=256 -max_len=16384 build/fuzz-checkpoint tests/fuzz/corpus/checkpoint
//
// The seed is a checkpoint written by io::save_checkpoint for exactly the state below (after one Adam step).
#include "tdfusion/io/checkpoint.hpp"

#include <c10/util/Logging.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  c10::SetStackTraceFetcher([] { return std::string(); });  // every refusal would otherwise symbolise a backtrace
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/dev/shm/fuzz_checkpoint-" + std::to_string(::getpid()) + ".pt";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  torch::nn::Linear net(4, 3);
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(0.01));
  tdfusion::io::CheckpointState state;
  state.modules = {{"fusion", net.ptr()}};
  state.optimizers = {{"adam", &adam}};
  state.counters = {{"epoch", 0}};
  try {
    tdfusion::io::load_checkpoint(path, state);
  } catch (const c10::Error& error) {
    const std::string text = error.what_without_backtrace();
    if (text.find(path) == std::string::npos || text.rfind("tdfusion: ", 0) != 0) {
      std::fprintf(stderr, "message is not a sentence naming the file: %s\n", text.c_str());
      std::abort();
    }
  }
  return 0;
}

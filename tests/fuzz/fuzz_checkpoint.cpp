// libFuzzer target: bytes -> io::load_checkpoint of a small network, its Adam state and a counter: tdfusion's
// checks of the zip records, pickles and TorchScript source, then LibTorch's loader on what passes them, then
// the shape and finiteness checks. Built with FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, which skips the
// records' CRC-32 check so that mutated records reach the parsers (the unit tests check the CRCs).
// Every input must load or be refused with one of tdfusion's sentences naming the file; a crash, a hang or
// another exception is a finding.
//
// Run: FUZZ_FLAGS="-malloc_limit_mb=256 -max_len=16384" tests/fuzz/run --time 1800 fuzz_checkpoint
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

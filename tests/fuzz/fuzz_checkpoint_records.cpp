// libFuzzer target: bytes -> the checks a checkpoint's pickle and TorchScript source records pass before LibTorch
// parses them (io::detail::check_pickle, io::detail::check_declarations). Every input must be accepted or refused
// with one of tdfusion's sentences naming the record; a crash, a hang or another exception is a finding.
//
// Run: tests/fuzz/run --time 1800 fuzz_checkpoint_records
//
// The seeds are the pickle and source records of a checkpoint written by io::save_checkpoint (a Linear(4, 3) and
// a BatchNorm1d(3) in a Sequential, with their Adam state): data.pkl, constants.pkl, a .debug_pkl and two class
// declarations.
#include "tdfusion/io/checkpoint.hpp"

#include <c10/util/Logging.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  c10::SetStackTraceFetcher([] { return std::string(); });  // every refusal would otherwise symbolise a backtrace
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  for (const bool pickle : {true, false}) {
    try {
      if (pickle) {
        tdfusion::io::detail::check_pickle(bytes, "record x");
      } else {
        tdfusion::io::detail::check_declarations(bytes, "record x");
      }
    } catch (const c10::Error& error) {
      const std::string text = error.what_without_backtrace();
      if (text.rfind("tdfusion: record x ", 0) != 0) {
        std::fprintf(stderr, "message is not a sentence naming the record: %s\n", text.c_str());
        std::abort();
      }
    }
  }
  return 0;
}

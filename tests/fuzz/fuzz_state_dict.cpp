// libFuzzer target: bytes -> io::read_torch_state_dict (zip directory, inflate, pickle, tensor geometry) ->
// io::load_state_dict into a small LightFusion (twin keys, shapes, finite values). Built with
// FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, which skips the records' CRC-32 check so that mutated records
// reach the parsers (the unit tests check the CRCs).
// Every input must either load or be refused with one of tdfusion's sentences naming the file; anything else
// (a crash, another exception, a message that is LibTorch's or the standard library's) aborts, and the
// sanitizers and libFuzzer's limits catch leaks, hangs and oversized allocations.
//
// Run: FUZZ_FLAGS=-malloc_limit_mb=256 tests/fuzz/run --time 1800 fuzz_state_dict
//
// The seeds are state_dicts written by io::write_torch_state_dict (LightFusion of width 2: depth 0, and depth 1
// in the released layout with its `.conv.weight` twins), the latter with its records deflated (re-zipped by
// Python's zipfile), and the first cut in half.
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <c10/util/Logging.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

namespace {

const std::string kName = "fuzz.pth";

void require_sentence(const c10::Error& error) {
  const std::string text = error.what_without_backtrace();
  if (text.rfind("tdfusion: " + kName, 0) != 0) {
    std::fprintf(stderr, "message is not a sentence naming the file: %s\n", text.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  c10::SetStackTraceFetcher([] { return std::string(); });  // every refusal would otherwise symbolise a backtrace
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static tdfusion::fusion::LightFusion net(tdfusion::fusion::LightFusionOptions().width(2).depth(1));
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const tdfusion::ParamDict state = tdfusion::io::read_torch_state_dict(in, kName);
    tdfusion::io::load_state_dict(*net, state, kName);
  } catch (const c10::Error& error) {
    require_sentence(error);
  }
  return 0;
}

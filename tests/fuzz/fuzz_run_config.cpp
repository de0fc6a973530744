// libFuzzer target: a run's config.json (meta::parse_run_config) on arbitrary bytes. A refusal naming the file
// is fine; a crash, a sanitizer report, a hang, another exception, or a configuration that does not survive
// writing and reading back unchanged is a finding.
#include "tdfusion/meta/run_folder.hpp"

#include <c10/util/Logging.h>

#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  c10::SetStackTraceFetcher([] { return std::string(); });  // every refusal would otherwise symbolise a backtrace
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  tdfusion::meta::RunConfig config;
  try {
    config = tdfusion::meta::parse_run_config(text, "RUN/config.json");
  } catch (const c10::Error& error) {
    if (std::string(error.what_without_backtrace()).find("RUN/config.json") == std::string::npos) std::abort();
    return 0;
  }
  const std::string written = tdfusion::meta::to_json(config).dump();
  const tdfusion::meta::RunConfig back = tdfusion::meta::parse_run_config(written, "written");
  if (!tdfusion::meta::config_differences(config, back).empty()) std::abort();
  return 0;
}

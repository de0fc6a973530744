// Helpers shared by the subcommands of `tdfusion`.
#include "cli.hpp"

#include <cmath>
#include <sstream>

// The built-in models: examples/models/NAME.pth, embedded at build time by cmake/embed_file.cmake (size 0 when
// the file was absent at build time).
extern const unsigned char tdfusion_model_refusion[], tdfusion_model_light[];
extern const std::size_t tdfusion_model_refusion_size, tdfusion_model_light_size;

namespace tdfusion::cli {

std::pair<int64_t, int64_t> parse_size(const std::string& text, const std::string& option) {
  int64_t h = 0, w = 0;
  char x = 0;
  std::istringstream in(text);
  if (!(in >> h >> x >> w) || x != 'x' || h <= 0 || w <= 0 || h > 65536 || w > 65536 || !in.eof())
    throw UsageError(option + ": expected HxW with sides in 1 .. 65536, e.g. 240x320, got '" + text + "'");
  return {h, w};
}

namespace {

struct BuiltInModel {
  std::string name;
  const unsigned char* bytes;
  std::size_t size;
};

const std::vector<BuiltInModel>& builtin_models() {
  static const std::vector<BuiltInModel> models = {
      {"refusion", tdfusion_model_refusion, tdfusion_model_refusion_size},
      {"light", tdfusion_model_light, tdfusion_model_light_size}};
  return models;
}

}  // namespace

fusion::AnyFusion load_model(const std::string& weights, const std::string& model) {
  if (!weights.empty()) return fusion::load_fusion(weights);
  for (const BuiltInModel& m : builtin_models()) {
    if (m.name != model) continue;
    TORCH_CHECK(m.size > 0, "tdfusion: this build has no built-in model '", model, "' (examples/models/", model,
                ".pth was absent); pass --weights FILE");
    std::istringstream bytes(std::string(reinterpret_cast<const char*>(m.bytes), m.size));
    return fusion::load_fusion(bytes, "the built-in model '" + model + "'");
  }
  throw UsageError("--model " + model + ": not a built-in model");
}

void add_model_options(CLI::App* cmd, std::string& model, std::string& weights) {
  std::vector<std::string> names;
  for (const BuiltInModel& m : builtin_models()) names.push_back(m.name);
  CLI::Option* weights_option =
      cmd->add_option("--weights", weights, "fusion state_dict (.pth) to use instead of a built-in model");
  cmd->add_option("--model", model, "built-in model: refusion (the paper's network) or light (faster)")
      ->capture_default_str()
      ->check(CLI::IsMember(names))
      ->excludes(weights_option);
}

CLI::Validator device_validator() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const bool cuda = text == "cuda" || text.rfind("cuda:", 0) == 0;
        if (text != "cpu" && !cuda) return "expected cpu, cuda or cuda:N, got '" + text + "'";
        if (cuda && !torch::cuda::is_available()) return "no CUDA device is available to this build of LibTorch";
        try {
          (void)torch::Device(text);
        } catch (const c10::Error&) {
          return "'" + text + "' is not a device (expected cpu, cuda or cuda:N)";
        }
        return "";
      },
      "cpu|cuda|cuda:N");
}

CLI::Validator learning_rate_validator() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double rate = 0.0;
        std::istringstream in(text);
        if (!(in >> rate) || !in.eof() || !std::isfinite(rate) || rate <= 0.0 || rate > 10.0)
          return "expected a learning rate in (0, 10], got '" + text + "'";
        return "";
      },
      "RATE");
}

}  // namespace tdfusion::cli

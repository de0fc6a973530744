// `tdfusion demo`: fuses a synthetic pair and the example pairs shipped with tdfusion (examples/data) with
// the built-in model, and optionally the pairs of another folder (e.g. ../shared/data).
#include "cli.hpp"

#include <tdfusion/data/paired_folder.hpp>
#include <tdfusion/data/synthetic_scenes.hpp>
#include <tdfusion/fusion/fuse_images.hpp>
#include <tdfusion/io/image.hpp>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <iostream>

namespace tdfusion::cli {

namespace {

namespace fs = std::filesystem;

/// The example pairs next to the program: `data/` beside it in the build tree (examples/CMakeLists.txt copies
/// it there), `../share/tdfusion/data` once installed. Empty when neither exists.
std::string example_data_dir() {
  std::error_code error;
  const fs::path program_dir = fs::read_symlink("/proc/self/exe", error).parent_path();
  for (const fs::path& dir : {program_dir / "data", program_dir / ".." / "share" / "tdfusion" / "data"}) {
    if (fs::is_directory(dir / "ir", error)) return dir.string();
  }
  return "";
}

struct DemoArgs {
  std::string out = "tdfusion-demo", data, weights, model = "refusion";
};

int run_demo(const DemoArgs& args) {
  fs::create_directories(args.out);
  fusion::AnyFusion net = load_model(args.weights, args.model);
  auto fuse_and_write = [&](const std::string& name, const torch::Tensor& ir, const torch::Tensor& vi) {
    const torch::Tensor fused = net.visit([&](auto& n) { return fusion::fuse_images(n, ir, vi); });
    for (const auto& [suffix, image] : {std::pair<std::string, torch::Tensor>{"_ir", ir}, {"_vi", vi}, {"_fused", fused}})
      io::write_image((fs::path(args.out) / (name + suffix + ".png")).string(), image);
    std::cout << "  " << (fs::path(args.out) / (name + "_fused.png")).string() << '\n';
  };
  // The pairs of a folder with ir/ and vi/ (at most `count` of them), prefixed by `set`.
  auto fuse_folder = [&](const fs::path& root, const std::string& set, size_t count) {
    std::cout << "fusing " << root.string() << ":\n";
    const auto pairs = data::match_pairs((root / "ir").string(), (root / "vi").string(), root.string());
    for (size_t i = 0; i < std::min(count, pairs.size()); ++i)
      fuse_and_write(set + pairs[i].stem, io::read_image(pairs[i].ir), io::read_image(pairs[i].vi));
  };
  std::cout << "fusing a synthetic pair:\n";
  const data::SyntheticScene scene = data::make_synthetic_scene(240, 320, 7);
  fuse_and_write("synthetic", scene.ir, scene.vi);
  const std::string examples = example_data_dir();
  if (examples.empty()) {
    std::cout << "the example pairs (examples/data) are not installed beside this program: skipping them\n";
  } else {
    fuse_folder(examples, "", std::numeric_limits<size_t>::max());
  }
  if (args.data.empty()) return 0;
  if (fs::is_directory(fs::path(args.data) / "ir")) {
    fuse_folder(args.data, "", std::numeric_limits<size_t>::max());
    return 0;
  }
  // A folder of data sets such as ../shared/data: two pairs of each, in name order.
  std::vector<fs::path> sets;
  for (const auto& entry : fs::directory_iterator(args.data)) {
    if (fs::is_directory(entry.path() / "ir") && fs::is_directory(entry.path() / "vi")) sets.push_back(entry.path());
  }
  std::sort(sets.begin(), sets.end());
  for (const fs::path& set : sets) fuse_folder(set, set.filename().string() + "_", 2);
  return 0;
}

}  // namespace

Subcommand add_demo(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* cmd = app.add_subcommand("demo", "fuse a synthetic pair and the example pairs with the built-in model");
  cmd->add_option("--out", args->out, "output folder")->capture_default_str();
  cmd->add_option("--data", args->data,
                  "also fuse a folder of pairs (ir/, vi/), or two pairs of each data set in a folder of them "
                  "(e.g. ../shared/data)")
      ->check(CLI::ExistingDirectory);
  add_model_options(cmd, args->model, args->weights);
  return {cmd, [args] { return run_demo(*args); }};
}

}  // namespace tdfusion::cli

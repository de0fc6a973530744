// `tdfusion fuse`: one pair, or two folders of pairs matched by file stem, fused with the built-in model or
// a state_dict. Everything is checked before the first output is written: every input decodes, partners
// match in size, and no output would replace an input.
#include "cli.hpp"

#include <tdfusion/data/paired_folder.hpp>
#include <tdfusion/fusion/fuse_images.hpp>
#include <tdfusion/io/image.hpp>

#include <ATen/Parallel.h>

#include <array>
#include <chrono>
#include <exception>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <set>
#include <utility>
#include <vector>

namespace tdfusion::cli {

namespace fs = std::filesystem;

namespace {

struct FuseArgs {
  std::string ir, vi, out, weights, model = "refusion", device = "cpu";
  int64_t tile = 0;
  bool parallel_tiles = false;
  bool raw = false;
  bool timings = false;
};

/// The path as the file system resolves it (symlinks and "..", also for a file that does not exist yet).
std::string real_path(const std::string& path) { return fs::weakly_canonical(fs::absolute(path)).string(); }

/// Refuses (usage error) an output that would replace one of the inputs.
void check_outputs(const std::vector<std::pair<data::PairPaths, std::string>>& jobs) {
  std::set<std::string> inputs;
  for (const auto& job : jobs) inputs.insert({real_path(job.first.ir), real_path(job.first.vi)});
  for (const auto& job : jobs) {
    if (inputs.count(real_path(job.second)) != 0)
      throw UsageError("--out " + job.second + " would replace an input image; choose another output");
  }
}

/// Decodes a pair's two images, one per thread where there are two (the first pair's decoding is on the
/// critical path of a one-pair call); a failure is reported for the infrared image first, as when decoded in turn.
std::pair<torch::Tensor, torch::Tensor> read_pair(const data::PairPaths& pair) {
  std::array<torch::Tensor, 2> images;
  std::array<std::exception_ptr, 2> errors;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      try {
        images[static_cast<size_t>(i)] = io::read_image_compact(i == 0 ? pair.ir : pair.vi);
      } catch (...) {
        errors[static_cast<size_t>(i)] = std::current_exception();
      }
    }
  });
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return {std::move(images[0]), std::move(images[1])};
}

int run_fuse(const FuseArgs& args) {
  const torch::Device device(args.device);
  std::vector<std::pair<data::PairPaths, std::string>> jobs;  // pair -> output file
  if (fs::is_directory(args.ir) || fs::is_directory(args.vi)) {
    if (!fs::is_directory(args.ir) || !fs::is_directory(args.vi))
      throw UsageError("--ir and --vi must both be folders or both be files (got '" + args.ir + "' and '" + args.vi + "')");
    for (const std::string& input : {args.ir, args.vi}) {
      if (fs::exists(args.out) && fs::equivalent(args.out, input))
        throw UsageError("--out " + args.out + " is an input folder; its images would be replaced");
    }
    for (const auto& pair : data::match_pairs(args.ir, args.vi, "fuse"))
      jobs.emplace_back(pair, (fs::path(args.out) / (pair.stem + ".png")).string());
  } else {
    jobs.push_back({data::PairPaths{fs::path(args.ir).stem().string(), args.ir, args.vi, ""}, args.out});
  }
  check_outputs(jobs);
  // --timings: each stage's seconds on standard error (the process's start, mostly loading LibTorch, is what
  // `tdfusion --help` takes).
  auto lap_start = std::chrono::steady_clock::now();
  auto lap = [&](const std::string& stage) {
    if (!args.timings) return;
    const auto now = std::chrono::steady_clock::now();
    std::cerr << "tdfusion: " << stage << ": " << std::fixed << std::setprecision(3)
              << std::chrono::duration<double>(now - lap_start).count() << " s\n";
    lap_start = now;
  };
  // Every pair decodes and matches in size before anything is written; a lone pair is kept for fusing.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> kept;
  for (const auto& [pair, out] : jobs) {
    auto [ir, vi] = read_pair(pair);
    TORCH_CHECK(ir.size(1) == vi.size(1) && ir.size(2) == vi.size(2), "tdfusion: '", pair.ir, "' is ", ir.size(1),
                " x ", ir.size(2), " (H x W) but its partner '", pair.vi, "' is ", vi.size(1), " x ", vi.size(2));
    if (jobs.size() == 1) kept.emplace_back(std::move(ir), std::move(vi));
  }
  lap("decoding and checking " + std::to_string(jobs.size()) + (jobs.size() == 1 ? " pair" : " pairs"));
  fusion::AnyFusion net = load_model(args.weights, args.model);
  net.visit([&](auto& n) { n->to(device); return 0; });
  lap("loading the model");
  const auto options = fusion::FuseImagesOptions()
                           .tile(args.tile)
                           .parallel_tiles(args.parallel_tiles)
                           .min_max(!args.raw)
                           .device(device);
  if (jobs.size() > 1) fs::create_directories(args.out);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto& [pair, out] = jobs[i];
    const auto images = kept.empty() ? read_pair(pair) : kept[i];
    const torch::Tensor &ir = images.first, &vi = images.second;
    const torch::Tensor fused = net.visit([&](auto& n) { return fusion::fuse_images(n, ir, vi, options); });
    lap(kept.empty() ? "decoding and fusing " + pair.stem : "fusing " + pair.stem);
    io::write_image(out, fused);
    lap("writing " + out);
    std::cout << "[" << i + 1 << "/" << jobs.size() << "] " << out << " (" << fused.size(2) << "x" << fused.size(1)
              << (fused.size(0) == 3 ? ", colour" : ", grey") << ")\n";
  }
  return 0;
}

}  // namespace

Subcommand add_fuse(CLI::App& app) {
  auto args = std::make_shared<FuseArgs>();
  CLI::App* cmd = app.add_subcommand("fuse", "fuse one pair or two folders of pairs");
  cmd->add_option("--ir", args->ir, "infrared image or folder")->required();
  cmd->add_option("--vi", args->vi, "visible image or folder")->required();
  cmd->add_option("--out", args->out, "output image (.png/.jpg/.bmp) or folder")->required();
  add_model_options(cmd, args->model, args->weights);
  cmd->add_option("--tile", args->tile, "fuse in tiles of this side (exact; bounds the network's memory)")
      ->check(CLI::Range(int64_t{32}, int64_t{65536}).description("32 .. 65536"));
  cmd->add_flag("--parallel-tiles", args->parallel_tiles,
                "with --tile: a tile per thread at a time (faster for tiles of about 128, memory of one tile each)");
  cmd->add_option("--device", args->device, "cpu, cuda or cuda:N")->capture_default_str()->check(device_validator());
  cmd->add_flag("--raw", args->raw, "keep the network's output range (no per-image min-max stretch)");
  cmd->add_flag("--timings", args->timings, "print each stage's seconds to standard error");
  return {cmd, [args] { return run_fuse(*args); }};
}

}  // namespace tdfusion::cli

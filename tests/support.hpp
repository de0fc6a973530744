#pragma once
// The tests' own tools: scratch folders, error capture, parameter counts, the shared data folder, and the
// finite-difference check of directional derivatives that every hypergradient test uses.
#include <doctest/doctest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <set>
#include <string>
#include <vector>

namespace tdfusion::test {

/// The example pairs shipped with the repository (examples/data: ir/, vi/), for tests that need real images.
inline const std::string kExampleData = TDFUSION_EXAMPLE_DATA;

/// A fresh folder under the system's temp folder, unique per process and object, removed at scope exit.
struct Scratch {
  std::filesystem::path dir;
  explicit Scratch(const std::string& name) {
    static std::atomic<int> counter{0};
    dir = std::filesystem::temp_directory_path() /
          ("tdfusion-test-" + name + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  /// The path of `name` inside the folder.
  std::string operator/(const std::string& name) const { return (dir / name).string(); }
  /// The sub-folder `name`, created.
  std::string folder(const std::string& name) const {
    std::filesystem::create_directories(dir / name);
    return (dir / name).string();
  }
  /// The names of what the folder holds.
  std::set<std::string> entries() const {
    std::set<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) names.insert(entry.path().filename().string());
    return names;
  }
};

/// The message of the exception `action` throws (LibTorch's without its backtrace), or "" when none.
inline std::string error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

inline bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

/// Writes `bytes` to `path`, replacing it.
inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

/// The whole content of a file ("" when it cannot be read).
inline std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

/// `../shared/<sub>` when it exists; otherwise "" after a MESSAGE that the calling test is skipped.
inline std::string shared_path(const std::string& sub) {
  const std::filesystem::path path = std::filesystem::path(TDFUSION_SHARED_DIR) / sub;
  if (std::filesystem::exists(path)) return path.string();
  MESSAGE("skipped: " << path.string() << " is absent (the shared data folder is not beside this clone)");
  return "";
}

/// Compares the analytic derivative of a scalar objective f(params) with central finite differences (step h,
/// in double precision), along the best-conditioned directions: the normalised gradient and the unit vectors
/// of its `coordinates` largest entries (random directions give derivatives so small against f that
/// round-off dominates the difference quotient). `grads` is df/dparams at the current point; `objective`
/// evaluates f. Returns the worst relative error; the parameters are left as they were.
inline double worst_directional_error(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                                      const std::function<double()>& objective, int64_t coordinates, double h = 1e-5) {
  std::vector<torch::Tensor> flat;
  for (const auto& g : grads) flat.push_back(g.flatten());
  const torch::Tensor all = torch::cat(flat);
  REQUIRE(all.abs().max().item<double>() > 0.0);  // the check would be empty without a gradient
  std::vector<torch::Tensor> directions{all / all.norm()};
  const torch::Tensor top = std::get<1>(all.abs().topk(coordinates));
  for (int64_t i = 0; i < coordinates; ++i) {
    directions.push_back(torch::zeros_like(all));
    directions.back()[top[i].item<int64_t>()] = 1.0;
  }
  auto shift = [&](const torch::Tensor& direction, double s) {
    torch::NoGradGuard no_grad;
    int64_t offset = 0;
    for (const auto& p : params) {
      p.add_(direction.narrow(0, offset, p.numel()).view_as(p), s);
      offset += p.numel();
    }
  };
  double worst = 0.0;
  for (const auto& direction : directions) {
    const double analytic = (all * direction).sum().item<double>();
    shift(direction, h);
    const double plus = objective();
    shift(direction, -2 * h);
    const double minus = objective();
    shift(direction, h);
    const double numeric = (plus - minus) / (2 * h);
    MESSAGE("directional derivative: analytic " << analytic << ", finite difference " << numeric);
    worst = std::max(worst, std::abs(analytic - numeric) / std::abs(numeric));
  }
  return worst;
}

}  // namespace tdfusion::test

// Networks of the paper: parameter counts, names, shapes, and the fusion loss.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/loss/fusion_loss.hpp"
#include "tdfusion/lossgen/fixed_weights.hpp"
#include "tdfusion/io/torch_state_dict.hpp"
#include "tdfusion/lossgen/lpn.hpp"

#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <unistd.h>

namespace {

using namespace tdfusion::test;

/// LibTorch's CPU allocator for the tests that count how many bytes of CPU tensors are alive at once.
class CountingAllocator final : public c10::Allocator {
 public:
  // No `override`, as in tdfusion::detail::ReusingCpuAllocator: LibTorch 2.x's Allocator differs.
  c10::DataPtr allocate(size_t bytes) const { return allocate_counted(bytes); }
  c10::DataPtr allocate(size_t bytes) { return allocate_counted(bytes); }
  void copy_data(void* dest, const void* src, size_t count) const { std::memcpy(dest, src, count); }
  c10::DeleterFnPtr raw_deleter() const { return &release; }

  static void reset_peak() { peak_ = live_.load(); }
  static size_t live() { return live_; }
  static size_t peak() { return peak_; }

 private:
  static constexpr size_t kHeader = 64;  // keeps LibTorch's 64-byte alignment and holds the size
  static c10::DataPtr allocate_counted(size_t bytes) {
    void* block = nullptr;
    if (posix_memalign(&block, kHeader, kHeader + std::max<size_t>(bytes, 1)) != 0) throw std::bad_alloc();
    *static_cast<size_t*>(block) = bytes;
    const size_t now = live_ += bytes;
    for (size_t seen = peak_; now > seen && !peak_.compare_exchange_weak(seen, now);) {
    }
    void* data = static_cast<char*>(block) + kHeader;
    return {data, data, &release, c10::Device(c10::kCPU)};
  }
  static void release(void* data) {
    void* block = static_cast<char*>(data) - kHeader;
    live_ -= *static_cast<size_t*>(block);
    std::free(block);
  }
  static inline std::atomic<size_t> live_{0}, peak_{0};
};

}  // namespace

TEST_CASE("ReFusion has the paper's 59,856 parameters under the released names") {
  tdfusion::fusion::ReFusion net;
  CHECK(count_parameters(*net) == 59856);
  const auto params = net->named_parameters();
  CHECK(params.size() == 86);  // a released state_dict has 140 keys: its 54 convolutions appear twice
  for (const char* key : {"project_in_1.weight", "encoder1.0.norm1.body.weight", "encoder2.1.attn.temperature",
                          "encoder1.0.attn.qkv_dwconv.weight", "encoder1.1.ffn.project_in.weight", "FM.temperature1",
                          "FM.qkv2_dwconv.weight", "FM.project_E_d.weight", "FM.project_out2.weight",
                          "decoder.1.ffn.project_out.weight", "project_out_0.weight", "project_out_1.weight"}) {
    CHECK_MESSAGE(params.contains(key), key);
  }
  CHECK(params["FM.project_E.weight"].sizes() == torch::IntArrayRef({128, 32, 1, 1}));
  CHECK(params["decoder.0.attn.qkv_dwconv.weight"].sizes() == torch::IntArrayRef({96, 1, 3, 3}));
}

TEST_CASE("LPN has the paper's 44,529 parameters") {
  tdfusion::lossgen::Lpn lpn;
  CHECK(count_parameters(*lpn) == 44529);
}

TEST_CASE("fusion networks keep any image size, including odd ones") {
  torch::manual_seed(0);
  tdfusion::fusion::ReFusion refusion;
  tdfusion::fusion::LightFusion light;
  tdfusion::lossgen::Lpn lpn;
  for (auto hw : {std::pair<int64_t, int64_t>{37, 53}, {1, 1}, {16, 9}}) {
    const auto ir = torch::rand({2, 1, hw.first, hw.second});
    const auto vi = torch::rand({2, 1, hw.first, hw.second});
    const auto fused = refusion->forward(ir, vi);
    CHECK(fused.sizes() == ir.sizes());
    CHECK(fused.min().item<double>() >= 0.0);
    CHECK(fused.max().item<double>() <= 1.0);
    CHECK(light->forward(ir, vi).sizes() == ir.sizes());
    const auto weights = lpn->forward(ir, vi);
    CHECK(weights.sizes() == torch::IntArrayRef({2, 2, hw.first, hw.second}));
    CHECK(torch::allclose(weights.sum(1), torch::ones({2, hw.first, hw.second})));
  }
}

namespace {

const std::string kFixtureDir = std::string(TDFUSION_SHARED_DIR) + "/fixtures/refusion-state-dict";

}  // namespace

TEST_CASE("ReFusion's inference frees each stage's inputs and stores no attention's q, k or v") {
  tdfusion::fusion::ReFusion net;
  net->eval();
  const c10::InferenceMode inference;
  const int64_t height = 240, width = 320;
  const torch::Tensor ir = torch::rand({1, 1, height, width}), vi = torch::rand({1, 1, height, width});
  static CountingAllocator counting;
  c10::SetCPUAllocator(&counting, 1);
  CountingAllocator::reset_peak();
  const size_t before = CountingAllocator::live();
  net->forward(ir, vi);
  c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), 2);
  const double maps = static_cast<double>(CountingAllocator::peak() - before) / (height * width * sizeof(float));
  MESSAGE("peak: " << maps << " feature maps");
  // The blocks hold 64 channels at most (AFM's 32-channel output beside its inputs, then beside its gated
  // half's output; the same in the decoder): none stores an attention's q, k or v, and the dense 3x3
  // convolutions (kernels::conv3x3) allocate only their outputs. Holding the encoders' outputs through the
  // decoder and all 96 channels of the decoder's q, k, v at once, as this network's forward pass once did, came
  // to 256 maps; AFM's q and k of both modalities beside its inputs, to 96; LibTorch's convolution after the
  // decoder (a reordered copy of its 32-channel input and its output beside that input), to 80.
  CHECK(maps < 68);
}

TEST_CASE("ReFusion loaded from a PyTorch state_dict reproduces PyTorch's output") {
  if (!std::filesystem::exists(kFixtureDir + "/refusion_state.pth")) {
    MESSAGE("skipped: fixture folder " << kFixtureDir << " is absent");
    return;
  }
  tdfusion::fusion::ReFusion net;
  tdfusion::io::load_torch_state_dict(*net, kFixtureDir + "/refusion_state.pth");
  std::ifstream file(kFixtureDir + "/tensors.pt", std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto tensors = torch::pickle_load(bytes).toGenericDict();
  const torch::Tensor ir = tensors.at("ir").toTensor(), vi = tensors.at("vi").toTensor();
  const torch::Tensor expected = tensors.at("fused").toTensor();
  REQUIRE(ir.sizes() == torch::IntArrayRef({1, 1, 37, 53}));
  torch::NoGradGuard no_grad;
  const torch::Tensor fused = net->forward(ir, vi);
  const double max_error = (fused - expected).abs().max().item<double>();
  MESSAGE("max |C++ - PyTorch| = " << max_error << ", output std " << expected.std().item<double>());
  CHECK(max_error < 1e-5);
  CHECK(expected.std().item<double>() > 1e-3);  // a constant output would make the comparison vacuous
}

TEST_CASE("a state_dict written in the released layout reads back into an identical network") {
  torch::manual_seed(3);
  tdfusion::fusion::ReFusion source, copy;
  const tdfusion::test::Scratch scratch("state_dict");
  const auto& dir = scratch.dir;
  const std::string path = (dir / "refusion.pth").string();
  tdfusion::io::write_torch_state_dict(path, tdfusion::io::released_layout(*source));
  const auto state = tdfusion::io::read_torch_state_dict(path);
  CHECK(state.size() == 140);
  CHECK(state["FM.project_E.conv.weight"].data_ptr() == state["FM.project_E.weight"].data_ptr());
  tdfusion::io::load_state_dict(*copy, state, path);
  const auto ir = torch::rand({1, 1, 13, 17}), vi = torch::rand({1, 1, 13, 17});
  CHECK(torch::equal(source->forward(ir, vi), copy->forward(ir, vi)));

  SUBCASE("errors name the file and the entry") {
    tdfusion::ParamDict missing = tdfusion::io::released_layout(*source);
    missing.erase("project_out_1.weight");
    missing.erase("project_out_1.conv.weight");
    CHECK(error_message([&] { tdfusion::io::load_state_dict(*copy, missing, "m.pth"); }).find("m.pth has no entry 'project_out_1.weight'") != std::string::npos);
    tdfusion::ParamDict wrong = tdfusion::io::released_layout(*source);
    wrong["FM.temperature1"] = torch::ones({4, 1, 1});
    CHECK(error_message([&] { tdfusion::io::load_state_dict(*copy, wrong, "w.pth"); }).find("'FM.temperature1' has shape [4, 1, 1]") != std::string::npos);
    tdfusion::ParamDict extra = tdfusion::io::released_layout(*source);
    extra.insert("head.bias", torch::zeros({1}));
    CHECK(error_message([&] { tdfusion::io::load_state_dict(*copy, extra, "x.pth"); }).find("does not know: head.bias") != std::string::npos);
    const std::string text = (dir / "notes.pth").string();
    std::ofstream(text) << "not a zip";
    CHECK(error_message([&] { tdfusion::io::read_torch_state_dict(text); }).find(text + " is not a PyTorch zip archive") != std::string::npos);
    CHECK(error_message([&] { tdfusion::io::read_torch_state_dict((dir / "absent.pth").string()); }).find("cannot open") != std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

namespace {

/// Sobel response at (y, x) with zero padding, by explicit loops (independent of the library's convolution).
double sobel_at(const torch::Tensor& img, int64_t y, int64_t x, bool y_direction) {
  static const double kx[3][3] = {{-1, 0, 1}, {-2, 0, 2}, {-1, 0, 1}};
  const auto a = img.accessor<double, 2>();
  double sum = 0.0;
  for (int dy = -1; dy <= 1; ++dy)
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t yy = y + dy, xx = x + dx;
      if (yy < 0 || xx < 0 || yy >= img.size(0) || xx >= img.size(1)) continue;
      sum += (y_direction ? kx[dx + 1][dy + 1] : kx[dy + 1][dx + 1]) * a[yy][xx];
    }
  return sum;
}

}  // namespace

TEST_CASE("the fusion loss matches a loop-by-loop computation of spec section 2") {
  torch::manual_seed(9);
  const int64_t h = 5, w = 7;
  const auto ir = torch::rand({1, 1, h, w}, torch::kFloat64), vi = torch::rand({1, 1, h, w}, torch::kFloat64);
  const auto fused = torch::rand({1, 1, h, w}, torch::kFloat64);
  const auto weights = torch::softmax(torch::randn({1, 2, h, w}, torch::kFloat64), 1);
  const auto terms = tdfusion::loss::fusion_loss(fused, ir, vi, weights, 0.7);

  const torch::Tensor A = ir[0][0], B = vi[0][0], F = fused[0][0], wa = weights[0][0], wb = weights[0][1];
  double intensity_a = 0, intensity_b = 0, grad_x = 0, grad_y = 0;
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x) {
      const double a = A[y][x].item<double>(), b = B[y][x].item<double>(), f = F[y][x].item<double>();
      intensity_a += std::pow(wa[y][x].item<double>() * (a - f), 2);
      intensity_b += std::pow(wb[y][x].item<double>() * (b - f), 2);
      for (bool dir_y : {false, true}) {
        const double ga = sobel_at(A, y, x, dir_y), gb = sobel_at(B, y, x, dir_y);
        const double target = std::abs(ga) >= std::abs(gb) ? ga : gb;
        (dir_y ? grad_y : grad_x) += std::abs(sobel_at(F, y, x, dir_y) - target);
      }
    }
  const double n = static_cast<double>(h * w);
  const double intensity = intensity_a / n + intensity_b / n, gradient = grad_x / n + grad_y / n;
  CHECK(terms.intensity.item<double>() == doctest::Approx(intensity).epsilon(1e-12));
  CHECK(terms.gradient.item<double>() == doctest::Approx(gradient).epsilon(1e-12));
  CHECK(terms.total.item<double>() == doctest::Approx(intensity + 0.7 * gradient).epsilon(1e-12));

  // Ties go to the infrared gradient, and the target keeps its sign.
  const auto same = tdfusion::loss::larger_magnitude(torch::tensor({2.0, -3.0, 1.0}), torch::tensor({-2.0, 1.0, -4.0}));
  CHECK(torch::equal(same, torch::tensor({2.0, -3.0, -4.0})));
}

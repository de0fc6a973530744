// Tiled fusion: equal to untiled fusion although ReFusion's channel attention is global over the image.
#include <doctest/doctest.h>

#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/fusion/tiled_fusion.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <algorithm>
#include <filesystem>

namespace {

using tdfusion::fusion::fuse_tiled;
using tdfusion::fusion::TiledFusionOptions;

const std::string kStateDict = std::string(TDFUSION_SHARED_DIR) + "/fixtures/refusion-state-dict/refusion_state.pth";

double max_difference(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a - b).abs().max().item<double>();
}

/// A smooth scene plus noise, so attention statistics differ across the image.
std::pair<torch::Tensor, torch::Tensor> pair_of(int64_t n, int64_t height, int64_t width,
                                                torch::Dtype dtype = torch::kFloat32) {
  torch::manual_seed(42);
  const auto ys = torch::linspace(0, 1, height).view({1, 1, height, 1});
  const auto xs = torch::linspace(0, 1, width).view({1, 1, 1, width});
  const torch::Tensor ir = (0.6 * torch::sin(6 * ys) * xs + 0.3 * torch::rand({n, 1, height, width})).clamp(0, 1);
  const torch::Tensor vi = (0.5 * ys + 0.4 * torch::rand({n, 1, height, width})).clamp(0, 1);
  return {ir.to(dtype), vi.to(dtype)};
}

template <class Net>
torch::Tensor untiled(Net& net, const torch::Tensor& ir, const torch::Tensor& vi) {
  torch::NoGradGuard no_grad;
  return net->forward(ir, vi);
}

/// What tiling without image-wide attention statistics gives: each tile's attention sees only that tile.
template <class Net>
torch::Tensor naive_tiled(Net& net, const torch::Tensor& ir, const torch::Tensor& vi, int64_t tile, int64_t halo) {
  torch::NoGradGuard no_grad;
  const int64_t height = ir.size(2), width = ir.size(3);
  torch::Tensor fused = torch::empty_like(ir);
  for (int64_t y0 = 0; y0 < height; y0 += tile) {
    for (int64_t x0 = 0; x0 < width; x0 += tile) {
      const int64_t y1 = std::min(y0 + tile, height), x1 = std::min(x0 + tile, width);
      const int64_t cy0 = std::max<int64_t>(y0 - halo, 0), cy1 = std::min(y1 + halo, height);
      const int64_t cx0 = std::max<int64_t>(x0 - halo, 0), cx1 = std::min(x1 + halo, width);
      const torch::Tensor out =
          net->forward(ir.slice(2, cy0, cy1).slice(3, cx0, cx1), vi.slice(2, cy0, cy1).slice(3, cx0, cx1));
      fused.slice(2, y0, y1).slice(3, x0, x1).copy_(out.slice(2, y0 - cy0, y1 - cy0).slice(3, x0 - cx0, x1 - cx0));
    }
  }
  return fused;
}

/// A hook that replaces attention by zeros, to see whether channel_attention consults it.
struct ZeroAttention : tdfusion::nn::AttentionTiling {
  int calls = 0;
  torch::Tensor matrix(const torch::Tensor& q, const torch::Tensor&, const torch::Tensor&, int64_t heads) override {
    ++calls;
    const int64_t d = q.size(1) / heads;
    return torch::zeros({q.size(0), heads, d, d}, q.options());
  }
};

}  // namespace

TEST_CASE("receptive_halo counts the 3x3 convolutions on the longest path") {
  CHECK(tdfusion::fusion::receptive_halo(tdfusion::fusion::ReFusionOptions()) == 13);
  CHECK(tdfusion::fusion::receptive_halo(tdfusion::fusion::LightFusionOptions()) == 5);
  CHECK(TiledFusionOptions().halo() >= 13);
}

TEST_CASE("fuse_tiled equals untiled ReFusion (random weights, float)") {
  torch::manual_seed(1);
  tdfusion::fusion::ReFusion net;
  const auto [ir, vi] = pair_of(1, 150, 70);  // 4 x 2 tiles, the last row and column narrow
  const double diff =
      max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(48).halo(13)), untiled(net, ir, vi));
  MESSAGE("max |tiled - untiled| = " << diff);
  CHECK(diff < 1e-5);
}

TEST_CASE("fuse_tiled gives the same image with tiles in parallel and one after another") {
  torch::manual_seed(7);
  tdfusion::fusion::ReFusion net;
  const auto [ir, vi] = pair_of(1, 100, 90);  // 3 x 3 tiles, the last row and column narrow
  const int threads = torch::get_num_threads();
  torch::set_num_threads(2);  // two tiles at a time, also where LibTorch starts with one thread
  const torch::Tensor parallel = fuse_tiled(net, ir, vi, TiledFusionOptions().tile(40).parallel_tiles(true));
  const torch::Tensor sequential = fuse_tiled(net, ir, vi, TiledFusionOptions().tile(40));
  torch::set_num_threads(threads);
  const double between = max_difference(parallel, sequential), exact = max_difference(parallel, untiled(net, ir, vi));
  MESSAGE("max |parallel - sequential tiles| = " << between << ", max |parallel tiles - untiled| = " << exact);
  CHECK(between < 1e-6);
  CHECK(exact < 1e-5);
}

TEST_CASE("fuse_tiled equals untiled ReFusion in double to rounding, and halo 13 is tight") {
  torch::manual_seed(2);
  tdfusion::fusion::ReFusion net;
  net->to(torch::kFloat64);
  const auto [ir, vi] = pair_of(1, 61, 45, torch::kFloat64);
  const torch::Tensor reference = untiled(net, ir, vi);
  const double diff = max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(24).halo(13)), reference);
  MESSAGE("max |tiled - untiled| (double) = " << diff);
  CHECK(diff < 1e-10);
  // One pixel less and the zero padding at the cut edges reaches the interior (weakly: through 13 layers).
  const double leak = max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(24).halo(12)), reference);
  MESSAGE("halo 12: max |tiled - untiled| (double) = " << leak);
  CHECK(leak > 1e3 * std::max(diff, 1e-16));
}

TEST_CASE("fuse_tiled equals untiled ReFusion with the fixture's PyTorch weights") {
  if (!std::filesystem::exists(kStateDict)) {
    MESSAGE("skipped: " << kStateDict << " is absent");
    return;
  }
  tdfusion::fusion::ReFusion net;
  tdfusion::io::load_torch_state_dict(*net, kStateDict);
  const auto [ir, vi] = pair_of(1, 97, 131);
  const torch::Tensor reference = untiled(net, ir, vi);
  const double diff = max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(48)), reference);
  MESSAGE("max |tiled - untiled| (fixture weights) = " << diff);
  CHECK(diff < 1e-5);
  // Why the statistics passes exist: tiles that attend only over themselves change the output.
  const double naive = max_difference(naive_tiled(net, ir, vi, 48, 16), reference);
  MESSAGE("max |naively tiled - untiled| (fixture weights) = " << naive);
  CHECK(naive > 1e-3);
  CHECK(naive > 100 * diff);
}

TEST_CASE("naive tiling of ReFusion differs from untiled fusion; fuse_tiled does not (batch of 2)") {
  torch::manual_seed(3);
  tdfusion::fusion::ReFusion net;
  const auto [ir, vi] = pair_of(2, 64, 64);  // each image of the batch gets its own attention matrices
  const torch::Tensor reference = untiled(net, ir, vi);
  const double exact = max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(32)), reference);
  const double naive = max_difference(naive_tiled(net, ir, vi, 32, 16), reference);
  MESSAGE("max |tiled - untiled| = " << exact << ", max |naively tiled - untiled| = " << naive);
  CHECK(exact < 1e-5);
  CHECK(naive > 100 * exact);
}

TEST_CASE("fuse_tiled equals untiled LightFusion, a net without attention") {
  torch::manual_seed(4);
  tdfusion::fusion::LightFusion net;
  {
    const auto [ir, vi] = pair_of(2, 150, 70);
    const double diff = max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(32).halo(5)), untiled(net, ir, vi));
    MESSAGE("LightFusion max |tiled - untiled| = " << diff);
    CHECK(diff < 1e-6);
    // A net without attention is local, so naive tiling is already exact.
    CHECK(max_difference(naive_tiled(net, ir, vi, 32, 5), untiled(net, ir, vi)) < 1e-6);
  }
  net->to(torch::kFloat64);
  const auto [ir, vi] = pair_of(1, 97, 131, torch::kFloat64);
  CHECK(max_difference(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(33)), untiled(net, ir, vi)) < 1e-12);
}

TEST_CASE("fuse_tiled with a tile covering the image is the untiled forward pass") {
  torch::manual_seed(5);
  tdfusion::fusion::ReFusion net;
  const auto [ir, vi] = pair_of(1, 37, 53);
  CHECK(torch::equal(fuse_tiled(net, ir, vi, TiledFusionOptions().tile(53)), untiled(net, ir, vi)));
  CHECK(torch::equal(fuse_tiled(net, ir, vi), untiled(net, ir, vi)));
}

TEST_CASE("the attention hook acts only inside its scope") {
  torch::manual_seed(6);
  const torch::Tensor q = torch::randn({1, 16, 9, 7}), k = torch::randn({1, 16, 9, 7}), v = torch::randn({1, 16, 9, 7});
  const torch::Tensor temperature = torch::rand({8, 1, 1}) + 0.5;
  const torch::Tensor before = tdfusion::nn::channel_attention(q, k, v, temperature, 8);
  CHECK(tdfusion::nn::AttentionTiling::active() == nullptr);
  ZeroAttention outer, inner;
  {
    const tdfusion::nn::AttentionTiling::Scope scope(outer);
    CHECK(tdfusion::nn::channel_attention(q, k, v, temperature, 8).abs().max().item<double>() == 0.0);
    {
      const tdfusion::nn::AttentionTiling::Scope nested(inner);
      tdfusion::nn::channel_attention(q, k, v, temperature, 8);
    }
    CHECK(tdfusion::nn::AttentionTiling::active() == &outer);
  }
  CHECK(outer.calls == 1);
  CHECK(inner.calls == 1);
  CHECK(tdfusion::nn::AttentionTiling::active() == nullptr);
  CHECK(torch::equal(tdfusion::nn::channel_attention(q, k, v, temperature, 8), before));
}

TEST_CASE("fuse_tiled rejects bad options and inputs") {
  tdfusion::fusion::LightFusion net;
  const torch::Tensor image = torch::rand({1, 1, 20, 20});
  CHECK_THROWS_WITH_AS(fuse_tiled(net, image, image, TiledFusionOptions().tile(0)),
                       doctest::Contains("tdfusion: fuse_tiled needs tile > 0"), c10::Error);
  CHECK_THROWS_WITH_AS(fuse_tiled(net, image, torch::rand({1, 1, 20, 21})),
                       doctest::Contains("differ in size"), c10::Error);
}

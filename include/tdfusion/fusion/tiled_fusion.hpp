#pragma once
// Fusion of images too large for one forward pass, in overlapping tiles, with the same result as the untiled
// pass (up to float rounding) and the memory of one tile.
//
// Every op of the fusion networks is local (3x3 and 1x1 convolutions, per-pixel LayerNorm, GELU, sigmoid)
// except channel attention, whose (C/heads) x (C/heads) matrices are built from sums over *all* pixels. So:
//  - a tile cut with a halo at least the receptive radius of the local ops reproduces its interior exactly,
//    provided every attention call uses the image-wide matrix;
//  - the matrix of one call only needs image-wide sums: S = sum_p q k^T per head and the squared norms
//    sum_p q^2, sum_p k^2 per channel, since softmax(normalise(q) normalise(k)^T * t) =
//    softmax(S / (max(|q|, eps) max(|k|, eps)^T) * t).
// fuse_tiled therefore runs one pass over the tiles per attention call, in forward order: pass s uses the
// final matrices of calls < s, adds the interior pixels' sums of call s, and stops that tile's forward there.
// A pass whose forward completes (no call s exists) is the output pass. With L attention calls this costs
// about L / 2 + 1 forward passes over the image (ReFusion: L = 8); a net without attention needs one pass.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/param_view.hpp"
#include "tdfusion/core/traits.hpp"
#include "tdfusion/nn/attention_tiling.hpp"
#include "tdfusion/nn/layers.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

namespace tdfusion::fusion {

struct TiledFusionOptions {
  /// Side of a tile's interior, the part of the output it produces; tiles partition the image.
  TORCH_ARG(int64_t, tile) = 512;
  /// Context cut around each interior (clipped at the image border, where the convolutions pad as untiled).
  /// Must be >= the net's receptive radius (receptive_halo) for exact results: 16 covers ReFusion's 13 at the
  /// defaults and LightFusion up to depth 14, with a margin.
  TORCH_ARG(int64_t, halo) = 16;
  /// On CPU, run one tile per thread at a time, each tile's kernels single-threaded, instead of one tile at a
  /// time on all threads. Memory grows to one tile per thread. It pays for small tiles, whose kernels are too
  /// short to keep all threads busy: ReFusion on 2 cores ran 1.5x as fast with 128-pixel tiles, but 0.95x
  /// with 256 and 0.6x with 512 (measured when glibc still mapped fresh pages for the worker threads' large
  /// blocks, before reuse_freed_memory kept them in its region). Other devices always take one tile at a time.
  TORCH_ARG(bool, parallel_tiles) = false;
};

namespace detail {

/// Thrown by the hook once the accumulated call's statistics of a tile are in: the rest of that tile's
/// forward pass is not needed. Not a std::exception, so code that catches those does not swallow it.
struct AttentionPassDone {};

/// The sums over a tile's interior pixels that one attention call's matrix needs (per head: q k^T, and the
/// squared norms of q's and k's channels), in double, so that the matrix does not depend on the tiling; with
/// the call's temperature and the type its matrix is used in.
struct AttentionSums {
  torch::Tensor qk, q_squares, k_squares, temperature;
  torch::ScalarType dtype = torch::kFloat32;

  void add(const AttentionSums& other) {
    TORCH_CHECK(qk.sizes() == other.qk.sizes(), "tdfusion: fuse_tiled: an attention call changed shape between tiles");
    qk += other.qk, q_squares += other.q_squares, k_squares += other.k_squares;
  }
};

/// A tile: its interior rows [y0, y1) and columns [x0, x1) of the output, cut with its halo as [cy0, cy1) x
/// [cx0, cx1) of the input.
struct Tile {
  int64_t y0, y1, x0, x1, cy0, cy1, cx0, cx1;
};

inline std::vector<Tile> tiles_of(int64_t height, int64_t width, int64_t tile, int64_t halo) {
  std::vector<Tile> tiles;
  for (int64_t y0 = 0; y0 < height; y0 += tile) {
    for (int64_t x0 = 0; x0 < width; x0 += tile) {
      const int64_t y1 = std::min(y0 + tile, height), x1 = std::min(x0 + tile, width);
      tiles.push_back({y0, y1, x0, x1, std::max<int64_t>(y0 - halo, 0), std::min(y1 + halo, height),
                       std::max<int64_t>(x0 - halo, 0), std::min(x1 + halo, width)});
    }
  }
  return tiles;
}

/// The attention hook of one thread of fuse_tiled: replays the finished matrices and, at the first call
/// beyond them, takes the tile's sums and ends its forward pass.
class TiledAttention : public nn::AttentionTiling {
 public:
  explicit TiledAttention(const std::vector<torch::Tensor>& matrices) : matrices_(matrices) {}

  /// Starts the forward pass of `tile`.
  void begin_tile(const Tile& tile) {
    tile_ = tile;
    calls_ = 0;
  }

  torch::Tensor matrix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& temperature,
                       int64_t heads) override {
    const int64_t n = q.size(0), c = q.size(1);
    TORCH_CHECK(q.size(2) == tile_.cy1 - tile_.cy0 && q.size(3) == tile_.cx1 - tile_.cx0,
                "tdfusion: fuse_tiled needs channel attention at the input resolution; a ", tile_.cy1 - tile_.cy0,
                " x ", tile_.cx1 - tile_.cx0, " tile reached attention with shape ", q.sizes());
    const auto index = static_cast<size_t>(calls_++);
    if (index < matrices_.size()) {
      const torch::Tensor& attn = matrices_[index];
      TORCH_CHECK(attn.size(0) == n && attn.size(1) == heads && attn.size(2) == c / heads,
                  "tdfusion: fuse_tiled: attention call ", index, " changed shape between tiles");
      return attn;
    }
    const int64_t pixels = (tile_.y1 - tile_.y0) * (tile_.x1 - tile_.x0);
    const auto acc = q.device().is_mps() ? torch::kFloat32 : torch::kFloat64;  // MPS has no double
    auto interior = [&](const torch::Tensor& x) {
      return x.slice(2, tile_.y0 - tile_.cy0, tile_.y1 - tile_.cy0)
          .slice(3, tile_.x0 - tile_.cx0, tile_.x1 - tile_.cx0)
          .to(acc)
          .reshape({n, heads, c / heads, pixels});
    };
    const torch::Tensor qi = interior(q), ki = interior(k);
    sums_ = {nn::ops::bmm(qi, ki.transpose(-2, -1)), qi.square().sum(-1), ki.square().sum(-1),
             temperature.detach().to(acc), q.scalar_type()};
    throw AttentionPassDone{};
  }

  int64_t calls() const { return calls_; }
  const AttentionSums& sums() const { return sums_; }

 private:
  const std::vector<torch::Tensor>& matrices_;  // final matrices of the calls before the accumulated one
  Tile tile_{};
  AttentionSums sums_;
  int64_t calls_ = 0;
};

/// What one tile's forward pass in one pass over the image gave.
struct TileResult {
  bool completed = false;  // its forward pass ran to the output (no attention call beyond the finished ones)
  AttentionSums sums;      // otherwise: its share of the next call's statistics
};

}  // namespace detail

/// The two inputs of a tiled fusion, made window by window so that they never exist whole in the network's
/// type: `cut(y0, y1, x0, x1)` returns the N x 1 x (y1 - y0) x (x1 - x0) infrared and visible inputs of rows
/// [y0, y1) and columns [x0, x1) of the N x 1 x `height` x `width` images. With parallel_tiles it is called
/// from several threads at once.
struct TileInputs {
  int64_t height = 0, width = 0;
  std::function<std::pair<torch::Tensor, torch::Tensor>(int64_t y0, int64_t y1, int64_t x0, int64_t x1)> cut;
};

/// Fuses the images whose inputs `inputs.cut` makes (N x 1 x H x W) with `net` tile by tile; equals
/// net->forward(ir, vi) on the whole inputs up to float rounding when options.halo() >= the net's receptive
/// radius. Works for any fusion policy built from tdfusion's blocks (its attention must go through
/// nn::channel_attention at the input resolution, called directly from forward_with). Peak memory is one tile
/// with its halo per concurrent tile (options.parallel_tiles), plus the output (N x C x H x W in the net's type),
/// a few (C/heads)^2 statistics and what `cut` reads from (e.g. 8-bit images): the inputs never exist whole in
/// the net's type. Costs about (attention calls / 2 + 1) forward passes, each over the tiles' halos too; an
/// image within one tile takes the plain single forward pass. The statistics are summed in tile order, so the
/// result does not depend on the thread count.
template <class FusionHolder>
torch::Tensor fuse_tiled(FusionHolder& net, const TileInputs& inputs, TiledFusionOptions options = {}) {
  static_assert(traits::check_fusion_policy<FusionHolder>());
  TORCH_CHECK(options.tile() > 0 && options.halo() >= 0, "tdfusion: fuse_tiled needs tile > 0 and halo >= 0, got tile ",
              options.tile(), " and halo ", options.halo());
  TORCH_CHECK(inputs.height > 0 && inputs.width > 0 && inputs.cut, "tdfusion: fuse_tiled needs inputs of a positive "
              "size, got ", inputs.height, " x ", inputs.width);
  torch::NoGradGuard no_grad;
  const ParamView params(*net);
  const int64_t height = inputs.height, width = inputs.width;
  auto cut = [&](int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
    auto [ir, vi] = inputs.cut(y0, y1, x0, x1);
    check_pair_shapes(ir, vi);
    TORCH_CHECK(ir.size(2) == y1 - y0 && ir.size(3) == x1 - x0, "tdfusion: fuse_tiled: the inputs of a ", y1 - y0,
                " x ", x1 - x0, " window have shape ", ir.sizes());
    return std::make_pair(ir, vi);
  };
  if (height <= options.tile() && width <= options.tile()) {
    const auto [ir, vi] = cut(0, height, 0, width);
    return net->forward_with(params, ir, vi);
  }

  const bool on_cpu = cut(0, 1, 0, 1).first.device().is_cpu();
  const std::vector<detail::Tile> tiles = detail::tiles_of(height, width, options.tile(), options.halo());
  const auto count = static_cast<int64_t>(tiles.size());
  std::vector<torch::Tensor> matrices;  // the final attention matrices found so far, in call order
  torch::Tensor fused;
  std::mutex allocation;
  const bool inference = c10::InferenceMode::is_enabled();
  for (;;) {  // one pass per attention call, the last one producing the output
    std::vector<detail::TileResult> results(tiles.size());
    auto run = [&](int64_t begin, int64_t end) {
      // The caller's autograd modes hold on every thread (they are thread-local).
      const c10::InferenceMode thread_inference(inference);
      const torch::NoGradGuard thread_no_grad;
      detail::TiledAttention hook(matrices);
      const nn::AttentionTiling::Scope scope(hook);
      for (int64_t t = begin; t < end; ++t) {
        const detail::Tile& tile = tiles[static_cast<size_t>(t)];
        detail::TileResult& result = results[static_cast<size_t>(t)];
        hook.begin_tile(tile);
        const auto [ir, vi] = cut(tile.cy0, tile.cy1, tile.cx0, tile.cx1);
        torch::Tensor out;
        try {
          out = net->forward_with(params, ir, vi);
        } catch (const detail::AttentionPassDone&) {
          result.sums = hook.sums();
          continue;
        }
        result.completed = true;
        TORCH_CHECK(hook.calls() == static_cast<int64_t>(matrices.size()), "tdfusion: fuse_tiled: a tile made ",
                    hook.calls(), " attention calls, earlier tiles ", matrices.size());
        TORCH_CHECK(out.dim() == 4 && out.size(0) == ir.size(0) && out.size(2) == tile.cy1 - tile.cy0 &&
                        out.size(3) == tile.cx1 - tile.cx0,
                    "tdfusion: fuse_tiled needs a fully convolutional net; a ", tile.cy1 - tile.cy0, " x ",
                    tile.cx1 - tile.cx0, " tile gave shape ", out.sizes());
        {
          const std::lock_guard<std::mutex> lock(allocation);
          if (!fused.defined()) fused = torch::empty({out.size(0), out.size(1), height, width}, out.options());
        }
        fused.slice(2, tile.y0, tile.y1)
            .slice(3, tile.x0, tile.x1)
            .copy_(out.slice(2, tile.y0 - tile.cy0, tile.y1 - tile.cy0).slice(3, tile.x0 - tile.cx0, tile.x1 - tile.cx0));
      }
    };
    if (options.parallel_tiles() && on_cpu) {
      at::parallel_for(0, count, 1, run);
    } else {
      run(0, count);
    }
    const bool output_pass = results.front().completed;
    for (const detail::TileResult& result : results) {
      TORCH_CHECK(result.completed == output_pass,
                  "tdfusion: fuse_tiled: tiles of one image made different numbers of attention calls");
    }
    if (output_pass) return fused;
    detail::AttentionSums total = results.front().sums;
    for (size_t t = 1; t < results.size(); ++t) total.add(results[t].sums);
    matrices.push_back(
        nn::attention_matrix(total.qk, total.q_squares.sqrt(), total.k_squares.sqrt(), total.temperature).to(total.dtype));
  }
}

/// As above, for inputs given whole (N x 1 x H x W); the tiles are views of them.
template <class FusionHolder>
torch::Tensor fuse_tiled(FusionHolder& net, const torch::Tensor& ir, const torch::Tensor& vi,
                         TiledFusionOptions options = {}) {
  check_pair_shapes(ir, vi);
  const TileInputs inputs{ir.size(2), ir.size(3), [&](int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
                            return std::make_pair(ir.slice(2, y0, y1).slice(3, x0, x1), vi.slice(2, y0, y1).slice(3, x0, x1));
                          }};
  return fuse_tiled(net, inputs, options);
}

}  // namespace tdfusion::fusion

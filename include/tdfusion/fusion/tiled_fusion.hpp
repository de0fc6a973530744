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
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/nn/layers.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace tdfusion::fusion {

/// Receptive radius of ReFusion in pixels: its longest chain of 3x3 convolutions. project_in (1), two per
/// transformer block (qkv_dwconv, ffn dwconv), two in AFM (qkv dwconv, then project_E_d or project_E*_d),
/// project_out_0 and project_out_1 (2): 1 + 2 * 2 + 2 + 2 * 2 + 2 = 13 at the defaults. 1x1 convolutions,
/// per-pixel ops and attention with image-wide matrices widen nothing.
inline int64_t receptive_halo(const ReFusionOptions& options) {
  return 1 + 2 * options.encoder_depth() + 2 + 2 * options.decoder_depth() + 2;
}

/// Receptive radius of LightFusion: one pixel per 3x3 convolution (conv0, depth hidden ones, conv_out).
inline int64_t receptive_halo(const LightFusionOptions& options) { return options.depth() + 2; }

struct TiledFusionOptions {
  /// Side of a tile's interior, the part of the output it produces; tiles partition the image.
  TORCH_ARG(int64_t, tile) = 512;
  /// Context cut around each interior (clipped at the image border, where the convolutions pad as untiled).
  /// Must be >= the net's receptive radius (receptive_halo) for exact results: 16 covers ReFusion's 13 at the
  /// defaults and LightFusion up to depth 14, with a margin.
  TORCH_ARG(int64_t, halo) = 16;
};

namespace detail {

/// Thrown by the hook once the accumulated call's statistics of a tile are in: the rest of that tile's
/// forward pass is not needed. Not a std::exception, so code that catches those does not swallow it.
struct AttentionPassDone {};

/// The attention hook of fuse_tiled: replays finished matrices and accumulates the next one.
class TiledAttention : public nn::AttentionTiling {
 public:
  /// Starts a tile's forward pass: the tile is height x width, its interior rows [y0, y1), columns [x0, x1).
  void begin_tile(int64_t height, int64_t width, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
    height_ = height, width_ = width, y0_ = y0, y1_ = y1, x0_ = x0, x1_ = x1;
    calls_ = 0;
  }

  torch::Tensor matrix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& temperature,
                       int64_t heads) override {
    const int64_t n = q.size(0), c = q.size(1);
    TORCH_CHECK(q.size(2) == height_ && q.size(3) == width_,
                "tdfusion: fuse_tiled needs channel attention at the input resolution; a ", height_, " x ",
                width_, " tile reached attention with shape ", q.sizes());
    const auto index = static_cast<size_t>(calls_++);
    if (index < matrices_.size()) {
      const torch::Tensor& attn = matrices_[index];
      TORCH_CHECK(attn.size(0) == n && attn.size(1) == heads && attn.size(2) == c / heads,
                  "tdfusion: fuse_tiled: attention call ", index, " changed shape between tiles");
      return attn;
    }
    accumulate(q, k, temperature, heads);
    throw AttentionPassDone{};
  }

  /// Turns the statistics of the pass that just ended into the next final attention matrix.
  void finish_pass() {
    matrices_.push_back(nn::attention_matrix(qk_, q_squares_.sqrt(), k_squares_.sqrt(), temperature_).to(dtype_));
    qk_ = q_squares_ = k_squares_ = temperature_ = torch::Tensor();
  }

  int64_t calls() const { return calls_; }
  int64_t finished() const { return static_cast<int64_t>(matrices_.size()); }

 private:
  void accumulate(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& temperature, int64_t heads) {
    const int64_t n = q.size(0), c = q.size(1), pixels = (y1_ - y0_) * (x1_ - x0_);
    // Sums over many tiles: accumulate in double (MPS has none) so the matrix does not depend on the tiling.
    const auto acc = q.device().is_mps() ? torch::kFloat32 : torch::kFloat64;
    auto interior = [&](const torch::Tensor& x) {
      return x.slice(2, y0_, y1_).slice(3, x0_, x1_).to(acc).reshape({n, heads, c / heads, pixels});
    };
    const torch::Tensor qi = interior(q), ki = interior(k);
    const torch::Tensor qk = nn::ops::bmm(qi, ki.transpose(-2, -1));
    const torch::Tensor qq = qi.square().sum(-1), kk = ki.square().sum(-1);
    if (!qk_.defined()) {
      qk_ = qk, q_squares_ = qq, k_squares_ = kk;
      temperature_ = temperature.detach().to(acc);
      dtype_ = q.scalar_type();
    } else {
      TORCH_CHECK(qk_.sizes() == qk.sizes(), "tdfusion: fuse_tiled: attention call ", finished(),
                  " changed shape between tiles");
      qk_ += qk, q_squares_ += qq, k_squares_ += kk;
    }
  }

  std::vector<torch::Tensor> matrices_;               // final matrices of calls 0 .. finished() - 1
  torch::Tensor qk_, q_squares_, k_squares_, temperature_;  // statistics of call finished()
  torch::ScalarType dtype_ = torch::kFloat32;
  int64_t calls_ = 0, height_ = 0, width_ = 0, y0_ = 0, y1_ = 0, x0_ = 0, x1_ = 0;
};

}  // namespace detail

/// Fuses ir and vi (N x 1 x H x W) with `net` tile by tile; equals net->forward(ir, vi) up to float rounding
/// when options.halo() >= the net's receptive radius. Works for any fusion policy built from tdfusion's blocks
/// (its attention must go through nn::channel_attention at the input resolution, called directly from
/// forward_with). Tiles run one after another on the inputs' device; peak memory is one tile with its halo,
/// plus the output and a few (C/heads)^2 statistics. Costs about (attention calls / 2 + 1) forward passes,
/// each over the tiles' halos too; an image within one tile takes the plain single forward pass.
template <class FusionHolder>
torch::Tensor fuse_tiled(FusionHolder& net, const torch::Tensor& ir, const torch::Tensor& vi,
                         TiledFusionOptions options = {}) {
  static_assert(traits::check_fusion_policy<FusionHolder>());
  check_pair_shapes(ir, vi);
  TORCH_CHECK(options.tile() > 0 && options.halo() >= 0, "tdfusion: fuse_tiled needs tile > 0 and halo >= 0, got tile ",
              options.tile(), " and halo ", options.halo());
  torch::NoGradGuard no_grad;
  const ParamView params(*net);
  const int64_t height = ir.size(2), width = ir.size(3), tile = options.tile(), halo = options.halo();
  if (height <= tile && width <= tile) return net->forward_with(params, ir, vi);

  detail::TiledAttention hook;
  const nn::AttentionTiling::Scope scope(hook);
  torch::Tensor fused;
  for (;;) {  // one pass per attention call, the last one producing the output
    bool output_pass = false, first_tile = true;
    for (int64_t y0 = 0; y0 < height; y0 += tile) {
      for (int64_t x0 = 0; x0 < width; x0 += tile) {
        const int64_t y1 = std::min(y0 + tile, height), x1 = std::min(x0 + tile, width);
        const int64_t cy0 = std::max<int64_t>(y0 - halo, 0), cy1 = std::min(y1 + halo, height);
        const int64_t cx0 = std::max<int64_t>(x0 - halo, 0), cx1 = std::min(x1 + halo, width);
        hook.begin_tile(cy1 - cy0, cx1 - cx0, y0 - cy0, y1 - cy0, x0 - cx0, x1 - cx0);
        auto cut = [&](const torch::Tensor& image) { return image.slice(2, cy0, cy1).slice(3, cx0, cx1); };
        bool completed = true;
        torch::Tensor out;
        try {
          out = net->forward_with(params, cut(ir), cut(vi));
        } catch (const detail::AttentionPassDone&) {
          completed = false;
        }
        TORCH_CHECK(first_tile || completed == output_pass,
                    "tdfusion: fuse_tiled: tiles of one image made different numbers of attention calls");
        first_tile = false;
        output_pass = completed;
        if (!completed) continue;
        TORCH_CHECK(hook.calls() == hook.finished(), "tdfusion: fuse_tiled: a tile made ", hook.calls(),
                    " attention calls, earlier tiles ", hook.finished());
        TORCH_CHECK(out.dim() == 4 && out.size(0) == ir.size(0) && out.size(2) == cy1 - cy0 &&
                        out.size(3) == cx1 - cx0,
                    "tdfusion: fuse_tiled needs a fully convolutional net; a ", cy1 - cy0, " x ", cx1 - cx0,
                    " tile gave shape ", out.sizes());
        if (!fused.defined()) fused = torch::empty({ir.size(0), out.size(1), height, width}, out.options());
        fused.slice(2, y0, y1).slice(3, x0, x1).copy_(out.slice(2, y0 - cy0, y1 - cy0).slice(3, x0 - cx0, x1 - cx0));
      }
    }
    if (output_pass) return fused;
    hook.finish_pass();
  }
}

}  // namespace tdfusion::fusion

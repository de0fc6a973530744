#pragma once
// Inference on real images (spec section 6): the network fuses luminance; colour is restored from the
// sources' chroma. Grey in, grey out.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/eval_mode.hpp"
#include "tdfusion/fusion/tiled_fusion.hpp"
#include "tdfusion/io/colour.hpp"

#include <torch/torch.h>

#include <utility>

namespace tdfusion::fusion {

struct FuseImagesOptions {
  /// > 0: fuse in tiles of this side (exact). The network's working memory is then one tile's; the images
  /// themselves stay whole: the sources as given (8-bit from io::read_image_compact), the fused luminance and
  /// the result in float32 (the per-image min-max stretch needs the whole fused image).
  TORCH_ARG(int64_t, tile) = 0;
  TORCH_ARG(bool, parallel_tiles) = false; ///< with tiles: one per CPU thread at a time (see TiledFusionOptions)
  TORCH_ARG(bool, min_max) = true;        ///< the release's per-image min-max stretch of the fused Y
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

/// Luminance (1 x H x W) of an image as io::read_image (C x H x W, C = 1 or 3, [0,1]) or io::read_image_compact
/// (uint8 levels, giving float32) returns it.
inline torch::Tensor luminance(const torch::Tensor& image) {
  TORCH_CHECK(image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3),
              "tdfusion: expected a 1 or 3 x H x W image, got shape ", image.sizes());
  const torch::Tensor values = image.is_floating_point() ? image : io::unit_values(image);
  return image.size(0) == 1 ? values : io::luma(values).unsqueeze(0);
}

/// Fuses a registered pair of images (C x H x W, C = 1 or 3, any size; floating-point values in [0,1] or uint8
/// levels) with `net` and returns the fused image on the CPU, float32 in [0,1]: 1 x H x W when both sources are
/// grey, else 3 x H x W RGB. Runs in c10::InferenceMode, so the result is an inference tensor (fine to write
/// or inspect, not to train on). With options.tile() the network's inputs are made tile by tile from the
/// sources (see FuseImagesOptions::tile for what that bounds).
template <class FusionNet>
torch::Tensor fuse_images(FusionNet& net, const torch::Tensor& ir_image, const torch::Tensor& vi_image,
                          const FuseImagesOptions& options = {}) {
  auto check = [](const torch::Tensor& image, const char* what) {
    TORCH_CHECK(image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3) && image.size(1) > 0 &&
                    image.size(2) > 0,
                "tdfusion: the ", what, " must be a non-empty 1 or 3 x H x W image, got shape ", image.sizes());
    if (image.is_floating_point()) check_finite(image, what);
  };
  check(ir_image, "infrared image");
  check(vi_image, "visible image");
  TORCH_CHECK(ir_image.size(-1) == vi_image.size(-1) && ir_image.size(-2) == vi_image.size(-2),
              "tdfusion: infrared (", ir_image.sizes(), ") and visible (", vi_image.sizes(), ") images differ in size");
  const c10::InferenceMode inference;  // no autograd bookkeeping at all: the result is for writing out
  const EvalMode eval(*net);
  const auto dtype = net->parameters().front().scalar_type();
  // The network's inputs for rows [y0, y1) and columns [x0, x1): the sources' luminance in the net's type.
  auto inputs = [&](int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
    auto input = [&](const torch::Tensor& image) {
      return luminance(image.slice(1, y0, y1).slice(2, x0, x1)).unsqueeze(0).to(options.device(), dtype);
    };
    return std::make_pair(input(ir_image), input(vi_image));
  };
  const int64_t height = ir_image.size(1), width = ir_image.size(2);
  torch::Tensor y;
  if (options.tile() > 0) {
    y = fuse_tiled(net, TileInputs{height, width, inputs},
                   TiledFusionOptions().tile(options.tile()).parallel_tiles(options.parallel_tiles()));
  } else {
    const auto [ir, vi] = inputs(0, height, 0, width);
    y = net->forward(ir, vi);
  }
  y = y[0].to(torch::kCPU, torch::kFloat32);
  if (options.min_max()) io::min_max_normalise_(y);
  return io::restore_colour(y, ir_image, vi_image);
}

}  // namespace tdfusion::fusion

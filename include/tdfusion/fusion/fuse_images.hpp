#pragma once
// Inference on real images (spec section 6): the network fuses luminance; colour is restored from the
// sources' chroma. Grey in, grey out.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/eval_mode.hpp"
#include "tdfusion/fusion/tiled_fusion.hpp"
#include "tdfusion/io/colour.hpp"

#include <torch/torch.h>

namespace tdfusion::fusion {

struct FuseImagesOptions {
  TORCH_ARG(int64_t, tile) = 0;           ///< > 0: fuse in tiles of this side with bounded memory (exact)
  TORCH_ARG(bool, parallel_tiles) = false; ///< with tiles: one per CPU thread at a time (see TiledFusionOptions)
  TORCH_ARG(bool, min_max) = true;        ///< the release's per-image min-max stretch of the fused Y
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

/// Luminance (1 x H x W) of an image as io::read_image returns it (C x H x W, C = 1 or 3, [0,1]).
inline torch::Tensor luminance(const torch::Tensor& image) {
  TORCH_CHECK(image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3),
              "tdfusion: expected a 1 or 3 x H x W image, got shape ", image.sizes());
  return image.size(0) == 1 ? image : io::rgb_to_ycbcr(image).narrow(0, 0, 1);
}

/// Fuses a registered pair of images (C x H x W, C = 1 or 3, values in [0,1], any size) with `net` and
/// returns the fused image on the CPU: 1 x H x W when both sources are grey, else 3 x H x W RGB. Runs in
/// c10::InferenceMode, so the result is an inference tensor (fine to write or inspect, not to train on).
template <class FusionNet>
torch::Tensor fuse_images(FusionNet& net, const torch::Tensor& ir_image, const torch::Tensor& vi_image,
                          const FuseImagesOptions& options = {}) {
  TORCH_CHECK(ir_image.size(-1) == vi_image.size(-1) && ir_image.size(-2) == vi_image.size(-2),
              "tdfusion: infrared (", ir_image.sizes(), ") and visible (", vi_image.sizes(), ") images differ in size");
  const c10::InferenceMode inference;  // no autograd bookkeeping at all: the result is for writing out
  const EvalMode eval(*net);
  const auto dtype = net->parameters().front().scalar_type();
  const torch::Tensor ir = luminance(ir_image).unsqueeze(0).to(options.device(), dtype);
  const torch::Tensor vi = luminance(vi_image).unsqueeze(0).to(options.device(), dtype);
  check_pair(ir, vi);
  torch::Tensor y = options.tile() > 0
                        ? fuse_tiled(net, ir, vi,
                                     TiledFusionOptions().tile(options.tile()).parallel_tiles(options.parallel_tiles()))
                        : net->forward(ir, vi);
  y = y[0].to(torch::kCPU, torch::kFloat32);
  if (options.min_max()) y = io::min_max_normalise(y);
  return io::restore_colour(y, ir_image.to(torch::kFloat32), vi_image.to(torch::kFloat32));
}

}  // namespace tdfusion::fusion

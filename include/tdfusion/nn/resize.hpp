#pragma once
// Bilinear resizing, as the release does it everywhere (F.interpolate, align_corners=False): task inputs cut
// from a pair, segmentation logits brought to the label size, decoder features brought to one size.

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace tdfusion::nn {

/// Bilinear resize (align_corners = false) of an N x C x h x w batch to height x width; a no-op at that size.
inline torch::Tensor resize_bilinear(const torch::Tensor& x, int64_t height, int64_t width) {
  if (x.size(2) == height && x.size(3) == width) return x;
  namespace F = torch::nn::functional;
  return F::interpolate(x, F::InterpolateFuncOptions()
                               .size(std::vector<int64_t>{height, width})
                               .mode(torch::kBilinear)
                               .align_corners(false));
}

}  // namespace tdfusion::nn

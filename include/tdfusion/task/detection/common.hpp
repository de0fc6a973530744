#pragma once
// Input handling shared by the detectors: padding to a multiple of the coarsest stride (the top-down path
// adds upsampled coarse maps to finer ones, which needs sizes that halve exactly).

#include <torch/torch.h>

#include <cstdint>

namespace tdfusion::task {

/// Pads the bottom and right of an N x C x H x W batch with `value` up to multiples of `multiple`; a no-op
/// when they already are. Padding at the bottom-right keeps pixel coordinates, so boxes need no shift.
inline torch::Tensor pad_to_multiple(const torch::Tensor& image, int64_t multiple, double value) {
  const int64_t h = image.size(2), w = image.size(3);
  const int64_t ph = (multiple - h % multiple) % multiple, pw = (multiple - w % multiple) % multiple;
  if (ph == 0 && pw == 0) return image;
  return torch::constant_pad_nd(image, {0, pw, 0, ph}, value);
}

}  // namespace tdfusion::task

#pragma once
// Input handling shared by the detectors: checks, and padding to a multiple of the coarsest stride (the
// top-down path adds upsampled coarse maps to finer ones, which needs sizes that halve exactly).

#include <torch/torch.h>

#include <cstdint>

namespace tdfusion::task {

/// Checks a detector's input: N x channels x H x W, non-empty, floating point.
inline void check_detection_image(const torch::Tensor& image, int64_t channels, const char* network) {
  TORCH_CHECK(image.defined(), "tdfusion: ", network, " input is undefined");
  TORCH_CHECK(image.dim() == 4 && image.size(1) == channels, "tdfusion: ", network, " input must be N x ", channels,
              " x H x W, got shape ", image.sizes());
  TORCH_CHECK(image.numel() > 0, "tdfusion: ", network, " input is empty, shape ", image.sizes());
  TORCH_CHECK(image.is_floating_point(), "tdfusion: ", network, " input must be floating point, got ", image.dtype());
}

/// Pads the bottom and right of an N x C x H x W batch with `value` up to multiples of `multiple`; a no-op
/// when they already are. Padding at the bottom-right keeps pixel coordinates, so boxes need no shift.
inline torch::Tensor pad_to_multiple(const torch::Tensor& image, int64_t multiple, double value) {
  const int64_t h = image.size(2), w = image.size(3);
  const int64_t ph = (multiple - h % multiple) % multiple, pw = (multiple - w % multiple) % multiple;
  if (ph == 0 && pw == 0) return image;
  return torch::constant_pad_nd(image, {0, pw, 0, ph}, value);
}

}  // namespace tdfusion::task

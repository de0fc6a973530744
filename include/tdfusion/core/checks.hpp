#pragma once
// Input validation shared by every entry point: bad data fails early with a message that says what is wrong.
// Networks check shapes (cheap); entry points that take user data also check values (one device sync).

#include <torch/torch.h>

#include <string>

namespace tdfusion {

/// Checks one image batch's layout: N x channels x H x W with N, H, W > 0, floating point. `what` names the
/// batch in messages (e.g. "infrared image", "SegFormer input").
inline void check_image_shape(const torch::Tensor& image, const std::string& what, int64_t channels = 1) {
  TORCH_CHECK(image.defined(), "tdfusion: ", what, " is undefined");
  TORCH_CHECK(image.dim() == 4, "tdfusion: ", what, " must be a N x ", channels, " x H x W batch, got shape ",
              image.sizes());
  TORCH_CHECK(image.size(0) > 0, "tdfusion: ", what, " is an empty batch");
  TORCH_CHECK(image.size(1) == channels, "tdfusion: ", what, " must have ", channels,
              channels == 1 ? " channel (luminance)" : " channels", ", got ", image.size(1));
  TORCH_CHECK(image.size(2) > 0 && image.size(3) > 0, "tdfusion: ", what, " has an empty image, shape ",
              image.sizes());
  TORCH_CHECK(image.is_floating_point(), "tdfusion: ", what, " must be floating point, got ", image.dtype());
}

/// Checks that a tensor holds no NaN or infinite value.
inline void check_finite(const torch::Tensor& tensor, const std::string& what) {
  TORCH_CHECK(torch::isfinite(tensor).all().item<bool>(), "tdfusion: ", what, " contains NaN or infinite values");
}

/// Checks the layout of an infrared / visible pair: same batch size, height, width, dtype and device.
inline void check_pair_shapes(const torch::Tensor& ir, const torch::Tensor& vi) {
  check_image_shape(ir, "infrared image");
  check_image_shape(vi, "visible image");
  TORCH_CHECK(ir.sizes() == vi.sizes(), "tdfusion: infrared and visible images differ in size: ", ir.sizes(),
              " vs ", vi.sizes());
  TORCH_CHECK(ir.device() == vi.device(), "tdfusion: infrared and visible images are on different devices (",
              ir.device(), " vs ", vi.device(), ")");
}

/// Full check of user data: layout as above and finite values.
inline void check_pair(const torch::Tensor& ir, const torch::Tensor& vi) {
  check_pair_shapes(ir, vi);
  check_finite(ir, "infrared image");
  check_finite(vi, "visible image");
}

}  // namespace tdfusion

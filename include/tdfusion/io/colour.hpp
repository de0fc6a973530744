#pragma once
// Colour output (spec section 6). The networks see luminance only; a colour result is rebuilt from the
// fused Y and the sources' chroma. The conversion is OpenCV's RGB <-> YCrCb (BT.601, full range), the one
// the release uses, on [0,1] data with the 8-bit chroma offset 128 / 255. Channels are ordered Y, Cb, Cr
// (OpenCV orders them Y, Cr, Cb).

#include <torch/torch.h>

#include <string>

namespace tdfusion::io {

/// Neutral chroma on [0,1] data: 128 on the 8-bit scale.
inline constexpr double kChromaMidpoint = 128.0 / 255.0;
/// The release's 1e-4 (a value on the 0..255 scale) expressed on [0,1] data. Chroma fusion is homogeneous
/// of degree 1 in (C - m), so scaling the data by s scales eps by s.
inline constexpr double kChromaEps = 1e-4 / 255.0;

namespace detail {

inline void check_channels(const torch::Tensor& image, int64_t channels, const char* what) {
  TORCH_CHECK(image.defined() && image.dim() >= 3 && image.size(-3) == channels, "tdfusion: ", what, " expects ... x ",
              channels, " x H x W, got shape ", image.defined() ? image.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(image.is_floating_point(), "tdfusion: ", what, " expects floating-point values, got ", image.dtype());
}

/// True when `image` (C x H x W) carries colour: three channels that are not all equal. The release's
/// test: RGB files holding grey content (TNO, the infrared images of M3FD and LLVIP) count as grey.
inline bool has_colour(const torch::Tensor& image) {
  return image.size(0) == 3 && !(torch::equal(image[0], image[1]) && torch::equal(image[1], image[2]));
}

}  // namespace detail

/// RGB -> YCbCr on [0,1] data, channels at dimension -3 (C x H x W or N x C x H x W):
///     Y  = 0.299 R + 0.587 G + 0.114 B
///     Cb = 0.564 (B - Y) + 128/255
///     Cr = 0.713 (R - Y) + 128/255
/// (OpenCV's constants; the exact BT.601 factors are 0.5/0.886 and 0.5/0.701.)
inline torch::Tensor rgb_to_ycbcr(const torch::Tensor& rgb) {
  detail::check_channels(rgb, 3, "rgb_to_ycbcr");
  const torch::Tensor r = rgb.select(-3, 0), g = rgb.select(-3, 1), b = rgb.select(-3, 2);
  const torch::Tensor y = 0.299 * r + 0.587 * g + 0.114 * b;
  return torch::stack({y, 0.564 * (b - y) + kChromaMidpoint, 0.713 * (r - y) + kChromaMidpoint}, -3);
}

/// YCbCr -> RGB with OpenCV's inverse constants (not clamped):
///     R = Y + 1.403 (Cr - 128/255)
///     G = Y - 0.714 (Cr - 128/255) - 0.344 (Cb - 128/255)
///     B = Y + 1.773 (Cb - 128/255)
/// OpenCV's rounded constants make the round trip with `rgb_to_ycbcr` exact only to about 5e-4.
inline torch::Tensor ycbcr_to_rgb(const torch::Tensor& ycbcr) {
  detail::check_channels(ycbcr, 3, "ycbcr_to_rgb");
  const torch::Tensor y = ycbcr.select(-3, 0);
  const torch::Tensor cb = ycbcr.select(-3, 1) - kChromaMidpoint, cr = ycbcr.select(-3, 2) - kChromaMidpoint;
  return torch::stack({y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb}, -3);
}

/// Fuses two chroma planes (spec section 6): each pixel is the average of the two, weighted by how far
/// each is from neutral, so the more saturated source dominates:
///     C = m + ((C1 - m)|C1 - m| + (C2 - m)|C2 - m|) / (|C1 - m| + |C2 - m| + eps)
/// This is the spec's (C1|C1 - m| + C2|C2 - m|) / (|C1 - m| + |C2 - m| + eps) rewritten around m; the two
/// differ by m eps / (|C1 - m| + |C2 - m| + eps). That is harmless where either source has chroma, but where
/// both are neutral the literal form gives 0 instead of m, i.e. a strong green cast in grey areas. (The
/// release escapes it only because its float OpenCV conversion puts m at 0.5 on 0..255 data.)
/// For 0..255 data pass m = 128 and eps = 1e-4.
inline torch::Tensor fuse_chroma(const torch::Tensor& c1, const torch::Tensor& c2, double midpoint = kChromaMidpoint,
                                 double eps = kChromaEps) {
  TORCH_CHECK(c1.defined() && c2.defined() && c1.sizes() == c2.sizes(),
              "tdfusion: fuse_chroma needs two chroma tensors of the same shape");
  TORCH_CHECK(eps > 0.0, "tdfusion: fuse_chroma needs eps > 0, got ", eps);
  const torch::Tensor d1 = c1 - midpoint, d2 = c2 - midpoint;
  const torch::Tensor a1 = d1.abs(), a2 = d2.abs();
  return (d1 * a1 + d2 * a2) / (a1 + a2 + eps) + midpoint;
}

/// The release's per-image min-max stretch of the fused Y: (y - min) / (max - min). A single image (any
/// shape up to C x H x W) or each image of an N x C x H x W batch; a constant image becomes 0.
inline torch::Tensor min_max_normalise(const torch::Tensor& y) {
  TORCH_CHECK(y.defined() && y.numel() > 0 && y.is_floating_point(),
              "tdfusion: min_max_normalise expects a non-empty floating-point tensor");
  const torch::Tensor flat = y.dim() == 4 ? y.reshape({y.size(0), -1}) : y.reshape({1, -1});
  const torch::Tensor low = std::get<0>(flat.min(1, /*keepdim=*/true));
  const torch::Tensor range = std::get<0>(flat.max(1, /*keepdim=*/true)) - low;
  const torch::Tensor stretched =
      torch::where(range > 0, (flat - low) / range.clamp_min(1e-30), torch::zeros_like(flat));
  return stretched.reshape(y.sizes());
}

/// Rebuilds the output image from the fused luminance (1 x H x W or H x W, [0,1]) and the two sources
/// (C x H x W, C = 1 or 3, [0,1], as `read_image` returns them; 3 equal channels count as grey):
/// - neither source has colour: the fused Y, 1 x H x W;
/// - one has colour: its Cb and Cr are copied, 3 x H x W RGB;
/// - both have colour: their chroma is fused with `fuse_chroma`, 3 x H x W RGB.
/// The output is clamped to [0,1] and has fused_y's dtype and device. Apply `min_max_normalise` to the
/// network output first to reproduce the release.
inline torch::Tensor restore_colour(const torch::Tensor& fused_y, const torch::Tensor& ir_image,
                                    const torch::Tensor& vi_image) {
  TORCH_CHECK(fused_y.defined() && fused_y.is_floating_point() &&
                  (fused_y.dim() == 2 || (fused_y.dim() == 3 && fused_y.size(0) == 1)),
              "tdfusion: restore_colour expects the fused luminance as 1 x H x W or H x W floats, got shape ",
              fused_y.defined() ? fused_y.sizes() : torch::IntArrayRef{});
  const torch::Tensor y = fused_y.dim() == 2 ? fused_y.unsqueeze(0) : fused_y;
  auto check_source = [&](const torch::Tensor& image, const char* what) {
    TORCH_CHECK(image.defined() && image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3) &&
                    image.size(1) == y.size(1) && image.size(2) == y.size(2),
                "tdfusion: restore_colour: the ", what, " image must be 1 or 3 x ", y.size(1), " x ", y.size(2),
                " (the fused image's size), got shape ", image.defined() ? image.sizes() : torch::IntArrayRef{});
    return image.to(y.device(), y.scalar_type());
  };
  const torch::Tensor ir = check_source(ir_image, "infrared"), vi = check_source(vi_image, "visible");
  const bool ir_colour = detail::has_colour(ir), vi_colour = detail::has_colour(vi);
  if (!ir_colour && !vi_colour) return y.clamp(0.0, 1.0);

  torch::Tensor chroma;
  if (ir_colour && vi_colour) {
    chroma = fuse_chroma(rgb_to_ycbcr(ir).narrow(0, 1, 2), rgb_to_ycbcr(vi).narrow(0, 1, 2));
  } else {
    chroma = rgb_to_ycbcr(ir_colour ? ir : vi).narrow(0, 1, 2);
  }
  return ycbcr_to_rgb(torch::cat({y, chroma}, 0)).clamp_(0.0, 1.0);
}

}  // namespace tdfusion::io

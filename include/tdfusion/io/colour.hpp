#pragma once
// Colour output (spec section 6). The networks see luminance only; a colour result is rebuilt from the
// fused Y and the sources' chroma. The conversion is OpenCV's RGB <-> YCrCb (BT.601, full range), the one
// the release uses, on [0,1] data with the 8-bit chroma offset 128 / 255. Channels are ordered Y, Cb, Cr
// (OpenCV orders them Y, Cr, Cb).

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

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

/// Rows per band when a full-resolution result is computed band by band (about 256 K pixels each), so that
/// the temporaries of the computation stay a few MiB whatever the image's size.
inline int64_t band_rows(int64_t width) { return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(width, 1)); }

}  // namespace detail

/// An image's values in [0,1] as `type`: uint8 levels (io::read_image_compact) become level / 255, computed as
/// io::read_image does; floating-point images are converted.
inline torch::Tensor unit_values(const torch::Tensor& image, torch::ScalarType type = torch::kFloat) {
  if (image.scalar_type() == torch::kByte) return image.to(torch::kFloat).div_(255.0).to(type);
  TORCH_CHECK(image.is_floating_point(), "tdfusion: expected an image of floating-point values in [0,1] or of uint8 "
              "levels, got ", image.dtype());
  return image.to(type);
}

/// The BT.601 luma 0.299 R + 0.587 G + 0.114 B of an RGB image on [0,1] data, channels at dimension -3.
inline torch::Tensor luma(const torch::Tensor& rgb) {
  detail::check_channels(rgb, 3, "luma");
  return 0.299 * rgb.select(-3, 0) + 0.587 * rgb.select(-3, 1) + 0.114 * rgb.select(-3, 2);
}

/// RGB -> YCbCr on [0,1] data, channels at dimension -3 (C x H x W or N x C x H x W):
///     Y  = 0.299 R + 0.587 G + 0.114 B
///     Cb = 0.564 (B - Y) + 128/255
///     Cr = 0.713 (R - Y) + 128/255
/// (OpenCV's constants; the exact BT.601 factors are 0.5/0.886 and 0.5/0.701.)
inline torch::Tensor rgb_to_ycbcr(const torch::Tensor& rgb) {
  detail::check_channels(rgb, 3, "rgb_to_ycbcr");
  const torch::Tensor y = luma(rgb);
  const torch::Tensor r = rgb.select(-3, 0), b = rgb.select(-3, 2);
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

/// The release's per-image min-max stretch of the fused Y, in place: y <- (y - min) / (max - min). A single
/// image (any shape up to C x H x W) or each image of an N x C x H x W batch; a constant image becomes 0.
inline torch::Tensor& min_max_normalise_(torch::Tensor& y) {
  TORCH_CHECK(y.defined() && y.numel() > 0 && y.is_floating_point(),
              "tdfusion: min_max_normalise expects a non-empty floating-point tensor");
  std::vector<int64_t> dims;  // all but the batch dimension
  for (int64_t d = y.dim() == 4 ? 1 : 0; d < y.dim(); ++d) dims.push_back(d);
  const torch::Tensor low = y.amin(dims, /*keepdim=*/true);
  const torch::Tensor range = y.amax(dims, /*keepdim=*/true) - low;
  y.sub_(low).div_(range.clamp_min(1e-30)).masked_fill_(range.gt(0).logical_not(), 0.0);
  return y;
}

/// As min_max_normalise_, into a new tensor.
inline torch::Tensor min_max_normalise(const torch::Tensor& y) {
  torch::Tensor stretched = y.clone();
  return min_max_normalise_(stretched);
}

/// Rebuilds the output image from the fused luminance (1 x H x W or H x W, [0,1]) and the two sources
/// (C x H x W, C = 1 or 3, [0,1] floats as `read_image` returns them or uint8 levels as `read_image_compact`
/// does; 3 equal channels count as grey):
/// - neither source has colour: the fused Y, 1 x H x W;
/// - one has colour: its Cb and Cr are copied, 3 x H x W RGB;
/// - both have colour: their chroma is fused with `fuse_chroma`, 3 x H x W RGB.
/// The output is clamped to [0,1] and has fused_y's dtype and device. It is computed in bands of rows, so the
/// memory it takes beyond its result is a band's. Apply `min_max_normalise` to the network output first to
/// reproduce the release.
inline torch::Tensor restore_colour(const torch::Tensor& fused_y, const torch::Tensor& ir_image,
                                    const torch::Tensor& vi_image) {
  TORCH_CHECK(fused_y.defined() && fused_y.is_floating_point() &&
                  (fused_y.dim() == 2 || (fused_y.dim() == 3 && fused_y.size(0) == 1)),
              "tdfusion: restore_colour expects the fused luminance as 1 x H x W or H x W floats, got shape ",
              fused_y.defined() ? fused_y.sizes() : torch::IntArrayRef{});
  const torch::Tensor y = fused_y.dim() == 2 ? fused_y.unsqueeze(0) : fused_y;
  const int64_t height = y.size(1), width = y.size(2);
  auto check_source = [&](const torch::Tensor& image, const char* what) {
    TORCH_CHECK(image.defined() && image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3) &&
                    image.size(1) == height && image.size(2) == width,
                "tdfusion: restore_colour: the ", what, " image must be 1 or 3 x ", height, " x ", width,
                " (the fused image's size), got shape ", image.defined() ? image.sizes() : torch::IntArrayRef{});
    TORCH_CHECK(image.is_floating_point() || image.scalar_type() == torch::kByte, "tdfusion: restore_colour: the ",
                what, " image must hold floating-point values or uint8 levels, got ", image.dtype());
  };
  check_source(ir_image, "infrared");
  check_source(vi_image, "visible");
  const bool ir_colour = detail::has_colour(ir_image), vi_colour = detail::has_colour(vi_image);
  if (!ir_colour && !vi_colour) return y.clamp(0.0, 1.0);

  torch::Tensor rgb = torch::empty({3, height, width}, y.options());
  const int64_t band = detail::band_rows(width);
  for (int64_t y0 = 0; y0 < height; y0 += band) {
    const int64_t rows = std::min(band, height - y0);
    auto chroma_of = [&](const torch::Tensor& image) {
      return rgb_to_ycbcr(unit_values(image.narrow(1, y0, rows), y.scalar_type()).to(y.device())).narrow(0, 1, 2);
    };
    const torch::Tensor chroma = ir_colour && vi_colour ? fuse_chroma(chroma_of(ir_image), chroma_of(vi_image))
                                                        : chroma_of(ir_colour ? ir_image : vi_image);
    rgb.narrow(1, y0, rows).copy_(ycbcr_to_rgb(torch::cat({y.narrow(1, y0, rows), chroma}, 0)).clamp_(0.0, 1.0));
  }
  return rgb;
}

}  // namespace tdfusion::io

#pragma once
// Detection labels: the batched target type of the detection task policies, its batching traits, and the box
// geometry that follows an image through crops, horizontal flips and resizes.
//
// Boxes are YOLO boxes, (cx, cy, w, h) normalised to [0,1] of the image they belong to. Normalised
// coordinates make the geometry simple:
//   resize (any aspect, any interpolation):  unchanged; the boxes scale with the image
//   horizontal flip:                         cx -> 1 - cx
//   crop:                                    re-normalised to the crop and clipped to it; boxes that keep
//                                            less than a fraction of their area are dropped
// The helpers work on the last four columns and keep any leading ones, so they take K x 5 per-image boxes
// (class, cx, cy, w, h) as well as M x 6 batched ones (batch index, class, cx, cy, w, h).

#include "tdfusion/core/target_traits.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace tdfusion::task {

/// The labels of a batch of images for the detection task policies.
struct DetectionTarget {
  /// M x 6 floating: batch index, class id, cx, cy, w, h, the box normalised to [0,1] of its image.
  torch::Tensor boxes = torch::zeros({0, 6});
  /// Images in the batch. Kept explicitly because an image may have no box, so the largest batch index
  /// does not tell it (batching shifts indices by it).
  int64_t batch_size = 0;

  /// Batches per-image K_i x 5 boxes (class, cx, cy, w, h); image i gets batch index i.
  static DetectionTarget from_images(const std::vector<torch::Tensor>& per_image) {
    std::vector<torch::Tensor> parts;
    for (size_t i = 0; i < per_image.size(); ++i) {
      const torch::Tensor& b = per_image[i];
      TORCH_CHECK(b.defined() && b.dim() == 2 && b.size(1) == 5, "tdfusion: boxes of image ", i,
                  " must be K x 5 (class, cx, cy, w, h), got ",
                  b.defined() ? b.sizes() : torch::IntArrayRef{});
      const torch::Tensor f = b.to(torch::kFloat);
      parts.push_back(torch::cat({torch::full({b.size(0), 1}, static_cast<double>(i), f.options()), f}, 1));
    }
    DetectionTarget target;
    target.batch_size = static_cast<int64_t>(per_image.size());
    if (!parts.empty()) target.boxes = torch::cat(parts, 0);
    return target;
  }

  /// The K x 5 boxes (class, cx, cy, w, h) of image `index`.
  torch::Tensor image_boxes(int64_t index) const {
    TORCH_CHECK(index >= 0 && index < batch_size, "tdfusion: image index ", index, " out of range for a batch of ",
                batch_size);
    const torch::Tensor rows = boxes.select(1, 0) == static_cast<double>(index);
    return boxes.index({rows}).narrow(1, 1, 5);
  }
};

/// Horizontally flipped boxes: cx -> 1 - cx.
inline torch::Tensor flip_boxes_horizontal(const torch::Tensor& boxes) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) >= 4, "tdfusion: boxes must be K x (... cx cy w h), got ",
              boxes.sizes());
  torch::Tensor flipped = boxes.clone();
  const int64_t cx = boxes.size(1) - 4;
  flipped.select(1, cx).copy_(1.0 - boxes.select(1, cx));
  return flipped;
}

/// The boxes of an image_height x image_width image after cutting the crop_height x crop_width window at
/// (top, left) (pixels): clipped to the window and normalised to it. A box is dropped when the part inside
/// keeps less than `min_visible` of its area (or nothing at all: zero-area boxes survive only if they lie
/// inside). The window may reach outside the image (as a padded crop would).
inline torch::Tensor crop_boxes(const torch::Tensor& boxes, int64_t image_height, int64_t image_width, int64_t top,
                                int64_t left, int64_t crop_height, int64_t crop_width, double min_visible = 0.25) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) >= 4, "tdfusion: boxes must be K x (... cx cy w h), got ",
              boxes.sizes());
  TORCH_CHECK(image_height > 0 && image_width > 0 && crop_height > 0 && crop_width > 0,
              "tdfusion: crop_boxes needs positive image and crop sizes, got image ", image_height, " x ",
              image_width, ", crop ", crop_height, " x ", crop_width);
  TORCH_CHECK(min_visible >= 0.0 && min_visible <= 1.0, "tdfusion: min_visible must be in [0, 1], got ",
              min_visible);
  const int64_t c = boxes.size(1) - 4;
  const torch::Tensor b = boxes.to(torch::kDouble);
  const torch::Tensor cx = b.select(1, c) * image_width, cy = b.select(1, c + 1) * image_height;
  const torch::Tensor w = b.select(1, c + 2) * image_width, h = b.select(1, c + 3) * image_height;
  const double x0 = static_cast<double>(left), y0 = static_cast<double>(top);
  const double x1 = x0 + static_cast<double>(crop_width), y1 = y0 + static_cast<double>(crop_height);
  const torch::Tensor bx0 = (cx - w / 2).clamp(x0, x1), bx1 = (cx + w / 2).clamp(x0, x1);
  const torch::Tensor by0 = (cy - h / 2).clamp(y0, y1), by1 = (cy + h / 2).clamp(y0, y1);
  const torch::Tensor area = w * h, visible = (bx1 - bx0) * (by1 - by0);
  // Zero-area boxes have no fraction to measure: they stay when their centre lies inside the window.
  const torch::Tensor inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1);
  const torch::Tensor keep =
      torch::where(area > 0, (visible > 0) & (visible >= min_visible * area), inside);
  torch::Tensor out = b.clone();
  out.select(1, c).copy_((bx0 + bx1) / 2 - x0).div_(crop_width);
  out.select(1, c + 1).copy_((by0 + by1) / 2 - y0).div_(crop_height);
  out.select(1, c + 2).copy_(bx1 - bx0).div_(crop_width);
  out.select(1, c + 3).copy_(by1 - by0).div_(crop_height);
  return out.index({keep}).to(boxes.scalar_type());
}

/// Boxes are normalised, so a resize (any size, any aspect) leaves them unchanged; spelt out so that code
/// that follows an image through its augmentations reads in full.
inline torch::Tensor resize_boxes(const torch::Tensor& boxes) { return boxes; }

}  // namespace tdfusion::task

namespace tdfusion {

/// Batching of detection targets: concatenation shifts every part's batch indices past the images before it.
template <>
struct TargetTraits<task::DetectionTarget> {
  static task::DetectionTarget concat(const std::vector<task::DetectionTarget>& parts) {
    task::DetectionTarget out;
    std::vector<torch::Tensor> boxes;
    for (const auto& part : parts) {
      TORCH_CHECK(part.boxes.defined() && part.boxes.dim() == 2 && part.boxes.size(1) == 6,
                  "tdfusion: detection target boxes must be M x 6 (batch index, class, cx, cy, w, h), got ",
                  part.boxes.defined() ? part.boxes.sizes() : torch::IntArrayRef{});
      torch::Tensor shifted = part.boxes.clone();
      shifted.select(1, 0).add_(static_cast<double>(out.batch_size));
      boxes.push_back(shifted);
      out.batch_size += part.batch_size;
    }
    if (!boxes.empty()) out.boxes = torch::cat(boxes, 0);
    return out;
  }
  static task::DetectionTarget to(const task::DetectionTarget& target, const torch::Device& device) {
    return {target.boxes.to(device), target.batch_size};
  }
};

}  // namespace tdfusion

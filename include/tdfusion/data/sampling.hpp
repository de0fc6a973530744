#pragma once
// Sampling shared by the data sets: seeded random streams, resizing, and cutting one training sample (task
// input at the task size, fusion crops at full resolution, a consistent flip) out of a registered pair.

#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/nn/resize.hpp"
#include "tdfusion/task/detection/target.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

namespace tdfusion::data {

namespace detail {

inline constexpr double kPi = 3.14159265358979323846;

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Derives an independent seed from a seed and a stream / item id.
inline uint64_t mix_seed(uint64_t seed, uint64_t stream) {
  return splitmix64(splitmix64(seed) ^ splitmix64(stream + 0x632BE59BD9B4E019ull));
}

/// A local random stream. The distributions are written out because the standard library's are
/// implementation-defined: this gives the same draws with every compiler and LibTorch version.
class SampleRng {
 public:
  explicit SampleRng(uint64_t seed) : engine_(seed) {}

  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }  ///< [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t integer(int64_t lo, int64_t hi) {  ///< inclusive range
    return std::min(hi, lo + static_cast<int64_t>(uniform() * static_cast<double>(hi - lo + 1)));
  }
  bool bernoulli(double p) { return uniform() < p; }

  /// rows x cols standard normal draws (Box-Muller), scaled by `stddev`.
  torch::Tensor normal(int64_t rows, int64_t cols, double stddev) {
    std::vector<float> values(static_cast<size_t>(rows * cols));
    for (size_t i = 0; i < values.size(); i += 2) {
      const double radius = std::sqrt(-2.0 * std::log(1.0 - uniform()));  // 1 - u is in (0, 1]
      const double angle = 2.0 * kPi * uniform();
      values[i] = static_cast<float>(stddev * radius * std::cos(angle));
      if (i + 1 < values.size()) values[i + 1] = static_cast<float>(stddev * radius * std::sin(angle));
    }
    return torch::from_blob(values.data(), {rows, cols}, torch::kFloat).clone();
  }

 private:
  std::mt19937_64 engine_;  // its output sequence is fixed by the standard
};

/// Nearest resize of an N x H x W label map, sampling at output pixel centres (PyTorch's "nearest-exact",
/// which lines up with bilinear align_corners=false). Works on integer labels directly.
inline torch::Tensor resize_labels(const torch::Tensor& labels, int64_t height, int64_t width) {
  if (labels.size(1) == height && labels.size(2) == width) return labels;
  auto source_index = [](int64_t out, int64_t in) {
    return ((torch::arange(out, torch::kDouble) + 0.5) * (static_cast<double>(in) / static_cast<double>(out)))
        .floor()
        .clamp_max(static_cast<double>(in - 1))
        .to(torch::kLong);
  };
  return labels.index_select(1, source_index(height, labels.size(1)))
      .index_select(2, source_index(width, labels.size(2)));
}

}  // namespace detail

/// How a data set turns a full-resolution pair into a training sample.
struct SampleGeometry {
  int64_t task_height = 0, task_width = 0;  ///< task input size; 0 keeps the image size
  int64_t crop_size = 256;                  ///< fusion crop side, clamped to the image's height and width
  bool flip = true;                         ///< random horizontal flips
};

/// The image part of a sample, and whether it was flipped (targets must follow).
struct PairSample {
  torch::Tensor ir, vi;            ///< 1 x 1 x task_h x task_w
  torch::Tensor ir_crop, vi_crop;  ///< 1 x 1 x c x c (c clamped per side), same offset in both
  bool flipped = false;
};

/// Draws a flip and a crop offset from `rng` and cuts a sample from a 1 x H x W pair. The crop offset is
/// drawn in the flipped image.
inline PairSample sample_pair(const torch::Tensor& ir, const torch::Tensor& vi, const SampleGeometry& geometry,
                              detail::SampleRng& rng) {
  PairSample sample;
  sample.flipped = geometry.flip && rng.bernoulli(0.5);
  const int64_t height = ir.size(1), width = ir.size(2);
  const int64_t crop_h = std::min(geometry.crop_size, height), crop_w = std::min(geometry.crop_size, width);
  const int64_t y0 = rng.integer(0, height - crop_h), x0 = rng.integer(0, width - crop_w);
  torch::Tensor a = ir.unsqueeze(0), b = vi.unsqueeze(0);
  if (sample.flipped) {
    a = a.flip({-1});
    b = b.flip({-1});
  }
  auto crop = [&](const torch::Tensor& image) { return image.narrow(2, y0, crop_h).narrow(3, x0, crop_w).contiguous(); };
  const int64_t task_h = geometry.task_height > 0 ? geometry.task_height : height;
  const int64_t task_w = geometry.task_width > 0 ? geometry.task_width : width;
  sample.ir = nn::resize_bilinear(a, task_h, task_w).contiguous();
  sample.vi = nn::resize_bilinear(b, task_h, task_w).contiguous();
  sample.ir_crop = crop(a);
  sample.vi_crop = crop(b);
  return sample;
}

/// A segmentation sample: the pair as above and its H x W label map, flipped and resized (nearest) alike.
inline PairBatch<torch::Tensor> segmentation_sample(const torch::Tensor& ir, const torch::Tensor& vi,
                                                    const torch::Tensor& labels, const SampleGeometry& geometry,
                                                    detail::SampleRng& rng) {
  const PairSample s = sample_pair(ir, vi, geometry, rng);
  torch::Tensor target = labels.unsqueeze(0);
  if (s.flipped) target = target.flip({-1});
  target = detail::resize_labels(target, s.ir.size(2), s.ir.size(3)).contiguous();
  return {s.ir, s.vi, target, s.ir_crop, s.vi_crop};
}

/// A detection sample: the pair as above and its K x 5 YOLO boxes (class, cx, cy, w, h). Normalised boxes
/// do not change with the resize to the task size; they follow the flip.
inline PairBatch<task::DetectionTarget> detection_sample(const torch::Tensor& ir, const torch::Tensor& vi,
                                                         const torch::Tensor& boxes, const SampleGeometry& geometry,
                                                         detail::SampleRng& rng) {
  const PairSample s = sample_pair(ir, vi, geometry, rng);
  const torch::Tensor image_boxes = s.flipped ? task::flip_boxes_horizontal(boxes) : boxes;
  return {s.ir, s.vi, task::DetectionTarget::from_images({image_boxes}), s.ir_crop, s.vi_crop};
}

/// The task labels a data set serves: class-id maps (torch::Tensor) or boxes (task::DetectionTarget).
template <class Target>
inline constexpr bool kIsDetection = std::is_same_v<Target, task::DetectionTarget>;

}  // namespace tdfusion::data

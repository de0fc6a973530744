#pragma once
// Synthetic registered infrared / visible scenes with segmentation and detection ground truth, so examples
// and tests run anywhere without downloading a data set. The scenes are built so that neither modality alone
// suffices: warm objects (people, vehicles) are bright in infrared but almost invisible in the visible image,
// textured objects (signs, painted markings) carry strong texture only the visible camera sees and are flat
// in infrared. A fused image must keep both to segment both classes well.

#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/data/sampling.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace tdfusion::data {

/// Segmentation class ids of the synthetic scenes (the values of SyntheticScene::mask).
inline constexpr int64_t kSceneBackground = 0;
inline constexpr int64_t kSceneWarmObject = 1;
inline constexpr int64_t kSceneTexturedObject = 2;
inline constexpr int64_t kSceneClasses = 3;  ///< segmentation classes, background included
/// Detection class ids (column 0 of SyntheticScene::boxes) have no background: 0 = warm object,
/// 1 = textured object, i.e. segmentation id - 1.
inline constexpr int64_t kSceneDetectionClasses = 2;

struct SyntheticScene {
  torch::Tensor ir, vi;  ///< 1 x H x W float32 in [0,1]
  torch::Tensor mask;    ///< H x W int64 segmentation class ids (kScene*)
  torch::Tensor boxes;   ///< K x 5 float32: detection class, cx, cy, w, h, normalised to [0,1] (YOLO)
};

struct SyntheticSceneOptions {
  TORCH_ARG(int64_t, min_objects) = 1;         ///< objects per class, at least
  TORCH_ARG(int64_t, max_objects) = 3;         ///< objects per class, at most (fewer if the scene is full)
  TORCH_ARG(double, min_object_size) = 0.12;   ///< longer side of an object, as a fraction of min(H, W)
  TORCH_ARG(double, max_object_size) = 0.3;
  TORCH_ARG(double, night_probability) = 0.5;  ///< night scenes: dark, noisy visible image
  TORCH_ARG(double, ir_noise) = 0.02;          ///< standard deviation of the infrared sensor noise
  TORCH_ARG(double, day_vi_noise) = 0.01;      ///< standard deviation of the visible sensor noise by day
  TORCH_ARG(double, night_vi_noise) = 0.04;    ///< ... and by night
};


/// Renders one scene. A pure function of its arguments: the same arguments give the same scene (on a
/// given build and CPU), and the global random generators are neither used nor advanced.
/// Objects lie fully inside the image and never overlap, so each box is the tight box of one object's
/// pixels in `mask`.
inline SyntheticScene make_synthetic_scene(int64_t height, int64_t width, uint64_t seed,
                                           SyntheticSceneOptions options = {}) {
  TORCH_CHECK(height >= 8 && width >= 8, "tdfusion: synthetic scenes need at least 8 x 8 pixels, got ", height,
              " x ", width);
  TORCH_CHECK(options.min_objects() >= 0 && options.min_objects() <= options.max_objects(),
              "tdfusion: synthetic scene object counts must satisfy 0 <= min_objects <= max_objects, got ",
              options.min_objects(), " and ", options.max_objects());
  TORCH_CHECK(options.min_object_size() > 0 && options.min_object_size() <= options.max_object_size() &&
                  options.max_object_size() <= 1,
              "tdfusion: synthetic scene object sizes must satisfy 0 < min <= max <= 1, got ",
              options.min_object_size(), " and ", options.max_object_size());
  TORCH_CHECK(options.ir_noise() >= 0 && options.day_vi_noise() >= 0 && options.night_vi_noise() >= 0,
              "tdfusion: synthetic scene noise levels must be non-negative");

  detail::SampleRng rng(detail::mix_seed(seed, 0x5CE7E));
  const double h = static_cast<double>(height), w = static_cast<double>(width), extent = std::min(h, w);
  // Pixel-centre coordinates; broadcasting them gives H x W fields.
  const torch::Tensor ys = (torch::arange(height, torch::kFloat) + 0.5).view({height, 1});
  const torch::Tensor xs = (torch::arange(width, torch::kFloat) + 0.5).view({1, width});

  auto gradient = [&](double amplitude) {
    const double angle = rng.uniform(0.0, 2.0 * detail::kPi);
    return amplitude * ((xs / w - 0.5) * std::cos(angle) + (ys / h - 0.5) * std::sin(angle));
  };
  auto inside_box = [&](double y0, double x0, double y1, double x1) {
    return (ys >= y0).logical_and(ys < y1).logical_and(xs >= x0).logical_and(xs < x1);
  };

  // Background: a smooth temperature field with warm patches (sun-heated ground, never as hot as a warm
  // object) and a reflectance field with flat structures (buildings, road) that show faintly in infrared.
  torch::Tensor ir = torch::full({height, width}, rng.uniform(0.15, 0.35), torch::kFloat) + gradient(rng.uniform(0.0, 0.1));
  torch::Tensor vi = torch::full({height, width}, rng.uniform(0.3, 0.55), torch::kFloat) + gradient(rng.uniform(0.0, 0.15));
  for (int64_t i = 0, n = rng.integer(1, 3); i < n; ++i) {
    const double amplitude = rng.uniform(-0.05, 0.15), sigma = rng.uniform(0.08, 0.25) * extent;
    const double cy = rng.uniform(0.0, h), cx = rng.uniform(0.0, w);
    ir = ir + amplitude * torch::exp(-((ys - cy).square() + (xs - cx).square()) / (2.0 * sigma * sigma));
  }
  for (int64_t i = 0, n = rng.integer(2, 4); i < n; ++i) {
    const double bh = rng.uniform(0.15, 0.5) * h, bw = rng.uniform(0.15, 0.5) * w;
    const double y0 = rng.uniform(0.0, h - bh), x0 = rng.uniform(0.0, w - bw);
    const torch::Tensor region = inside_box(y0, x0, y0 + bh, x0 + bw);
    vi = vi + region * rng.uniform(-0.15, 0.15);
    ir = ir + region * rng.uniform(-0.04, 0.04);
  }

  torch::Tensor mask = torch::zeros({height, width}, torch::kLong);
  std::vector<std::array<double, 4>> occupied;  // y0, x0, y1, x1 of placed objects, with a margin
  std::vector<float> boxes;  // 5 values per object
  constexpr double kMargin = 2.0;
  constexpr int kPlacementTries = 30;

  for (const int64_t label : {kSceneWarmObject, kSceneTexturedObject}) {
    for (int64_t i = 0, n = rng.integer(options.min_objects(), options.max_objects()); i < n; ++i) {
      // Shape: warm objects are tall ellipses (people) or wide rectangles (vehicles); textured objects are
      // rectangles (signs) or ellipses (markings).
      const double size = rng.uniform(options.min_object_size(), options.max_object_size()) * extent;
      const bool ellipse = rng.bernoulli(0.5);
      double oh = size, ow = size;
      if (label == kSceneTexturedObject) {
        oh *= rng.uniform(0.5, 1.0);
      } else if (ellipse) {
        ow *= rng.uniform(0.3, 0.5);  // person: tall
      } else {
        oh *= rng.uniform(0.45, 0.7);  // vehicle: wide
      }
      const double ry = std::min(std::max(oh / 2.0, 1.5), h / 2.0), rx = std::min(std::max(ow / 2.0, 1.5), w / 2.0);

      bool placed = false;
      double cy = 0.0, cx = 0.0;
      for (int attempt = 0; attempt < kPlacementTries && !placed; ++attempt) {
        cy = rng.uniform(ry, h - ry);
        cx = rng.uniform(rx, w - rx);
        placed = std::none_of(occupied.begin(), occupied.end(), [&](const std::array<double, 4>& o) {
          return cy - ry < o[2] && cy + ry > o[0] && cx - rx < o[3] && cx + rx > o[1];
        });
      }
      if (!placed) continue;  // scene is full: fewer objects rather than overlapping ones
      occupied.push_back({cy - ry - kMargin, cx - rx - kMargin, cy + ry + kMargin, cx + rx + kMargin});

      const torch::Tensor dy = ((ys - cy) / ry).square(), dx = ((xs - cx) / rx).square();
      const torch::Tensor radius2 = ellipse ? dy + dx : torch::maximum(dy, dx);  // 0 at the centre, 1 at the rim
      const torch::Tensor object = radius2 <= 1.0;
      if (!object.any().item<bool>()) continue;

      if (label == kSceneWarmObject) {
        // Hot, with a slightly warmer core; in the visible image only a faint change of the background.
        const double hot = rng.uniform(0.7, 0.9);
        ir = torch::where(object, hot - 0.1 * radius2, ir);
        vi = vi + object * rng.uniform(-0.04, 0.04);
      } else {
        // High-contrast stripes or checks in the visible image; the temperature of the surroundings.
        const double mean = rng.uniform(0.35, 0.65), amplitude = rng.uniform(0.25, 0.35);
        torch::Tensor square;
        if (rng.bernoulli(0.5)) {
          const double angle = rng.uniform(0.0, detail::kPi), period = rng.uniform(3.0, 8.0), phase = rng.uniform();
          const torch::Tensor t = (xs * std::cos(angle) + ys * std::sin(angle)) / period + phase;
          square = (t - t.floor() < 0.5).to(torch::kFloat) * 2.0 - 1.0;
        } else {
          const double cell = rng.uniform(2.5, 6.0);
          square = ((xs / cell).floor() + (ys / cell).floor()).remainder(2.0) * 2.0 - 1.0;
        }
        vi = torch::where(object, mean + amplitude * square, vi);
        ir = ir + object * rng.uniform(-0.03, 0.03);
      }
      mask.masked_fill_(object, label);

      // Tight box of the object's pixels.
      const torch::Tensor rows = object.any(1).nonzero(), cols = object.any(0).nonzero();
      const double y0 = rows.min().item<double>(), y1 = rows.max().item<double>() + 1.0;
      const double x0 = cols.min().item<double>(), x1 = cols.max().item<double>() + 1.0;
      for (const double value : {static_cast<double>(label - 1), (x0 + x1) / 2.0 / w, (y0 + y1) / 2.0 / h,
                                 (x1 - x0) / w, (y1 - y0) / h}) {
        boxes.push_back(static_cast<float>(value));
      }
    }
  }

  // Sensors: night scales the visible image down and raises its noise; infrared is the same day and night.
  const bool night = rng.bernoulli(options.night_probability());
  const double gain = night ? rng.uniform(0.2, 0.35) : rng.uniform(0.9, 1.1);
  vi = vi * gain + rng.normal(height, width, night ? options.night_vi_noise() : options.day_vi_noise());
  ir = ir + rng.normal(height, width, options.ir_noise());

  torch::Tensor box_tensor = torch::zeros({static_cast<int64_t>(boxes.size() / 5), 5}, torch::kFloat);
  std::copy(boxes.begin(), boxes.end(), box_tensor.data_ptr<float>());
  return {ir.clamp(0.0, 1.0).unsqueeze(0).contiguous(), vi.clamp(0.0, 1.0).unsqueeze(0).contiguous(), mask,
          box_tensor};
}

struct SyntheticScenesOptions {
  TORCH_ARG(int64_t, count) = 64;          ///< distinct scenes; the sample counter cycles through them
  TORCH_ARG(int64_t, scene_height) = 128;  ///< full resolution (fusion crops are cut from it)
  TORCH_ARG(int64_t, scene_width) = 128;
  TORCH_ARG(int64_t, task_height) = 128;   ///< task network input size (scenes are resized to it)
  TORCH_ARG(int64_t, task_width) = 128;
  TORCH_ARG(int64_t, crop_size) = 96;      ///< fusion crop side, clamped to the scene's height and width
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(bool, flip) = true;            ///< random horizontal flips
  TORCH_ARG(SyntheticSceneOptions, scene) = {};
};

/// A data set of synthetic scenes for the bilevel optimiser, serving segmentation masks (Target =
/// torch::Tensor, `SyntheticScenes`) or boxes (Target = task::DetectionTarget, `SyntheticDetectionScenes`).
/// `get(counter)` serves scene `counter % size()` and draws its crop and flip from (seed, counter), so a
/// stream of batches is reproducible and can be resumed from any counter.
template <class Target>
class SyntheticScenesFor {
 public:
  explicit SyntheticScenesFor(SyntheticScenesOptions options = {}) : options_(options) {
    TORCH_CHECK(options.count() > 0, "tdfusion: SyntheticScenes needs count > 0, got ", options.count());
    TORCH_CHECK(options.task_height() > 0 && options.task_width() > 0,
                "tdfusion: SyntheticScenes needs a positive task size, got ", options.task_height(), " x ",
                options.task_width());
    TORCH_CHECK(options.crop_size() > 0, "tdfusion: SyntheticScenes needs crop_size > 0, got ",
                options.crop_size());
    // Validates the scene size and scene options once, here, rather than at the first batch.
    make_synthetic_scene(options.scene_height(), options.scene_width(), 0, options.scene());
  }

  size_t size() const { return static_cast<size_t>(options_.count()); }

  /// Scene `index` at full resolution, unflipped, with its boxes.
  SyntheticScene scene(size_t index) const {
    TORCH_CHECK(index < size(), "tdfusion: scene index ", index, " out of range for ", size(), " scenes");
    return make_synthetic_scene(options_.scene_height(), options_.scene_width(),
                                detail::mix_seed(options_.seed(), index), options_.scene());
  }

  /// Batch of one: ir / vi (1 x 1 x task_h x task_w), target (1 x task_h x task_w int64), and
  /// ir_crop / vi_crop (1 x 1 x c x c at full resolution, same offset). A flip, when drawn, applies to all
  /// of them; the crop offset is drawn in the flipped image.
  PairBatch<Target> get(uint64_t counter) const {
    const SyntheticScene s = scene(static_cast<size_t>(counter % size()));
    detail::SampleRng rng(detail::mix_seed(detail::splitmix64(options_.seed() ^ 0xD8A3ull), counter));
    if constexpr (kIsDetection<Target>) {
      return detection_sample(s.ir, s.vi, s.boxes, geometry(), rng);
    } else {
      return segmentation_sample(s.ir, s.vi, s.mask, geometry(), rng);
    }
  }

  /// How get() samples: task size, crop size and flips of the options.
  SampleGeometry geometry() const {
    return SampleGeometry{options_.task_height(), options_.task_width(), options_.crop_size(), options_.flip()};
  }

  const SyntheticScenesOptions& options() const { return options_; }

 private:
  SyntheticScenesOptions options_;
};

using SyntheticScenes = SyntheticScenesFor<torch::Tensor>;
using SyntheticDetectionScenes = SyntheticScenesFor<task::DetectionTarget>;

}  // namespace tdfusion::data

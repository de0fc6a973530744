#pragma once
// Object detection metrics with COCO-evaluation semantics (pycocotools COCOeval, bounding boxes, one area range,
// no crowd regions), on plain structs; task_metrics.hpp converts tensors.
//
// Per image and class: detections sorted by descending score (stable), the top `max_detections` kept; each is
// matched greedily to the not-yet-matched ground truth of highest IoU >= t (ties go to the later box, as
// COCOeval's loop does), so a ground truth is matched at most once and duplicates are false positives.
// Per class over all images: detections sorted by score (stable, image order breaking ties), cumulative TP/FP,
// recall = TP / #GT, precision = TP / (TP + FP), made monotone from the right (the precision envelope), and
// read at the 101 recall points 0, 0.01, ..., 1 (the first point reaching each recall; 0 past the last).
// AP50 uses t = 0.5; AP50:95 averages t = 0.50, 0.55, ..., 0.95. A class without ground truth has no AP
// (NaN) and is left out of the means; a class with ground truth but no detection has AP 0.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace tdfusion::metrics {

/// An axis-aligned box in pixels (x1 <= x2, y1 <= y2), its class and (for detections) its confidence.
struct Box {
  float x1 = 0, y1 = 0, x2 = 0, y2 = 0;
  int cls = 0;
  float score = 1.0f;  ///< ignored for ground truth
};

/// Intersection over union of two boxes (COCO's: continuous coordinates, no +1); 0 when the union is empty.
inline double box_iou(const Box& a, const Box& b) {
  const double iw = std::min<double>(a.x2, b.x2) - std::max<double>(a.x1, b.x1);
  const double ih = std::min<double>(a.y2, b.y2) - std::max<double>(a.y1, b.y1);
  if (iw <= 0.0 || ih <= 0.0) return 0.0;
  const double inter = iw * ih;
  const double area_a = (static_cast<double>(a.x2) - a.x1) * (static_cast<double>(a.y2) - a.y1);
  const double area_b = (static_cast<double>(b.x2) - b.x1) * (static_cast<double>(b.y2) - b.y1);
  const double union_area = area_a + area_b - inter;
  return union_area > 0.0 ? inter / union_area : 0.0;
}

/// The ten COCO IoU thresholds, numpy.linspace(0.5, 0.95, 10) bit for bit.
inline std::array<double, 10> coco_iou_thresholds() {
  std::array<double, 10> t{};
  const double step = (0.95 - 0.5) / 9.0;
  for (int i = 0; i < 10; ++i) t[static_cast<std::size_t>(i)] = i * step + 0.5;
  t[9] = 0.95;
  return t;
}

/// COCO's 101-point interpolated AP of one precision-recall curve (points in detection order, recall
/// non-decreasing): precision envelope from the right, then the mean of the envelope at the first point whose
/// recall reaches 0, 0.01, ..., 1 (0 where the curve never reaches that recall).
inline double average_precision_101(const std::vector<double>& recall, std::vector<double> precision) {
  if (recall.size() != precision.size()) {
    throw std::invalid_argument("tdfusion: average_precision_101 got " + std::to_string(recall.size()) +
                                " recall and " + std::to_string(precision.size()) + " precision values");
  }
  for (std::size_t i = precision.size(); i-- > 1;) precision[i - 1] = std::max(precision[i - 1], precision[i]);
  double sum = 0.0;
  for (int k = 0; k <= 100; ++k) {
    const double threshold = k == 100 ? 1.0 : k * (1.0 / 100.0);  // numpy.linspace(0, 1, 101)
    const auto it = std::lower_bound(recall.begin(), recall.end(), threshold);
    if (it != recall.end()) sum += precision[static_cast<std::size_t>(it - recall.begin())];
  }
  return sum / 101.0;
}

struct DetectionEvaluationOptions {
  int max_detections = 100;      ///< per image and class, highest scores first (COCO's maxDets); <= 0: all
  double score_threshold = 0.0;  ///< detections counted in `precision` / `recall` (not in AP)
};

/// One class's results.
struct ClassDetectionMetrics {
  int cls = 0;
  int64_t ground_truths = 0;
  int64_t detections = 0;         ///< after the per-image max_detections cut
  std::array<double, 10> ap{};    ///< AP at each coco_iou_thresholds() value; NaN without ground truth
  double ap50 = std::nan("");     ///< ap[0]
  double ap50_95 = std::nan("");  ///< mean of ap
  double precision = std::nan("");  ///< at IoU 0.5 over detections scoring >= score_threshold; 0 if there are none
  double recall = std::nan("");     ///< ditto; NaN without ground truth
};

struct DetectionMetrics {
  std::vector<ClassDetectionMetrics> classes;  ///< one per class id
  int classes_with_ground_truth = 0;           ///< the classes averaged below
  double map50 = std::nan("");
  double map50_95 = std::nan("");
  double precision = std::nan("");
  double recall = std::nan("");
};

/// Accumulates detections and ground truth image by image, then computes per-class and mean AP.
class DetectionEvaluator {
 public:
  explicit DetectionEvaluator(int num_classes, DetectionEvaluationOptions options = {})
      : num_classes_(num_classes), options_(options) {
    if (num_classes <= 0) {
      throw std::invalid_argument("tdfusion: DetectionEvaluator needs num_classes > 0, got " +
                                  std::to_string(num_classes));
    }
  }

  /// Adds one image's detections and ground-truth boxes (either may be empty).
  void add_image(const std::vector<Box>& detections, const std::vector<Box>& ground_truth) {
    check_boxes(detections, "detection");
    check_boxes(ground_truth, "ground-truth box");
    images_.push_back({detections, ground_truth});
  }

  std::size_t images() const { return images_.size(); }
  int num_classes() const { return num_classes_; }
  void reset() { images_.clear(); }

  DetectionMetrics compute() const {
    const std::array<double, 10> thresholds = coco_iou_thresholds();
    DetectionMetrics result;
    double sum50 = 0, sum5095 = 0, sum_p = 0, sum_r = 0;
    for (int cls = 0; cls < num_classes_; ++cls) {
      ClassDetectionMetrics metrics;
      metrics.cls = cls;
      // Per threshold: (score, matched) of every kept detection, images in order.
      std::array<std::vector<std::pair<float, bool>>, 10> outcomes;
      for (const Image& image : images_) {
        std::vector<const Box*> gts, dets;
        for (const Box& box : image.ground_truth) {
          if (box.cls == cls) gts.push_back(&box);
        }
        for (const Box& box : image.detections) {
          if (box.cls == cls) dets.push_back(&box);
        }
        std::stable_sort(dets.begin(), dets.end(), [](const Box* a, const Box* b) { return a->score > b->score; });
        if (options_.max_detections > 0 && dets.size() > static_cast<std::size_t>(options_.max_detections)) {
          dets.resize(static_cast<std::size_t>(options_.max_detections));
        }
        metrics.ground_truths += static_cast<int64_t>(gts.size());
        metrics.detections += static_cast<int64_t>(dets.size());
        std::vector<double> ious(dets.size() * gts.size());
        for (std::size_t d = 0; d < dets.size(); ++d) {
          for (std::size_t g = 0; g < gts.size(); ++g) ious[d * gts.size() + g] = box_iou(*dets[d], *gts[g]);
        }
        for (std::size_t t = 0; t < thresholds.size(); ++t) {
          std::vector<bool> taken(gts.size(), false);
          for (std::size_t d = 0; d < dets.size(); ++d) {
            double best = std::min(thresholds[t], 1.0 - 1e-10);
            std::ptrdiff_t match = -1;
            for (std::size_t g = 0; g < gts.size(); ++g) {
              if (taken[g] || ious[d * gts.size() + g] < best) continue;
              best = ious[d * gts.size() + g];
              match = static_cast<std::ptrdiff_t>(g);
            }
            if (match >= 0) taken[static_cast<std::size_t>(match)] = true;
            outcomes[t].emplace_back(dets[d]->score, match >= 0);
          }
        }
      }
      if (metrics.ground_truths > 0) {
        for (std::size_t t = 0; t < thresholds.size(); ++t) {
          std::vector<std::pair<float, bool>>& list = outcomes[t];
          std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
          std::vector<double> recall, precision;
          double tp = 0, fp = 0;
          int64_t tp_kept = 0, kept = 0;
          for (const auto& [score, matched] : list) {
            (matched ? tp : fp) += 1.0;
            recall.push_back(tp / static_cast<double>(metrics.ground_truths));
            precision.push_back(tp / (tp + fp + std::numeric_limits<double>::epsilon()));  // np.spacing(1)
            if (t == 0 && score >= options_.score_threshold) {
              ++kept;
              tp_kept += matched ? 1 : 0;
            }
          }
          metrics.ap[t] = average_precision_101(recall, precision);
          if (t == 0) {
            metrics.precision = kept == 0 ? 0.0 : static_cast<double>(tp_kept) / static_cast<double>(kept);
            metrics.recall = static_cast<double>(tp_kept) / static_cast<double>(metrics.ground_truths);
          }
        }
        metrics.ap50 = metrics.ap[0];
        metrics.ap50_95 = std::accumulate(metrics.ap.begin(), metrics.ap.end(), 0.0) / 10.0;
        ++result.classes_with_ground_truth;
        sum50 += metrics.ap50;
        sum5095 += metrics.ap50_95;
        sum_p += metrics.precision;
        sum_r += metrics.recall;
      } else {
        metrics.ap.fill(std::nan(""));
        int64_t kept = 0;
        for (const auto& outcome : outcomes[0]) kept += outcome.first >= options_.score_threshold ? 1 : 0;
        metrics.precision = 0.0;  // every detection of a class without ground truth is a false positive
        if (kept == 0) metrics.precision = std::nan("");
      }
      result.classes.push_back(metrics);
    }
    if (result.classes_with_ground_truth > 0) {
      const double n = result.classes_with_ground_truth;
      result.map50 = sum50 / n;
      result.map50_95 = sum5095 / n;
      result.precision = sum_p / n;
      result.recall = sum_r / n;
    }
    return result;
  }

 private:
  struct Image {
    std::vector<Box> detections;
    std::vector<Box> ground_truth;
  };

  void check_boxes(const std::vector<Box>& boxes, const char* what) const {
    for (std::size_t i = 0; i < boxes.size(); ++i) {
      const Box& b = boxes[i];
      const std::string where = std::string(what) + " " + std::to_string(i) + " of image " +
                                std::to_string(images_.size());
      if (b.cls < 0 || b.cls >= num_classes_) {
        throw std::out_of_range("tdfusion: " + where + " has class " + std::to_string(b.cls) + ", outside [0, " +
                                std::to_string(num_classes_) + ")");
      }
      if (!(std::isfinite(b.x1) && std::isfinite(b.y1) && std::isfinite(b.x2) && std::isfinite(b.y2) &&
            std::isfinite(b.score))) {
        throw std::invalid_argument("tdfusion: " + where + " has a NaN or infinite coordinate or score");
      }
      if (b.x2 < b.x1 || b.y2 < b.y1) {
        throw std::invalid_argument("tdfusion: " + where + " has x2 < x1 or y2 < y1 (boxes are x1, y1, x2, y2)");
      }
    }
  }

  int num_classes_;
  DetectionEvaluationOptions options_;
  std::vector<Image> images_;
};

}  // namespace tdfusion::metrics

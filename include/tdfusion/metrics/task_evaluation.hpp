#pragma once
// The downstream task's metrics on fused images, for any task policy: the evaluation is chosen at compile
// time from what the policy offers.
//   segmentation  Target = torch::Tensor (N x H x W class ids) and `Tensor forward(image)` returning
//                 N x C x H x W logits: mIoU, pixel accuracy and per-class IoU (segmentation_metrics.hpp);
//   detection     Target = task::DetectionTarget and `detect(image, conf, iou, max_det)`: AP50, AP50:95,
//                 precision, recall and per-class AP50 (detection_metrics.hpp), boxes in the image's pixels;
//   anything else no task metrics (the trainer still reports the task loss).

#include "tdfusion/metrics/task_metrics.hpp"
#include "tdfusion/task/detection/box_ops.hpp"
#include "tdfusion/task/detection/target.hpp"

#include <torch/torch.h>

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace tdfusion::metrics {

struct TaskEvaluationOptions {
  TORCH_ARG(int64_t, ignore_index) = 255;  ///< segmentation: ground-truth value left out of the counts
  TORCH_ARG(double, conf) = 0.001;         ///< detection: score threshold of the decoding (ultralytics' val)
  TORCH_ARG(double, iou) = 0.7;            ///< detection: NMS IoU threshold
  TORCH_ARG(int64_t, max_det) = 300;       ///< detection: detections kept per image
  TORCH_ARG(double, score_threshold) = 0.25;  ///< detection: detections counted in precision / recall
};

namespace detail {
template <class T, class = void>
struct has_detect : std::false_type {};
template <class T>
struct has_detect<T, std::void_t<decltype(std::declval<T&>().detect(std::declval<const torch::Tensor&>(), 0.0, 0.0,
                                                                    int64_t{0}))>> : std::true_type {};

template <class T, class = void>
struct has_image_forward : std::false_type {};
template <class T>
struct has_image_forward<T, std::void_t<decltype(std::declval<T&>().forward(std::declval<const torch::Tensor&>()))>>
    : std::is_convertible<decltype(std::declval<T&>().forward(std::declval<const torch::Tensor&>())), torch::Tensor> {};

template <class T, class = void>
struct has_num_classes_option : std::false_type {};
template <class T>
struct has_num_classes_option<T, std::void_t<decltype(std::declval<const T&>().options().num_classes())>>
    : std::true_type {};
}  // namespace detail

/// The ground-truth boxes of one image, K x 5 YOLO rows (class, cx, cy, w, h normalised), in pixels of a
/// height x width image.
inline std::vector<Box> pixel_boxes(const torch::Tensor& yolo, int64_t height, int64_t width) {
  TORCH_CHECK(yolo.dim() == 2 && yolo.size(1) == 5, "tdfusion: boxes must be K x 5 (class, cx, cy, w, h), got ",
              yolo.sizes());
  const torch::Tensor scale = torch::tensor({static_cast<double>(width), static_cast<double>(height),
                                             static_cast<double>(width), static_cast<double>(height)});
  const torch::Tensor b = yolo.detach().to(torch::kCPU, torch::kDouble);
  return boxes_from_tensors(task::xywh_to_xyxy(b.narrow(1, 1, 4) * scale), b.select(1, 0));
}

/// A task's metrics over a data set: the headline ones (mIoU and pixel accuracy; or AP50, AP50:95 and the
/// precision P and recall R at the score threshold, means over the classes with ground truth) and the same
/// per class (IoU[c]; or AP50[c], NaN for a class without ground truth).
struct TaskMetrics {
  MetricRow summary;
  MetricRow per_class;
};

/// Accumulates a task policy's predictions on fused batches and reports its metrics (see the file comment).
/// `Impl` is the policy's module type (e.g. task::SmallDetectorImpl).
template <class Impl>
class TaskEvaluation {
  using Target = typename Impl::Target;

 public:
  static constexpr bool kSegmentation =
      std::is_same_v<Target, torch::Tensor> && detail::has_image_forward<Impl>::value;
  static constexpr bool kDetection = std::is_same_v<Target, task::DetectionTarget> && detail::has_detect<Impl>::value &&
                                     detail::has_num_classes_option<Impl>::value;
  /// Whether this task has metrics at all.
  static constexpr bool kHasMetrics = kSegmentation || kDetection;

  explicit TaskEvaluation(TaskEvaluationOptions options = {}) : options_(options) {}

  /// Adds a fused batch N x 1 x H x W and its labels. Call in inference mode (no grad, eval()).
  void add(Impl& task, const torch::Tensor& fused, const Target& target) {
    if constexpr (kSegmentation) {
      const torch::Tensor logits = task.forward(fused);
      if (!evaluator_) evaluator_.emplace(logits.size(1), options_.ignore_index());
      update(*evaluator_, logits, target);
    } else if constexpr (kDetection) {
      if (!evaluator_) {
        DetectionEvaluationOptions o;
        o.max_detections = static_cast<int>(options_.max_det());
        o.score_threshold = options_.score_threshold();
        evaluator_.emplace(static_cast<int>(task.options().num_classes()), o);
      }
      const std::vector<torch::Tensor> found = task.detect(fused, options_.conf(), options_.iou(), options_.max_det());
      for (size_t i = 0; i < found.size(); ++i) {
        const torch::Tensor& d = found[i];  // K x 6: x1, y1, x2, y2, score, class
        evaluator_->add_image(boxes_from_tensors(d.narrow(1, 0, 4), d.select(1, 5), d.select(1, 4)),
                              pixel_boxes(target.image_boxes(static_cast<int64_t>(i)), fused.size(2), fused.size(3)));
      }
    } else {
      (void)task, (void)fused, (void)target;
    }
  }

  /// The metrics so far (both rows empty without metrics or samples).
  TaskMetrics result() const {
    TaskMetrics out;
    if (!evaluator_) return out;
    if constexpr (kSegmentation) {
      out.summary.values = {{"mIoU", evaluator_->mean_iou()}, {"pixel_accuracy", evaluator_->pixel_accuracy()}};
      const std::vector<double> iou = evaluator_->iou();
      for (size_t c = 0; c < iou.size(); ++c) out.per_class.values.emplace_back("IoU[" + std::to_string(c) + "]", iou[c]);
    } else if constexpr (kDetection) {
      const DetectionMetrics m = evaluator_->compute();
      out.summary.values = {{"AP50", m.map50}, {"AP50:95", m.map50_95}, {"P", m.precision}, {"R", m.recall}};
      for (const ClassDetectionMetrics& c : m.classes) {
        out.per_class.values.emplace_back("AP50[" + std::to_string(c.cls) + "]", c.ap50);
      }
    }
    return out;
  }

 private:
  TaskEvaluationOptions options_;
  // The task's own evaluator only (a task without metrics never makes one).
  std::optional<std::conditional_t<kSegmentation, ConfusionMatrix, DetectionEvaluator>> evaluator_;
};

}  // namespace tdfusion::metrics

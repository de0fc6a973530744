#pragma once
// The downstream task's metrics on a method's fused folder (`tdfusion eval --task-run`): a trained task network
// runs on every fused image of an evaluation table, prepared as in training (luminance, resized bilinearly to
// the task size), against the image's label file matched by stem: YOLO .txt for detection, a class-id PNG
// (resized by nearest neighbour) for segmentation.

#include "tdfusion/core/eval_mode.hpp"
#include "tdfusion/data/paired_folder.hpp"
#include "tdfusion/data/sampling.hpp"
#include "tdfusion/data/yolo_labels.hpp"
#include "tdfusion/io/image.hpp"
#include "tdfusion/metrics/evaluate_folders.hpp"
#include "tdfusion/metrics/task_evaluation.hpp"
#include "tdfusion/nn/resize.hpp"

#include <torch/torch.h>

#include <map>
#include <string>

namespace tdfusion::metrics {

/// `task`: a task policy holder (e.g. task::SmallDetector) whose options() give num_classes. task_height x
/// task_width: the network's input size (0 x 0: each image's own size). Every evaluated image of `table` needs a
/// label in `label_dir`; a missing one is an error naming the image.
template <class TaskHolder>
TaskMetrics evaluate_task(TaskHolder& task, const EvaluationTable& table, const std::string& label_dir,
                          int64_t task_height, int64_t task_width, const TaskEvaluationOptions& options = {}) {
  using Impl = typename TaskHolder::ContainedType;
  using Evaluation = TaskEvaluation<Impl>;
  static_assert(Evaluation::kHasMetrics, "tdfusion: evaluate_task needs a segmentation or detection task policy");
  constexpr bool detection = Evaluation::kDetection;
  const int64_t classes = task->options().num_classes();
  const std::map<std::string, std::string> labels =
      data::detail::scan_files(label_dir, "task labels", /*text_files=*/detection);
  const torch::Device device = task->parameters().front().device();
  torch::NoGradGuard no_grad;
  const EvalMode eval(*task);
  Evaluation evaluation(options);
  for (const ImageMetrics& row : table.rows) {
    const auto label = labels.find(row.image);
    TORCH_CHECK(label != labels.end(), "tdfusion: no label for fused image '", row.fused_path, "' in '", label_dir,
                "' (expected ", row.image, detection ? ".txt)" : ".png)");
    const torch::Tensor image = io::read_grey(row.fused_path).unsqueeze(0);
    const int64_t h = task_height > 0 ? task_height : image.size(2), w = task_width > 0 ? task_width : image.size(3);
    const torch::Tensor input = nn::resize_bilinear(image, h, w).to(device);
    if constexpr (detection) {
      evaluation.add(*task, input, task::DetectionTarget::from_images({data::read_yolo_labels(label->second, classes)}));
    } else {
      const torch::Tensor map = io::read_label(label->second, classes, options.ignore_index()).unsqueeze(0);
      TORCH_CHECK(map.size(1) == image.size(2) && map.size(2) == image.size(3), "tdfusion: label map '",
                  label->second, "' is ", map.size(1), " x ", map.size(2), " (H x W) but fused image '",
                  row.fused_path, "' is ", image.size(2), " x ", image.size(3));
      evaluation.add(*task, input, data::detail::resize_labels(map, h, w).to(device));
    }
  }
  return evaluation.result();
}

}  // namespace tdfusion::metrics

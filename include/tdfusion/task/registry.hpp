#pragma once
// The task networks known by name, for programs that choose one at run time (`tdfusion train --task`,
// a run folder's config.json). One table: adding a task policy here makes it available everywhere.

#include "tdfusion/task/detection.hpp"
#include "tdfusion/task/segmentation.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace tdfusion::task {

/// Stands for the task policy `Policy` (a torch module holder) in a call of with_task.
template <class Policy>
struct TaskTag {
  using type = Policy;
};

/// The names with_task accepts: segmentation first (small-seg, segformer), then detection (small-det, yolov8).
inline const std::vector<std::string>& task_names() {
  static const std::vector<std::string> names = {"small-seg", "segformer", "small-det", "yolov8"};
  return names;
}

/// Calls `fn(TaskTag<Policy>{})` with the policy named `name` and returns its result (every branch must
/// return the same type). An unknown name is an error that lists the known ones.
template <class Fn>
decltype(auto) with_task(const std::string& name, Fn&& fn) {
  const std::vector<std::string>& names = task_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    std::string known;
    for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
    TORCH_CHECK(false, "tdfusion: unknown task '", name, "' (known tasks: ", known, ")");
  }
  if (name == "small-seg") return fn(TaskTag<SmallSegNet>{});
  if (name == "segformer") return fn(TaskTag<SegFormer>{});
  if (name == "small-det") return fn(TaskTag<SmallDetector>{});
  return fn(TaskTag<Yolov8Detector>{});
}

/// True for the detection tasks (labels are YOLO boxes), false for segmentation (label maps).
inline bool is_detection_task(const std::string& name) {
  return with_task(name, [](auto tag) {
    using Impl = typename decltype(tag)::type::ContainedType;
    return std::is_same_v<typename Impl::Target, DetectionTarget>;
  });
}

/// A task policy with `classes` classes, from its options type (`Policy::ContainedType::Options`).
template <class Policy>
Policy make_task(int64_t classes) {
  return Policy(typename Policy::ContainedType::Options().num_classes(classes));
}

}  // namespace tdfusion::task

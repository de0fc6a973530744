#pragma once
// Downstream-task metrics: segmentation (confusion matrix, IoU, mIoU) and detection (COCO-style AP), plus
// adaptors from the tensors the task policies produce. The metric classes themselves do not need torch:
// include segmentation_metrics.hpp / detection_metrics.hpp alone for a torch-free build.

#include "tdfusion/metrics/detection_metrics.hpp"
#include "tdfusion/metrics/segmentation_metrics.hpp"

#include <torch/torch.h>

#include <vector>

namespace tdfusion::metrics {

/// Adds a batch to `matrix`. prediction: class ids of the target's shape (any integer dtype), or logits /
/// probabilities with one more dimension at index 1 (N x C x H x W for an N x H x W target), reduced by argmax.
inline void update(ConfusionMatrix& matrix, const torch::Tensor& prediction, const torch::Tensor& target) {
  TORCH_CHECK(prediction.defined() && target.defined(), "tdfusion: ConfusionMatrix update got an undefined tensor");
  TORCH_CHECK(!target.is_floating_point(), "tdfusion: segmentation targets must hold integer class ids, got ",
              target.dtype());
  torch::Tensor ids = prediction;
  if (prediction.is_floating_point()) {
    TORCH_CHECK(prediction.dim() == target.dim() + 1 && prediction.size(1) == matrix.num_classes(),
                "tdfusion: segmentation logits must be N x ", matrix.num_classes(), " x ... for a target of shape ",
                target.sizes(), ", got ", prediction.sizes());
    ids = prediction.argmax(1);
  }
  TORCH_CHECK(ids.sizes() == target.sizes(), "tdfusion: segmentation prediction shape ", ids.sizes(),
              " differs from the target shape ", target.sizes());
  const torch::Tensor p = ids.detach().to(torch::kCPU, torch::kLong).contiguous();
  const torch::Tensor t = target.detach().to(torch::kCPU, torch::kLong).contiguous();
  matrix.update(p.data_ptr<int64_t>(), t.data_ptr<int64_t>(), static_cast<std::size_t>(t.numel()));
}

/// Boxes from tensors: xyxy K x 4 (x1, y1, x2, y2 in pixels), classes K (integer), scores K (optional; 1 when
/// undefined, as for ground truth).
inline std::vector<Box> boxes_from_tensors(const torch::Tensor& xyxy, const torch::Tensor& classes,
                                           const torch::Tensor& scores = torch::Tensor()) {
  TORCH_CHECK(xyxy.defined() && xyxy.dim() == 2 && xyxy.size(1) == 4,
              "tdfusion: boxes must be K x 4 (x1, y1, x2, y2), got ",
              xyxy.defined() ? xyxy.sizes() : torch::IntArrayRef{});
  const int64_t k = xyxy.size(0);
  TORCH_CHECK(classes.defined() && classes.numel() == k, "tdfusion: expected ", k, " box classes, got ",
              classes.defined() ? classes.numel() : 0);
  TORCH_CHECK(!scores.defined() || scores.numel() == k, "tdfusion: expected ", k, " box scores, got ", scores.numel());
  const torch::Tensor b = xyxy.detach().to(torch::kCPU, torch::kFloat).contiguous();
  const torch::Tensor c = classes.detach().to(torch::kCPU, torch::kLong).contiguous().view(-1);
  const torch::Tensor s =
      scores.defined() ? scores.detach().to(torch::kCPU, torch::kFloat).contiguous().view(-1) : torch::Tensor();
  std::vector<Box> boxes(static_cast<std::size_t>(k));
  const float* bp = b.data_ptr<float>();
  for (int64_t i = 0; i < k; ++i) {
    Box& box = boxes[static_cast<std::size_t>(i)];
    box.x1 = bp[4 * i];
    box.y1 = bp[4 * i + 1];
    box.x2 = bp[4 * i + 2];
    box.y2 = bp[4 * i + 3];
    box.cls = static_cast<int>(c.data_ptr<int64_t>()[i]);
    box.score = s.defined() ? s.data_ptr<float>()[i] : 1.0f;
  }
  return boxes;
}

}  // namespace tdfusion::metrics

#pragma once
// The task-aligned assigner of TOOD (Feng et al. 2021) as YOLOv8 uses it: for every ground-truth box, the
// top-k anchors (cell centres inside the box) by the alignment metric s^alpha * CIoU^beta, where s is the
// predicted score of the box's class and CIoU the overlap of the predicted box with it. An anchor claimed by
// several boxes goes to the one it overlaps most. Soft targets: one-hot class times the alignment metric,
// normalised per box so that its best anchor gets the box's best overlap.
// Decisions only: it runs without gradient on detached predictions, as in ultralytics.

#include "tdfusion/task/detection/box_ops.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>

namespace tdfusion::task {

struct TaskAlignedAssignerOptions {
  TORCH_ARG(int64_t, topk) = 10;
  TORCH_ARG(double, alpha) = 0.5;  ///< exponent of the class score in the alignment metric
  TORCH_ARG(double, beta) = 6.0;   ///< exponent of the CIoU
  TORCH_ARG(double, eps) = 1e-9;
};

/// Per image and anchor (B x A): what the assigner decided.
struct Assignment {
  torch::Tensor labels;     ///< B x A int64: class of the assigned box (0 for background anchors)
  torch::Tensor boxes;      ///< B x A x 4: xyxy of the assigned box (in the ground truth's units)
  torch::Tensor scores;     ///< B x A x C: soft class targets (0 for background anchors)
  torch::Tensor foreground; ///< B x A bool
  torch::Tensor gt_index;   ///< B x A int64: index of the assigned box among the image's boxes
};

/// pred_scores B x A x C (probabilities), pred_boxes B x A x 4 (xyxy), anchors A x 2 and gt_boxes B x M x 4
/// (xyxy) in one unit (ultralytics: pixels); gt_labels B x M (class ids), gt_valid B x M (false for the
/// padding of images with fewer than M boxes).
inline Assignment task_aligned_assign(const torch::Tensor& pred_scores, const torch::Tensor& pred_boxes,
                                      const torch::Tensor& anchors, const torch::Tensor& gt_labels,
                                      const torch::Tensor& gt_boxes, const torch::Tensor& gt_valid,
                                      TaskAlignedAssignerOptions options = {}) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(pred_scores.dim() == 3 && pred_boxes.dim() == 3 && pred_boxes.size(2) == 4 &&
                  pred_boxes.size(0) == pred_scores.size(0) && pred_boxes.size(1) == pred_scores.size(1),
              "tdfusion: assigner needs B x A x C scores and B x A x 4 boxes, got ", pred_scores.sizes(), " and ",
              pred_boxes.sizes());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(0) == pred_scores.size(1) && anchors.size(1) == 2,
              "tdfusion: assigner needs A x 2 anchor points, got ", anchors.sizes());
  TORCH_CHECK(gt_boxes.dim() == 3 && gt_boxes.size(2) == 4 && gt_labels.sizes() == gt_boxes.sizes().slice(0, 2) &&
                  gt_valid.sizes() == gt_labels.sizes() && gt_boxes.size(0) == pred_scores.size(0),
              "tdfusion: assigner needs B x M x 4 boxes with B x M labels and validity, got ", gt_boxes.sizes(),
              ", ", gt_labels.sizes(), ", ", gt_valid.sizes());
  const int64_t b = pred_scores.size(0), a = pred_scores.size(1), c = pred_scores.size(2), m = gt_boxes.size(1);
  const auto float_options = pred_scores.options();

  Assignment out;
  if (m == 0) {  // no box in the whole batch: every anchor is background
    out.labels = torch::zeros({b, a}, float_options.dtype(torch::kLong));
    out.boxes = torch::zeros({b, a, 4}, float_options);
    out.scores = torch::zeros({b, a, c}, float_options);
    out.foreground = torch::zeros({b, a}, float_options.dtype(torch::kBool));
    out.gt_index = torch::zeros({b, a}, float_options.dtype(torch::kLong));
    return out;
  }
  const torch::Tensor labels = gt_labels.to(torch::kLong);
  const torch::Tensor valid = gt_valid.to(torch::kBool).unsqueeze(-1);  // B x M x 1
  const torch::Tensor gts = gt_boxes.to(pred_boxes.scalar_type());

  // Candidates: anchor centres strictly inside a (real) box.
  const torch::Tensor xy = anchors.view({1, 1, a, 2});
  const torch::Tensor deltas = torch::cat({xy - gts.narrow(-1, 0, 2).unsqueeze(2), gts.narrow(-1, 2, 2).unsqueeze(2) - xy}, -1);
  const torch::Tensor in_gts = std::get<0>(deltas.min(-1)).gt(options.eps()) & valid;  // B x M x A

  // Alignment metric on the candidates (0 elsewhere).
  const torch::Tensor class_scores =
      pred_scores.transpose(1, 2).gather(1, labels.clamp(0, c - 1).unsqueeze(-1).expand({b, m, a}));  // B x M x A
  const torch::Tensor overlaps =
      bbox_ciou(gts.unsqueeze(2), pred_boxes.unsqueeze(1)).clamp_min(0) * in_gts;  // B x M x A
  const torch::Tensor metric = class_scores.pow(options.alpha()) * overlaps.pow(options.beta()) * in_gts;

  // Top-k anchors per box, among the candidates.
  const int64_t k = std::min(options.topk(), a);
  const torch::Tensor top = std::get<1>(metric.topk(k, -1));
  torch::Tensor positive = torch::zeros_like(metric).scatter_(-1, top, 1.0) * in_gts;  // B x M x A

  // Anchors claimed by several boxes go to the box they overlap most (ultralytics: argmax over all boxes).
  torch::Tensor fg_count = positive.sum(1);  // B x A
  if (fg_count.max().item<double>() > 1) {
    const torch::Tensor multi = (fg_count > 1).unsqueeze(1).expand({b, m, a});
    const torch::Tensor best = torch::zeros_like(positive).scatter_(1, overlaps.argmax(1, true), 1.0);
    positive = torch::where(multi, best, positive);
    fg_count = positive.sum(1);
  }
  const torch::Tensor gt_index = positive.argmax(1);  // B x A
  const torch::Tensor foreground = fg_count > 0;

  // Targets of the assigned boxes.
  out.labels = labels.gather(1, gt_index).clamp_min(0);
  out.boxes = gts.gather(1, gt_index.unsqueeze(-1).expand({b, a, 4}));
  torch::Tensor scores = torch::one_hot(out.labels.clamp_max(c - 1), c).to(pred_scores.scalar_type()) *
                         foreground.unsqueeze(-1);

  // Normalise: per box, metric / (its best metric) * (its best overlap); per anchor, the max over boxes.
  const torch::Tensor aligned = metric * positive;
  const torch::Tensor best_metric = std::get<0>(aligned.max(-1, true));                // B x M x 1
  const torch::Tensor best_overlap = std::get<0>((overlaps * positive).max(-1, true));  // B x M x 1
  const torch::Tensor norm = std::get<0>((aligned * best_overlap / (best_metric + options.eps())).max(1));  // B x A
  out.scores = scores * norm.unsqueeze(-1);
  out.foreground = foreground;
  out.gt_index = gt_index;
  return out;
}

}  // namespace tdfusion::task

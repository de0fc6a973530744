#pragma once
// The YOLOv8 detection loss (ultralytics' v8DetectionLoss) and the decoding of head outputs into boxes,
// shared by every detector here. One implementation, so the small CPU detector trains on exactly the loss of
// the release's YOLOv8-n.
//
// Loss, for head outputs of a batch of N images and a DetectionTarget:
//   assignment   task-aligned assigner (top-k 10, alpha 0.5, beta 6) on the detached predictions, in pixels
//   L_cls        sum over anchors and classes of BCE-with-logits against the soft targets, / S
//   L_box        sum over foreground anchors of (1 - CIoU(pred, assigned box)) * w, / S
//   L_dfl        sum over foreground anchors of the mean DFL of the four sides * w, / S
//   total        (7.5 L_box + 0.5 L_cls + 1.5 L_dfl) * N      (ultralytics multiplies by the batch size)
// with w an anchor's soft target summed over classes and S = max(sum of all soft targets, 1). Boxes and
// the DFL are in grid units of each anchor's level, the DFL targets clamped to reg_max - 1.01 bins.

#include "tdfusion/task/detection/assigner.hpp"
#include "tdfusion/task/detection/box_ops.hpp"
#include "tdfusion/task/detection/target.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace tdfusion::task {

struct DetectionLossOptions {
  TORCH_ARG(double, box_gain) = 7.5;
  TORCH_ARG(double, cls_gain) = 0.5;
  TORCH_ARG(double, dfl_gain) = 1.5;
  TORCH_ARG(TaskAlignedAssignerOptions, assigner) = {};
  /// Multiply the total by the batch size, as ultralytics does (its loss is a per-image mean times N).
  TORCH_ARG(bool, scale_by_batch) = true;
};

/// The loss and its three (ungained, unscaled) components.
struct DetectionLossParts {
  torch::Tensor total, box, cls, dfl;
  torch::Tensor score_sum;  ///< the normaliser S = max(sum of the soft targets, 1), a constant
};

/// Where a head's output cells lie: the (padded) network input and the strides of its levels.
struct DetectionLayout {
  int64_t num_classes = 0, reg_max = 16;
  std::vector<int64_t> strides{8, 16, 32};
  int64_t input_height = 0, input_width = 0;  ///< the padded network input (multiples of every stride)
  int64_t image_height = 0, image_width = 0;  ///< the image the boxes are normalised to (top-left part of it)

  /// The layout of a detector with strides 8, 16 and 32 on an H x W image, padded to multiples of 32.
  static DetectionLayout for_image(int64_t num_classes, int64_t reg_max, int64_t height, int64_t width) {
    DetectionLayout l;
    l.num_classes = num_classes;
    l.reg_max = reg_max;
    l.strides = {8, 16, 32};
    l.image_height = height;
    l.image_width = width;
    l.input_height = (height + 31) / 32 * 32;
    l.input_width = (width + 31) / 32 * 32;
    return l;
  }

  /// Anchor points (A x 2, grid units) and their strides (A x 1).
  std::pair<torch::Tensor, torch::Tensor> anchors(const torch::TensorOptions& options) const {
    std::vector<std::pair<int64_t, int64_t>> grids;
    for (int64_t s : strides) grids.emplace_back(input_height / s, input_width / s);
    return make_anchors(grids, strides, options);
  }
};

namespace detail {

/// Checks a detection target against a batch of `batch` images and `classes` classes (one device sync).
inline void check_detection_target(const DetectionTarget& target, int64_t batch, int64_t classes) {
  const torch::Tensor& b = target.boxes;
  TORCH_CHECK(b.defined() && b.dim() == 2 && b.size(1) == 6,
              "tdfusion: detection target boxes must be M x 6 (batch index, class, cx, cy, w, h), got ",
              b.defined() ? b.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(target.batch_size == batch, "tdfusion: detection target is for ", target.batch_size,
              " images but the batch has ", batch);
  if (b.size(0) == 0) return;
  const torch::Tensor d = b.to(torch::kDouble);
  const torch::Tensor index = d.select(1, 0), cls = d.select(1, 1), geometry = d.narrow(1, 2, 4);
  const torch::Tensor flags =
      torch::stack({((index < 0) | (index >= batch) | (index != index.round())).any(),
                    ((cls < 0) | (cls >= classes) | (cls != cls.round())).any(),
                    (~torch::isfinite(geometry) | (geometry < 0) | (geometry > 1)).any()})
          .cpu();
  TORCH_CHECK(!flags[0].item<bool>(), "tdfusion: detection target has a batch index outside [0, ", batch, ")");
  TORCH_CHECK(!flags[1].item<bool>(), "tdfusion: detection target has a class id outside [0, ", classes, ")");
  TORCH_CHECK(!flags[2].item<bool>(), "tdfusion: detection target has box coordinates outside [0, 1]");
}

/// Ground truth padded to B x M: labels B x M, xyxy boxes B x M x 4 in pixels, validity B x M.
struct PaddedTruth {
  torch::Tensor labels, boxes, valid;
};

inline PaddedTruth pad_truth(const DetectionTarget& target, int64_t batch, double width, double height,
                             const torch::TensorOptions& options) {
  const torch::Tensor b = target.boxes.to(options.device(), options.dtype().toScalarType());
  const int64_t count = b.size(0);
  const torch::Tensor index = b.select(1, 0).to(torch::kLong);
  const torch::Tensor per_image = torch::bincount(index, {}, batch);
  const int64_t m = count == 0 ? 0 : per_image.max().item<int64_t>();
  PaddedTruth truth{torch::zeros({batch, m}, options.dtype(torch::kLong)), torch::zeros({batch, m, 4}, options),
                    torch::zeros({batch, m}, options.dtype(torch::kBool))};
  if (count == 0) return truth;
  // Slot of each box within its image: its rank among the image's boxes (stable order).
  const torch::Tensor order = std::get<1>(torch::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const torch::Tensor sorted = index.index_select(0, order);
  const torch::Tensor starts = per_image.cumsum(0) - per_image;
  const torch::Tensor slot = torch::arange(count, index.options()) - starts.index_select(0, sorted);
  const torch::Tensor scale = torch::tensor({width, height, width, height}, options);
  const torch::Tensor rows = b.index_select(0, order);
  truth.labels.index_put_({sorted, slot}, rows.select(1, 1).round().to(torch::kLong));
  truth.boxes.index_put_({sorted, slot}, xywh_to_xyxy(rows.narrow(1, 2, 4)) * scale);
  truth.valid.index_put_({sorted, slot}, torch::ones({count}, options.dtype(torch::kBool)));
  return truth;
}

}  // namespace detail

/// Splits raw head outputs N x (4 reg_max + classes) x A into DFL logits N x A x 4 reg_max and class
/// logits N x A x classes.
inline std::pair<torch::Tensor, torch::Tensor> split_head_output(const torch::Tensor& head, const DetectionLayout& layout) {
  const int64_t r = layout.reg_max, c = layout.num_classes;
  TORCH_CHECK(head.dim() == 3 && head.size(1) == 4 * r + c, "tdfusion: detection head output must be N x ",
              4 * r + c, " x A, got ", head.sizes());
  return {head.narrow(1, 0, 4 * r).transpose(1, 2), head.narrow(1, 4 * r, c).transpose(1, 2)};
}

/// The assigner's decisions for raw head outputs, made on their detached values (the assignment's boxes in
/// pixels). They carry no gradient: the loss treats them as constants.
inline Assignment yolov8_assign(const torch::Tensor& head, const DetectionLayout& layout,
                                const DetectionTarget& target, const DetectionLossOptions& options = {}) {
  torch::NoGradGuard no_grad;
  const auto [pred_dist, pred_logits] = split_head_output(head.detach(), layout);
  detail::check_detection_target(target, head.size(0), layout.num_classes);
  const auto [anchors, strides] = layout.anchors(head.options());
  TORCH_CHECK(anchors.size(0) == head.size(2), "tdfusion: detection head output has ", head.size(2),
              " cells but the layout has ", anchors.size(0));
  const torch::Tensor pred_boxes = dist_to_bbox(dfl_decode(pred_dist, layout.reg_max), anchors) * strides;
  const detail::PaddedTruth truth = detail::pad_truth(target, head.size(0), static_cast<double>(layout.image_width),
                                                      static_cast<double>(layout.image_height), head.options());
  return task_aligned_assign(pred_logits.sigmoid(), pred_boxes, anchors * strides, truth.labels, truth.boxes,
                             truth.valid, options.assigner());
}

/// The YOLOv8 loss of raw head outputs against a given assignment (see the file comment). Differentiable
/// to any order in `head`.
inline DetectionLossParts yolov8_loss_given(const torch::Tensor& head, const DetectionLayout& layout,
                                            const Assignment& assigned, const DetectionLossOptions& options = {}) {
  const int64_t r = layout.reg_max, n = head.size(0);
  const auto [pred_dist, pred_logits] = split_head_output(head, layout);
  const auto [anchors, strides] = layout.anchors(head.options());
  TORCH_CHECK(assigned.scores.sizes() == pred_logits.sizes(), "tdfusion: the assignment is for scores of shape ",
              assigned.scores.sizes(), " but the head predicts ", pred_logits.sizes());
  const torch::Tensor pred_boxes = dist_to_bbox(dfl_decode(pred_dist, r), anchors);  // N x A x 4, grid units

  DetectionLossParts parts;
  parts.score_sum = assigned.scores.sum().clamp_min(1.0);
  parts.cls = bce_with_logits(pred_logits, assigned.scores).sum() / parts.score_sum;
  const torch::Tensor fg = assigned.foreground.flatten().nonzero().squeeze(1);
  if (fg.numel() > 0) {
    const torch::Tensor weight = assigned.scores.sum(-1).flatten().index_select(0, fg);
    const torch::Tensor target_boxes = (assigned.boxes / strides).reshape({-1, 4}).index_select(0, fg);
    const torch::Tensor boxes = pred_boxes.reshape({-1, 4}).index_select(0, fg);
    parts.box = ((1.0 - bbox_ciou(boxes, target_boxes)) * weight).sum() / parts.score_sum;
    const torch::Tensor points = anchors.repeat({n, 1}).index_select(0, fg);
    const torch::Tensor sides = bbox_to_dist(points, target_boxes, static_cast<double>(r) - 1.01);  // K x 4
    const torch::Tensor logits = pred_dist.reshape({-1, 4 * r}).index_select(0, fg).reshape({-1, r});
    parts.dfl = (dfl_loss(logits, sides.reshape({-1})).view({-1, 4}).mean(-1) * weight).sum() / parts.score_sum;
  } else {
    parts.box = torch::zeros({}, head.options());
    parts.dfl = torch::zeros({}, head.options());
  }
  parts.total = options.box_gain() * parts.box + options.cls_gain() * parts.cls + options.dfl_gain() * parts.dfl;
  if (options.scale_by_batch()) parts.total = parts.total * static_cast<double>(n);
  return parts;
}

/// The YOLOv8 loss of raw head outputs N x (4 reg_max + classes) x A (see the file comment): assignment on
/// the detached predictions, then the loss against it. Differentiable (to any order) in `head`, with the
/// assignment a constant, as in ultralytics. So its gradient is not the derivative of the loss value: the
/// soft targets move with the predictions (and so does CIoU's alpha, also a constant). Finite-difference
/// checks must hold the assignment fixed (yolov8_assign + yolov8_loss_given).
inline DetectionLossParts yolov8_detection_loss(const torch::Tensor& head, const DetectionLayout& layout,
                                                const DetectionTarget& target, const DetectionLossOptions& options = {}) {
  return yolov8_loss_given(head, layout, yolov8_assign(head, layout, target, options), options);
}

/// Detections of raw head outputs, per image an K x 6 tensor (x1, y1, x2, y2, score, class) in pixels of
/// the image, clipped to it, by decreasing score: per anchor the best class, kept if its probability exceeds
/// `conf`, then class-aware NMS at `iou`, at most `max_det` (ultralytics' single-label predict path).
inline std::vector<torch::Tensor> decode_detections(const torch::Tensor& head, const DetectionLayout& layout,
                                                    double conf = 0.25, double iou = 0.7, int64_t max_det = 300) {
  const int64_t r = layout.reg_max, c = layout.num_classes;
  split_head_output(head, layout);  // checks the shape
  TORCH_CHECK(max_det >= 0, "tdfusion: max_det must not be negative, got ", max_det);
  torch::NoGradGuard no_grad;
  const torch::Tensor out = head.to(torch::kCPU, torch::kFloat);
  auto [anchors, strides] = layout.anchors(out.options());
  const torch::Tensor boxes_all =
      (dist_to_bbox(dfl_decode(out.narrow(1, 0, 4 * r).transpose(1, 2), r), anchors) * strides);
  const torch::Tensor probs_all = out.narrow(1, 4 * r, c).transpose(1, 2).sigmoid();
  const double w = static_cast<double>(layout.image_width), h = static_cast<double>(layout.image_height);
  constexpr int64_t kMaxNms = 30000;  // ultralytics' cap on boxes entering NMS
  std::vector<torch::Tensor> detections;
  for (int64_t i = 0; i < out.size(0); ++i) {
    auto [score, cls] = probs_all[i].max(-1);
    const torch::Tensor keep = (score > conf).nonzero().squeeze(1);
    torch::Tensor boxes = boxes_all[i].index_select(0, keep), scores = score.index_select(0, keep),
                  classes = cls.index_select(0, keep);
    if (scores.size(0) > kMaxNms) {
      const torch::Tensor top = std::get<1>(scores.topk(kMaxNms));
      boxes = boxes.index_select(0, top);
      scores = scores.index_select(0, top);
      classes = classes.index_select(0, top);
    }
    torch::Tensor kept = batched_nms(boxes, scores, classes, iou);
    kept = kept.narrow(0, 0, std::min(kept.size(0), max_det));
    boxes = boxes.index_select(0, kept);
    boxes = torch::stack({boxes.select(1, 0).clamp(0, w), boxes.select(1, 1).clamp(0, h), boxes.select(1, 2).clamp(0, w),
                          boxes.select(1, 3).clamp(0, h)}, 1);
    detections.push_back(torch::cat({boxes, scores.index_select(0, kept).unsqueeze(1),
                                     classes.index_select(0, kept).unsqueeze(1).to(torch::kFloat)}, 1));
  }
  return detections;
}

}  // namespace tdfusion::task

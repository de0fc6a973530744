#pragma once
// Box arithmetic of the YOLOv8 detectors: box formats, CIoU, anchor grids, distance <-> box conversion,
// the distribution focal loss (DFL) and non-maximum suppression. Every differentiable function here uses
// ops with double-backward support, because the bilevel optimiser differentiates the task loss through the
// fusion network's fast weights.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace tdfusion::task {

/// (cx, cy, w, h) -> (x1, y1, x2, y2) on the last dimension.
inline torch::Tensor xywh_to_xyxy(const torch::Tensor& b) {
  const torch::Tensor c = b.narrow(-1, 0, 2), half = b.narrow(-1, 2, 2) / 2;
  return torch::cat({c - half, c + half}, -1);
}

/// (x1, y1, x2, y2) -> (cx, cy, w, h) on the last dimension.
inline torch::Tensor xyxy_to_xywh(const torch::Tensor& b) {
  const torch::Tensor p = b.narrow(-1, 0, 2), q = b.narrow(-1, 2, 2);
  return torch::cat({(p + q) / 2, q - p}, -1);
}

/// Complete IoU (Zheng et al. 2020) of xyxy boxes, broadcast over the leading dimensions; the last
/// dimension (4) is reduced. As in ultralytics: eps 1e-7 in the union, the enclosing diagonal and the
/// heights; the aspect trade-off alpha = v / (v - IoU + 1) is a constant (no gradient):
///   CIoU = IoU - rho^2 / c^2 - alpha v,   v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / h1))^2
inline torch::Tensor bbox_ciou(const torch::Tensor& box1, const torch::Tensor& box2, double eps = 1e-7) {
  const torch::Tensor b1x1 = box1.select(-1, 0), b1y1 = box1.select(-1, 1), b1x2 = box1.select(-1, 2),
                      b1y2 = box1.select(-1, 3);
  const torch::Tensor b2x1 = box2.select(-1, 0), b2y1 = box2.select(-1, 1), b2x2 = box2.select(-1, 2),
                      b2y2 = box2.select(-1, 3);
  const torch::Tensor w1 = b1x2 - b1x1, h1 = (b1y2 - b1y1).clamp_min(eps);
  const torch::Tensor w2 = b2x2 - b2x1, h2 = (b2y2 - b2y1).clamp_min(eps);
  const torch::Tensor inter = (torch::minimum(b1x2, b2x2) - torch::maximum(b1x1, b2x1)).clamp_min(0) *
                              (torch::minimum(b1y2, b2y2) - torch::maximum(b1y1, b2y1)).clamp_min(0);
  const torch::Tensor iou = inter / (w1 * h1 + w2 * h2 - inter + eps);
  const torch::Tensor cw = torch::maximum(b1x2, b2x2) - torch::minimum(b1x1, b2x1);
  const torch::Tensor ch = torch::maximum(b1y2, b2y2) - torch::minimum(b1y1, b2y1);
  const torch::Tensor c2 = cw.square() + ch.square() + eps;
  const torch::Tensor rho2 = ((b2x1 + b2x2 - b1x1 - b1x2).square() + (b2y1 + b2y2 - b1y1 - b1y2).square()) / 4;
  constexpr double kPi = 3.14159265358979323846;
  const torch::Tensor v = (4.0 / (kPi * kPi)) * (torch::atan(w2 / h2) - torch::atan(w1 / h1)).square();
  torch::Tensor alpha;
  {
    torch::NoGradGuard no_grad;
    alpha = v / (v - iou + (1.0 + eps));
  }
  return iou - (rho2 / c2 + v * alpha);
}

/// Plain IoU of every pair of xyxy boxes: K x 4 and L x 4 -> K x L (0 where the union is empty).
inline torch::Tensor box_iou(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor lt = torch::maximum(a.unsqueeze(1).narrow(-1, 0, 2), b.unsqueeze(0).narrow(-1, 0, 2));
  const torch::Tensor rb = torch::minimum(a.unsqueeze(1).narrow(-1, 2, 2), b.unsqueeze(0).narrow(-1, 2, 2));
  const torch::Tensor wh = (rb - lt).clamp_min(0);
  const torch::Tensor inter = wh.select(-1, 0) * wh.select(-1, 1);
  auto area = [](const torch::Tensor& x) { return (x.select(-1, 2) - x.select(-1, 0)) * (x.select(-1, 3) - x.select(-1, 1)); };
  const torch::Tensor uni = area(a).unsqueeze(1) + area(b).unsqueeze(0) - inter;
  return torch::where(uni > 0, inter / uni.clamp_min(1e-12), torch::zeros_like(inter));
}

/// Anchor points of a multi-level grid: level i has grids[i] = {h, w} cells of side strides[i]. Returns
/// (points A x 2, in grid units of their level, cell centres at +0.5; strides A x 1), levels in order,
/// row-major within a level (the order of a flattened N x C x h x w map).
inline std::pair<torch::Tensor, torch::Tensor> make_anchors(const std::vector<std::pair<int64_t, int64_t>>& grids,
                                                            const std::vector<int64_t>& strides,
                                                            const torch::TensorOptions& options,
                                                            double offset = 0.5) {
  TORCH_CHECK(grids.size() == strides.size(), "tdfusion: make_anchors needs one stride per grid");
  std::vector<torch::Tensor> points, stride_parts;
  for (size_t i = 0; i < grids.size(); ++i) {
    const auto [h, w] = grids[i];
    const torch::Tensor sy = torch::arange(h, options) + offset, sx = torch::arange(w, options) + offset;
    const torch::Tensor yy = sy.view({h, 1}).expand({h, w}), xx = sx.view({1, w}).expand({h, w});
    points.push_back(torch::stack({xx, yy}, -1).reshape({h * w, 2}));
    stride_parts.push_back(torch::full({h * w, 1}, static_cast<double>(strides[i]), options));
  }
  return {torch::cat(points, 0), torch::cat(stride_parts, 0)};
}

/// Distances (left, top, right, bottom) from anchor points -> xyxy boxes.
inline torch::Tensor dist_to_bbox(const torch::Tensor& distance, const torch::Tensor& anchors) {
  return torch::cat({anchors - distance.narrow(-1, 0, 2), anchors + distance.narrow(-1, 2, 2)}, -1);
}

/// xyxy boxes -> distances (left, top, right, bottom) from anchor points, clamped to [0, max_distance].
inline torch::Tensor bbox_to_dist(const torch::Tensor& anchors, const torch::Tensor& boxes, double max_distance) {
  return torch::cat({anchors - boxes.narrow(-1, 0, 2), boxes.narrow(-1, 2, 2) - anchors}, -1)
      .clamp(0.0, max_distance);
}

/// DFL decoding: ... x (4 * reg_max) logits -> ... x 4 distances, the expectation of each side's softmax
/// distribution over the bins 0 .. reg_max - 1.
inline torch::Tensor dfl_decode(const torch::Tensor& logits, int64_t reg_max) {
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  TORCH_CHECK(!shape.empty() && shape.back() == 4 * reg_max, "tdfusion: DFL logits must end in 4 x ", reg_max,
              " = ", 4 * reg_max, " values, got shape ", logits.sizes());
  shape.back() = 4;
  shape.push_back(reg_max);
  const torch::Tensor bins = torch::arange(reg_max, logits.options());
  return torch::softmax(logits.reshape(shape), -1).matmul(bins);
}

/// Distribution focal loss (Li et al. 2020) of K x reg_max logits against K continuous targets: the
/// cross-entropy with the two neighbouring bins, weighted by proximity,
///   -((t_r - t) log p[t_l] + (t - t_l) log p[t_r]),  t_l = floor(t), t_r = t_l + 1,
/// with t clamped to [0, reg_max - 1.01] so that t_r stays a bin. Returns K values.
inline torch::Tensor dfl_loss(const torch::Tensor& logits, const torch::Tensor& target) {
  const int64_t reg_max = logits.size(-1);
  const torch::Tensor t = target.clamp(0.0, static_cast<double>(reg_max) - 1.01);
  const torch::Tensor left = t.floor().to(torch::kLong), right = left + 1;
  const torch::Tensor weight_left = right.to(t.scalar_type()) - t, weight_right = 1 - weight_left;
  const torch::Tensor log_p = torch::log_softmax(logits, -1);
  return -(log_p.gather(-1, left.unsqueeze(-1)).squeeze(-1) * weight_left +
           log_p.gather(-1, right.unsqueeze(-1)).squeeze(-1) * weight_right);
}

/// Binary cross-entropy with logits, elementwise: softplus(x) - t x. Written out because softplus has a
/// double backward in every LibTorch version, whereas the fused kernel's backward may not.
inline torch::Tensor bce_with_logits(const torch::Tensor& logits, const torch::Tensor& target) {
  return torch::softplus(logits) - target * logits;
}

namespace detail {
// Greedy NMS on CPU doubles; `same_group(i, j)` says whether two boxes may suppress each other.
template <class SameGroup>
torch::Tensor greedy_nms(const torch::Tensor& boxes, const torch::Tensor& scores, double iou_threshold,
                         SameGroup same_group) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "tdfusion: NMS boxes must be K x 4 (x1, y1, x2, y2), got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "tdfusion: NMS needs one score per box, got ",
              scores.sizes(), " for ", boxes.size(0), " boxes");
  const int64_t k = boxes.size(0);
  const torch::Tensor order = std::get<1>(
      torch::sort(scores.detach().to(torch::kCPU, torch::kDouble), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const torch::Tensor b = boxes.detach().to(torch::kCPU, torch::kDouble).contiguous();
  const double* p = b.data_ptr<double>();
  const int64_t* idx = order.data_ptr<int64_t>();
  std::vector<double> area(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) area[i] = std::max(0.0, p[4 * i + 2] - p[4 * i]) * std::max(0.0, p[4 * i + 3] - p[4 * i + 1]);
  std::vector<char> suppressed(static_cast<size_t>(k), 0);
  std::vector<int64_t> keep;
  for (int64_t a = 0; a < k; ++a) {
    const int64_t i = idx[a];
    if (suppressed[i]) continue;
    keep.push_back(i);
    for (int64_t c = a + 1; c < k; ++c) {
      const int64_t j = idx[c];
      if (suppressed[j] || !same_group(i, j)) continue;
      const double w = std::min(p[4 * i + 2], p[4 * j + 2]) - std::max(p[4 * i], p[4 * j]);
      const double h = std::min(p[4 * i + 3], p[4 * j + 3]) - std::max(p[4 * i + 1], p[4 * j + 1]);
      if (w <= 0.0 || h <= 0.0) continue;
      const double inter = w * h, uni = area[i] + area[j] - inter;
      if (uni > 0.0 && inter / uni > iou_threshold) suppressed[j] = 1;
    }
  }
  return torch::tensor(keep, torch::kLong);
}
}  // namespace detail

/// Greedy non-maximum suppression (torchvision's semantics): visits boxes by decreasing score (ties keep
/// their order) and drops every later box whose IoU with a kept one exceeds `iou_threshold`. Returns the
/// kept indices, highest score first. Runs on the CPU (boxes are copied there).
inline torch::Tensor nms(const torch::Tensor& boxes, const torch::Tensor& scores, double iou_threshold) {
  return detail::greedy_nms(boxes, scores, iou_threshold, [](int64_t, int64_t) { return true; });
}

/// Class-aware NMS: boxes only suppress boxes of their own class (what ultralytics gets by offsetting boxes
/// per class, without its assumption that boxes are smaller than the offset).
inline torch::Tensor batched_nms(const torch::Tensor& boxes, const torch::Tensor& scores, const torch::Tensor& classes,
                                 double iou_threshold) {
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == boxes.size(0), "tdfusion: NMS needs one class per box");
  const torch::Tensor c = classes.detach().to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* cls = c.data_ptr<int64_t>();
  return detail::greedy_nms(boxes, scores, iou_threshold, [cls](int64_t i, int64_t j) { return cls[i] == cls[j]; });
}

}  // namespace tdfusion::task

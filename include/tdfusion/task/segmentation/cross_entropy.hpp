#pragma once
// The segmentation task loss of the release (spec section 4): logits resized bilinearly to the label size,
// then cross-entropy over all classes (background included).

#include "tdfusion/nn/resize.hpp"

#include <torch/torch.h>

#include <vector>

namespace tdfusion::task {

/// Mean cross-entropy of N x C x h x w logits against N x H x W integer class ids over the pixels whose
/// label is not `ignore_index` (the default -100 ignores nothing, as in PyTorch). Logits of another size
/// are first resized bilinearly to H x W. Labels must be in [0, C) apart from `ignore_index`; the check
/// costs one device sync. With no labelled pixel at all the loss is 0 (PyTorch would return NaN, which
/// would poison a training run over one unlabelled crop).
inline torch::Tensor segmentation_loss(const torch::Tensor& logits, const torch::Tensor& target,
                                       int64_t ignore_index = -100) {
  TORCH_CHECK(logits.defined() && logits.dim() == 4, "tdfusion: segmentation logits must be N x C x h x w, got ",
              logits.defined() ? logits.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(logits.is_floating_point(), "tdfusion: segmentation logits must be floating point, got ",
              logits.dtype());
  TORCH_CHECK(target.defined() && target.dim() == 3, "tdfusion: segmentation target must be N x H x W class ids, got ",
              target.defined() ? target.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(torch::isIntegralType(target.scalar_type(), /*includeBool=*/false),
              "tdfusion: segmentation target must hold integer class ids, got ", target.dtype());
  TORCH_CHECK(target.size(0) == logits.size(0), "tdfusion: segmentation target has batch size ", target.size(0),
              " but the logits have ", logits.size(0));
  TORCH_CHECK(target.size(1) > 0 && target.size(2) > 0, "tdfusion: segmentation target is empty, shape ",
              target.sizes());

  const int64_t classes = logits.size(1);
  const torch::Tensor labels = target.to(logits.device(), torch::kLong);
  const torch::Tensor labelled = labels != ignore_index;
  const torch::Tensor bad = labelled & ((labels < 0) | (labels >= classes));
  // One sync for both questions: any bad id? any labelled pixel?
  const torch::Tensor flags = torch::stack({bad.any(), labelled.any()}).cpu();
  if (flags[0].item<bool>()) {
    const int64_t id = labels.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK(false, "tdfusion: segmentation target holds class id ", id, ", outside [0, ", classes, ") for ",
                classes, " classes (ignore_index ", ignore_index, ")");
  }

  const torch::Tensor resized = nn::resize_bilinear(logits, labels.size(1), labels.size(2));
  if (!flags[1].item<bool>()) return resized.sum() * 0;  // keeps the graph, so callers can still differentiate
  namespace F = torch::nn::functional;
  return F::cross_entropy(resized, labels, F::CrossEntropyFuncOptions().ignore_index(ignore_index));
}

}  // namespace tdfusion::task

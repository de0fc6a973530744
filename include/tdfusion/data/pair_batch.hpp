#pragma once
// What the bilevel optimiser consumes: one batch of registered infrared / visible pairs, given twice, once
// resized to the task network's input size (with the task's labels) and once as full-resolution crops for
// the fusion loss (spec section 3: fusion crops at full resolution, task input at the task size).

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/target_traits.hpp"

#include <torch/torch.h>

#include <vector>

namespace tdfusion::data {

template <class Target>
struct PairBatch {
  torch::Tensor ir, vi;            ///< task input, N x 1 x h x w in [0,1]
  Target target;                   ///< the task's labels for `ir` / `vi`
  torch::Tensor ir_crop, vi_crop;  ///< fusion-loss crops, N x 1 x c x c in [0,1], same offsets in both

  /// The same batch on another device (and the images in another floating dtype).
  PairBatch to(const torch::Device& device, torch::Dtype dtype) const {
    return {ir.to(device, dtype), vi.to(device, dtype), TargetTraits<Target>::to(target, device),
            ir_crop.to(device, dtype), vi_crop.to(device, dtype)};
  }

  /// Modality-swap augmentation (spec section 3): the batch followed by itself with ir and vi exchanged.
  /// The geometry is unchanged, so the labels are repeated as they are.
  PairBatch with_modality_swap() const {
    return {torch::cat({ir, vi}, 0), torch::cat({vi, ir}, 0), TargetTraits<Target>::concat({target, target}),
            torch::cat({ir_crop, vi_crop}, 0), torch::cat({vi_crop, ir_crop}, 0)};
  }

  /// Validates layout and values; the message names what is wrong.
  void check() const {
    check_pair(ir, vi);
    check_pair(ir_crop, vi_crop);
    TORCH_CHECK(ir.size(0) == ir_crop.size(0), "tdfusion: batch has ", ir.size(0), " task images but ",
                ir_crop.size(0), " fusion crops");
  }
};

/// Several batches as one: images, crops and targets concatenated along the batch, in order. All parts must
/// share their task and crop sizes.
template <class Target>
PairBatch<Target> concat(const std::vector<PairBatch<Target>>& parts) {
  TORCH_CHECK(!parts.empty(), "tdfusion: cannot concatenate zero batches");
  if (parts.size() == 1) return parts.front();
  std::vector<torch::Tensor> ir, vi, ir_crop, vi_crop;
  std::vector<Target> targets;
  for (const PairBatch<Target>& part : parts) {
    TORCH_CHECK(part.ir.sizes().slice(1) == parts.front().ir.sizes().slice(1) &&
                    part.ir_crop.sizes().slice(1) == parts.front().ir_crop.sizes().slice(1),
                "tdfusion: samples of one step differ in size (task input ", parts.front().ir.sizes(), " vs ",
                part.ir.sizes(), ", crops ", parts.front().ir_crop.sizes(), " vs ", part.ir_crop.sizes(),
                "); batches of several pairs need a fixed task size and a crop no larger than the smallest image");
    ir.push_back(part.ir);
    vi.push_back(part.vi);
    ir_crop.push_back(part.ir_crop);
    vi_crop.push_back(part.vi_crop);
    targets.push_back(part.target);
  }
  return {torch::cat(ir, 0), torch::cat(vi, 0), TargetTraits<Target>::concat(targets), torch::cat(ir_crop, 0),
          torch::cat(vi_crop, 0)};
}

}  // namespace tdfusion::data

#pragma once
// Segmentation task policies: SegFormer (the release's network), SmallSegNet (fast CPU stand-in) and the
// cross-entropy task loss they share. A task policy offers `Target`, `loss(fused, target)` and `forward(image)`.

#include "tdfusion/task/segmentation/cross_entropy.hpp"
#include "tdfusion/task/segmentation/segformer.hpp"
#include "tdfusion/task/segmentation/small_seg.hpp"

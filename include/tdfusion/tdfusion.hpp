#pragma once
// tdfusion: task-driven infrared-visible image fusion with a learnable fusion loss (TDFusion, CVPR 2025).
// The umbrella header; each folder below can also be included on its own.

#include "tdfusion/core/autograd.hpp"
#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/param_view.hpp"
#include "tdfusion/core/traits.hpp"
#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/data/synthetic_scenes.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/loss/fusion_loss.hpp"
#include "tdfusion/lossgen/fixed_weights.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/bilevel_optimizer.hpp"
#include "tdfusion/meta/callbacks.hpp"
#include "tdfusion/meta/options.hpp"
#include "tdfusion/meta/update_policies/max_normalized_sgd.hpp"
#include "tdfusion/meta/update_policies/sgd_fast_weights.hpp"
#include "tdfusion/nn/layers.hpp"
#include "tdfusion/task/segmentation.hpp"

// Each TDFUSION_MISUSE_* case composes the bilevel optimiser from a broken policy (or data set). CTest builds
// one case at a time and passes only if the compiler rejects it with the library's static_assert message for
// that case; the CONTROL and DISABLED_TYPE_CHECKS cases must compile.
#ifdef TDFUSION_MISUSE_DISABLED_TYPE_CHECKS
#define TDFUSION_DISABLE_TYPE_CHECKS
#endif
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/bilevel_optimizer.hpp"

#include <vector>
#include "tdfusion/task/detection.hpp"
#include "tdfusion/task/segmentation.hpp"

namespace {
using tdfusion::fusion::LightFusion;
using tdfusion::lossgen::Lpn;
using tdfusion::task::SmallSegNet;

// A fusion network without the fast-weight forward pass.
struct StatefulOnlyFusionImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor&) { return ir; }
};
TORCH_MODULE(StatefulOnlyFusion);

// Not a torch module at all.
struct PlainFusion {
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor&) { return ir; }
};

// A loss generator whose forward takes one image.
struct OneInputGeneratorImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& ir) { return ir; }
};
TORCH_MODULE(OneInputGenerator);

// A task without a label type.
struct UntypedTaskImpl : torch::nn::Module {
  torch::Tensor loss(const torch::Tensor& fused, const torch::Tensor&) { return fused.mean(); }
};
TORCH_MODULE(UntypedTask);

// A task without a loss.
struct LosslessTaskImpl : torch::nn::Module {
  using Target = torch::Tensor;
};
TORCH_MODULE(LosslessTask);

// An outer update with the wrong signature.
struct WrongOuterUpdate {
  void step(double lr) const { (void)lr; }
};

// An outer update with the right parameters that does not return the largest |gradient| as a double.
struct FloatOuterUpdate {
  float step(const std::vector<torch::Tensor>&, const std::vector<torch::Tensor>&, double) const { return 0.0F; }
};

// A fusion loss that takes no loss weights.
struct UnweightedLoss {
  torch::Tensor operator()(const torch::Tensor& fused, const torch::Tensor& ir, const torch::Tensor&) const {
    return (fused - ir).abs().mean();
  }
};

// A label type whose traits can batch it but not move it to a device.
struct Labels {
  torch::Tensor map;
};
}  // namespace

template <>
struct tdfusion::TargetTraits<Labels> {
  static Labels concat(const std::vector<Labels>& parts) { return parts.front(); }
};

namespace {
struct UnmovableLabelTaskImpl : torch::nn::Module {
  using Target = Labels;
  torch::Tensor loss(const torch::Tensor& fused, const Labels&) { return fused.mean(); }
};
TORCH_MODULE(UnmovableLabelTask);

using Trainer = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet>;

// Data sets: one without size(), one whose get() serves the wrong label type.
struct SizelessDataset {
  tdfusion::data::PairBatch<torch::Tensor> get(uint64_t) const { return {}; }
};
struct BoxDataset {
  size_t size() const { return 1; }
  tdfusion::data::PairBatch<tdfusion::task::DetectionTarget> get(uint64_t) const { return {}; }
};
}  // namespace

#if defined(TDFUSION_MISUSE_FUSION_WITHOUT_FORWARD_WITH)
using Broken = tdfusion::meta::BilevelOptimizer<StatefulOnlyFusion, Lpn, SmallSegNet>;
#elif defined(TDFUSION_MISUSE_FUSION_NOT_A_MODULE)
using Broken = tdfusion::meta::BilevelOptimizer<PlainFusion, Lpn, SmallSegNet>;
#elif defined(TDFUSION_MISUSE_LOSS_GENERATOR_WITHOUT_PAIR_FORWARD)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, OneInputGenerator, SmallSegNet>;
#elif defined(TDFUSION_MISUSE_TASK_WITHOUT_TARGET)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, UntypedTask>;
#elif defined(TDFUSION_MISUSE_TASK_WITHOUT_LOSS)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, LosslessTask>;
#elif defined(TDFUSION_MISUSE_WRONG_OUTER_UPDATE)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet, tdfusion::loss::TdfusionLoss,
                                                tdfusion::meta::SgdFastWeights, WrongOuterUpdate>;
#elif defined(TDFUSION_MISUSE_OUTER_UPDATE_NOT_DOUBLE)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet, tdfusion::loss::TdfusionLoss,
                                                tdfusion::meta::SgdFastWeights, FloatOuterUpdate>;
#elif defined(TDFUSION_MISUSE_DISABLED_TYPE_CHECKS)
// The escape hatch: without the library's checks, a policy they would reject but that works is accepted.
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet, tdfusion::loss::TdfusionLoss,
                                                tdfusion::meta::SgdFastWeights, FloatOuterUpdate>;
#elif defined(TDFUSION_MISUSE_FUSION_LOSS_WITHOUT_WEIGHTS)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet, UnweightedLoss>;
#elif defined(TDFUSION_MISUSE_TARGET_TRAITS_WITHOUT_TO)
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, UnmovableLabelTask>;
#elif defined(TDFUSION_MISUSE_DATASET_WITHOUT_SIZE)
using Broken = Trainer;
void train(Trainer& trainer) { trainer.fit(SizelessDataset()); }
#elif defined(TDFUSION_MISUSE_DATASET_WRONG_TARGET)
using Broken = Trainer;
void train(Trainer& trainer) { trainer.fit(BoxDataset()); }
#else
// The control case: correct policies compile, so a failing case fails for its own reason.
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet>;
#endif

static_assert(sizeof(Broken) > 0, "instantiates the optimiser's class definition and its policy checks");

// Each TDFUSION_MISUSE_* case composes the bilevel optimiser from a broken policy. CTest builds one case at a
// time and passes only if the compiler rejects it with the library's static_assert message for that case.
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/bilevel_optimizer.hpp"
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
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet, tdfusion::meta::SgdFastWeights,
                                                WrongOuterUpdate>;
#else
// The control case: correct policies compile, so a failing case fails for its own reason.
using Broken = tdfusion::meta::BilevelOptimizer<LightFusion, Lpn, SmallSegNet>;
#endif

static_assert(sizeof(Broken) > 0, "instantiates the optimiser's class definition and its policy checks");

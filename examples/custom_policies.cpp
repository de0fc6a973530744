// Writing your own policies (examples/writing-policies.md): a fusion network, a loss generator, a task and a
// fusion loss of your own, composed by the same bilevel optimiser and trained on synthetic scenes.
//
//   build/examples/custom_policies
#include <tdfusion/tdfusion.hpp>

#include <iostream>

namespace nn = tdfusion::nn;
using tdfusion::ParamView;

// Fusion policy: a learned per-pixel blend alpha * ir + (1 - alpha) * vi, alpha from two small convolutions.
// The only rule: compute the output from a ParamView, so the meta step can run it with fast weights.
class BlendFusionImpl : public torch::nn::Module {
 public:
  BlendFusionImpl() {
    hidden_ = register_module("hidden", nn::Conv(2, 8, 3, 1, /*bias=*/true));
    alpha_ = register_module("alpha", nn::Conv(8, 1, 3, 1, /*bias=*/true));
  }
  torch::Tensor forward_with(const ParamView& p, const torch::Tensor& ir, const torch::Tensor& vi) const {
    const torch::Tensor h = torch::relu(hidden_->forward_with(p.sub("hidden"), torch::cat({ir, vi}, 1)));
    const torch::Tensor alpha = torch::sigmoid(alpha_->forward_with(p.sub("alpha"), h));
    return alpha * ir + (1 - alpha) * vi;
  }
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) { return forward_with(ParamView(*this), ir, vi); }

 private:
  nn::Conv hidden_{nullptr}, alpha_{nullptr};
};
TORCH_MODULE(BlendFusion);

// Loss generator: per-pixel weights from a 1x1 convolution of the pair, softmax over the two sources.
class PixelWeightsImpl : public torch::nn::Module {
 public:
  PixelWeightsImpl() { conv_ = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 2, 1))); }
  torch::Tensor forward(const torch::Tensor& ir, const torch::Tensor& vi) {
    return torch::softmax(conv_->forward(torch::cat({ir, vi}, 1)), 1);
  }

 private:
  torch::nn::Conv2d conv_{nullptr};
};
TORCH_MODULE(PixelWeights);

// Task: foreground / background segmentation with a two-layer CNN and binary cross-entropy.
class ForegroundTaskImpl : public torch::nn::Module {
 public:
  using Target = torch::Tensor;  // N x H x W class ids; anything but background counts as foreground
  ForegroundTaskImpl() {
    net_ = register_module("net", torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)),
                                                        torch::nn::ReLU(),
                                                        torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 1, 3).padding(1))));
  }
  torch::Tensor loss(const torch::Tensor& fused, const Target& target) {
    const torch::Tensor logits = net_->forward(fused).squeeze(1);
    return torch::binary_cross_entropy_with_logits(logits, (target > 0).to(logits.dtype()));
  }

 private:
  torch::nn::Sequential net_{nullptr};
};
TORCH_MODULE(ForegroundTask);

// Fusion loss: the learned weights on an L1 intensity term, plus the paper's gradient term at half weight.
struct L1IntensityLoss {
  torch::Tensor operator()(const torch::Tensor& fused, const torch::Tensor& ir, const torch::Tensor& vi,
                           const torch::Tensor& weights) const {
    const torch::Tensor intensity =
        (weights.narrow(1, 0, 1) * (ir - fused)).abs().mean() + (weights.narrow(1, 1, 1) * (vi - fused)).abs().mean();
    return intensity + 0.5 * tdfusion::loss::fusion_loss(fused, ir, vi, weights).gradient;
  }
};

int main() {
  torch::manual_seed(0);
  using Trainer = tdfusion::meta::BilevelOptimizer<BlendFusion, PixelWeights, ForegroundTask, L1IntensityLoss>;
  Trainer trainer(BlendFusion(), PixelWeights(), ForegroundTask(),
                  tdfusion::meta::BilevelOptions().epochs(3).meta_steps_per_epoch(8).fusion_lr(1e-2).task_lr(1e-2));
  tdfusion::data::SyntheticScenes scenes(tdfusion::data::SyntheticScenesOptions().count(16).scene_height(64).scene_width(64)
                                             .task_height(64).task_width(64).crop_size(48));
  const tdfusion::meta::FitResult result = trainer.fit(scenes, tdfusion::meta::PrintLosses(std::cout));
  std::cout << "trained " << result.epoch << " epochs; last meta step's outer task loss "
            << result.last_meta_step->task_loss << '\n';
  const auto pair = scenes.scene(0);
  const torch::Tensor weights = trainer.loss_generator()->forward(pair.ir.unsqueeze(0), pair.vi.unsqueeze(0));
  std::cout << "mean learned infrared weight on scene 0: " << weights.select(1, 0).mean().item<double>() << '\n';
}

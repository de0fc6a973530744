// Networks of the paper: parameter counts, names, shapes, and the fusion loss.
#include <doctest/doctest.h>

#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/loss/fusion_loss.hpp"
#include "tdfusion/lossgen/fixed_weights.hpp"
#include "tdfusion/lossgen/lpn.hpp"

namespace {

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace

TEST_CASE("ReFusion has the paper's 59,856 parameters under the released names") {
  tdfusion::fusion::ReFusion net;
  CHECK(count_parameters(*net) == 59856);
  const auto params = net->named_parameters();
  CHECK(params.size() == 86);  // a released state_dict has 140 keys: its 54 convolutions appear twice
  for (const char* key : {"project_in_1.weight", "encoder1.0.norm1.body.weight", "encoder2.1.attn.temperature",
                          "encoder1.0.attn.qkv_dwconv.weight", "encoder1.1.ffn.project_in.weight", "FM.temperature1",
                          "FM.qkv2_dwconv.weight", "FM.project_E_d.weight", "FM.project_out2.weight",
                          "decoder.1.ffn.project_out.weight", "project_out_0.weight", "project_out_1.weight"}) {
    CHECK_MESSAGE(params.contains(key), key);
  }
  CHECK(params["FM.project_E.weight"].sizes() == torch::IntArrayRef({128, 32, 1, 1}));
  CHECK(params["decoder.0.attn.qkv_dwconv.weight"].sizes() == torch::IntArrayRef({96, 1, 3, 3}));
}

TEST_CASE("LPN has the paper's 44,529 parameters") {
  tdfusion::lossgen::Lpn lpn;
  CHECK(count_parameters(*lpn) == 44529);
}

TEST_CASE("fusion networks keep any image size, including odd ones") {
  torch::manual_seed(0);
  tdfusion::fusion::ReFusion refusion;
  tdfusion::fusion::LightFusion light;
  tdfusion::lossgen::Lpn lpn;
  for (auto hw : {std::pair<int64_t, int64_t>{37, 53}, {1, 1}, {16, 9}}) {
    const auto ir = torch::rand({2, 1, hw.first, hw.second});
    const auto vi = torch::rand({2, 1, hw.first, hw.second});
    const auto fused = refusion->forward(ir, vi);
    CHECK(fused.sizes() == ir.sizes());
    CHECK(fused.min().item<double>() >= 0.0);
    CHECK(fused.max().item<double>() <= 1.0);
    CHECK(light->forward(ir, vi).sizes() == ir.sizes());
    const auto weights = lpn->forward(ir, vi);
    CHECK(weights.sizes() == torch::IntArrayRef({2, 2, hw.first, hw.second}));
    CHECK(torch::allclose(weights.sum(1), torch::ones({2, hw.first, hw.second})));
  }
}

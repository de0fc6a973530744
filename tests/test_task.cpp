// Segmentation task policies: the cross-entropy task loss against a hand computation, SegFormer-B0 and
// SmallSegNet shapes, parameter counts, gradients to the fused image (first and second order), training.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/core/autograd.hpp"
#include "tdfusion/task/segmentation.hpp"

#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

namespace {

using namespace tdfusion::test;

using tdfusion::task::SegFormer;
using tdfusion::task::SegFormerImpl;
using tdfusion::task::SegFormerOptions;
using tdfusion::task::segmentation_loss;
using tdfusion::task::SmallSegNet;
using tdfusion::task::SmallSegNetImpl;
using tdfusion::task::SmallSegNetOptions;

// The task-policy API the meta optimiser consumes.
static_assert(std::is_same_v<SegFormerImpl::Target, torch::Tensor>);
static_assert(std::is_same_v<SmallSegNetImpl::Target, torch::Tensor>);
static_assert(std::is_same_v<decltype(std::declval<SegFormerImpl&>().loss(torch::Tensor(), torch::Tensor())),
                             torch::Tensor>);
static_assert(std::is_same_v<decltype(std::declval<SmallSegNetImpl&>().forward(torch::Tensor())), torch::Tensor>);


// Bilinear resize, align_corners = false, written from the definition: output pixel i samples the input at
// (i + 0.5) * in / out - 0.5, clamped at 0 on the low side, with the upper neighbour clamped to the last pixel.
torch::Tensor bilinear_reference(const torch::Tensor& x, int64_t out_h, int64_t out_w) {
  const int64_t n = x.size(0), c = x.size(1), in_h = x.size(2), in_w = x.size(3);
  torch::Tensor y = torch::zeros({n, c, out_h, out_w}, torch::kDouble);
  auto src = x.accessor<double, 4>();
  auto dst = y.accessor<double, 4>();
  auto coord = [](int64_t i, int64_t in, int64_t out, int64_t& i0, int64_t& i1, double& t) {
    const double s = std::max(0.0, (i + 0.5) * static_cast<double>(in) / static_cast<double>(out) - 0.5);
    i0 = static_cast<int64_t>(std::floor(s));
    i1 = std::min(i0 + 1, in - 1);
    t = s - static_cast<double>(i0);
  };
  for (int64_t b = 0; b < n; ++b)
    for (int64_t k = 0; k < c; ++k)
      for (int64_t i = 0; i < out_h; ++i)
        for (int64_t j = 0; j < out_w; ++j) {
          int64_t y0, y1, x0, x1;
          double ty, tx;
          coord(i, in_h, out_h, y0, y1, ty);
          coord(j, in_w, out_w, x0, x1, tx);
          dst[b][k][i][j] = (1 - ty) * ((1 - tx) * src[b][k][y0][x0] + tx * src[b][k][y0][x1]) +
                            ty * ((1 - tx) * src[b][k][y1][x0] + tx * src[b][k][y1][x1]);
        }
  return y;
}

// Mean over labelled pixels of -log softmax(logits)[label], by hand (logits already at the label size).
double cross_entropy_reference(const torch::Tensor& logits, const torch::Tensor& labels, int64_t ignore) {
  auto z = logits.accessor<double, 4>();
  auto t = labels.accessor<int64_t, 3>();
  double total = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < logits.size(0); ++b)
    for (int64_t i = 0; i < logits.size(2); ++i)
      for (int64_t j = 0; j < logits.size(3); ++j) {
        if (t[b][i][j] == ignore) continue;
        double sum = 0.0;
        for (int64_t k = 0; k < logits.size(1); ++k) sum += std::exp(z[b][k][i][j]);
        total += std::log(sum) - z[b][t[b][i][j]][i][j];
        ++count;
      }
  return total / static_cast<double>(count);
}

// Central finite difference of the task loss along `direction` vs the autograd directional derivative.
template <typename Net>
void check_directional_derivative(Net& net, const torch::Tensor& image, const torch::Tensor& labels) {
  const torch::Tensor x = image.clone().requires_grad_(true);
  const torch::Tensor grad = tdfusion::gradients(net->loss(x, labels), {x})[0];
  const torch::Tensor direction = torch::randn_like(image);
  const double eps = 1e-6;
  const double plus = net->loss(image + eps * direction, labels).template item<double>();
  const double minus = net->loss(image - eps * direction, labels).template item<double>();
  const double numeric = (plus - minus) / (2 * eps);
  const double analytic = (grad * direction).sum().template item<double>();
  CHECK(numeric == doctest::Approx(analytic).epsilon(1e-6));
}

// The loss -> image gradient made differentiable again (the path the bilevel optimiser needs).
template <typename Net>
void check_double_backward(Net& net, const torch::Tensor& image, const torch::Tensor& labels) {
  const torch::Tensor x = image.clone().requires_grad_(true);
  const tdfusion::GradOptions keep{/*retain_graph=*/true, /*create_graph=*/true};
  const torch::Tensor g = tdfusion::gradients(net->loss(x, labels), {x}, keep)[0];
  const torch::Tensor gg = tdfusion::gradients(g.pow(2).sum(), {x})[0];
  CHECK(torch::isfinite(gg).all().item<bool>());
  CHECK(gg.abs().sum().item<double>() > 0.0);
}

}  // namespace

TEST_CASE("segmentation_loss matches a hand-computed cross-entropy with bilinear resize and ignore labels") {
  torch::manual_seed(1);
  const int64_t ignore = 255;
  const torch::Tensor logits = torch::randn({2, 3, 3, 4}, torch::kDouble) * 2;
  torch::Tensor labels = torch::randint(0, 3, {2, 5, 7}, torch::kLong);
  labels.index_put_({0, 1, torch::indexing::Slice()}, ignore);  // a whole row ignored
  labels.index_put_({1, 4, 6}, ignore);

  const double expected = cross_entropy_reference(bilinear_reference(logits, 5, 7), labels, ignore);
  CHECK(segmentation_loss(logits, labels, ignore).item<double>() == doctest::Approx(expected).epsilon(1e-12));

  // Same size: no resize; default ignore_index (-100) ignores nothing.
  const torch::Tensor full = torch::randint(0, 3, {2, 3, 4}, torch::kLong);
  CHECK(segmentation_loss(logits, full).item<double>() ==
        doctest::Approx(cross_entropy_reference(logits, full, -100)).epsilon(1e-12));

  // Narrow integer labels on the same pixels give the same loss; float logits agree to float precision.
  CHECK(segmentation_loss(logits, full.to(torch::kUInt8)).item<double>() ==
        doctest::Approx(segmentation_loss(logits, full).item<double>()).epsilon(1e-12));
  CHECK(segmentation_loss(logits.to(torch::kFloat), labels, ignore).item<double>() ==
        doctest::Approx(expected).epsilon(1e-5));
}

TEST_CASE("segmentation_loss with every pixel ignored is zero and still differentiable") {
  const torch::Tensor logits = torch::randn({1, 4, 2, 2}, torch::kDouble).requires_grad_(true);
  const torch::Tensor loss = segmentation_loss(logits, torch::full({1, 2, 2}, 7, torch::kLong), 7);
  CHECK(loss.item<double>() == 0.0);
  CHECK(tdfusion::gradients(loss, {logits})[0].abs().sum().item<double>() == 0.0);
}

TEST_CASE("segmentation_loss rejects malformed targets and names the bad class id") {
  const torch::Tensor logits = torch::randn({2, 9, 4, 4});
  const torch::Tensor good = torch::zeros({2, 4, 4}, torch::kLong);
  CHECK(contains(error_message([&] { segmentation_loss(logits, good.unsqueeze(1)); }), "N x H x W"));
  CHECK(contains(error_message([&] { segmentation_loss(logits, good.slice(0, 0, 1)); }), "batch size 1"));
  CHECK(contains(error_message([&] { segmentation_loss(logits, good.to(torch::kFloat)); }), "integer class ids"));
  CHECK(contains(error_message([&] { segmentation_loss(logits.flatten(2), good); }), "N x C x h x w"));

  torch::Tensor bad = good.clone();
  bad.index_put_({1, 2, 3}, 12);
  const std::string message = error_message([&] { segmentation_loss(logits, bad); });
  CHECK(contains(message, "tdfusion: "));
  CHECK(contains(message, "class id 12"));
  CHECK(contains(message, "[0, 9)"));
  bad.index_put_({1, 2, 3}, -3);
  CHECK(contains(error_message([&] { segmentation_loss(logits, bad); }), "class id -3"));
  // 255 is an ordinary (bad) id unless it is the ignore label.
  bad.index_put_({1, 2, 3}, 255);
  CHECK(contains(error_message([&] { segmentation_loss(logits, bad); }), "class id 255"));
  CHECK(std::isfinite(segmentation_loss(logits, bad, 255).item<double>()));
}

TEST_CASE("SegFormer-B0 has 3,713,321 parameters (1 channel, 9 classes) under the original names") {
  // Hand count. LayerNorm(C): 2C. A block of width C, MLP 4C, reduction r:
  //   norm1 2C + q C^2+C + kv 2C^2+2C + proj C^2+C + norm2 2C + fc1 4C^2+4C + dwconv 4C*9+4C + fc2 4C^2+C
  //   = 12C^2 + 53C, plus for r > 1 the sr conv r^2 C^2 + C and its LayerNorm 2C.
  // Stage 1 (C 32, r 8): embed 1*32*49+32 + 64 = 1,664; blocks 2 * (12,288+1,696+65,536+96) = 159,232; norm 64
  //   -> 160,960.
  // Stage 2 (C 64, r 4): embed 32*64*9+64 + 128 = 18,624; blocks 2 * (49,152+3,392+65,536+192) = 236,544;
  //   norm 128 -> 255,296.
  // Stage 3 (C 160, r 2): embed 64*160*9+160 + 320 = 92,640; blocks 2 * (307,200+8,480+102,400+480) = 837,120;
  //   norm 320 -> 930,080.
  // Stage 4 (C 256, r 1): embed 160*256*9+256 + 512 = 369,408; blocks 2 * (786,432+13,568) = 1,600,000;
  //   norm 512 -> 1,969,920.
  // Encoder: 3,316,256 (3,319,392 with 3 input channels: the usual "MiT-B0 3.3M").
  // Decoder: linears (32+64+160+256)*256 + 4*256 = 132,096; fuse 1024*256 (no bias) = 262,144; BN 512;
  //   classifier 256*9+9 = 2,313 -> 397,065.  Total 3,713,321.
  SegFormer net;
  CHECK(count_parameters(*net->backbone()) == 3316256);
  CHECK(count_parameters(*net->decode_head()) == 397065);
  CHECK(count_parameters(*net) == 3713321);
  CHECK(count_parameters(*SegFormer(SegFormerOptions().in_channels(3).num_classes(150))) == 3752694);

  const auto params = net->named_parameters();
  for (const char* key :
       {"backbone.patch_embed1.proj.weight", "backbone.patch_embed1.norm.bias", "backbone.block1.0.norm1.weight",
        "backbone.block1.0.attn.q.weight", "backbone.block1.1.attn.kv.bias", "backbone.block1.0.attn.sr.weight",
        "backbone.block3.1.attn.norm.weight", "backbone.block2.0.attn.proj.weight", "backbone.block4.1.mlp.fc1.weight",
        "backbone.block4.0.mlp.dwconv.dwconv.weight", "backbone.block4.1.mlp.fc2.bias", "backbone.norm4.weight",
        "decode_head.linear_c1.proj.weight", "decode_head.linear_c4.proj.bias", "decode_head.linear_fuse.conv.weight",
        "decode_head.linear_fuse.bn.weight", "decode_head.linear_pred.weight", "decode_head.linear_pred.bias"}) {
    CHECK_MESSAGE(params.contains(key), key);
  }
  CHECK_FALSE(params.contains("backbone.block4.0.attn.sr.weight"));  // reduction ratio 1: plain attention
  CHECK_FALSE(params.contains("decode_head.linear_fuse.conv.bias"));
  CHECK(params["backbone.block1.0.attn.sr.weight"].sizes() == torch::IntArrayRef({32, 32, 8, 8}));
  CHECK(params["backbone.patch_embed2.proj.weight"].sizes() == torch::IntArrayRef({64, 32, 3, 3}));
  CHECK(params["decode_head.linear_fuse.conv.weight"].sizes() == torch::IntArrayRef({256, 1024, 1, 1}));
  CHECK(net->named_buffers().contains("decode_head.linear_fuse.bn.running_mean"));
}

TEST_CASE("SmallSegNet has 21,129 parameters at the defaults") {
  // stem 1*16*9+16 = 160; down 16*32*9+32 = 4,640; context 32*32*9+32 = 9,248; fuse 48*16*9+16 = 6,928;
  // classifier 16*9+9 = 153.
  CHECK(count_parameters(*SmallSegNet()) == 21129);
}

TEST_CASE("SegFormer and SmallSegNet segment odd image sizes at full resolution") {
  torch::manual_seed(2);
  SegFormer segformer;
  SmallSegNet small;
  const torch::Tensor image = torch::rand({2, 1, 37, 53});
  const torch::Tensor labels = torch::randint(0, 9, {2, 37, 53}, torch::kLong);

  CHECK(segformer->forward(image).sizes() == torch::IntArrayRef({2, 9, 37, 53}));
  CHECK(segformer->coarse_logits(image).sizes() == torch::IntArrayRef({2, 9, 10, 14}));  // 1/4, rounded up
  CHECK(small->forward(image).sizes() == torch::IntArrayRef({2, 9, 37, 53}));
  CHECK(small->forward(torch::rand({1, 1, 1, 1})).sizes() == torch::IntArrayRef({1, 9, 1, 1}));
  // Below 29 x 29 the first stages' grids are smaller than their reduction windows (padded, see the header).
  for (auto hw : {std::pair<int64_t, int64_t>{29, 29}, {12, 12}, {5, 40}, {1, 1}}) {
    CHECK(segformer->forward(torch::rand({2, 1, hw.first, hw.second})).sizes() ==
          torch::IntArrayRef({2, 9, hw.first, hw.second}));
  }

  for (const double loss : {segformer->loss(image, labels).item<double>(), small->loss(image, labels).item<double>()}) {
    CHECK(std::isfinite(loss));
    CHECK(loss > 0.0);
  }
  // Labels of another size than the image: logits follow the labels.
  CHECK(std::isfinite(segformer->loss(image, torch::randint(0, 9, {2, 20, 30}, torch::kLong)).item<double>()));

  CHECK(contains(error_message([&] { segformer->forward(torch::rand({1, 2, 64, 64})); }), "must have 1 channel"));
  CHECK(contains(error_message([&] { small->forward(torch::rand({1, 64, 64})); }), "N x 1 x H x W"));
  CHECK(contains(error_message([&] { small->loss(image, labels.unsqueeze(1)); }), "N x H x W"));
}

TEST_CASE("segmentation task losses send exact gradients to the fused image, in float and double") {
  torch::manual_seed(3);
  SegFormer segformer;
  SmallSegNet small;
  const torch::Tensor image = torch::rand({2, 1, 37, 53});
  const torch::Tensor labels = torch::randint(0, 9, {2, 37, 53}, torch::kLong);

  for (bool use_double : {false, true}) {
    CAPTURE(use_double);
    if (use_double) {
      segformer->to(torch::kDouble);
      small->to(torch::kDouble);
    }
    const torch::Tensor x = image.to(use_double ? torch::kDouble : torch::kFloat).clone().requires_grad_(true);
    for (const torch::Tensor& loss : {segformer->loss(x, labels), small->loss(x, labels)}) {
      CHECK(bool(loss.scalar_type() == x.scalar_type()));
      const torch::Tensor grad = tdfusion::gradients(loss, {x})[0];
      CHECK(torch::isfinite(grad).all().item<bool>());
      CHECK(grad.abs().sum().item<double>() > 0.0);
    }
  }
  const torch::Tensor x = image.to(torch::kDouble);
  check_directional_derivative(segformer, x, labels);
  check_directional_derivative(small, x, labels);
  check_double_backward(segformer, x, labels);
  check_double_backward(small, x, labels);
}

TEST_CASE("SmallSegNet: Adam steps lower the task loss on a fixed synthetic problem") {
  torch::manual_seed(4);
  SmallSegNet net(SmallSegNetOptions().num_classes(2).width(8));
  const torch::Tensor image = torch::rand({2, 1, 24, 24});
  const torch::Tensor labels = (image.squeeze(1) > 0.5).to(torch::kLong);
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-2));
  const double first = net->loss(image, labels).item<double>();
  for (int step = 0; step < 30; ++step) {
    adam.zero_grad();
    net->loss(image, labels).backward();
    adam.step();
  }
  const double last = net->loss(image, labels).item<double>();
  INFO("SmallSegNet loss ", first, " -> ", last);
  CHECK(first > 0.6);  // about log 2 at initialisation
  CHECK(last < 0.25);
  const double accuracy = (net->forward(image).argmax(1) == labels).to(torch::kDouble).mean().item<double>();
  CHECK(accuracy > 0.9);
}

TEST_CASE("SegFormer: Adam steps lower the task loss on a fixed synthetic problem") {
  torch::manual_seed(5);
  SegFormer net(SegFormerOptions().num_classes(2));
  // Smooth blobs: SegFormer predicts at 1/4 resolution, so pixel noise labels would not be learnable.
  const torch::Tensor image = tdfusion::nn::resize_bilinear(torch::rand({2, 1, 4, 4}), 32, 32);
  const torch::Tensor labels = (image.squeeze(1) > 0.5).to(torch::kLong);
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-3));
  const double first = net->loss(image, labels).item<double>();
  for (int step = 0; step < 10; ++step) {
    adam.zero_grad();
    net->loss(image, labels).backward();
    adam.step();
  }
  const double last = net->loss(image, labels).item<double>();
  INFO("SegFormer loss ", first, " -> ", last);
  CHECK(first > 0.6);  // about log 2 at initialisation
  CHECK(last < 0.4);
}

TEST_CASE("segmentation task policies clone into independent snapshots") {
  torch::manual_seed(6);
  SegFormer segformer;
  SmallSegNet small;
  const torch::Tensor image = torch::rand({1, 1, 40, 40});
  const torch::Tensor segformer_before = segformer->forward(image);
  const torch::Tensor small_before = small->forward(image);
  auto segformer_copy = std::dynamic_pointer_cast<SegFormerImpl>(segformer->clone());
  auto small_copy = std::dynamic_pointer_cast<SmallSegNetImpl>(small->clone());
  REQUIRE(segformer_copy);
  REQUIRE(small_copy);
  CHECK(segformer_copy->parameters().size() == segformer->parameters().size());
  {
    torch::NoGradGuard no_grad;
    for (auto& p : segformer->parameters()) p.add_(0.1);
    for (auto& p : small->parameters()) p.add_(0.1);
  }
  // The copies compute what the originals computed before the change: no weight (blocks included) is shared.
  CHECK(torch::allclose(segformer_copy->forward(image), segformer_before));
  CHECK(torch::allclose(small_copy->forward(image), small_before));
  CHECK_FALSE(torch::allclose(segformer->forward(image), segformer_before));
  CHECK_FALSE(torch::allclose(small->forward(image), small_before));
}

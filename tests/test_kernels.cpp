// The fast CPU kernels: agreement with the plain LibTorch ops to second order (float), and first and second
// derivatives against central finite differences (double), for every op; the fast path of the whole fusion network;
// the allocator that keeps their outputs' memory for reuse.
#include <doctest/doctest.h>

#include "tdfusion/fusion/refusion.hpp"
#include "tdfusion/core/autograd.hpp"
#include "tdfusion/core/runtime.hpp"
#include "tdfusion/nn/kernels/ops.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace tdfusion;
namespace ops = tdfusion::nn::ops;
using Tensors = std::vector<torch::Tensor>;
using Op = std::function<torch::Tensor(const Tensors&)>;

/// max |a - b| / max |b|: the error relative to the tensor's scale.
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-300);
}

Tensors leaves(const Tensors& values) {
  Tensors out;
  for (const auto& v : values) out.push_back(v.detach().clone().requires_grad_(true));
  return out;
}

/// What the fast and plain paths must agree on: the op, the gradient of L = sum(op * r) with respect to every
/// input, and the derivative of <that gradient, v> (a Hessian-vector product, as in the meta step).
struct Derivatives {
  torch::Tensor value;
  Tensors gradient, hessian_v;
};

Derivatives derivatives(const Op& op, const Tensors& inputs, const torch::Tensor& r, const Tensors& v, bool fast) {
  const ops::FastKernels mode(fast);
  const Tensors x = leaves(inputs);
  const torch::Tensor y = op(x);
  const Tensors g = gradients((y * r).sum(), x, {/*retain_graph=*/true, /*create_graph=*/true});
  torch::Tensor dot = torch::zeros({});
  for (size_t i = 0; i < g.size(); ++i) dot = dot + (g[i] * v[i]).sum();
  Tensors detached;
  for (const auto& t : g) detached.push_back(t.detach());
  return {y.detach(), detached, gradients(dot, x)};
}

/// Fast against plain in float: output, first-order gradients and Hessian-vector products within 1e-5 of the
/// tensors' scale.
void check_agreement(const std::string& name, const Op& op, const Tensors& inputs) {
  torch::manual_seed(7);
  const torch::Tensor r = torch::randn(op(inputs).sizes());
  Tensors v;
  for (const auto& t : inputs) v.push_back(torch::randn(t.sizes()));
  const Derivatives fast = derivatives(op, inputs, r, v, true);
  const Derivatives plain = derivatives(op, inputs, r, v, false);
  INFO(name);
  CHECK(relative_error(fast.value, plain.value) < 1e-5);
  {  // The op's graph dies with its output: no node keeps itself alive (as a tensor in its own saved_data would).
    const Tensors x = leaves(inputs);
    torch::Tensor y = op(x);
    const std::weak_ptr<torch::autograd::Node> node = y.grad_fn();
    REQUIRE_FALSE(node.expired());
    y.reset();
    CHECK(node.expired());
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    INFO("input " << i);
    CHECK(relative_error(fast.gradient[i], plain.gradient[i]) < 1e-5);
    CHECK(relative_error(fast.hessian_v[i], plain.hessian_v[i]) < 1e-5);
  }
}

/// First and second directional derivatives of L(x) = sum(op(x) * r) against central differences (double),
/// along a random direction u of all inputs: dL.u, and d/dt <grad L(x + t u), v> = u^T H v via double backward.
void check_derivatives(const std::string& name, const Op& op, const Tensors& inputs_float) {
  torch::manual_seed(11);
  Tensors inputs;
  for (const auto& t : inputs_float) inputs.push_back(t.to(torch::kDouble));
  const torch::Tensor r = torch::randn(op(inputs).sizes(), torch::kDouble);
  Tensors u, v;
  for (const auto& t : inputs) {
    u.push_back(torch::randn(t.sizes(), torch::kDouble));
    v.push_back(torch::randn(t.sizes(), torch::kDouble));
  }
  auto shifted = [&](double t) {
    Tensors x;
    for (size_t i = 0; i < inputs.size(); ++i) x.push_back(inputs[i] + t * u[i]);
    return x;
  };
  auto loss = [&](const Tensors& x) { return (op(x) * r).sum(); };
  auto grad_dot_v = [&](const Tensors& at, bool create_graph) {
    const Tensors x = leaves(at);
    const Tensors g = gradients(loss(x), x, {/*retain_graph=*/create_graph, /*create_graph=*/create_graph});
    torch::Tensor dot = torch::zeros({}, torch::kDouble);
    for (size_t i = 0; i < g.size(); ++i) dot = dot + (g[i] * v[i]).sum();
    return std::make_pair(dot, x);
  };
  const double h = 1e-5;
  INFO(name);
  // First order.
  const Tensors x = leaves(inputs);
  const Tensors g = gradients(loss(x), x);
  double analytic = 0;
  for (size_t i = 0; i < g.size(); ++i) analytic += (g[i] * u[i]).sum().item<double>();
  const double numeric = (loss(shifted(h)).item<double>() - loss(shifted(-h)).item<double>()) / (2 * h);
  MESSAGE(name << ": first derivative " << analytic << " vs " << numeric);
  CHECK(std::abs(analytic - numeric) <= 1e-6 * std::max(1.0, std::abs(numeric)));
  // Second order: differentiate <grad L, v> once more.
  const auto [dot, at] = grad_dot_v(inputs, /*create_graph=*/true);
  const Tensors hv = gradients(dot, at);
  double second = 0;
  for (size_t i = 0; i < hv.size(); ++i) second += (hv[i] * u[i]).sum().item<double>();
  const double second_numeric =
      (grad_dot_v(shifted(h), false).first.item<double>() - grad_dot_v(shifted(-h), false).first.item<double>()) /
      (2 * h);
  MESSAGE(name << ": second derivative " << second << " vs " << second_numeric);
  CHECK(std::abs(second) > 1e-8);  // the check would be empty for an op whose second derivative vanishes
  CHECK(std::abs(second - second_numeric) <= 1e-5 * std::max(1.0, std::abs(second_numeric)));
  // The same second derivative from a recorded backward pass: the differentiable formulas a third one would use.
  const auto [dot_again, at_again] = grad_dot_v(inputs, /*create_graph=*/true);
  const Tensors hv_recorded = gradients(dot_again, at_again, {/*retain_graph=*/true, /*create_graph=*/true});
  for (size_t i = 0; i < hv.size(); ++i) {
    INFO("recorded second derivative of input " << i);
    CHECK(relative_error(hv_recorded[i], hv[i]) < 1e-10);
  }
}

torch::Tensor cosine_gram(const Tensors& t) { return ops::cosine_gram(t[0], t[1]); }

/// The op's inputs at an odd size, and a channel split of a wider tensor (strided views, as the networks pass).
struct Case {
  std::string name;
  Op op;
  Tensors inputs;
};

std::vector<Case> cases() {
  torch::manual_seed(3);
  const torch::Tensor x = torch::randn({2, 5, 7, 9}), wide = torch::randn({2, 10, 7, 9});
  const torch::Tensor split = wide.chunk(2, 1)[1];  // batch stride 10 * 63, not 5 * 63
  std::vector<Case> all;
  all.push_back({"conv1x1", [](const Tensors& t) { return ops::conv1x1(t[0], t[1]); }, {x, torch::randn({4, 5, 1, 1})}});
  all.push_back({"conv1x1 of a channel split", [](const Tensors& t) { return ops::conv1x1(t[0], t[1]); },
                 {split, torch::randn({3, 5, 1, 1})}});
  all.push_back({"depthwise3x3", [](const Tensors& t) { return ops::depthwise3x3(t[0], t[1]); },
                 {split, torch::randn({5, 1, 3, 3})}});
  all.push_back({"depthwise3x3 on one column", [](const Tensors& t) { return ops::depthwise3x3(t[0], t[1]); },
                 {torch::randn({1, 2, 5, 1}), torch::randn({2, 1, 3, 3})}});
  all.push_back({"dense 3x3 convolution", [](const Tensors& t) { return ops::conv_same(t[0], t[1]); },
                 {split, torch::randn({4, 5, 3, 3})}});
  // Squared, so that the incoming gradient of the convolution depends on the inputs (checks its derivative too).
  all.push_back({"squared dense 5x5 convolution with a bias",
                 [](const Tensors& t) { return ops::conv_same(t[0], t[1], t[2]).square(); },
                 {x, torch::randn({3, 5, 5, 5}), torch::randn({3})}});
  all.push_back({"channel_layer_norm", [](const Tensors& t) { return ops::channel_layer_norm(t[0], t[1], t[2]); },
                 {split * 3 + 1, torch::randn({5}), torch::randn({5})}});
  all.push_back({"gelu_gate", [](const Tensors& t) { return ops::gelu_gate(t[0]); }, {wide * 2}});
  all.push_back({"gelu_gate of a channel split", [](const Tensors& t) { return ops::gelu_gate(t[0]); },
                 {torch::randn({2, 12, 7, 9}).slice(1, 2, 12)}});
  all.push_back({"bmm", [](const Tensors& t) { return ops::bmm(t[0], t[1]); },
                 {torch::randn({2, 3, 4, 6}), torch::randn({2, 3, 6, 5})}});
  all.push_back({"bmm with a transposed operand (a Gram matrix)",
                 [](const Tensors& t) { return ops::bmm(t[0], t[0].transpose(-1, -2)); }, {torch::randn({2, 3, 4, 50})}});
  all.push_back({"cosine_gram", cosine_gram, {torch::randn({2, 3, 4, 40}), torch::randn({2, 3, 2, 40})}});
  all.push_back({"channel attention",
                 [](const Tensors& t) { return nn::channel_attention(t[0], t[1], t[2], t[3], 2); },
                 {torch::randn({2, 4, 5, 6}), torch::randn({2, 4, 5, 6}), torch::randn({2, 4, 5, 6}),
                  torch::rand({2, 1, 1}) + 0.5}});
  all.push_back({"channel attention with a folded projection",
                 [](const Tensors& t) { return nn::channel_attention(t[0], t[1], t[2], t[3], 2, t[4]); },
                 {torch::randn({2, 4, 5, 6}), torch::randn({2, 4, 5, 6}), torch::randn({2, 4, 5, 6}),
                  torch::rand({2, 1, 1}) + 0.5, torch::randn({4, 4, 1, 1})}});
  return all;
}

}  // namespace

TEST_CASE("a projection folded into channel attention equals the 1x1 convolution after it") {
  torch::manual_seed(4);
  const torch::Tensor q = torch::randn({2, 6, 5, 7}, torch::kDouble), k = torch::randn({2, 6, 5, 7}, torch::kDouble);
  const torch::Tensor v = torch::randn({2, 6, 5, 7}, torch::kDouble), t = torch::rand({3, 1, 1}, torch::kDouble) + 0.5;
  const torch::Tensor w = torch::randn({6, 6, 1, 1}, torch::kDouble);
  const torch::Tensor folded = nn::channel_attention(q, k, v, t, 3, w);
  CHECK(relative_error(folded, torch::conv2d(nn::channel_attention(q, k, v, t, 3), w)) < 1e-12);
  CHECK_THROWS_WITH_AS(nn::channel_attention(q, k, v, t, 3, torch::randn({6, 5, 1, 1}, torch::kDouble)),
                       doctest::Contains("attention projection must be 6 x 6 x 1 x 1"), c10::Error);
}

TEST_CASE("fast CPU kernels agree with the plain LibTorch ops to 1e-5 (values, first and second derivatives, float)") {
  for (const Case& c : cases()) check_agreement(c.name, c.op, c.inputs);
}

TEST_CASE("fast CPU kernels: first and second derivatives match central finite differences (double)") {
  for (const Case& c : cases()) check_derivatives(c.name, c.op, c.inputs);
}

TEST_CASE("cosine_gram clamps the norms of short rows as F.normalize does, to second order") {
  // A row of norm 4e-14 < 1e-12 (its clamped norm is constant) next to ordinary rows; finite differences
  // would cross the clamp, so the plain composition is the reference.
  torch::manual_seed(6);
  const torch::Tensor q = torch::cat({torch::randn({2, 3, 3, 40}), torch::full({2, 3, 1, 40}, 1e-14)}, 2);
  check_agreement("cosine_gram with a clamped row", cosine_gram, {q, torch::randn({2, 3, 2, 40})});
}

TEST_CASE("bmm splits long products over the summed dimension and still agrees with matmul") {
  torch::manual_seed(5);
  const torch::Tensor a = torch::randn({1, 1, 8, 20000}), b = torch::randn({1, 1, 20000, 6});
  const torch::Tensor fast = ops::bmm(a, b);
  torch::Tensor plain;
  {
    const ops::FastKernels off(false);
    plain = ops::bmm(a, b);
  }
  CHECK(relative_error(fast, plain) < 1e-5);
}

TEST_CASE("ops fall back to LibTorch for what the kernels do not cover") {
  const torch::Tensor x = torch::randn({1, 2, 4, 4}).to(torch::kBFloat16), w = torch::randn({3, 2, 1, 1}).to(torch::kBFloat16);
  const torch::Tensor y = ops::conv1x1(x, w);
  CHECK((y.scalar_type() == torch::kBFloat16));
  CHECK(relative_error(y.to(torch::kFloat), torch::conv2d(x, w).to(torch::kFloat)) == 0.0);
  CHECK(ops::fast_kernels_enabled());
  {
    const ops::FastKernels off(false);
    CHECK_FALSE(ops::fast_kernels_enabled());
  }
  CHECK(ops::fast_kernels_enabled());
}

TEST_CASE("ReFusion on the fast kernels agrees with the plain ops, forward and backward") {
  torch::manual_seed(9);
  fusion::ReFusion net;
  const torch::Tensor ir = torch::rand({2, 1, 37, 45}), vi = torch::rand({2, 1, 37, 45});
  auto run = [&](bool fast) {
    const ops::FastKernels mode(fast);
    const torch::Tensor y = net->forward(ir, vi);
    return std::make_pair(y.detach(), gradients(y.square().sum(), net->parameters()));
  };
  const auto [fast_y, fast_g] = run(true);
  const auto [plain_y, plain_g] = run(false);
  CHECK(relative_error(fast_y, plain_y) < 1e-5);
  double worst = 0;
  for (size_t i = 0; i < fast_g.size(); ++i) worst = std::max(worst, relative_error(fast_g[i], plain_g[i]));
  MESSAGE("worst relative gradient difference over ReFusion's parameters: " << worst);
  CHECK(worst < 1e-4);

  // Inference takes the fused block kernels (LayerNorm, 1x1 and depthwise convolutions in one pass).
  torch::NoGradGuard no_grad;
  CHECK(ops::inference_fusable({&ir}));
  const torch::Tensor fused = net->forward(ir, vi);
  torch::Tensor plain;
  {
    const ops::FastKernels off(false);
    plain = net->forward(ir, vi);
  }
  CHECK(relative_error(fused, plain) < 1e-5);
  // The fused kernels alone, with and without the LayerNorm: on one row, on a narrow image split into bands of
  // rows, and on one split into tiles both ways, with a last column of tiles narrower than the others.
  for (const auto& [height, width] : {std::pair<int64_t, int64_t>{1, 21}, {300, 21}, {300, 150}}) {
    for (const bool norm : {true, false}) {
      CAPTURE(height);
      CAPTURE(width);
      CAPTURE(norm);
      const torch::Tensor x = torch::randn({2, 8, height, width});
      const torch::Tensor lw = norm ? torch::rand({8}) : torch::Tensor(), lb = norm ? torch::randn({8}) : torch::Tensor();
      const torch::Tensor w_in = torch::randn({32, 8, 1, 1}) * 0.3, w_dw = torch::randn({32, 1, 3, 3}) * 0.3;
      const torch::Tensor w_out = torch::randn({8, 16, 1, 1}) * 0.3;
      const torch::Tensor block = ops::feed_forward_block(x, lw, lb, w_in, w_dw, w_out);
      const torch::Tensor qkv = ops::norm_pointwise_depthwise(x, lw, lb, w_in, w_dw);
      const ops::FastKernels off(false);
      const torch::Tensor normed = norm ? ops::channel_layer_norm(x, lw, lb) : x;
      const torch::Tensor expanded = ops::depthwise3x3(ops::conv1x1(normed, w_in), w_dw);
      CHECK(relative_error(qkv, expanded) < 1e-5);
      CHECK(relative_error(block, x + ops::conv1x1(ops::gelu_gate(expanded), w_out)) < 1e-5);
    }
  }
  // An attention's Gram matrices and norms (3 heads of q and k rows), a cross attention's, an attention's
  // output for given mixing matrices, also into channels of a larger tensor, followed by a feed-forward half in
  // the same pass (attention_feed_forward), and dense 3x3 convolutions, in float and double, with 6 channels (a
  // register block of 4 outputs and two single ones) on rows of 1 to 4 vectors and a remainder of pixels, 40
  // rows (two rows of tiles).
  for (const auto type : {torch::kFloat, torch::kDouble}) {
    for (const int64_t width : {5, 60, 150}) {
      CAPTURE(type);
      CAPTURE(width);
      const auto options = torch::TensorOptions().dtype(type);
      const torch::Tensor x = torch::randn({2, 6, 40, width}, options);
      const torch::Tensor lw = torch::rand({6}, options), lb = torch::randn({6}, options);
      const torch::Tensor w_v = torch::randn({6, 6, 1, 1}, options) * 0.3, w_dw = torch::randn({6, 1, 3, 3}, options) * 0.3;
      const torch::Tensor mixing = torch::randn({2, 6, 6}, options);
      const torch::Tensor w_qk = torch::randn({12, 6, 1, 1}, options) * 0.3, w_qk_dw = torch::randn({12, 1, 3, 3}, options) * 0.3;
      const torch::Tensor output = ops::attention_output(x, lw, lb, w_v, w_dw, mixing);
      const torch::Tensor lw2 = torch::rand({6}, options), lb2 = torch::randn({6}, options);
      const torch::Tensor w_in = torch::randn({16, 6, 1, 1}, options) * 0.3;
      const torch::Tensor w_in_dw = torch::randn({16, 1, 3, 3}, options) * 0.3;
      const torch::Tensor w_out = torch::randn({6, 8, 1, 1}, options) * 0.3;
      const torch::Tensor block =
          ops::attention_feed_forward(x, lw, lb, w_v, w_dw, mixing, lw2, lb2, w_in, w_in_dw, w_out);
      const torch::Tensor two_passes = ops::feed_forward_block(output, lw2, lb2, w_in, w_in_dw, w_out);
      CHECK_THROWS_WITH_AS(ops::attention_feed_forward(x, lw, lb, w_v, w_dw, mixing, lw2, lb2, w_in, w_in_dw,
                                                       w_out.narrow(1, 0, 7)),
                           doctest::Contains("attention_feed_forward kernel got output weight [6, 7, 1, 1] for 6 "
                                             "channels and 16 hidden ones"),
                           c10::Error);
      const std::vector<torch::Tensor> sums = ops::attention_gram(x, lw, lb, w_qk, w_qk_dw, 3);
      const torch::Tensor x2 = torch::randn_like(x), w_qk2 = torch::randn_like(w_qk) * 0.3;
      const torch::Tensor w_qk2_dw = torch::randn_like(w_qk_dw) * 0.3;
      const std::vector<torch::Tensor> cross = ops::cross_attention_gram(x, w_qk, w_qk_dw, x2, w_qk2, w_qk2_dw, 3);
      const torch::Tensor larger = torch::full({2, 10, 40, width}, std::nan(""), options);
      const torch::Tensor written = ops::attention_output(x, lw, lb, w_v, w_dw, mixing, larger.narrow(1, 3, 6));
      CHECK(written.data_ptr() == larger.narrow(1, 3, 6).data_ptr());
      CHECK(torch::equal(written, output));
      CHECK(torch::cat({larger.narrow(1, 0, 3), larger.narrow(1, 9, 1)}, 1).isnan().all().item<bool>());
      CHECK_THROWS_WITH_AS(ops::attention_output(x, lw, lb, w_v, w_dw, mixing, larger.narrow(1, 0, 5)),
                           doctest::Contains("cannot write its [2, 6, 40, "),
                           c10::Error);
      {
        const torch::AutoGradMode grad(true);  // where a gradient is wanted, no kernel may write around autograd
        CHECK_THROWS_WITH_AS(ops::attention_output(x, lw, lb, w_v, w_dw, mixing, torch::zeros_like(x).requires_grad_()),
                             doctest::Contains("cannot write into a tensor that needs a gradient"), c10::Error);
      }
      // Dense 3x3 convolutions at inference (kernels::conv3x3 under ops::conv_same), of x and of a channel split,
      // 6 -> 5 channels (a register block of 4 outputs and a single one), with a bias.
      const torch::Tensor w_conv = torch::randn({5, 6, 3, 3}, options), b_conv = torch::randn({5}, options);
      const torch::Tensor split = torch::randn({2, 10, 40, width}, options).narrow(1, 2, 6);
      const int64_t counted = nn::kernels::multiply_adds();
      const torch::Tensor conv = ops::conv_same(x, w_conv, b_conv), conv_split = ops::conv_same(split, w_conv);
      CHECK(nn::kernels::multiply_adds() - counted == 2 * (2 * 40 * width * 5 * 6 * 9));  // the kernel ran, twice
      CHECK_THROWS_WITH_AS(nn::kernels::conv3x3(x, w_conv.narrow(1, 0, 5)),
                           doctest::Contains("conv3x3 kernel got input [2, 6, 40, "), c10::Error);
      const ops::FastKernels off(false);
      const double tolerance = type == torch::kFloat ? 1e-5 : 1e-12;
      CHECK(relative_error(conv, torch::conv2d(x, w_conv, b_conv, 1, 1)) < tolerance);
      CHECK(relative_error(conv_split, torch::conv2d(split, w_conv, {}, 1, 1)) < tolerance);
      const torch::Tensor normed = ops::channel_layer_norm(x, lw, lb);
      const torch::Tensor v = ops::depthwise3x3(ops::conv1x1(normed, w_v), w_dw);
      CHECK(relative_error(output, x + torch::matmul(mixing, v.flatten(2)).view_as(x)) < tolerance);
      CHECK(relative_error(block, two_passes) < tolerance);
      const auto qk = ops::depthwise3x3(ops::conv1x1(normed, w_qk), w_qk_dw).view({2, 2, 3, 2, -1}).unbind(1);
      CHECK(relative_error(sums[0], torch::matmul(qk[0], qk[1].transpose(-1, -2))) < tolerance);
      CHECK(relative_error(sums[1], qk[0].norm(2, -1)) < tolerance);
      CHECK(relative_error(sums[2], qk[1].norm(2, -1)) < tolerance);

      const auto qk1 = ops::depthwise3x3(ops::conv1x1(x, w_qk), w_qk_dw).view({2, 2, 3, 2, -1}).unbind(1);
      const auto qk2 = ops::depthwise3x3(ops::conv1x1(x2, w_qk2), w_qk2_dw).view({2, 2, 3, 2, -1}).unbind(1);
      CHECK(relative_error(cross[0], torch::matmul(qk2[0], qk1[1].transpose(-1, -2))) < tolerance);
      CHECK(relative_error(cross[1], torch::matmul(qk1[0], qk2[1].transpose(-1, -2))) < tolerance);
      CHECK(relative_error(cross[2], qk1[0].norm(2, -1)) < tolerance);
      CHECK(relative_error(cross[3], qk1[1].norm(2, -1)) < tolerance);
      CHECK(relative_error(cross[4], qk2[0].norm(2, -1)) < tolerance);
      CHECK(relative_error(cross[5], qk2[1].norm(2, -1)) < tolerance);
    }
  }
  CHECK_THROWS_WITH_AS(ops::feed_forward_block(torch::randn({1, 8, 4, 4}), torch::rand({8}), torch::Tensor(),
                                               torch::randn({32, 8, 1, 1}), torch::randn({32, 1, 3, 3}),
                                               torch::randn({8, 16, 1, 1})),
                       doctest::Contains("both LayerNorm weights or neither"), c10::Error);
}

TEST_CASE("stream_planes copies a tile's planes into a window exactly, whatever its alignment and width") {
  namespace detail = tdfusion::nn::kernels::detail;
  auto check = [](auto zero) {
    using T = decltype(zero);
    // 2 planes of 3 rows, copied into a 2 x 5 x 64 output (and a 16-element margin) at 16 element offsets, which
    // meet every start within a 64-byte line, and at widths below, at and above one and two lines (the partial
    // lines at a row's ends are stored as usual, the whole ones non-temporally): nothing outside the window changes.
    constexpr int64_t kPlanes = 2, kRows = 3, kRow = 64, kPlane = 5 * kRow;
    for (int64_t shift = 0; shift < 16; ++shift) {
      for (const int64_t cols : {1, 7, 8, 15, 16, 17, 33, 40}) {
        CAPTURE(shift);
        CAPTURE(cols);
        std::vector<T> tile(static_cast<size_t>(kPlanes * kRows * cols)), output(kPlanes * kPlane + 16, T(-1));
        for (size_t i = 0; i < tile.size(); ++i) tile[i] = static_cast<T>(i + 1);
        T* window = output.data() + shift + kRow;  // the window starts at row 1, column `shift`
        detail::stream_planes<T>(tile.data(), kRows * cols, kPlanes, kRows, cols, {window, kPlane, kRow});
        detail::store_fence();
        int64_t wrong = 0;
        for (int64_t i = 0; i < static_cast<int64_t>(output.size()); ++i) {
          const int64_t p = i - shift - kRow, c = p / kPlane, r = p % kPlane / kRow, x = p % kRow;
          const bool inside = p >= 0 && c < kPlanes && r < kRows && x < cols;
          wrong += output[static_cast<size_t>(i)] != (inside ? tile[static_cast<size_t>((c * kRows + r) * cols + x)] : T(-1));
        }
        CHECK(wrong == 0);
      }
    }
  };
  check(float{});
  check(double{});
}

TEST_CASE("for_each_item does every item once, and a thread done with its share takes over another's rest") {
  namespace detail = tdfusion::nn::kernels::detail;
  const int threads = torch::get_num_threads();
  for (const int count : {1, 2}) {
    torch::set_num_threads(count);
    for (const int64_t items : {0, 1, 2, 3, 5, 64, 1001}) {
      CAPTURE(count);
      CAPTURE(items);
      std::vector<std::atomic<int>> done(static_cast<size_t>(items));
      std::atomic<int64_t> shares{0};
      detail::for_each_item(items, [&](const auto& next) {
        ++shares;
        for (int64_t item = 0; next(item);) ++done[static_cast<size_t>(item)];
      });
      CHECK(std::all_of(done.begin(), done.end(), [](const std::atomic<int>& d) { return d == 1; }));
      CHECK(shares == std::max<int64_t>(1, std::min<int64_t>(count, items)));
    }
  }
  // Two shares of 10 items, [0, 5) and [5, 10): item 0 holds its thread until the other nine are done, which
  // the other thread can only do by taking items 4, 3, 2, 1 from the back of the first share.
  torch::set_num_threads(2);
  std::vector<std::thread::id> by(10);
  std::atomic<int> finished{0};
  detail::for_each_item(10, [&](const auto& next) {
    for (int64_t item = 0; next(item);) {
      by[static_cast<size_t>(item)] = std::this_thread::get_id();
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (item == 0 && finished < 9 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
      ++finished;
    }
  });
  CHECK(std::count(by.begin(), by.end(), by[0]) == 1);
  CHECK(std::count(by.begin(), by.end(), by[1]) == 9);
  // Inside a parallel region (a kernel called per tile of a tiled fusion) one share does all items, in order.
  std::vector<std::vector<int64_t>> orders(2);
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      detail::for_each_item(5, [&](const auto& next) {
        orders[static_cast<size_t>(i)].push_back(-1);  // one per share
        for (int64_t item = 0; next(item);) orders[static_cast<size_t>(i)].push_back(item);
      });
    }
  });
  torch::set_num_threads(threads);
  for (const auto& order : orders) CHECK(order == std::vector<int64_t>{-1, 0, 1, 2, 3, 4});
}

TEST_CASE("reuse_freed_memory's region hands out best-fit blocks, coalesces freed ones and keeps them") {
  using tdfusion::detail::BlockRegion;
  const size_t mb = BlockRegion::kMinBytes;
  BlockRegion region(16 * mb);
  char* a = static_cast<char*>(region.allocate(mb));
  char* b = static_cast<char*>(region.allocate(3 * mb));
  char* c = static_cast<char*>(region.allocate(mb + 1));  // rounded up to whole pages
  REQUIRE((a != nullptr && b != nullptr && c != nullptr));
  CHECK(b == a + mb);
  CHECK(c == b + 3 * mb);
  CHECK(region.high_water() == 5 * mb + BlockRegion::kGranule);
  CHECK(region.release(b));
  CHECK(static_cast<char*>(region.allocate(2 * mb)) == b);  // the freed block rather than new space
  CHECK(static_cast<char*>(region.allocate(mb)) == b + 2 * mb);
  CHECK(region.high_water() == 5 * mb + BlockRegion::kGranule);
  int outside = 0;
  CHECK_FALSE(region.release(&outside));
  CHECK_FALSE(region.release(a + BlockRegion::kGranule));  // inside a block, not one
  // Freed in an order that leaves holes first: once all are back they are one block again.
  for (char* block : {b, c, a, b + 2 * mb}) CHECK(region.release(block));
  CHECK(static_cast<char*>(region.allocate(16 * mb)) == a);
  CHECK(region.allocate(mb) == nullptr);  // full
  CHECK(region.release(a));
  CHECK(region.allocate(17 * mb) == nullptr);
}

TEST_CASE("reuse_freed_memory's region makes a block's fresh pages resident before they are written") {
  using tdfusion::detail::BlockRegion;
  const size_t mb = BlockRegion::kMinBytes, page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  // Whether this kernel populates on request (Linux 5.14+), asked of a page of its own.
  void* probe = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(probe != MAP_FAILED);
#ifdef MADV_POPULATE_WRITE
  const bool populates = madvise(probe, page, MADV_POPULATE_WRITE) == 0;
#else
  const bool populates = false;
#endif
  munmap(probe, page);
  if (!populates) {
    MESSAGE("skipped: this kernel does not populate pages on request (MADV_POPULATE_WRITE, Linux 5.14+)");
    return;
  }
  const auto resident_pages = [page](const char* block, size_t bytes) {
    std::vector<unsigned char> status(bytes / page);
    REQUIRE(mincore(const_cast<char*>(block), bytes, status.data()) == 0);
    return std::count_if(status.begin(), status.end(), [](unsigned char s) { return (s & 1) != 0; });
  };
  BlockRegion region(64 * mb);
  char* a = static_cast<char*>(region.allocate(8 * mb));
  REQUIRE(a != nullptr);
  CHECK(resident_pages(a, 8 * mb) == static_cast<std::ptrdiff_t>(8 * mb / page));
  CHECK(resident_pages(a + 8 * mb, 8 * mb) == 0);  // beyond the block: reserved only
  // A larger block extends the freed one at the top; its new stretch is resident too.
  CHECK(region.release(a));
  char* b = static_cast<char*>(region.allocate(12 * mb));
  REQUIRE(b == a);
  CHECK(resident_pages(b, 12 * mb) == static_cast<std::ptrdiff_t>(12 * mb / page));
  CHECK(resident_pages(b + 12 * mb, 4 * mb) == 0);
}

TEST_CASE("reuse_freed_memory's allocator serves large tensors from its region, again and again, small ones as before") {
  tdfusion::detail::ReusingCpuAllocator allocator;
  const size_t large = 8 * tdfusion::detail::BlockRegion::kMinBytes;
  void* first = nullptr;
  {
    const c10::DataPtr block = allocator.allocate(large);
    first = block.get();
    CHECK((block.get_deleter() == allocator.raw_deleter()));
    std::memset(block.get(), 1, large);
  }
  const size_t high_water = allocator.region().high_water();
  const c10::DataPtr again = allocator.allocate(large);
  CHECK(again.get() == first);
  CHECK(allocator.region().high_water() == high_water);
  const c10::DataPtr small = allocator.allocate(1000);
  CHECK((small.get_deleter() == c10::GetDefaultCPUAllocator()->raw_deleter()));
  // The raw interface (LibTorch's oneDNN convolutions use it) for both kinds.
  for (const size_t bytes : {size_t{1000}, large}) {
    void* raw = allocator.raw_allocate(bytes);
    REQUIRE(raw != nullptr);
    allocator.raw_deallocate(raw);
  }
}

#pragma once
// The building blocks' operations with a fast CPU path: each is the plain LibTorch composition on other
// devices (CUDA keeps LibTorch's kernels) and, on CPU float / double tensors, a custom autograd function
// around the kernels of cpu.hpp. The meta step differentiates through a gradient, so every function here is
// differentiable to any order:
//   linear ops (bmm, depthwise3x3, conv_same) write their backward with the same fast ops (the weight gradient
//   of a convolution is itself a differentiable op whose backward is again made of convolutions);
//   channel_layer_norm uses a fused kernel for an ordinary backward pass and, when the backward pass itself is
//   recorded (create_graph, as in the meta step's inner step), differentiable LibTorch ops for the same
//   gradient; gelu_gate's recorded backward is itself a function of that kind (a fused kernel for the meta
//   step's outer pass, differentiable ops for a third derivative).
// For inference (no gradient wanted) a transformer block runs two fused kernels instead, over cache-sized tiles
// processed in parallel: the attention's Gram matrices from LayerNorm + 1x1 + depthwise convolution (q and k
// never stored), then its output with the residual (v never stored) and the whole feed-forward half. Dense
// convolutions keep LibTorch's oneDNN kernels, which outran an im2col + Eigen GEMM version here (see README,
// Performance); conv_same only rewrites their recorded backward (an ordinary one stays LibTorch's), because
// LibTorch 1.13 differentiates a convolution's gradient through a transposed convolution that runs as a
// single-threaded im2col + netlib GEMM.
// FastKernels(false) switches the fast path off (for comparisons: the tests and benchmarks measure against it).

#include "tdfusion/nn/kernels/cpu.hpp"

#include <torch/torch.h>

#include <atomic>
#include <initializer_list>

namespace tdfusion::nn::ops {

namespace detail {
inline std::atomic<bool>& fast_kernels_flag() {
  static std::atomic<bool> enabled{true};
  return enabled;
}
}  // namespace detail

/// Whether the fast CPU kernels are in use (on by default).
inline bool fast_kernels_enabled() { return detail::fast_kernels_flag().load(); }

/// Switches the fast CPU kernels on or off for a scope (process-wide), then restores the previous setting.
class FastKernels {
 public:
  explicit FastKernels(bool enabled) : previous_(detail::fast_kernels_flag().exchange(enabled)) {}
  ~FastKernels() { detail::fast_kernels_flag() = previous_; }
  FastKernels(const FastKernels&) = delete;
  FastKernels& operator=(const FastKernels&) = delete;

 private:
  bool previous_;
};

namespace detail {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// The fast path applies to defined CPU tensors of one floating type (float or double).
inline bool fast(std::initializer_list<const torch::Tensor*> tensors) {
  if (!fast_kernels_enabled()) return false;
  const torch::Tensor& first = **tensors.begin();
  const auto type = first.scalar_type();
  if (type != torch::kFloat && type != torch::kDouble) return false;
  for (const torch::Tensor* t : tensors) {
    if (!t->defined() || !t->device().is_cpu() || t->scalar_type() != type || t->is_sparse()) return false;
  }
  return true;
}

inline torch::Tensor flipped(const torch::Tensor& w) { return w.flip({2, 3}); }

inline constexpr double kNormEps = 1e-12;  ///< F.normalize's: norms below it are clamped to it

}  // namespace detail

inline torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b);
inline torch::Tensor normalised_gram(const torch::Tensor& gram, const torch::Tensor& q_norm, const torch::Tensor& k_norm);
inline torch::Tensor depthwise3x3(const torch::Tensor& x, const torch::Tensor& w);
inline torch::Tensor conv_same(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b = {});

namespace detail {

inline torch::Tensor readable(const torch::Tensor& t) { return kernels::bmm_readable(t) ? t : t.contiguous(); }

struct BmmFunction : torch::autograd::Function<BmmFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b) {
    ctx->save_for_backward({a, b});
    return kernels::bmm(readable(a), readable(b));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& a = saved[0];
    const torch::Tensor& b = saved[1];
    torch::Tensor da, db;
    if (ctx->needs_input_grad(0)) da = ops::bmm(grads[0], b.transpose(-1, -2));
    if (ctx->needs_input_grad(1)) db = ops::bmm(a.transpose(-1, -2), grads[0]);
    return {da, db};
  }
};

/// G = normalised_gram(q k^T, |q|, |k|) over rows of length P (q: B1 x B2 x d x P, k: B1 x B2 x d' x P). Its
/// ordinary backward writes dq = c q + dS k, with dS = dG / (|q| |k|^T) and c = -rowsum(dG G) / |q|^2 (0 where
/// |q| <= eps: the clamped norm is constant there), the product added onto c q in place (dk alike): two passes
/// over the long rows per gradient, where the plain composition (a product's and a norm's backward, then their
/// sum) takes five.
struct CosineGramFunction : torch::autograd::Function<CosineGramFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k) {
    const torch::Tensor q_norm = q.norm(2, {-1}), k_norm = k.norm(2, {-1});
    const torch::Tensor g = ops::normalised_gram(kernels::bmm(readable(q), readable(k).transpose(-1, -2)), q_norm, k_norm);
    ctx->save_for_backward({q, k, g});  // g as a saved output: kept in saved_data, it would hold its own node
    ctx->saved_data["q_norm"] = q_norm;
    ctx->saved_data["k_norm"] = k_norm;
    return g;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &q = saved[0], &k = saved[1], &dg = grads[0];
    if (!torch::GradMode::is_enabled()) {
      return gradient(dg, saved[2], ctx->saved_data["q_norm"].toTensor(),
                      ctx->saved_data["k_norm"].toTensor(), q, k, /*recorded=*/false);
    }
    // Recorded: G and the norms again from differentiable ops, so that the gradient's own derivative exists.
    const torch::Tensor q_norm = q.norm(2, {-1}), k_norm = k.norm(2, {-1});
    const torch::Tensor g = ops::normalised_gram(ops::bmm(q, k.transpose(-1, -2)), q_norm, k_norm);
    return gradient(dg, g, q_norm, k_norm, q, k, /*recorded=*/true);
  }

 private:
  /// (dq, dk); recorded: from differentiable ops, otherwise by the in-place kernel.
  static variable_list gradient(const torch::Tensor& dg, const torch::Tensor& g, const torch::Tensor& q_norm,
                                const torch::Tensor& k_norm, const torch::Tensor& q, const torch::Tensor& k,
                                bool recorded) {
    const torch::Tensor ds = normalised_gram(dg, q_norm, k_norm), dgg = dg * g;
    auto coefficient = [](const torch::Tensor& sums, const torch::Tensor& norm) {
      return (-sums / norm.clamp_min(kNormEps).square() * (norm > kNormEps)).unsqueeze(-1);
    };
    const torch::Tensor cq = coefficient(dgg.sum(-1), q_norm), ck = coefficient(dgg.sum(-2), k_norm);
    if (recorded) return {cq * q + ops::bmm(ds, k), ck * k + ops::bmm(ds.transpose(-1, -2), q)};
    torch::Tensor dq = (cq * q).contiguous(), dk = (ck * k).contiguous();
    kernels::bmm_accumulate(dq, ds, readable(k));
    kernels::bmm_accumulate(dk, ds.transpose(-1, -2), readable(q));
    return {dq, dk};
  }
};

struct DepthwiseWeightGradFunction : torch::autograd::Function<DepthwiseWeightGradFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& dy, const torch::Tensor& x) {
    ctx->save_for_backward({dy, x});
    return kernels::depthwise3x3_weight_grad(dy, x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& g = grads[0];
    torch::Tensor ddy, dx;
    if (ctx->needs_input_grad(0)) ddy = ops::depthwise3x3(saved[1], g);
    if (ctx->needs_input_grad(1)) dx = ops::depthwise3x3(saved[0], flipped(g));
    return {ddy, dx};
  }
};

struct DepthwiseFunction : torch::autograd::Function<DepthwiseFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w) {
    ctx->save_for_backward({x, w});
    return kernels::depthwise3x3(x, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    torch::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = ops::depthwise3x3(grads[0], flipped(saved[1]));
    if (ctx->needs_input_grad(1)) dw = DepthwiseWeightGradFunction::apply(grads[0], saved[0]);
    return {dx, dw};
  }
};

/// dL/dx of y = conv_same(x, w) given dy: the convolution of dy with the transposed, flipped kernel.
inline torch::Tensor conv_same_input_grad(const torch::Tensor& dy, const torch::Tensor& w) {
  return ops::conv_same(dy, flipped(w.transpose(0, 1)));
}

/// dL/dw of y = conv_same(x, w) given dy (the correlation of x with dy), by LibTorch's weight-gradient kernel.
struct ConvWeightGradFunction : torch::autograd::Function<ConvWeightGradFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& dy, const torch::Tensor& x, int64_t kernel) {
    ctx->save_for_backward({dy, x});
    const torch::Tensor weight_shape = torch::empty({dy.size(1), x.size(1), kernel, kernel}, x.options());
    const int64_t pad = kernel / 2;
    return std::get<1>(at::convolution_backward(dy, x, weight_shape, c10::nullopt, {1, 1}, {pad, pad}, {1, 1},
                                                /*transposed=*/false, {0, 0}, /*groups=*/1, {false, true, false}));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& g = grads[0];
    torch::Tensor ddy, dx;
    if (ctx->needs_input_grad(0)) ddy = ops::conv_same(saved[1], g);
    if (ctx->needs_input_grad(1)) dx = conv_same_input_grad(saved[0], g);
    return {ddy, dx, torch::Tensor()};
  }
};

struct ConvFunction : torch::autograd::Function<ConvFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w) {
    ctx->save_for_backward({x, w});
    return torch::conv2d(x, w, {}, /*stride=*/1, /*padding=*/w.size(2) / 2);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w = saved[1];
    if (!torch::GradMode::is_enabled()) {  // an ordinary backward pass: LibTorch's gradient kernels, in one call
      const int64_t pad = w.size(2) / 2;
      auto [dx, dw, db] = at::convolution_backward(grads[0], x, w, c10::nullopt, {1, 1}, {pad, pad}, {1, 1},
                                                   /*transposed=*/false, {0, 0}, /*groups=*/1,
                                                   {ctx->needs_input_grad(0), ctx->needs_input_grad(1), false});
      return {dx, dw};
    }
    torch::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = conv_same_input_grad(grads[0], w);
    if (ctx->needs_input_grad(1)) dw = ConvWeightGradFunction::apply(grads[0], x, w.size(2));
    return {dx, dw};
  }
};

/// The plain LibTorch channel LayerNorm (biased variance), the reference of the fast kernel.
inline torch::Tensor plain_layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                      double eps) {
  const torch::Tensor centred = x - x.mean(1, /*keepdim=*/true);
  const torch::Tensor var = centred.pow(2).mean(1, /*keepdim=*/true);
  return centred * torch::rsqrt(var + eps) * w.view({1, -1, 1, 1}) + b.view({1, -1, 1, 1});
}

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& b, double eps) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["eps"] = eps;
    return kernels::channel_layer_norm(x, w, b, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w = saved[1], &g = grads[0];
    const double eps = ctx->saved_data["eps"].toDouble();
    if (!torch::GradMode::is_enabled()) {
      std::vector<torch::Tensor> d = kernels::channel_layer_norm_backward(g, x, w, eps);
      return {d[0], d[1], d[2], torch::Tensor()};
    }
    // The backward pass is being recorded: the same gradient from differentiable ops.
    const torch::Tensor centred = x - x.mean(1, true);
    const torch::Tensor rstd = torch::rsqrt(centred.pow(2).mean(1, true) + eps);
    const torch::Tensor xhat = centred * rstd;
    const torch::Tensor gxhat = g * w.view({1, -1, 1, 1});
    const torch::Tensor dx = rstd * (gxhat - gxhat.mean(1, true) - xhat * (gxhat * xhat).mean(1, true));
    return {dx, (g * xhat).sum({0, 2, 3}), g.sum({0, 2, 3}), torch::Tensor()};
  }
};

/// dx = [dy b gelu'(a); dy gelu(a)], the gradient of y = gelu(a) * b for x = [a; b]: gelu_gate's recorded
/// backward as one function, whose own backward is one fused kernel (LibTorch's GELU derivatives computed erf
/// several times over).
struct GeluGateBackwardFunction : torch::autograd::Function<GeluGateBackwardFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& dy, const torch::Tensor& x) {
    ctx->save_for_backward({dy, x});
    return kernels::gelu_gate_backward(dy, x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &g = saved[0], &x = saved[1], &gdx = grads[0];
    if (!torch::GradMode::is_enabled()) return kernels::gelu_gate_double_backward(gdx, g, x);
    // Recorded: the same gradient from differentiable ops.
    const auto ab = x.chunk(2, 1), gd = gdx.chunk(2, 1);
    const torch::Tensor &a = ab[0], &b = ab[1], &gda = gd[0], &gdb = gd[1];
    const torch::Tensor cdf = 0.5 * (1 + torch::erf(a * M_SQRT1_2));
    const torch::Tensor pdf = 0.3989422804014327 * torch::exp(-0.5 * a.square());
    const torch::Tensor slope = cdf + a * pdf, gda_gate = gda * b;
    return {gda_gate * slope + gdb * a * cdf,
            torch::cat({g * (gda_gate * pdf * (2 - a.square()) + gdb * slope), gda * g * slope}, 1)};
  }
};

struct GeluGateFunction : torch::autograd::Function<GeluGateFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
    return kernels::gelu_gate(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const torch::Tensor x = ctx->get_saved_variables()[0];
    if (!torch::GradMode::is_enabled()) return {kernels::gelu_gate_backward(grads[0], x)};
    return {GeluGateBackwardFunction::apply(grads[0], x)};
  }
};

}  // namespace detail

/// a B1 x B2 x M x K times b B1 x B2 x K x N (batch dimensions broadcast as in torch::matmul when given by expand).
inline torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.dim() == 4 && b.dim() == 4 && detail::fast({&a, &b})) return detail::BmmFunction::apply(a, b);
  return torch::matmul(a, b);
}

/// gram / (max(|q|, eps) max(|k|, eps)^T), eps = 1e-12 as in F.normalize: the Gram matrix of L2-normalised rows
/// from the raw rows' Gram matrix (... x d x d') and norms (... x d and ... x d').
inline torch::Tensor normalised_gram(const torch::Tensor& gram, const torch::Tensor& q_norm, const torch::Tensor& k_norm) {
  return gram / (q_norm.clamp_min(detail::kNormEps).unsqueeze(-1) * k_norm.clamp_min(detail::kNormEps).unsqueeze(-2));
}

/// normalise(q) normalise(k)^T for q B1 x B2 x d x P, k B1 x B2 x d' x P (rows L2-normalised along P, as by
/// F.normalize), without forming the long normalised rows.
inline torch::Tensor cosine_gram(const torch::Tensor& q, const torch::Tensor& k) {
  if (q.dim() == 4 && k.dim() == 4 && detail::fast({&q, &k})) return detail::CosineGramFunction::apply(q, k);
  return normalised_gram(torch::matmul(q, k.transpose(-1, -2)), q.norm(2, {-1}), k.norm(2, {-1}));
}

/// 1x1 convolution without bias: x N x I x H x W, w O x I x 1 x 1.
inline torch::Tensor conv1x1(const torch::Tensor& x, const torch::Tensor& w) {
  if (!detail::fast({&x, &w})) return torch::conv2d(x, w);
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const torch::Tensor weight = w.reshape({1, 1, out, in}).expand({n, 1, out, in});
  return ops::bmm(weight, x.reshape({n, 1, in, x.size(2) * x.size(3)})).view({n, out, x.size(2), x.size(3)});
}

/// Depthwise 3x3 convolution, stride 1, zero padding 1, without bias: w C x 1 x 3 x 3.
inline torch::Tensor depthwise3x3(const torch::Tensor& x, const torch::Tensor& w) {
  if (!detail::fast({&x, &w})) return torch::conv2d(x, w, {}, 1, 1, /*dilation=*/1, /*groups=*/x.size(1));
  return detail::DepthwiseFunction::apply(x, w);
}

/// Per-pixel LayerNorm over the channels of N x C x H x W (biased variance): weight and bias of size C.
inline torch::Tensor channel_layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                        double eps = 1e-5) {
  if (!detail::fast({&x, &w, &b})) return detail::plain_layer_norm(x, w, b, eps);
  return detail::LayerNormFunction::apply(x, w, b, eps);
}

/// Whether `tensors` may take the fused inference kernels: the fast CPU path, and no gradient wanted.
inline bool inference_fusable(std::initializer_list<const torch::Tensor*> tensors) {
  if (!detail::fast(tensors)) return false;
  if (!torch::GradMode::is_enabled()) return true;
  for (const torch::Tensor* t : tensors) {
    if (t->requires_grad()) return false;
  }
  return true;
}

/// Dense convolution, stride 1, "same" zero padding, optional bias b: w O x I x k x k, k odd.
inline torch::Tensor conv_same(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  if (inference_fusable({&x, &w}) && x.dim() == 4 && w.dim() == 4 && w.size(2) == 3) {
    const torch::Tensor y = kernels::conv3x3(x, w);
    return b.defined() ? y + b.view({1, -1, 1, 1}) : y;
  }
  if (!detail::fast({&x, &w}) || inference_fusable({&x, &w})) {
    return torch::conv2d(x, w, b, /*stride=*/1, /*padding=*/w.size(2) / 2);
  }
  const torch::Tensor y = detail::ConvFunction::apply(x, w);
  return b.defined() ? y + b.view({1, -1, 1, 1}) : y;
}

namespace detail {

/// Checks that a fused block kernel may run: the input and weights, and the LayerNorm's unless undefined (no
/// LayerNorm), satisfy inference_fusable.
inline void check_fusable(const char* kernel, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                          std::initializer_list<const torch::Tensor*> tensors) {
  const torch::Tensor& x = **tensors.begin();
  TORCH_CHECK(ln_w.defined() == ln_b.defined(), "tdfusion: ", kernel, " needs both LayerNorm weights or neither");
  TORCH_CHECK(inference_fusable(tensors) && (!ln_w.defined() || inference_fusable({&x, &ln_w, &ln_b})), "tdfusion: ",
              kernel, " is for inference on CPU float or double tensors");
}

}  // namespace detail

/// x + W_out (gelu(a) * b), [a; b] = dwconv3x3(W_in LN(x)): the feed-forward half of a Restormer block in one
/// pass (kernels::feed_forward_block; undefined ln_w and ln_b: no LayerNorm). Only where inference_fusable holds.
inline torch::Tensor feed_forward_block(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                        const torch::Tensor& w_in, const torch::Tensor& w_dw, const torch::Tensor& w_out,
                                        double eps = 1e-5) {
  detail::check_fusable("feed_forward_block", ln_w, ln_b, {&x, &w_in, &w_dw, &w_out});
  return kernels::feed_forward_block(x, ln_w, ln_b, w_in, w_dw, w_out, eps);
}

/// {gram, |q|, |k|} of a Restormer attention's q and k = the channel halves of dwconv3x3(W_qk LN(x)), per head
/// (kernels::attention_gram; undefined ln_w and ln_b: no LayerNorm): what nn::attention_matrix needs, without
/// q and k ever stored. Only where inference_fusable holds.
inline std::vector<torch::Tensor> attention_gram(const torch::Tensor& x, const torch::Tensor& ln_w,
                                                 const torch::Tensor& ln_b, const torch::Tensor& w_qk,
                                                 const torch::Tensor& w_dw, int64_t heads, double eps = 1e-5) {
  detail::check_fusable("attention_gram", ln_w, ln_b, {&x, &w_qk, &w_dw});
  return kernels::attention_gram(x, ln_w, ln_b, w_qk, w_dw, heads, eps);
}

/// {q_2 k_1^T, q_1 k_2^T, |q_1|, |k_1|, |q_2|, |k_2|} per head of a cross attention between x1 and x2 whose q_i
/// and k_i are the channel halves of dwconv3x3(W_qk_i x_i) (kernels::cross_attention_gram): what the two
/// attention matrices of ReFusion's fusion module need, in one pass, without q and k ever stored. Only where
/// inference_fusable holds.
inline std::vector<torch::Tensor> cross_attention_gram(const torch::Tensor& x1, const torch::Tensor& w_qk1,
                                                       const torch::Tensor& w_dw1, const torch::Tensor& x2,
                                                       const torch::Tensor& w_qk2, const torch::Tensor& w_dw2,
                                                       int64_t heads) {
  const torch::Tensor none;
  detail::check_fusable("cross_attention_gram", none, none, {&x1, &w_qk1, &w_dw1, &x2, &w_qk2, &w_dw2});
  return kernels::cross_attention_gram(x1, w_qk1, w_dw1, x2, w_qk2, w_dw2, heads);
}

/// x + M_n dwconv3x3(W_v LN(x)): a Restormer attention's output with its residual, for image n's mixing matrix
/// M_n (nn::attention_mixing), in one pass (kernels::attention_output; undefined ln_w and ln_b: no LayerNorm),
/// into `out` where it is given (channels of a larger tensor, say). Only where inference_fusable holds.
inline torch::Tensor attention_output(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                      const torch::Tensor& w_v, const torch::Tensor& w_dw, const torch::Tensor& mixing,
                                      const torch::Tensor& out = {}, double eps = 1e-5) {
  detail::check_fusable("attention_output", ln_w, ln_b, {&x, &w_v, &w_dw, &mixing});
  TORCH_CHECK(!out.defined() || inference_fusable({&x, &out}), "tdfusion: attention_output cannot write into a "
              "tensor that needs a gradient, or of another type or device than its input");
  return kernels::attention_output(x, ln_w, ln_b, w_v, w_dw, mixing, eps, out);
}

/// feed_forward_block(attention_output(x, ln1_w, ln1_b, w_v, w_dv, mixing), ln2_w, ln2_b, w_in, w_dw, w_out): a
/// Restormer block once its attention matrices are known, in one pass that never stores the attention's output
/// (kernels::attention_feed_forward). Only where inference_fusable holds.
inline torch::Tensor attention_feed_forward(const torch::Tensor& x, const torch::Tensor& ln1_w,
                                            const torch::Tensor& ln1_b, const torch::Tensor& w_v,
                                            const torch::Tensor& w_dv, const torch::Tensor& mixing,
                                            const torch::Tensor& ln2_w, const torch::Tensor& ln2_b,
                                            const torch::Tensor& w_in, const torch::Tensor& w_dw,
                                            const torch::Tensor& w_out, double eps = 1e-5) {
  detail::check_fusable("attention_feed_forward", ln1_w, ln1_b, {&x, &w_v, &w_dv, &mixing});
  detail::check_fusable("attention_feed_forward", ln2_w, ln2_b, {&x, &w_in, &w_dw, &w_out});
  return kernels::attention_feed_forward(x, ln1_w, ln1_b, w_v, w_dv, mixing, ln2_w, ln2_b, w_in, w_dw, w_out, eps);
}

/// dwconv3x3(W_in LN(x)): a Restormer attention's q, k, v in one pass (kernels::norm_pointwise_depthwise;
/// undefined ln_w and ln_b: no LayerNorm). Only where inference_fusable holds.
inline torch::Tensor norm_pointwise_depthwise(const torch::Tensor& x, const torch::Tensor& ln_w,
                                              const torch::Tensor& ln_b, const torch::Tensor& w_in,
                                              const torch::Tensor& w_dw, double eps = 1e-5) {
  detail::check_fusable("norm_pointwise_depthwise", ln_w, ln_b, {&x, &w_in, &w_dw});
  return kernels::norm_pointwise_depthwise(x, ln_w, ln_b, w_in, w_dw, eps);
}

/// gelu(a) * b with the exact (erf) GELU for the channel halves [a; b] of x (N x 2C x H x W): a gated
/// feed-forward's gate. One tensor rather than two, so that the gradient is one tensor too (a channel split's
/// backward would copy the halves' gradients together).
inline torch::Tensor gelu_gate(const torch::Tensor& x) {
  if (x.dim() != 4 || x.size(1) % 2 != 0 || !detail::fast({&x})) {
    const auto ab = x.chunk(2, 1);
    return torch::gelu(ab[0]) * ab[1];
  }
  return detail::GeluGateFunction::apply(x);
}

}  // namespace tdfusion::nn::ops

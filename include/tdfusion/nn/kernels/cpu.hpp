#pragma once
// CPU kernels of the building blocks that dominate the fusion, loss-generation and task networks, written with
// Eigen (its GEMM and vectorised array expressions) and run on LibTorch's intra-op thread pool (at::parallel_for,
// so torch::set_num_threads governs them and nested calls run serially). They compute values only; ops.hpp wraps
// them in autograd functions. Every kernel takes and returns plain NCHW tensors of float or double.
//
//   bmm                  C[i, j] = A[i, j] B[i, j] over two batch dimensions; operands row- or column-major
//                        (1x1 convolutions, channel attention and their gradients); bmm_accumulate: C += A B
//   depthwise3x3         depthwise 3x3 convolution, stride 1, zero padding 1 (vectorised rows)
//   depthwise3x3_weight_grad  its weight gradient sum_n,p dy[c, p] x[c, p + k]
//   channel_layer_norm   per-pixel LayerNorm over channels (biased variance), and its first-order backward
//   gelu_gate            gelu(a) * b with the exact (erf) GELU for the channel halves [a; b] of one tensor, its
//                        backward and the backward of that
//   norm_pointwise_depthwise  dwconv3x3(W LN(x)), a Restormer attention's q, k, v, in one pass (inference only)
//   conv3x3              dense 3x3 convolution, stride 1, zero padding 1, over cache-sized tiles (inference only)
//   feed_forward_block   x + GDFN(LN(x)) of a Restormer block in one pass over cache-sized tiles (inference only)
//   attention_gram       the Gram matrices and row norms of an attention's q and k = dwconv3x3(W_qk LN(x)), likewise;
//                        cross_attention_gram: those of both attentions of a cross attention between two inputs
//   attention_output     x + M dwconv3x3(W_v LN(x)), an attention's output for given matrices M, likewise
//                        (all four also without the LayerNorm, as in ReFusion's fusion module)
//   attention_feed_forward  attention_output then feed_forward_block in one pass: a Restormer block once its
//                        attention matrices are known, the attention's output never stored
//
// Reductions over pixels accumulate over at most a few rows in the tensor's type and beyond that in double.

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/torch.h>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace tdfusion::nn::kernels {

/// Multiply-adds done by the convolution and matrix kernels in this process (elementwise kernels are not
/// counted; the all-zero weight blocks a fused kernel skips are): what the benchmarks divide by time to report
/// GFLOP/s (2 FLOP per multiply-add).
inline std::atomic<int64_t>& multiply_adds() {
  static std::atomic<int64_t> count{0};
  return count;
}

namespace detail {

template <class T>
using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Array = Eigen::Array<T, Eigen::Dynamic, 1>;

/// Pixels (or output columns) per work item: large enough to amortise scheduling and keep GEMM panels
/// efficient, small enough to spread the work over all threads.
inline int64_t chunk_size(int64_t total, int64_t items, int64_t minimum) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = std::max<int64_t>(1, 4 * threads / std::max<int64_t>(1, items));
  return std::max(minimum, (total + wanted - 1) / wanted);
}

/// Whether each of the N images of an N x C x H x W tensor is one contiguous block (the batch stride may be
/// anything, as for the halves of a channel split).
inline bool block_contiguous(const torch::Tensor& t) {
  if (t.dim() != 4) return false;
  const int64_t h = t.size(2), w = t.size(3);
  return (t.stride(3) == 1 || w == 1) && (t.stride(2) == w || h == 1) && (t.stride(1) == h * w || t.size(1) == 1);
}

/// A new contiguous tensor of x's shape and type: what the kernels write their results into.
inline torch::Tensor new_like(const torch::Tensor& x) {
  return torch::empty(x.sizes(), x.options().memory_format(torch::MemoryFormat::Contiguous));
}

/// Calls fn with an Eigen map of the rows x cols matrix at `data` whose elements lie at r * row_stride +
/// c * col_stride, one of the strides being 1 (or its dimension 1): row-major or column-major.
template <class T, class Fn>
void with_matrix(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, const Fn& fn) {
  using Eigen::OuterStride;
  if (col_stride == 1 || cols == 1) {
    const int64_t outer = rows == 1 ? cols : row_stride;
    fn(Eigen::Map<const RowMatrix<T>, 0, OuterStride<>>(data, rows, cols, OuterStride<>(outer)));
  } else {
    const int64_t outer = cols == 1 ? rows : col_stride;
    fn(Eigen::Map<const ColMatrix<T>, 0, OuterStride<>>(data, rows, cols, OuterStride<>(outer)));
  }
}

inline bool matrix_layout_ok(const torch::Tensor& t) {
  return t.dim() == 4 && (t.stride(3) == 1 || t.stride(2) == 1 || t.size(3) == 1 || t.size(2) == 1);
}

}  // namespace detail

/// Whether bmm can read `t` (4-D, each matrix row- or column-major; other tensors need .contiguous()).
inline bool bmm_readable(const torch::Tensor& t) { return detail::matrix_layout_ok(t); }

namespace detail {

/// c = a b, or c += a b when `accumulate` (c contiguous B1 x B2 x M x N; see bmm).
inline void bmm_into(torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b, bool accumulate) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4 && a.size(0) == b.size(0) && a.size(1) == b.size(1) && a.size(3) == b.size(2),
              "tdfusion: bmm kernel got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(bmm_readable(a) && bmm_readable(b), "tdfusion: bmm kernel needs row- or column-major matrices");
  const int64_t b1 = a.size(0), b2 = a.size(1), m = a.size(2), k = a.size(3), n = b.size(3);
  TORCH_CHECK(c.is_contiguous() && c.sizes() == torch::IntArrayRef({b1, b2, m, n}) &&
                  c.scalar_type() == a.scalar_type(),
              "tdfusion: bmm kernel cannot write its ", b1, " x ", b2, " x ", m, " x ", n, " product into ", c.sizes());
  multiply_adds() += b1 * b2 * m * n * k;
  if (c.numel() == 0 || k == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tdfusion_bmm", [&] {
    using T = scalar_t;
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    T* pc = c.data_ptr<T>();
    const int64_t batches = b1 * b2;
    auto a_at = [&](int64_t i) { return pa + (i / b2) * a.stride(0) + (i % b2) * a.stride(1); };
    auto b_at = [&](int64_t i) { return pb + (i / b2) * b.stride(0) + (i % b2) * b.stride(1); };
    // c[i][:, j0:j1] (+)= a[i][:, k0:k1] b[i][k0:k1, j0:j1]
    auto product = [&](int64_t i, int64_t j0, int64_t j1, int64_t k0, int64_t k1, T* out, int64_t out_stride) {
      Eigen::Map<detail::RowMatrix<T>, 0, Eigen::OuterStride<>> dst(out, m, j1 - j0, Eigen::OuterStride<>(out_stride));
      detail::with_matrix(a_at(i) + k0 * a.stride(3), m, k1 - k0, a.stride(2), a.stride(3), [&](const auto& lhs) {
        detail::with_matrix(b_at(i) + k0 * b.stride(2) + j0 * b.stride(3), k1 - k0, j1 - j0, b.stride(2), b.stride(3),
                            [&](const auto& rhs) {
                              if (accumulate) {
                                dst.noalias() += lhs * rhs;
                              } else {
                                dst.noalias() = lhs * rhs;
                              }
                            });
      });
    };
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const bool split_k = batches * ((n + 255) / 256) < 2 * threads && k >= 4096 && m * n <= 256 * 256;
    if (!split_k) {
      const int64_t cols = detail::chunk_size(n, batches, 256);
      const int64_t col_chunks = (n + cols - 1) / cols;
      at::parallel_for(0, batches * col_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t i = item / col_chunks, j0 = (item % col_chunks) * cols, j1 = std::min(n, j0 + cols);
          product(i, j0, j1, 0, k, pc + i * m * n + j0, n);
        }
      });
      return;
    }
    const int64_t depth = detail::chunk_size(k, batches, 2048);
    const int64_t parts = (k + depth - 1) / depth;
    std::vector<T> partial(static_cast<size_t>(batches * parts * m * n));
    at::parallel_for(0, batches * parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t i = item / parts, k0 = (item % parts) * depth;
        product(i, 0, n, k0, std::min(k, k0 + depth), partial.data() + item * m * n, n);
      }
    });
    for (int64_t i = 0; i < batches; ++i) {
      for (int64_t e = 0; e < m * n; ++e) {
        double sum = 0;
        for (int64_t p = 0; p < parts; ++p) sum += partial[static_cast<size_t>((i * parts + p) * m * n + e)];
        pc[i * m * n + e] = static_cast<T>(accumulate ? pc[i * m * n + e] + sum : sum);
      }
    }
  });
}

}  // namespace detail

/// a: B1 x B2 x M x K, b: B1 x B2 x K x N (batch strides may be 0, as after expand) -> contiguous B1 x B2 x M x N.
/// Work is split over batch entries and output columns, or, for small outputs of long products (Gram
/// matrices, weight gradients), over the summed dimension with per-chunk partial products.
inline torch::Tensor bmm(const torch::Tensor& a, const torch::Tensor& b) {
  RECORD_FUNCTION("tdfusion::bmm", std::vector<c10::IValue>());
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, "tdfusion: bmm kernel got shapes ", a.sizes(), " and ", b.sizes());
  torch::Tensor c = torch::empty({a.size(0), a.size(1), a.size(2), b.size(3)},
                                 a.options().memory_format(torch::MemoryFormat::Contiguous));
  detail::bmm_into(c, a, b, /*accumulate=*/false);
  return c;
}

/// c += a b in place (c contiguous B1 x B2 x M x N, written by no one else meanwhile): a product added to a
/// tensor without the zeroing and the extra pass of a separate addition.
inline void bmm_accumulate(torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
  RECORD_FUNCTION("tdfusion::bmm_accumulate", std::vector<c10::IValue>());
  detail::bmm_into(c, a, b, /*accumulate=*/true);
}

namespace detail {

/// Rows r - 1, r, r + 1 of one image plane, each copied with a zero column on both sides (zero rows outside
/// the plane), so that a 3x3 window at column x reads columns x .. x + 2 of the three rows without branches.
/// The rows live in a ring of three slots, so moving to the next row copies one row, not three.
template <class T>
class PaddedRows {
 public:
  PaddedRows(const T* plane, int64_t height, int64_t width)
      : plane_(plane), height_(height), width_(width), rows_(static_cast<size_t>(3 * (width + 2)), T(0)) {}

  /// Loads the window around row r.
  void load(int64_t r) {
    row_ = r;
    for (int64_t source = r - 1; source <= r + 1; ++source) {
      int64_t& held = held_[slot(source)];
      if (held == source) continue;
      held = source;
      T* row = rows_.data() + slot(source) * (width_ + 2) + 1;  // the zero columns are never written
      if (source < 0 || source >= height_) {
        std::fill(row, row + width_, T(0));
      } else {
        std::copy(plane_ + source * width_, plane_ + (source + 1) * width_, row);
      }
    }
  }

  /// Row ky (0, 1, 2 for r - 1, r, r + 1), shifted so that element x is the window's left column.
  const T* row(int64_t ky) const { return rows_.data() + slot(row_ + ky - 1) * (width_ + 2); }

 private:
  static int64_t slot(int64_t source) { return (source + 3) % 3; }  // source >= -1

  const T* plane_;
  int64_t height_, width_, row_ = 0;
  std::vector<T> rows_;
  int64_t held_[3] = {-2, -2, -2};  // the source row in each slot (-2: none yet)
};

}  // namespace detail

/// Depthwise 3x3 convolution, stride 1, zero padding 1: x N x C x H x W (block-contiguous), w C x 1 x 3 x 3.
inline torch::Tensor depthwise3x3(const torch::Tensor& x, const torch::Tensor& w) {
  RECORD_FUNCTION("tdfusion::depthwise3x3", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == 3 &&
                  w.size(3) == 3,
              "tdfusion: depthwise3x3 kernel got input ", x.sizes(), " and weight ", w.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), h = x.size(2), width = x.size(3);
  multiply_adds() += batch * channels * h * width * 9;
  const torch::Tensor xc = detail::block_contiguous(x) ? x : x.contiguous();
  const torch::Tensor wc = w.contiguous();
  torch::Tensor y = detail::new_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_depthwise3x3", [&] {
    using T = scalar_t;
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / channels, c = plane % channels;
        detail::PaddedRows<T> window(xc.data_ptr<T>() + n * xc.stride(0) + c * h * width, h, width);
        const T* k = wc.data_ptr<T>() + c * 9;
        // Taps in locals: the compiler need not reload them for fear of aliasing the output.
        const T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
        T* dst = y.data_ptr<T>() + plane * h * width;
        for (int64_t r = 0; r < h; ++r) {
          window.load(r);
          const T *a = window.row(0), *b = window.row(1), *d = window.row(2);
          T* out = dst + r * width;
          _Pragma("omp simd")
          for (int64_t i = 0; i < width; ++i) {
            out[i] = k0 * a[i] + k1 * a[i + 1] + k2 * a[i + 2] + k3 * b[i] + k4 * b[i + 1] + k5 * b[i + 2] +
                     k6 * d[i] + k7 * d[i + 1] + k8 * d[i + 2];
          }
        }
      }
    });
  });
  return y;
}

/// The weight gradient of depthwise3x3: dw[c, 0, ky, kx] = sum_n,p dy[n, c, p] x[n, c, p + (ky - 1, kx - 1)].
inline torch::Tensor depthwise3x3_weight_grad(const torch::Tensor& dy, const torch::Tensor& x) {
  RECORD_FUNCTION("tdfusion::depthwise3x3_weight_grad", std::vector<c10::IValue>());
  TORCH_CHECK(dy.sizes() == x.sizes() && x.dim() == 4, "tdfusion: depthwise3x3 weight-gradient kernel got ",
              dy.sizes(), " and ", x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), h = x.size(2), width = x.size(3);
  multiply_adds() += batch * channels * h * width * 9;
  const torch::Tensor xc = detail::block_contiguous(x) ? x : x.contiguous();
  const torch::Tensor gc = detail::block_contiguous(dy) ? dy : dy.contiguous();
  torch::Tensor dw = torch::empty({channels, 1, 3, 3}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_depthwise3x3_weight_grad", [&] {
    using T = scalar_t;
    // Lane-wise partial sums (one vector of each of the nine taps) over bands of rows: a horizontal reduction
    // per band instead of nine per row, which dominated the time.
    constexpr int64_t kLanes = 16, kBandRows = 8;
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sums[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        T lanes[9][kLanes] = {};
        auto flush = [&] {
          for (int e = 0; e < 9; ++e) {
            for (int64_t l = 0; l < kLanes; ++l) sums[e] += lanes[e][l];
            std::fill(lanes[e], lanes[e] + kLanes, T(0));
          }
        };
        for (int64_t n = 0; n < batch; ++n) {
          detail::PaddedRows<T> window(xc.data_ptr<T>() + n * xc.stride(0) + c * h * width, h, width);
          const T* grad = gc.data_ptr<T>() + n * gc.stride(0) + c * h * width;
          for (int64_t r = 0; r < h; ++r) {
            window.load(r);
            const T* g = grad + r * width;
            const T *a = window.row(0), *b = window.row(1), *d = window.row(2);
            for (int64_t i0 = 0; i0 < width; i0 += kLanes) {
              const int64_t count = std::min(kLanes, width - i0);
              _Pragma("omp simd")
              for (int64_t l = 0; l < count; ++l) {
                const int64_t i = i0 + l;
                const T gi = g[i];
                lanes[0][l] += gi * a[i];
                lanes[1][l] += gi * a[i + 1];
                lanes[2][l] += gi * a[i + 2];
                lanes[3][l] += gi * b[i];
                lanes[4][l] += gi * b[i + 1];
                lanes[5][l] += gi * b[i + 2];
                lanes[6][l] += gi * d[i];
                lanes[7][l] += gi * d[i + 1];
                lanes[8][l] += gi * d[i + 2];
              }
            }
            if ((r + 1) % kBandRows == 0) flush();
          }
        }
        flush();
        T* out = dw.data_ptr<T>() + c * 9;
        for (int e = 0; e < 9; ++e) out[e] = static_cast<T>(sums[e]);
      }
    });
  });
  return dw;
}

namespace detail {

/// Calls fn(n, p0, p1) for blocks of `block` pixels (elements) of every image: the unit of the per-pixel kernels.
template <class Fn>
void pixel_blocks(int64_t batch, int64_t pixels, int64_t block, const Fn& fn) {
  block = std::max<int64_t>(1, std::min(pixels, block));
  const int64_t blocks = (pixels + block - 1) / block;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, p0 = (item % blocks) * block;
      fn(n, p0, std::min(pixels, p0 + block));
    }
  });
}

/// Pixels per LayerNorm block: the block's C channels (about 256 KB of floats) stay in cache between its passes.
inline int64_t layer_norm_block(int64_t channels) { return std::max<int64_t>(256, 65536 / std::max<int64_t>(1, channels)); }

/// Per-pixel mean and reciprocal standard deviation over the C channels of one image block (two passes).
template <class T>
void channel_moments(const T* x, int64_t channels, int64_t pixels, int64_t p0, int64_t len, Array<T>& mean,
                     Array<T>& rstd, double eps) {
  using ConstRow = Eigen::Map<const Array<T>>;
  mean.setZero(len);
  for (int64_t c = 0; c < channels; ++c) mean += ConstRow(x + c * pixels + p0, len);
  mean /= static_cast<T>(channels);
  rstd.setZero(len);
  for (int64_t c = 0; c < channels; ++c) rstd += (ConstRow(x + c * pixels + p0, len) - mean).square();
  rstd = (rstd / static_cast<T>(channels) + static_cast<T>(eps)).rsqrt();
}

}  // namespace detail

/// Per-pixel LayerNorm over channels: y = (x - mean_c x) / sqrt(var_c x + eps) * w[c] + b[c] (biased variance).
inline torch::Tensor channel_layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                        double eps) {
  RECORD_FUNCTION("tdfusion::channel_layer_norm", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 4 && w.numel() == x.size(1) && b.numel() == x.size(1),
              "tdfusion: channel_layer_norm kernel got input ", x.sizes(), ", weight ", w.sizes(), ", bias ", b.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const torch::Tensor xc = detail::block_contiguous(x) ? x : x.contiguous();
  const torch::Tensor wc = w.contiguous(), bc = b.contiguous();
  torch::Tensor y = detail::new_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_channel_layer_norm", [&] {
    using T = scalar_t;
    using ConstRow = Eigen::Map<const detail::Array<T>>;
    using Row = Eigen::Map<detail::Array<T>>;
    detail::pixel_blocks(batch, pixels, detail::layer_norm_block(channels), [&](int64_t n, int64_t p0, int64_t p1) {
      const T* src = xc.data_ptr<T>() + n * xc.stride(0);
      T* dst = y.data_ptr<T>() + n * channels * pixels;
      const int64_t len = p1 - p0;
      detail::Array<T> mean, rstd;
      detail::channel_moments(src, channels, pixels, p0, len, mean, rstd, eps);
      for (int64_t c = 0; c < channels; ++c) {
        Row(dst + c * pixels + p0, len) =
            (ConstRow(src + c * pixels + p0, len) - mean) * rstd * wc.data_ptr<T>()[c] + bc.data_ptr<T>()[c];
      }
    });
  });
  return y;
}

/// First-order backward of channel_layer_norm: (dx, dw, db) for the output gradient dy.
inline std::vector<torch::Tensor> channel_layer_norm_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                                              const torch::Tensor& w, double eps) {
  RECORD_FUNCTION("tdfusion::channel_layer_norm_backward", std::vector<c10::IValue>());
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const torch::Tensor xc = detail::block_contiguous(x) ? x : x.contiguous();
  const torch::Tensor gc = detail::block_contiguous(dy) ? dy : dy.contiguous();
  const torch::Tensor wc = w.contiguous();
  torch::Tensor dx = detail::new_like(x);
  torch::Tensor dw = torch::empty({channels}, x.options()), db = torch::empty({channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_channel_layer_norm_backward", [&] {
    using T = scalar_t;
    using ConstRow = Eigen::Map<const detail::Array<T>>;
    using Row = Eigen::Map<detail::Array<T>>;
    const int64_t block = std::max<int64_t>(1, std::min(pixels, detail::layer_norm_block(channels)));
    const int64_t blocks = (pixels + block - 1) / block;
    // Per-item partial sums of dw and db, added in item order afterwards (deterministic).
    std::vector<double> partial(static_cast<size_t>(batch * blocks * 2 * channels), 0.0);
    const T* pw = wc.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      detail::Array<T> mean, rstd, a, s, xhat;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / blocks, p0 = (item % blocks) * block, len = std::min(pixels, p0 + block) - p0;
        const T* src = xc.data_ptr<T>() + n * xc.stride(0);
        const T* grad = gc.data_ptr<T>() + n * gc.stride(0);
        T* out = dx.data_ptr<T>() + n * channels * pixels;
        double* sums = partial.data() + item * 2 * channels;
        detail::channel_moments(src, channels, pixels, p0, len, mean, rstd, eps);
        a.setZero(len);  // mean_c dy w
        s.setZero(len);  // mean_c dy w xhat
        for (int64_t c = 0; c < channels; ++c) {
          const ConstRow g(grad + c * pixels + p0, len);
          xhat = (ConstRow(src + c * pixels + p0, len) - mean) * rstd;
          a += g * pw[c];
          s += g * pw[c] * xhat;
          sums[c] += static_cast<double>((g * xhat).sum());
          sums[channels + c] += static_cast<double>(g.sum());
        }
        a /= static_cast<T>(channels);
        s /= static_cast<T>(channels);
        for (int64_t c = 0; c < channels; ++c) {
          xhat = (ConstRow(src + c * pixels + p0, len) - mean) * rstd;
          Row(out + c * pixels + p0, len) = rstd * (ConstRow(grad + c * pixels + p0, len) * pw[c] - a - xhat * s);
        }
      }
    });
    for (int64_t c = 0; c < channels; ++c) {
      double sw = 0, sb = 0;
      for (int64_t item = 0; item < batch * blocks; ++item) {
        sw += partial[static_cast<size_t>(item * 2 * channels + c)];
        sb += partial[static_cast<size_t>(item * 2 * channels + channels + c)];
      }
      dw.data_ptr<T>()[c] = static_cast<T>(sw);
      db.data_ptr<T>()[c] = static_cast<T>(sb);
    }
  });
  return {dx, dw, db};
}

namespace detail {
inline constexpr int64_t kElementBlock = 16384;  ///< elements per work item of the elementwise kernels

/// Elementwise kernel scaffolding: fills `outputs` (block-contiguous, of the inputs' common 4-D shape) by
/// fn(in, out) over blocks of every image, where in(i) and out(j) are Eigen arrays of the block of input i
/// (block-contiguous, or made so) and output j. Channel halves of one new tensor are block-contiguous outputs.
template <class T, class Fn>
void elementwise(const char* kernel, std::vector<torch::Tensor> inputs, const std::vector<torch::Tensor>& outputs,
                 const Fn& fn) {
  const torch::Tensor& first = inputs[0];
  for (torch::Tensor& t : inputs) {
    TORCH_CHECK(t.dim() == 4 && t.sizes() == first.sizes(), "tdfusion: ", kernel, " kernel got shapes ",
                first.sizes(), " and ", t.sizes());
    if (!block_contiguous(t)) t = t.contiguous();
  }
  for (const torch::Tensor& t : outputs) {
    TORCH_CHECK(t.sizes() == first.sizes() && block_contiguous(t), "tdfusion: ", kernel, " kernel cannot write ",
                first.sizes(), " into ", t.sizes());
  }
  const int64_t batch = first.size(0), per_image = first.size(1) * first.size(2) * first.size(3);
  pixel_blocks(batch, per_image, kElementBlock, [&](int64_t n, int64_t p0, int64_t p1) {
    auto in = [&](size_t i) {
      return Eigen::Map<const Array<T>>(inputs[i].data_ptr<T>() + n * inputs[i].stride(0) + p0, p1 - p0);
    };
    auto out = [&](size_t j) {
      return Eigen::Map<Array<T>>(outputs[j].data_ptr<T>() + n * outputs[j].stride(0) + p0, p1 - p0);
    };
    fn(in, out);
  });
}

/// The two channel halves of x (N x 2C x H x W): gelu_gate's a and b.
inline std::pair<torch::Tensor, torch::Tensor> halves(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) % 2 == 0, "tdfusion: gelu_gate needs an even number of channels, got ",
              x.sizes());
  const int64_t c = x.size(1) / 2;
  return {x.slice(1, 0, c), x.slice(1, c)};
}

/// Phi(x), the standard normal distribution function (Eigen's vectorised erf for float).
template <class E>
auto normal_cdf(const E& x) {
  using T = typename E::Scalar;
  return T(0.5) * (T(1) + (x * T(M_SQRT1_2)).erf());
}

/// gelu(x) = x Phi(x), the exact GELU.
template <class E>
auto gelu(const E& x) {
  return x * normal_cdf(x);
}

/// phi(x), the standard normal density.
template <class E>
auto normal_pdf(const E& x) {
  using T = typename E::Scalar;
  return T(0.3989422804014327) * (T(-0.5) * x.square()).exp();
}
}  // namespace detail

/// gelu(a) * b elementwise for the channel halves [a; b] of x (N x 2C x H x W, block-contiguous) -> N x C x H x W.
inline torch::Tensor gelu_gate(const torch::Tensor& x) {
  RECORD_FUNCTION("tdfusion::gelu_gate", std::vector<c10::IValue>());
  const auto x_halves = detail::halves(x);
  const torch::Tensor &a = x_halves.first, &b = x_halves.second;
  torch::Tensor y = detail::new_like(a);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_gelu_gate", [&] {
    detail::elementwise<scalar_t>("gelu_gate", {a, b}, {y}, [](const auto& in, const auto& out) {
      out(0) = detail::gelu(in(0)) * in(1);
    });
  });
  return y;
}

/// First-order backward of gelu_gate: dx = [da; db] = [dy b gelu'(a); dy gelu(a)], gelu'(x) = Phi(x) + x phi(x).
inline torch::Tensor gelu_gate_backward(const torch::Tensor& dy, const torch::Tensor& x) {
  RECORD_FUNCTION("tdfusion::gelu_gate_backward", std::vector<c10::IValue>());
  const auto x_halves = detail::halves(x);
  const torch::Tensor &a = x_halves.first, &b = x_halves.second;
  torch::Tensor dx = detail::new_like(x);
  const auto dx_halves = detail::halves(dx);
  const torch::Tensor &da = dx_halves.first, &db = dx_halves.second;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_gelu_gate_backward", [&] {
    using T = scalar_t;
    detail::elementwise<T>("gelu_gate_backward", {dy, a, b}, {da, db}, [](const auto& in, const auto& out) {
      const auto g = in(0), x = in(1);
      const detail::Array<T> cdf = detail::normal_cdf(x);
      out(0) = g * in(2) * (cdf + x * detail::normal_pdf(x));
      out(1) = g * x * cdf;
    });
  });
  return dx;
}

/// Backward of gelu_gate_backward: for the gradient [gda; gdb] of its output, (d dy, d x) =
/// (gda b gelu'(a) + gdb gelu(a), [dy (gda b gelu''(a) + gdb gelu'(a)); gda dy gelu'(a)]),
/// gelu''(x) = phi(x) (2 - x^2). The meta step's outer pass runs it once per gate instead of a dozen LibTorch ops.
inline std::vector<torch::Tensor> gelu_gate_double_backward(const torch::Tensor& gdx, const torch::Tensor& dy,
                                                            const torch::Tensor& x) {
  RECORD_FUNCTION("tdfusion::gelu_gate_double_backward", std::vector<c10::IValue>());
  const auto x_halves = detail::halves(x);
  const torch::Tensor &a = x_halves.first, &b = x_halves.second;
  const auto gdx_halves = detail::halves(gdx);
  const torch::Tensor &gda = gdx_halves.first, &gdb = gdx_halves.second;
  torch::Tensor ddy = detail::new_like(dy), dx = detail::new_like(x);
  const auto dx_halves = detail::halves(dx);
  const torch::Tensor &da = dx_halves.first, &db = dx_halves.second;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_gelu_gate_double_backward", [&] {
    using T = scalar_t;
    detail::elementwise<T>("gelu_gate_double_backward", {gda, gdb, dy, a, b}, {ddy, da, db},
                           [](const auto& in, const auto& out) {
      const auto gda = in(0), gdb = in(1), g = in(2), x = in(3), gate = in(4);
      const detail::Array<T> cdf = detail::normal_cdf(x), pdf = detail::normal_pdf(x);
      const detail::Array<T> slope = cdf + x * pdf, gda_gate = gda * gate;
      out(0) = gda_gate * slope + gdb * x * cdf;
      out(1) = g * (gda_gate * pdf * (T(2) - x.square()) + gdb * slope);
      out(2) = gda * g * slope;
    });
  });
  return {ddy, dx};
}

namespace detail {

/// Image planes seen through a rows x cols window: element (c, r, i) at data[c * plane + r * row + i].
template <class T>
struct PlaneWindow {
  T* data;
  int64_t plane, row;
  int64_t channel(int64_t c) const { return c * plane; }
};

/// Input channels at any offsets, seen through a rows x cols window: element (c, r, i) at
/// data[offsets[c] + r * row + i] (conv3x3's inputs: the planes of a gathered tile shifted by each tap).
template <class T>
struct OffsetWindow {
  const T* data;
  const int64_t* offsets;
  int64_t row;
  int64_t channel(int64_t c) const { return offsets[c]; }
};

/// y_o = residual_o + sum_c w[o * w_row + c] x_c for the output planes o < outs of a window (residual 0 where
/// its data is null): the 1x1 convolutions of the fused kernels. With only 16 to 64 input channels a general GEMM
/// spends much of its time packing the operands and zeroing its output; this reads the planes in place, keeps
/// a block of 4 outputs x (up to) kMaxVectors vectors of pixels in registers and writes each output once. The
/// residual may be y itself (an in-place addition): each element is read before it is written.
template <class T, class Input = PlaneWindow<const T>>
void pointwise(Input x, int64_t ins, const T* w, int64_t w_row, int64_t outs, PlaneWindow<const T> residual,
               PlaneWindow<T> y, int64_t rows, int64_t cols) {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr int64_t kLanes = Eigen::internal::packet_traits<T>::size, kOuts = 4;
  // The block's accumulators, its pixel vectors and a weight all in registers: 4 x 4 + 4 + 1 of AVX-512's 32,
  // 4 x 3 + 3 + 1 of AVX2's 16 (4 x 4 there spills accumulators to the stack in the innermost loop).
  constexpr int64_t kMaxVectors = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 3;
  // Outputs [o, o + kBlock) at pixels [i, i + kVectors * kLanes) of one row.
  auto block = [&](auto vectors, auto block_outs, const T* in, const T* res, T* out, int64_t o) {
    constexpr int64_t kVectors = decltype(vectors)::value, kBlock = decltype(block_outs)::value;
    Packet acc[kBlock][kVectors];
    for (int64_t b = 0; b < kBlock; ++b) {
      for (int64_t v = 0; v < kVectors; ++v) {
        acc[b][v] = res != nullptr ? Eigen::internal::ploadu<Packet>(res + (o + b) * residual.plane + v * kLanes)
                                   : Eigen::internal::pset1<Packet>(T(0));
      }
    }
    for (int64_t c = 0; c < ins; ++c) {
      Packet pixels[kVectors];
      for (int64_t v = 0; v < kVectors; ++v) pixels[v] = Eigen::internal::ploadu<Packet>(in + x.channel(c) + v * kLanes);
      for (int64_t b = 0; b < kBlock; ++b) {
        const Packet weight = Eigen::internal::pset1<Packet>(w[(o + b) * w_row + c]);
        for (int64_t v = 0; v < kVectors; ++v) acc[b][v] = Eigen::internal::pmadd(pixels[v], weight, acc[b][v]);
      }
    }
    for (int64_t b = 0; b < kBlock; ++b) {
      for (int64_t v = 0; v < kVectors; ++v) Eigen::internal::pstoreu(out + (o + b) * y.plane + v * kLanes, acc[b][v]);
    }
  };
  auto columns = [&](auto vectors, const T* in, const T* res, T* out) {
    int64_t o = 0;
    for (; o + kOuts <= outs; o += kOuts) block(vectors, std::integral_constant<int64_t, kOuts>{}, in, res, out, o);
    for (; o < outs; ++o) block(vectors, std::integral_constant<int64_t, 1>{}, in, res, out, o);
  };
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = x.data + r * x.row;
    const T* res = residual.data != nullptr ? residual.data + r * residual.row : nullptr;
    T* out = y.data + r * y.row;
    int64_t i = 0;
    auto shifted = [&](const T* p) { return p != nullptr ? p + i : nullptr; };
    for (; i + kMaxVectors * kLanes <= cols; i += kMaxVectors * kLanes) {
      columns(std::integral_constant<int64_t, kMaxVectors>{}, in + i, shifted(res), out + i);
    }
    const int64_t left = (cols - i) / kLanes;
    if (left == 3) columns(std::integral_constant<int64_t, 3>{}, in + i, shifted(res), out + i);
    if (left == 2) columns(std::integral_constant<int64_t, 2>{}, in + i, shifted(res), out + i);
    if (left == 1) columns(std::integral_constant<int64_t, 1>{}, in + i, shifted(res), out + i);
    for (i += left * kLanes; i < cols; ++i) {
      for (int64_t o = 0; o < outs; ++o) {
        T sum = res != nullptr ? res[o * residual.plane + i] : T(0);
        for (int64_t c = 0; c < ins; ++c) sum += w[o * w_row + c] * in[x.channel(c) + i];
        out[o * y.plane + i] = sum;
      }
    }
  }
}

/// Copies a tile's planes (`planes` of rows x cols elements, `from_plane` apart, each row-major) into the
/// window `to` of an output, storing each row's whole 64-byte lines with non-temporal stores (x86): they go to
/// memory without first reading each line into the cache, as ordinary stores do. The fused kernels' outputs
/// (20-40 MB each at 640 x 480) outgrow the caches, so the next kernel reads them from memory either way. The
/// partial lines at a row's ends are stored as usual. Measured on 640 x 480 ReFusion passes (2 cores, Zen 2):
/// 12 % faster; at 320 x 240 10 %; at 160 x 120, whose maps fit in the cache, the same. Call store_fence() before
/// other threads read the output.
template <class T>
void stream_planes(const T* from, int64_t from_plane, int64_t planes, int64_t rows, int64_t cols, PlaneWindow<T> to) {
  constexpr auto kLine = static_cast<int64_t>(64 / sizeof(T));
  for (int64_t c = 0; c < planes; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = from + c * from_plane + r * cols;
      T* dst = to.data + c * to.plane + r * to.row;
      const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % 64 / sizeof(T));
      int64_t i = std::min(cols, (kLine - misaligned) % kLine);
      std::copy(src, src + i, dst);
#if defined(__SSE2__)
      for (; i + kLine <= cols; i += kLine) {
        for (int64_t k = 0; k < kLine; k += static_cast<int64_t>(16 / sizeof(T))) {
          if constexpr (std::is_same_v<T, float>) {
            _mm_stream_ps(dst + i + k, _mm_loadu_ps(src + i + k));
          } else {
            _mm_stream_pd(dst + i + k, _mm_loadu_pd(src + i + k));
          }
        }
      }
#endif
      std::copy(src + i, src + cols, dst + i);
    }
  }
}

/// Orders this thread's non-temporal stores (stream_planes) before its later stores, such as the ones that
/// tell other threads it is done.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Runs the work items [0, items) on LibTorch's threads, balanced. Each thread first takes the items of its own
/// contiguous share in order (neighbouring tiles on one core, as its prefetchers favour: handing out items one
/// by one from a common counter made the tile kernels 15-30 % slower), then the last items left in the other
/// shares, so that no core idles while another still has work (a statically split list left one core waiting
/// for the other at the end of each kernel). work(next) runs once per share, with its own buffers;
/// next(item) sets the next item and returns false when none is left. No result depends on which thread
/// does an item.
template <class Work>
void for_each_item(int64_t items, const Work& work) {
  TORCH_CHECK(items < (int64_t{1} << 32), "tdfusion: ", items, " work items are too many for one kernel call");
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();  // nested calls run serially
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(threads, items));
  // A share's items not yet taken, [first, last) in one word: its owner takes them from the front, others from
  // the back. One cache line each, so that the owners' steps do not contend.
  struct alignas(64) Share {
    std::atomic<uint64_t> left;
  };
  std::vector<Share> remaining(static_cast<size_t>(shares));
  for (int64_t s = 0; s < shares; ++s) {
    remaining[static_cast<size_t>(s)].left = static_cast<uint64_t>(s * items / shares) |
                                             static_cast<uint64_t>((s + 1) * items / shares) << 32;
  }
  auto take = [&remaining](int64_t share, bool front, int64_t& item) {
    std::atomic<uint64_t>& left = remaining[static_cast<size_t>(share)].left;
    uint64_t range = left.load(std::memory_order_relaxed);
    for (;;) {
      const auto first = static_cast<int64_t>(range & 0xffffffffu), last = static_cast<int64_t>(range >> 32);
      if (first >= last) return false;
      const uint64_t rest = front ? range + 1 : range - (uint64_t{1} << 32);
      if (left.compare_exchange_weak(range, rest, std::memory_order_relaxed)) {
        item = front ? first : last - 1;
        return true;
      }
    }
  };
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t own = begin; own < end; ++own) {
      work([&](int64_t& item) {
        if (take(own, true, item)) return true;
        for (int64_t other = 1; other < shares; ++other) {
          if (take((own + other) % shares, false, item)) return true;
        }
        return false;
      });
    }
  });
}

/// dwconv3x3(W_in LN(x)) on a tile of an image, the common start of the fused block kernels, in cache-sized
/// buffers. compute(n, tile) gathers the tile with a one-pixel halo and normalises it (unless ln_w is null: no
/// LayerNorm); expand(first, count, slot) multiplies it by rows [first, first + count) of W_in into the slots
/// [slot, slot + count) of a buffer of out_channels planes (a caller may expand a few planes at a time, so that
/// they stay in the fastest cache until used); depthwise(plane, slot, dst, stride) then writes the tile's
/// convolved values of output plane `plane`, expanded into `slot`, row by row, `stride` apart. The halo is always
/// there: where it lies outside the image it holds zeros, which W_in (without bias) keeps zero, so the depthwise
/// convolution reads the buffer directly.
template <class T>
class NormPointwiseDepthwiseTile {
 public:
  struct Tile {
    int64_t r0, r1, c0, c1;  ///< rows [r0, r1), columns [c0, c1)
  };

  /// Elements of a 64-byte vector: tiles are a whole number of them wide, and the buffers' planes a whole number
  /// of them long, whatever the tile's shape (the 1x1 products run about a third slower on planes that are not
  /// vector-aligned).
  static constexpr int64_t kVector = 64 / static_cast<int64_t>(sizeof(T));

  /// The length of a buffer plane holding `elements`: whole vectors.
  static int64_t padded(int64_t elements) { return (elements + kVector - 1) / kVector * kVector; }

  NormPointwiseDepthwiseTile(const T* x, int64_t channels, int64_t height, int64_t width, const T* ln_w,
                             const T* ln_b, const T* w_in, int64_t out_channels, const T* w_dw, double eps)
      : x_(x), channels_(channels), height_(height), width_(width), ln_w_(ln_w), ln_b_(ln_b),
        w_in_(w_in), out_channels_(out_channels), w_dw_(w_dw), eps_(eps) {}

  /// The tiles of an image: about 2048 pixels each (8 KB a float plane, so that the gathered input, the
  /// planes expanded at a time and a caller's mixed planes stay in L2), nearly square, so the halo stays small,
  /// a whole number of 64-byte vectors wide, so the depthwise rows need no remainder loop, and in bands of equal
  /// height, so that the halves of the tile list LibTorch's threads take hold equal work. Measured on a 640 x 480
  /// ReFusion pass (2 cores, Zen 2): 1536 pixels 3-4 % slower than 2048, 3072 1-3 %, 2560 the same; 32 columns
  /// 4-8 % slower than 48, 64 columns 12-19 %; the 38-row bands (the last one 24 rows) before equal ones 3 %.
  static std::vector<Tile> tiles(int64_t height, int64_t width) {
    constexpr int64_t kArea = 2048;
    const int64_t cols = std::max<int64_t>(kVector, std::llround(std::sqrt(double{kArea}) / kVector) * kVector);
    const int64_t most_rows = std::max<int64_t>(8, kArea / (cols + 2) - 2);
    const int64_t bands = std::max<int64_t>(1, (height + most_rows - 1) / most_rows);
    const int64_t rows = (height + bands - 1) / bands;
    std::vector<Tile> all;
    for (int64_t r = 0; r < height; r += rows) {
      for (int64_t c = 0; c < width; c += cols) all.push_back({r, std::min(height, r + rows), c, std::min(width, c + cols)});
    }
    return all;
  }

  /// Where compute() reads the image: pixel (c, r, i) at window.data[c * window.plane + (r - r0) * window.row +
  /// i - c0], for the rows and columns that the tile and its halo need inside the image.
  struct Source {
    PlaneWindow<const T> window;
    int64_t r0, c0;
  };

  /// Computes the tile of image n of the input given at construction.
  void compute(int64_t n, const Tile& tile) {
    compute(Source{{x_ + n * channels_ * height_ * width_, height_ * width_, width_}, 0, 0}, tile);
  }

  /// Computes the tile of the image in `source` (a part of it held in a caller's buffer, say).
  void compute(const Source& source, const Tile& tile) {
    tile_ = tile;
    const int64_t rows = tile.r1 - tile.r0 + 2, cols = tile.c1 - tile.c0 + 2, len = rows * cols;
    const int64_t b0 = std::max<int64_t>(0, tile.c0 - 1), b1 = std::min(width_, tile.c1 + 1);
    normed_.resize(padded(len), channels_);
    for (int64_t c = 0; c < channels_; ++c) {
      T* column = normed_.col(c).data();
      std::fill(column + len, column + normed_.rows(), T(0));
      for (int64_t r = tile.r0 - 1; r <= tile.r1; ++r) {
        T* row = column + (r - tile.r0 + 1) * cols;
        if (r < 0 || r >= height_) {
          std::fill(row, row + cols, T(0));
          continue;
        }
        row[0] = row[cols - 1] = T(0);  // the halo columns outside the image stay zero
        const PlaneWindow<const T>& in = source.window;
        const T* from = in.data + c * in.plane + (r - source.r0) * in.row + (b0 - source.c0);
        std::copy(from, from + (b1 - b0), row + (b0 - tile.c0 + 1));
      }
    }
    if (ln_w_ != nullptr) {
      channel_moments(normed_.data(), channels_, normed_.rows(), 0, len, mean_, rstd_, eps_);
      for (int64_t c = 0; c < channels_; ++c) {
        normed_.col(c).head(len).array() = (normed_.col(c).head(len).array() - mean_) * rstd_ * ln_w_[c] + ln_b_[c];
      }
      clear_outside_image(rows, cols);  // the LayerNorm maps a zero pixel to its bias
    }
    expanded_.resize(normed_.rows(), out_channels_);
  }

  /// Multiplies the tile by rows [first, first + count) of W_in into the buffer's columns [slot, slot + count).
  /// Leading and trailing input channels whose weights are zero in all these rows are skipped: ReFusion's
  /// fusion module has such blocks (a block-diagonal half of its W_in), and adding exact zeros changes no
  /// finite sum.
  void expand(int64_t first, int64_t count, int64_t slot) {
    const int64_t len = plane();
    const T* w = w_in_ + first * channels_;
    auto zero_channel = [&](int64_t c) {
      for (int64_t o = 0; o < count; ++o) {
        if (w[o * channels_ + c] != T(0)) return false;
      }
      return true;
    };
    int64_t c0 = 0, c1 = channels_;
    while (c0 < c1 && zero_channel(c0)) ++c0;
    while (c1 > c0 && zero_channel(c1 - 1)) --c1;
    pointwise<T>({normed_.data() + c0 * len, len, 0}, c1 - c0, w + c0, channels_, count, {nullptr, 0, 0},
                 {expanded_.data() + slot * len, len, 0}, 1, len);
  }

  /// The tile gathered (and normalised) by compute: one plane of (rows + 2) x (cols + 2) pixels per channel,
  /// plane() elements apart.
  const T* gathered() const { return normed_.data(); }
  int64_t plane() const { return normed_.rows(); }

  void depthwise(int64_t plane, int64_t slot, T* dst, int64_t stride) const {
    const int64_t cols = tile_.c1 - tile_.c0 + 2, count = cols - 2;
    const T* k = w_dw_ + plane * 9;
    const T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
    const T* above = expanded_.col(slot).data();
    for (int64_t r = 0; r < tile_.r1 - tile_.r0; ++r, above += cols) {
      const T *ra = above, *rb = above + cols, *rc = above + 2 * cols;
      T* out = dst + r * stride;
      _Pragma("omp simd")
      for (int64_t i = 0; i < count; ++i) {
        out[i] = k0 * ra[i] + k1 * ra[i + 1] + k2 * ra[i + 2] + k3 * rb[i] + k4 * rb[i + 1] + k5 * rb[i + 2] +
                 k6 * rc[i] + k7 * rc[i + 1] + k8 * rc[i + 2];
      }
    }
  }

 private:
  /// Zeroes the buffer's halo rows and columns that lie outside the image.
  void clear_outside_image(int64_t rows, int64_t cols) {
    const bool top = tile_.r0 == 0, bottom = tile_.r1 == height_, left = tile_.c0 == 0, right = tile_.c1 == width_;
    if (!(top || bottom || left || right)) return;
    for (int64_t c = 0; c < channels_; ++c) {
      T* column = normed_.col(c).data();
      if (top) std::fill(column, column + cols, T(0));
      if (bottom) std::fill(column + (rows - 1) * cols, column + rows * cols, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        if (left) column[r * cols] = T(0);
        if (right) column[r * cols + cols - 1] = T(0);
      }
    }
  }

  const T* x_;
  int64_t channels_, height_, width_;
  const T *ln_w_, *ln_b_;
  const T* w_in_;
  int64_t out_channels_;
  const T* w_dw_;
  double eps_;
  Tile tile_{0, 0, 0, 0};
  ColMatrix<T> normed_, expanded_;
  Array<T> mean_, rstd_;
};

/// The LayerNorm weights are both undefined (no LayerNorm) or both of size C.
inline void check_block_weights(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                const torch::Tensor& w_in, const torch::Tensor& w_dw) {
  const bool norm_ok = ln_w.defined() ? ln_b.defined() && ln_w.numel() == x.size(1) && ln_b.numel() == x.size(1)
                                      : !ln_b.defined();
  TORCH_CHECK(x.dim() == 4 && norm_ok && w_in.dim() == 4 && w_in.size(1) == x.size(1) && w_dw.size(0) == w_in.size(0) &&
                  w_dw.size(1) == 1,
              "tdfusion: fused block kernel got input ", x.sizes(), " and weights ", w_in.sizes(), ", ", w_dw.sizes());
}

/// Data of an optional tensor (null when undefined).
template <class T>
const T* data_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

/// A fused block kernel's input and weights, checked and contiguous (ln_w and ln_b undefined: no LayerNorm).
struct BlockInputs {
  torch::Tensor x, ln_w, ln_b, w_in, w_dw;

  BlockInputs(const torch::Tensor& x_, const torch::Tensor& ln_w_, const torch::Tensor& ln_b_,
              const torch::Tensor& w_in_, const torch::Tensor& w_dw_) {
    check_block_weights(x_, ln_w_, ln_b_, w_in_, w_dw_);
    x = x_.contiguous();
    ln_w = ln_w_.defined() ? ln_w_.contiguous() : ln_w_;
    ln_b = ln_b_.defined() ? ln_b_.contiguous() : ln_b_;
    w_in = w_in_.contiguous();
    w_dw = w_dw_.contiguous();
  }

  /// A tile evaluator of dwconv3x3(W_in LN(x)) over them (one per thread: it owns its buffers).
  template <class T>
  NormPointwiseDepthwiseTile<T> tile(double eps) const {
    return {x.data_ptr<T>(), x.size(1), x.size(2), x.size(3), data_or_null<T>(ln_w), data_or_null<T>(ln_b),
            w_in.data_ptr<T>(), w_in.size(0), w_dw.data_ptr<T>(), eps};
  }
};

}  // namespace detail

/// dwconv3x3(W_in LN(x)): the q, k, v of a Restormer attention, in one pass over cache-sized tiles (inference
/// only; the intermediates never leave the cache). x: N x C x H x W; ln_w, ln_b: C; w_in: O x C x 1 x 1;
/// w_dw: O x 1 x 3 x 3. Undefined ln_w and ln_b: dwconv3x3(W_in x).
inline torch::Tensor norm_pointwise_depthwise(const torch::Tensor& x, const torch::Tensor& ln_w,
                                              const torch::Tensor& ln_b, const torch::Tensor& w_in,
                                              const torch::Tensor& w_dw, double eps) {
  RECORD_FUNCTION("tdfusion::norm_pointwise_depthwise", std::vector<c10::IValue>());
  const detail::BlockInputs in(x, ln_w, ln_b, w_in, w_dw);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3), out = w_in.size(0);
  multiply_adds() += batch * height * width * out * (channels + 9);
  torch::Tensor y = torch::empty({batch, out, height, width}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_norm_pointwise_depthwise", [&] {
    using T = scalar_t;
    using Fused = detail::NormPointwiseDepthwiseTile<T>;
    const std::vector<typename Fused::Tile> tiles = Fused::tiles(height, width);
    const auto count = static_cast<int64_t>(tiles.size());
    detail::for_each_item(batch * count, [&](const auto& next) {
      Fused fused = in.tile<T>(eps);
      for (int64_t item = 0; next(item);) {
        const int64_t n = item / count;
        const auto& tile = tiles[static_cast<size_t>(item % count)];
        fused.compute(n, tile);
        fused.expand(0, out, 0);
        for (int64_t o = 0; o < out; ++o) {
          fused.depthwise(o, o, y.data_ptr<T>() + ((n * out + o) * height + tile.r0) * width + tile.c0, width);
        }
      }
    });
  });
  return y;
}

/// Dense 3x3 convolution, stride 1, zero padding 1, without bias (inference only): x N x C x H x W, w O x C x 3 x 3.
/// Each cache-sized tile is gathered once with its halo; the convolution is then one 1x1 convolution
/// (detail::pointwise) of 9C channels, the gathered planes shifted by each tap: no reordered or unfolded copy of
/// the input, as LibTorch's convolutions make, and each output written once.
inline torch::Tensor conv3x3(const torch::Tensor& x, const torch::Tensor& w) {
  RECORD_FUNCTION("tdfusion::conv3x3", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == 3 && w.size(3) == 3 &&
                  w.scalar_type() == x.scalar_type(),
              "tdfusion: conv3x3 kernel got input ", x.sizes(), " and weight ", w.sizes());
  const torch::Tensor input = x.contiguous();
  const torch::Tensor weights = w.permute({0, 2, 3, 1}).contiguous();  // O x 3 x 3 x C: input channel tap * C + c
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3), out = w.size(0);
  multiply_adds() += batch * height * width * out * channels * 9;
  torch::Tensor y = torch::empty({batch, out, height, width}, x.options().memory_format(torch::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_conv3x3", [&] {
    using T = scalar_t;
    using Gather = detail::NormPointwiseDepthwiseTile<T>;  // gathers tiles (no LayerNorm, no W_in)
    const std::vector<typename Gather::Tile> tiles = Gather::tiles(height, width);
    const auto count = static_cast<int64_t>(tiles.size());
    detail::for_each_item(batch * count, [&](const auto& next) {
      Gather gather(input.data_ptr<T>(), channels, height, width, nullptr, nullptr, nullptr, 0, nullptr, 0.0);
      std::vector<int64_t> offsets(static_cast<size_t>(9 * channels));
      detail::ColMatrix<T> result;
      for (int64_t item = 0; next(item);) {
        const int64_t n = item / count;
        const auto& tile = tiles[static_cast<size_t>(item % count)];
        const int64_t rows = tile.r1 - tile.r0, cols = tile.c1 - tile.c0, stride = cols + 2;
        gather.compute(n, tile);
        for (int64_t tap = 0; tap < 9; ++tap) {
          for (int64_t c = 0; c < channels; ++c) {
            offsets[static_cast<size_t>(tap * channels + c)] = c * gather.plane() + (tap / 3) * stride + tap % 3;
          }
        }
        result.resize(Gather::padded(rows * cols), out);
        detail::pointwise<T>(detail::OffsetWindow<T>{gather.gathered(), offsets.data(), stride}, 9 * channels,
                             weights.data_ptr<T>(), 9 * channels, out, {nullptr, 0, 0},
                             {result.data(), result.rows(), cols}, rows, cols);
        detail::stream_planes<T>(result.data(), result.rows(), out, rows, cols,
                                 {y.data_ptr<T>() + (n * out * height + tile.r0) * width + tile.c0, height * width, width});
      }
      detail::store_fence();
    });
  });
  return y;
}

namespace detail {

/// gelu(a) * b of a gated feed-forward, [a; b] = the tile that `fused` computed (its W_in rows: a's hidden,
/// then b's), into the `hidden` columns of `gated` (tile pixels, rows `cols` apart); `gate` is scratch.
template <class T>
void gated_values(NormPointwiseDepthwiseTile<T>& fused, int64_t hidden, ColMatrix<T>& gated, Array<T>& gate,
                  int64_t cols) {
  gate.resize(gated.rows());
  constexpr int64_t kGroup = 8;  // hidden channels per expansion: their a and b planes stay in L1/L2
  for (int64_t c0 = 0; c0 < hidden; c0 += kGroup) {
    const int64_t g = std::min(kGroup, hidden - c0);
    fused.expand(c0, g, 0);
    fused.expand(hidden + c0, g, g);
    for (int64_t c = c0; c < c0 + g; ++c) {
      fused.depthwise(c, c - c0, gated.col(c).data(), cols);
      fused.depthwise(c + hidden, g + c - c0, gate.data(), cols);
      gated.col(c).array() = gelu(gated.col(c).array()) * gate;
    }
  }
}

/// An attention's v, the tile that `fused` computed, into the `channels` columns of `values` (tile pixels, rows
/// `cols` apart).
template <class T>
void attention_values(NormPointwiseDepthwiseTile<T>& fused, int64_t channels, ColMatrix<T>& values, int64_t cols) {
  fused.expand(0, channels, 0);
  for (int64_t c = 0; c < channels; ++c) fused.depthwise(c, c, values.col(c).data(), cols);
}

/// out = residual + P f on a rows x cols window, for a tile's `hidden` planes f (the columns of `mixed`, rows
/// `cols` apart) and P (channels x hidden, row-major): computed into the tile buffer `result`, then streamed
/// to `out` (stream_planes; the caller fences).
template <class T>
void project_tile(const ColMatrix<T>& mixed, int64_t hidden, const T* projection, int64_t channels,
                  PlaneWindow<const T> residual, int64_t rows, int64_t cols, ColMatrix<T>& result, PlaneWindow<T> out) {
  result.resize(NormPointwiseDepthwiseTile<T>::padded(rows * cols), channels);
  pointwise<T>({mixed.data(), mixed.rows(), cols}, hidden, projection, hidden, channels, residual,
               {result.data(), result.rows(), cols}, rows, cols);
  stream_planes<T>(result.data(), result.rows(), channels, rows, cols, out);
}

/// y = x + P_n f(dwconv3x3(W_in LN(x))) for each image n, over the tiles of NormPointwiseDepthwiseTile (the
/// residual half of a fused block): mix(fused, f, scratch, cols) writes f of the tile's W_in channels into the
/// `hidden` columns of f (tile pixels x hidden), and the projection P_n = projection(n) (C x hidden, row-major)
/// adds them to x's window as it writes y's. y: a block-contiguous tensor of x's shape.
template <class T, class Mix, class Projection>
void residual_tiles(const BlockInputs& in, double eps, int64_t hidden, const Mix& mix, const Projection& projection,
                    torch::Tensor& y) {
  using Fused = NormPointwiseDepthwiseTile<T>;
  const torch::Tensor& xc = in.x;
  const int64_t batch = xc.size(0), channels = xc.size(1), height = xc.size(2), width = xc.size(3);
  const int64_t pixels = height * width;
  const std::vector<typename Fused::Tile> tiles = Fused::tiles(height, width);
  const auto count = static_cast<int64_t>(tiles.size());
  detail::for_each_item(batch * count, [&](const auto& next) {
    Fused fused = in.tile<T>(eps);
    ColMatrix<T> mixed, result;
    Array<T> scratch;
    for (int64_t item = 0; next(item);) {
      const int64_t n = item / count;
      const auto& tile = tiles[static_cast<size_t>(item % count)];
      const int64_t rows = tile.r1 - tile.r0, cols = tile.c1 - tile.c0;
      fused.compute(n, tile);
      mixed.resize(rows * cols, hidden);
      mix(fused, mixed, scratch, cols);
      const int64_t offset = tile.r0 * width + tile.c0;
      project_tile<T>(mixed, hidden, projection(n), channels,
                      {xc.data_ptr<T>() + n * xc.stride(0) + offset, pixels, width}, rows, cols, result,
                      {y.data_ptr<T>() + n * y.stride(0) + offset, pixels, width});
    }
    store_fence();
  });
}

/// Checks a gated feed-forward's weights against its input x (w_in: 2H x C, w_out: C x H); returns H.
inline int64_t feed_forward_hidden(const char* kernel, const torch::Tensor& x, const torch::Tensor& w_in,
                                   const torch::Tensor& w_out) {
  const int64_t channels = x.size(1), hidden2 = w_in.size(0), hidden = hidden2 / 2;
  TORCH_CHECK(hidden2 == 2 * hidden && w_out.dim() == 4 && w_out.size(0) == channels && w_out.size(1) == hidden,
              "tdfusion: ", kernel, " kernel got output weight ", w_out.sizes(), " for ", channels, " channels and ",
              hidden2, " hidden ones");
  return hidden;
}

/// Checks an attention's value weight (C x C) and mixing matrices (N x C x C) against its input x.
inline void check_attention_weights(const char* kernel, const torch::Tensor& x, const torch::Tensor& w_v,
                                    const torch::Tensor& mixing) {
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(w_v.size(0) == channels && mixing.dim() == 3 && mixing.size(0) == batch && mixing.size(1) == channels &&
                  mixing.size(2) == channels && mixing.scalar_type() == x.scalar_type(),
              "tdfusion: ", kernel, " kernel got value weight ", w_v.sizes(), " and mixing matrices ", mixing.sizes(),
              " for input ", x.sizes());
}

}  // namespace detail

/// The feed-forward half of a Restormer transformer block, x + W_out (gelu(a) * b) with [a; b] =
/// dwconv3x3(W_in LN(x)), in one pass over cache-sized tiles (inference only): the 2H- and H-channel
/// intermediates stay in cache instead of streaming through memory; each tile recomputes the LayerNorm and W_in
/// of its one-pixel halo. x: N x C x H x W; ln_w, ln_b: C; w_in: 2H x C x 1 x 1; w_dw: 2H x 1 x 3 x 3;
/// w_out: C x H x 1 x 1. Undefined ln_w and ln_b: without the LayerNorm.
inline torch::Tensor feed_forward_block(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                        const torch::Tensor& w_in, const torch::Tensor& w_dw,
                                        const torch::Tensor& w_out, double eps) {
  RECORD_FUNCTION("tdfusion::feed_forward_block", std::vector<c10::IValue>());
  const detail::BlockInputs in(x, ln_w, ln_b, w_in, w_dw);
  const int64_t channels = x.size(1), hidden = detail::feed_forward_hidden("feed_forward_block", x, w_in, w_out);
  multiply_adds() += x.size(0) * x.size(2) * x.size(3) * hidden * (3 * channels + 18);
  const torch::Tensor wout = w_out.contiguous();
  torch::Tensor y = detail::new_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_feed_forward_block", [&] {
    using T = scalar_t;
    auto gated = [hidden](auto& fused, detail::ColMatrix<T>& out, detail::Array<T>& gate, int64_t cols) {
      detail::gated_values(fused, hidden, out, gate, cols);
    };
    detail::residual_tiles<T>(in, eps, hidden, gated, [&](int64_t) { return wout.data_ptr<T>(); }, y);
  });
  return y;
}

namespace detail {

/// The per-head Gram matrices q_a k_b^T for the source pairs (a, b) in `pairs`, and the row norms |q_s|, |k_s|
/// of every source s, where source s's q and k are the channel halves of dwconv3x3(W_qk LN(x)) of sources[s]
/// (inputs of one shape, weights of one shape), in one pass over cache-sized tiles: q and k never leave the
/// cache. Sums over a tile are taken in T, over tiles in double. Returns the Gram matrices (N x heads x d x d),
/// one per pair, then |q_s| and |k_s| (N x heads x d) of each source in turn.
template <class T>
std::vector<torch::Tensor> attention_gram_pass(const std::vector<BlockInputs>& sources,
                                               const std::vector<std::pair<size_t, size_t>>& pairs, int64_t heads,
                                               double eps) {
  const torch::Tensor& x = sources.front().x;
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  const int64_t qk = sources.front().w_in.size(0), dim = qk / 2, d = heads > 0 ? dim / heads : 0;
  TORCH_CHECK(qk == 2 * dim && heads > 0 && dim == heads * d, "tdfusion: attention_gram kernel cannot split ", qk,
              " channels into q and k of ", heads, " heads");
  for (const BlockInputs& source : sources) {
    TORCH_CHECK(source.x.sizes() == x.sizes() && source.w_in.size(0) == qk, "tdfusion: attention_gram kernel got inputs ",
                x.sizes(), " and ", source.x.sizes(), " with ", qk, " and ", source.w_in.size(0), " channels of q and k");
    multiply_adds() += batch * height * width * qk * (source.x.size(1) + 10);
  }
  multiply_adds() += batch * height * width * static_cast<int64_t>(pairs.size()) * dim * d;
  const auto options = x.options().memory_format(torch::MemoryFormat::Contiguous);
  std::vector<torch::Tensor> results;
  for (size_t i = 0; i < pairs.size() + 2 * sources.size(); ++i) {
    results.push_back(i < pairs.size() ? torch::zeros({batch, heads, d, d}, options) : torch::zeros({batch, heads, d}, options));
  }
  if (x.numel() == 0) return results;
  using Fused = NormPointwiseDepthwiseTile<T>;
  const auto source_count = static_cast<int64_t>(sources.size());
  const std::vector<typename Fused::Tile> tiles = Fused::tiles(height, width);
  const auto count = static_cast<int64_t>(tiles.size());
  // Per tile: each pair's heads' d x d Gram matrices, then the squared norms of each source's q and k rows.
  const int64_t grams = static_cast<int64_t>(pairs.size()) * heads * d * d, sums = grams + source_count * qk;
  std::vector<double> partial(static_cast<size_t>(batch * count * sums));
  detail::for_each_item(batch * count, [&](const auto& next) {
    std::vector<Fused> fused;
    for (const BlockInputs& source : sources) fused.push_back(source.tile<T>(eps));
    ColMatrix<T> head;  // one head's q and k rows of each source over the tile: pixels x (sources 2d)
    // Columns of source s's q row i and k row i of the head.
    auto q_col = [&](size_t s, int64_t i) { return head.col(static_cast<int64_t>(s) * 2 * d + i); };
    auto k_col = [&](size_t s, int64_t i) { return head.col(static_cast<int64_t>(s) * 2 * d + d + i); };
    for (int64_t item = 0; next(item);) {
      const auto& tile = tiles[static_cast<size_t>(item % count)];
      const int64_t cols = tile.c1 - tile.c0;
      for (Fused& source : fused) {
        source.compute(item / count, tile);
        source.expand(0, qk, 0);
      }
      head.resize((tile.r1 - tile.r0) * cols, source_count * 2 * d);
      double* out = partial.data() + item * sums;
      for (int64_t h = 0; h < heads; ++h) {
        for (size_t s = 0; s < fused.size(); ++s) {
          for (int64_t i = 0; i < d; ++i) {
            fused[s].depthwise(h * d + i, h * d + i, q_col(s, i).data(), cols);
            fused[s].depthwise(dim + h * d + i, dim + h * d + i, k_col(s, i).data(), cols);
          }
        }
        for (size_t p = 0; p < pairs.size(); ++p) {
          for (int64_t i = 0; i < d; ++i) {
            for (int64_t j = 0; j < d; ++j) {
              out[((static_cast<int64_t>(p) * heads + h) * d + i) * d + j] = q_col(pairs[p].first, i).dot(k_col(pairs[p].second, j));
            }
          }
        }
        for (size_t s = 0; s < fused.size(); ++s) {
          double* norms = out + grams + static_cast<int64_t>(s) * qk + h * d;
          for (int64_t i = 0; i < d; ++i) {
            norms[i] = q_col(s, i).squaredNorm();
            norms[dim + i] = k_col(s, i).squaredNorm();
          }
        }
      }
    }
  });
  for (int64_t n = 0; n < batch; ++n) {
    std::vector<double> total(static_cast<size_t>(sums), 0.0);
    for (int64_t t = 0; t < count; ++t) {
      const double* part = partial.data() + (n * count + t) * sums;
      for (int64_t e = 0; e < sums; ++e) total[static_cast<size_t>(e)] += part[e];
    }
    for (size_t p = 0; p < pairs.size(); ++p) {
      T* g = results[p].data_ptr<T>() + n * heads * d * d;
      const double* sum = total.data() + static_cast<int64_t>(p) * heads * d * d;
      for (int64_t e = 0; e < heads * d * d; ++e) g[e] = static_cast<T>(sum[e]);
    }
    for (size_t s = 0; s < sources.size(); ++s) {
      const double* squares = total.data() + grams + static_cast<int64_t>(s) * qk;
      T* qn = results[pairs.size() + 2 * s].data_ptr<T>() + n * dim;
      T* kn = results[pairs.size() + 2 * s + 1].data_ptr<T>() + n * dim;
      for (int64_t e = 0; e < dim; ++e) {
        qn[e] = static_cast<T>(std::sqrt(squares[e]));
        kn[e] = static_cast<T>(std::sqrt(squares[dim + e]));
      }
    }
  }
  return results;
}

}  // namespace detail

/// The per-head Gram matrices q_h k_h^T and the row norms |q_c|, |k_c| of a Restormer attention's q and k, the
/// channel halves of dwconv3x3(W_qk LN(x)), in one pass over cache-sized tiles (inference only; see
/// detail::attention_gram_pass). x: N x C x H x W; ln_w, ln_b: C; w_qk: 2D x C x 1 x 1; w_dw: 2D x 1 x 3 x 3,
/// heads dividing D. Returns {gram: N x heads x d x d, q_norm, k_norm: N x heads x d} (d = D / heads).
/// Undefined ln_w and ln_b: without the LayerNorm.
inline std::vector<torch::Tensor> attention_gram(const torch::Tensor& x, const torch::Tensor& ln_w,
                                                 const torch::Tensor& ln_b, const torch::Tensor& w_qk,
                                                 const torch::Tensor& w_dw, int64_t heads, double eps) {
  RECORD_FUNCTION("tdfusion::attention_gram", std::vector<c10::IValue>());
  const std::vector<detail::BlockInputs> sources{{x, ln_w, ln_b, w_qk, w_dw}};
  std::vector<torch::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_attention_gram", [&] {
    sums = detail::attention_gram_pass<scalar_t>(sources, {{0, 0}}, heads, eps);
  });
  return sums;
}

/// The two attentions' sums of a cross attention between x1 and x2 (ReFusion's fusion module, no LayerNorm),
/// where q_i and k_i are the channel halves of dwconv3x3(W_qk_i x_i): the per-head Gram matrices q_2 k_1^T and
/// q_1 k_2^T and the norms of the four, in one pass over both inputs (see detail::attention_gram_pass). x1, x2:
/// N x C x H x W; w_qk_i: 2D x C x 1 x 1; w_dw_i: 2D x 1 x 3 x 3. Returns {q_2 k_1^T, q_1 k_2^T, |q_1|, |k_1|,
/// |q_2|, |k_2|}.
inline std::vector<torch::Tensor> cross_attention_gram(const torch::Tensor& x1, const torch::Tensor& w_qk1,
                                                       const torch::Tensor& w_dw1, const torch::Tensor& x2,
                                                       const torch::Tensor& w_qk2, const torch::Tensor& w_dw2,
                                                       int64_t heads) {
  RECORD_FUNCTION("tdfusion::cross_attention_gram", std::vector<c10::IValue>());
  const torch::Tensor none;
  const std::vector<detail::BlockInputs> sources{{x1, none, none, w_qk1, w_dw1}, {x2, none, none, w_qk2, w_dw2}};
  std::vector<torch::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tdfusion_cross_attention_gram", [&] {
    sums = detail::attention_gram_pass<scalar_t>(sources, {{1, 0}, {0, 1}}, heads, 0.0);
  });
  return sums;
}

/// The output of a Restormer channel attention with its residual, x + M_n v with v = dwconv3x3(W_v LN(x)), in
/// one pass over cache-sized tiles (inference only): v never leaves the cache. M_n = W_proj blockdiag(attn_n)
/// folds image n's attention matrices and the output projection into one C x C matrix (nn::attention_mixing).
/// x: N x C x H x W; ln_w, ln_b: C; w_v: C x C x 1 x 1; w_dw: C x 1 x 3 x 3; mixing: N x C x C. Undefined ln_w
/// and ln_b: without the LayerNorm. Written into `out` where it is given (a block-contiguous tensor of x's
/// shape sharing no memory with x, e.g. channels of a larger tensor), else into a new tensor; returns it.
inline torch::Tensor attention_output(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                      const torch::Tensor& w_v, const torch::Tensor& w_dw, const torch::Tensor& mixing,
                                      double eps, const torch::Tensor& out = {}) {
  RECORD_FUNCTION("tdfusion::attention_output", std::vector<c10::IValue>());
  const detail::BlockInputs in(x, ln_w, ln_b, w_v, w_dw);
  const int64_t batch = x.size(0), channels = x.size(1);
  detail::check_attention_weights("attention_output", x, w_v, mixing);
  multiply_adds() += batch * x.size(2) * x.size(3) * channels * (2 * channels + 9);
  TORCH_CHECK(!out.defined() || (out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                                  out.device() == x.device() && detail::block_contiguous(out)),
              "tdfusion: attention_output kernel cannot write its ", x.sizes(), " output into ", out.sizes());
  const torch::Tensor mc = mixing.contiguous();
  torch::Tensor y = out.defined() ? out : detail::new_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_attention_output", [&] {
    using T = scalar_t;
    auto values = [channels](auto& fused, detail::ColMatrix<T>& out, detail::Array<T>&, int64_t cols) {
      detail::attention_values(fused, channels, out, cols);
    };
    const T* matrices = mc.data_ptr<T>();
    detail::residual_tiles<T>(in, eps, channels, values, [&](int64_t n) { return matrices + n * channels * channels; }, y);
  });
  return y;
}

/// A Restormer transformer block once its attention matrices are known, z = y + W_out (gelu(a) * b) with
/// [a; b] = dwconv3x3(W_in LN2(y)), y = x + M_n dwconv3x3(W_v LN1(x)), in one pass over cache-sized tiles
/// (inference only): attention_output then feed_forward_block, without y ever leaving the cache, which spares
/// a feature map's write and read. Each tile computes y on itself and the one-pixel ring that the feed-forward's
/// depthwise convolution reads, so the attention's part is done anew on that ring (about 9 % more of it on
/// 2048-pixel tiles). Arguments as for attention_output (ln1_w, ln1_b, w_v, w_dv, mixing) and
/// feed_forward_block (ln2_w, ln2_b, w_in, w_dw, w_out).
inline torch::Tensor attention_feed_forward(const torch::Tensor& x, const torch::Tensor& ln1_w,
                                            const torch::Tensor& ln1_b, const torch::Tensor& w_v,
                                            const torch::Tensor& w_dv, const torch::Tensor& mixing,
                                            const torch::Tensor& ln2_w, const torch::Tensor& ln2_b,
                                            const torch::Tensor& w_in, const torch::Tensor& w_dw,
                                            const torch::Tensor& w_out, double eps) {
  RECORD_FUNCTION("tdfusion::attention_feed_forward", std::vector<c10::IValue>());
  const detail::BlockInputs attention(x, ln1_w, ln1_b, w_v, w_dv), feed_forward(x, ln2_w, ln2_b, w_in, w_dw);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  detail::check_attention_weights("attention_feed_forward", x, w_v, mixing);
  const int64_t hidden = detail::feed_forward_hidden("attention_feed_forward", x, w_in, w_out);
  multiply_adds() += batch * height * width * (channels * (2 * channels + 9) + hidden * (3 * channels + 18));
  const torch::Tensor mc = mixing.contiguous(), wout = w_out.contiguous();
  torch::Tensor z = detail::new_like(x);
  if (z.numel() == 0) return z;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tdfusion_attention_feed_forward", [&] {
    using T = scalar_t;
    using Fused = detail::NormPointwiseDepthwiseTile<T>;
    const T* const xd = attention.x.data_ptr<T>();
    const int64_t pixels = height * width;
    const std::vector<typename Fused::Tile> tiles = Fused::tiles(height, width);
    const auto count = static_cast<int64_t>(tiles.size());
    detail::for_each_item(batch * count, [&](const auto& next) {
      Fused attend = attention.tile<T>(eps), feed = feed_forward.tile<T>(eps);
      detail::ColMatrix<T> values, y, gated, result;
      detail::Array<T> gate;
      for (int64_t item = 0; next(item);) {
        const int64_t n = item / count;
        const auto& tile = tiles[static_cast<size_t>(item % count)];
        // y on the tile and its ring inside the image, each plane one run of whole vectors, zero beyond `len`
        const typename Fused::Tile ring{std::max<int64_t>(0, tile.r0 - 1), std::min(height, tile.r1 + 1),
                                        std::max<int64_t>(0, tile.c0 - 1), std::min(width, tile.c1 + 1)};
        const int64_t ring_cols = ring.c1 - ring.c0, len = (ring.r1 - ring.r0) * ring_cols;
        const int64_t plane = Fused::padded(len);
        attend.compute(n, ring);
        values.resize(plane, channels);
        detail::attention_values(attend, channels, values, ring_cols);
        y.resize(plane, channels);
        for (int64_t c = 0; c < channels; ++c) {
          const T* from = xd + (n * channels + c) * pixels + ring.r0 * width + ring.c0;
          for (int64_t r = 0; r < ring.r1 - ring.r0; ++r) {
            std::copy(from + r * width, from + r * width + ring_cols, y.col(c).data() + r * ring_cols);
          }
        }
        values.bottomRows(plane - len).setZero();
        y.bottomRows(plane - len).setZero();
        // y = x + M_n v: x's window, copied in above, is the residual, added onto in place, over each plane as one
        // row of whole vectors (the ring's rows, 2 columns wider than the tile's, would leave 2 to scalar code).
        detail::pointwise<T>({values.data(), plane, plane}, channels, mc.data_ptr<T>() + n * channels * channels,
                             channels, channels, {y.data(), plane, plane}, {y.data(), plane, plane}, 1, plane);
        feed.compute({{y.data(), plane, ring_cols}, ring.r0, ring.c0}, tile);
        const int64_t rows = tile.r1 - tile.r0, cols = tile.c1 - tile.c0;
        gated.resize(rows * cols, hidden);
        detail::gated_values(feed, hidden, gated, gate, cols);
        const T* y_tile = y.data() + (tile.r0 - ring.r0) * ring_cols + (tile.c0 - ring.c0);
        detail::project_tile<T>(gated, hidden, wout.data_ptr<T>(), channels, {y_tile, plane, ring_cols}, rows, cols,
                                result, {z.data_ptr<T>() + n * z.stride(0) + tile.r0 * width + tile.c0, pixels, width});
      }
      detail::store_fence();
    });
  });
  return z;
}

}  // namespace tdfusion::nn::kernels

// CPU kernels of the resnet_fused ops (schemas in csrc/ops.cpp, spec in resnet_fused/reference.py).
//
// Layouts: an input is processed in one of two dense layouts, without copies:
//   * NCHW  (`input.is_contiguous()`): viewed as [N, C, S], S = prod(spatial); inner loops run over S.
//   * NHWC  ("channels last": [N, *spatial, C] dense, C innermost, any rank >= 3): viewed as [M, C],
//     M = N*S; inner loops run over C.
// Any other layout is made contiguous first. Tensors that go with the input (residual, grad_out,
// output) are brought to the input's layout (a copy only when theirs differs), so one linear index
// addresses all of them; outputs are `empty_like(input)` (same strides, same memory format).
//
// Reductions (bn_stats, bn_backward_reduce) are deterministic whatever the thread count: the work is
// cut into fixed chunks that depend only on the shape, each chunk is summed sequentially by one
// thread in the accumulation type (at::opmath_type), and the chunk partials of a channel are merged
// in double in a fixed order.
//
// The loops are plain scalar loops parallelized with at::parallel_for; vectorization with at::vec
// (and per-capability builds) is a later issue. The per-element formulas live in csrc/bn_math.h,
// shared with the CUDA kernels. All indexing is int64.

// Narrow ATen headers (not ATen/ATen.h) keep the compile short.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bn_math.h"

namespace resnet_fused {
namespace cpu {
namespace {

using at::Tensor;
namespace rm = ::resnet_fused::math;

// ---------------------------------------------------------------------------------------------
// chunking constants (shape-only: never derived from the thread count)
// ---------------------------------------------------------------------------------------------
constexpr int64_t kNchwChunk = 2048;   // elements of one channel per reduction chunk (NCHW)
constexpr int64_t kNhwcRows = 256;     // rows per reduction chunk (channels last)
constexpr int64_t kNhwcChannels = 64;  // channels per reduction chunk (channels last)
constexpr int64_t kGrain = 32768;  // elements below which work stays serial (ATen's GRAIN_SIZE)

// ---------------------------------------------------------------------------------------------
// validation and layout
// ---------------------------------------------------------------------------------------------
struct Geometry {
  bool channels_last = false;
  int64_t N = 0, C = 0, S = 0;  // S = prod(spatial sizes)
  int64_t numel = 0;
};

void check_input(const char* op, const Tensor& input) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have rank >= 2 ([N, C, *]), got rank ", input.dim(),
              " with shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got dtype ", input.scalar_type());
}

bool is_channels_last_dense(const Tensor& t) {
  return t.dim() >= 3 && t.movedim(1, -1).is_contiguous();
}

// The input in a layout the kernels handle: NCHW-contiguous or channels-last dense.
Tensor normalize_layout(const Tensor& input, Geometry& geo) {
  Tensor x = input;
  if (x.is_contiguous()) {
    geo.channels_last = false;
  } else if (is_channels_last_dense(x)) {
    geo.channels_last = true;
  } else {
    x = x.contiguous();
    geo.channels_last = false;
  }
  geo.N = x.size(0);
  geo.C = x.size(1);
  geo.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) geo.S *= x.size(d);
  geo.numel = x.numel();
  return x;
}

// `t` in the input's layout (copied only if its own layout differs).
Tensor match_layout(const Tensor& t, const Geometry& geo) {
  if (geo.channels_last) {
    return is_channels_last_dense(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.is_contiguous() ? t : t.contiguous();
}

// A tensor that goes with the input (grad_out, output, residual): same shape, dtype and device.
void check_like_input(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device(), " (tensors on different devices)");
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ",
              input.sizes(), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
              input.scalar_type(), ", got dtype ", t.scalar_type());
}

// A per-channel vector converted to the accumulation dtype (a tiny copy at most).
Tensor channel_vector(const char* op, const char* name, const Tensor& v, const Tensor& input,
                      int64_t C, at::ScalarType acc) {
  TORCH_CHECK(v.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(v.device() == input.device(), op, ": ", name, " is on ", v.device(),
              " but input is on ", input.device(), " (tensors on different devices)");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", name,
              " must be a per-channel vector of length C=", C, ", got shape ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": ", name,
              " must have a floating dtype, got dtype ", v.scalar_type());
  return v.to(acc).contiguous();
}

bool present(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename F>
void bool_dispatch(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// loop skeletons
// ---------------------------------------------------------------------------------------------

// Calls op(i, c) for every element: i is the linear index into the (layout-matched) dense buffers,
// c its channel. NCHW: spatial-inner segments of constant channel; channels last: channel-inner.
template <typename Op>
void elementwise_loop(const Geometry& geo, const Op& op) {
  const int64_t C = geo.C, S = geo.S;
  if (geo.numel == 0) return;
  if (!geo.channels_last) {
    at::parallel_for(0, geo.numel, kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t plane = i / S;
        const int64_t c = plane % C;
        const int64_t seg_end = std::min(end, (plane + 1) * S);
        for (; i < seg_end; ++i) op(i, c);
      }
    });
  } else {
    const int64_t M = geo.N * S;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)),
                     [&](int64_t row_begin, int64_t row_end) {
                       for (int64_t r = row_begin; r < row_end; ++r) {
                         const int64_t base = r * C;
                         for (int64_t c = 0; c < C; ++c) op(base + c, c);
                       }
                     });
  }
}

// Sums of one chunk of one channel, taken about `shift` (0 where no shift is needed).
struct ChunkSums {
  double n = 0, shift = 0, s1 = 0, s2 = 0;
};

// Chunked per-channel reduction. For each chunk and channel:
//   K = shift(i_first, c); for each element i: elem(i, c, K, s1, s2)  (s1, s2 in acc_t)
// Returns the partials channel-major: parts[c * chunks + j], j in a fixed order.
template <typename acc_t, typename Shift, typename Elem>
std::vector<ChunkSums> chunked_channel_sums(const Geometry& geo, int64_t& chunks, const Shift& shift,
                                            const Elem& elem) {
  const int64_t N = geo.N, C = geo.C, S = geo.S;
  std::vector<ChunkSums> parts;
  chunks = 0;
  if (geo.numel == 0) return parts;
  if (!geo.channels_last) {
    // A chunk: one channel, planes [n0, n1), spatial range [s0, s1); about kNchwChunk elements.
    const int64_t planes_per_chunk = S >= kNchwChunk ? 1 : kNchwChunk / S;
    const int64_t piece = S >= kNchwChunk ? kNchwChunk : S;
    const int64_t pieces = (S + piece - 1) / piece;
    const int64_t nblocks = (N + planes_per_chunk - 1) / planes_per_chunk;
    chunks = nblocks * pieces;
    parts.resize(static_cast<size_t>(C * chunks));
    const int64_t elems_per_task = std::min<int64_t>(planes_per_chunk, N) * piece;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(elems_per_task, 1));
    at::parallel_for(0, C * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / chunks;
        const int64_t j = t % chunks;
        const int64_t n0 = (j / pieces) * planes_per_chunk;
        const int64_t n1 = std::min(N, n0 + planes_per_chunk);
        const int64_t s0 = (j % pieces) * piece;
        const int64_t s1_end = std::min(S, s0 + piece);
        const acc_t K = shift((n0 * C + c) * S + s0, c);
        acc_t s1 = acc_t(0), s2 = acc_t(0);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t base = (n * C + c) * S;
          for (int64_t s = s0; s < s1_end; ++s) elem(base + s, c, K, s1, s2);
        }
        ChunkSums& p = parts[static_cast<size_t>(t)];
        p.n = static_cast<double>((n1 - n0) * (s1_end - s0));
        p.shift = static_cast<double>(K);
        p.s1 = static_cast<double>(s1);
        p.s2 = static_cast<double>(s2);
      }
    });
  } else {
    // A chunk: rows [r0, r1) (kNhwcRows) x channels [c0, c1) (kNhwcChannels).
    const int64_t M = N * S;
    const int64_t row_blocks = (M + kNhwcRows - 1) / kNhwcRows;
    const int64_t chan_blocks = (C + kNhwcChannels - 1) / kNhwcChannels;
    chunks = row_blocks;
    parts.resize(static_cast<size_t>(C * chunks));
    const int64_t elems_per_task = std::min(M, kNhwcRows) * std::min(C, kNhwcChannels);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(elems_per_task, 1));
    at::parallel_for(0, row_blocks * chan_blocks, grain, [&](int64_t begin, int64_t end) {
      acc_t K[kNhwcChannels], s1[kNhwcChannels], s2[kNhwcChannels];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t rb = t / chan_blocks;
        const int64_t c0 = (t % chan_blocks) * kNhwcChannels;
        const int64_t c1 = std::min(C, c0 + kNhwcChannels);
        const int64_t r0 = rb * kNhwcRows;
        const int64_t r1 = std::min(M, r0 + kNhwcRows);
        for (int64_t c = c0; c < c1; ++c) {
          K[c - c0] = shift(r0 * C + c, c);
          s1[c - c0] = acc_t(0);
          s2[c - c0] = acc_t(0);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = r * C;
          for (int64_t c = c0; c < c1; ++c) elem(base + c, c, K[c - c0], s1[c - c0], s2[c - c0]);
        }
        for (int64_t c = c0; c < c1; ++c) {
          ChunkSums& p = parts[static_cast<size_t>(c * chunks + rb)];
          p.n = static_cast<double>(r1 - r0);
          p.shift = static_cast<double>(K[c - c0]);
          p.s1 = static_cast<double>(s1[c - c0]);
          p.s2 = static_cast<double>(s2[c - c0]);
        }
      }
    });
  }
  return parts;
}

// ---------------------------------------------------------------------------------------------
// bn_stats
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& input_) {
  constexpr const char* op = "bn_stats";
  check_input(op, input_);
  Geometry geo;
  const Tensor input = normalize_layout(input_, geo);
  const auto acc = opmath_scalar_type(input.scalar_type());
  Tensor mean = at::empty({geo.C}, input.options().dtype(acc));
  Tensor var = at::empty({geo.C}, input.options().dtype(acc));
  if (geo.C == 0) return std::make_tuple(mean, var);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* var_p = var.mutable_data_ptr<acc_t>();
    int64_t chunks = 0;
    // Shifted sums about the chunk's first element: no catastrophic cancellation for inputs whose
    // mean is large compared with their spread; chunks are merged with Chan's formula in double.
    const auto parts = chunked_channel_sums<acc_t>(
        geo, chunks, [&](int64_t i, int64_t) { return static_cast<acc_t>(x[i]); },
        [&](int64_t i, int64_t, acc_t K, acc_t& s1, acc_t& s2) {
          const acc_t d = static_cast<acc_t>(x[i]) - K;
          s1 += d;
          s2 += d * d;
        });
    at::parallel_for(0, geo.C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        rm::StatsPartial<double> total{0.0, 0.0, 0.0};
        for (int64_t j = 0; j < chunks; ++j) {
          const ChunkSums& p = parts[static_cast<size_t>(c * chunks + j)];
          total = rm::stats_merge(total, rm::stats_from_shifted_sums(p.n, p.shift, p.s1, p.s2));
        }
        if (total.n == 0.0) {  // empty channel: NaN, like torch's mean over no elements
          mean_p[c] = std::numeric_limits<acc_t>::quiet_NaN();
          var_p[c] = std::numeric_limits<acc_t>::quiet_NaN();
        } else {
          mean_p[c] = static_cast<acc_t>(total.mean);
          var_p[c] = static_cast<acc_t>(rm::stats_biased_var(total));
        }
      }
    });
  });
  return std::make_tuple(mean, var);
}

// ---------------------------------------------------------------------------------------------
// bn_apply
// ---------------------------------------------------------------------------------------------
Tensor bn_apply_cpu(const Tensor& input_, const Tensor& scale_, const Tensor& shift_,
                    const c10::optional<Tensor>& residual_, const c10::optional<Tensor>& res_scale_,
                    const c10::optional<Tensor>& res_shift_, bool relu) {
  constexpr const char* op = "bn_apply";
  check_input(op, input_);
  const bool has_res = present(residual_);
  const bool has_res_affine = present(res_scale_);
  TORCH_CHECK(has_res_affine == present(res_shift_), op,
              ": res_scale and res_shift must be given together (both or neither)");
  TORCH_CHECK(!has_res_affine || has_res, op, ": res_scale/res_shift need a residual");
  if (has_res) check_like_input(op, "residual", *residual_, input_);

  Geometry geo;
  const Tensor input = normalize_layout(input_, geo);
  const int64_t C = geo.C;
  const auto acc = opmath_scalar_type(input.scalar_type());
  const Tensor scale = channel_vector(op, "scale", scale_, input, C, acc);
  const Tensor shift = channel_vector(op, "shift", shift_, input, C, acc);
  Tensor residual, res_scale, res_shift;
  if (has_res) residual = match_layout(*residual_, geo);
  if (has_res_affine) {
    res_scale = channel_vector(op, "res_scale", *res_scale_, input, C, acc);
    res_shift = channel_vector(op, "res_shift", *res_shift_, input, C, acc);
  }
  Tensor out = at::empty_like(input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    bool_dispatch(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      if (!has_res) {
        elementwise_loop(geo, [&](int64_t i, int64_t c) {
          y[i] = static_cast<scalar_t>(rm::bn_apply_plain(static_cast<acc_t>(x[i]), sc[c], sh[c], kRelu));
        });
        return;
      }
      const scalar_t* r = residual.const_data_ptr<scalar_t>();
      if (!has_res_affine) {
        elementwise_loop(geo, [&](int64_t i, int64_t c) {
          y[i] = static_cast<scalar_t>(rm::bn_apply_residual(
              static_cast<acc_t>(x[i]), sc[c], sh[c], static_cast<acc_t>(r[i]), kRelu));
        });
        return;
      }
      const acc_t* rsc = res_scale.const_data_ptr<acc_t>();
      const acc_t* rsh = res_shift.const_data_ptr<acc_t>();
      elementwise_loop(geo, [&](int64_t i, int64_t c) {
        y[i] = static_cast<scalar_t>(rm::bn_apply_residual_affine(
            static_cast<acc_t>(x[i]), sc[c], sh[c], static_cast<acc_t>(r[i]), rsc[c], rsh[c], kRelu));
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
struct BackwardOperands {
  Geometry geo;
  Tensor input, grad_out, output;  // grad_out and output in the input's layout
};

BackwardOperands backward_operands(const char* op, const Tensor& grad_out_, const Tensor& input_,
                                   const c10::optional<Tensor>& output_, bool relu) {
  check_input(op, input_);
  TORCH_CHECK(grad_out_.defined(), op, ": grad_out is undefined");
  check_like_input(op, "grad_out", grad_out_, input_);
  const bool has_output = present(output_);
  TORCH_CHECK(!relu || has_output, op, ": relu=True requires output (the forward output masks the gradient)");
  if (has_output) check_like_input(op, "output", *output_, input_);
  BackwardOperands b;
  b.input = normalize_layout(input_, b.geo);
  b.grad_out = match_layout(grad_out_, b.geo);
  if (relu) b.output = match_layout(*output_, b.geo);
  return b;
}

std::tuple<Tensor, Tensor> bn_backward_reduce_cpu(const Tensor& grad_out_, const Tensor& input_,
                                                  const c10::optional<Tensor>& output_,
                                                  const Tensor& mean_, bool relu) {
  constexpr const char* op = "bn_backward_reduce";
  BackwardOperands b = backward_operands(op, grad_out_, input_, output_, relu);
  const Geometry& geo = b.geo;
  const auto acc = opmath_scalar_type(b.input.scalar_type());
  const Tensor mean = channel_vector(op, "mean", mean_, b.input, geo.C, acc);
  Tensor sum_dy = at::empty({geo.C}, b.input.options().dtype(acc));
  Tensor sum_dy_xmu = at::empty({geo.C}, b.input.options().dtype(acc));
  if (geo.C == 0) return std::make_tuple(sum_dy, sum_dy_xmu);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.input.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = b.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = b.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* o = relu ? b.output.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* m = mean.const_data_ptr<acc_t>();
    acc_t* sdy = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sdx = sum_dy_xmu.mutable_data_ptr<acc_t>();
    int64_t chunks = 0;
    std::vector<ChunkSums> parts;
    const auto no_shift = [](int64_t, int64_t) { return acc_t(0); };
    bool_dispatch(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      parts = chunked_channel_sums<acc_t>(geo, chunks, no_shift,
                                          [&](int64_t i, int64_t c, acc_t, acc_t& s1, acc_t& s2) {
                                            acc_t g = static_cast<acc_t>(dy[i]);
                                            if (kRelu) g = rm::relu_backward_mask(g, static_cast<acc_t>(o[i]));
                                            s1 += g;
                                            s2 += g * (static_cast<acc_t>(x[i]) - m[c]);
                                          });
    });
    at::parallel_for(0, geo.C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double t1 = 0.0, t2 = 0.0;
        for (int64_t j = 0; j < chunks; ++j) {
          const ChunkSums& p = parts[static_cast<size_t>(c * chunks + j)];
          t1 += p.s1;
          t2 += p.s2;
        }
        sdy[c] = static_cast<acc_t>(t1);
        sdx[c] = static_cast<acc_t>(t2);
      }
    });
  });
  return std::make_tuple(sum_dy, sum_dy_xmu);
}

Tensor bn_backward_apply_cpu(const Tensor& grad_out_, const Tensor& input_, const c10::optional<Tensor>& output_,
                             const Tensor& mean_, const Tensor& invstd_, const c10::optional<Tensor>& weight_,
                             const c10::optional<Tensor>& mean_dy_, const c10::optional<Tensor>& mean_dy_xmu_,
                             bool relu) {
  constexpr const char* op = "bn_backward_apply";
  const bool train = present(mean_dy_);
  TORCH_CHECK(train == present(mean_dy_xmu_), op,
              ": mean_dy and mean_dy_xmu must be given together (both or neither)");
  BackwardOperands b = backward_operands(op, grad_out_, input_, output_, relu);
  const Geometry& geo = b.geo;
  const int64_t C = geo.C;
  const auto acc = opmath_scalar_type(b.input.scalar_type());
  const Tensor mean = channel_vector(op, "mean", mean_, b.input, C, acc);
  const Tensor invstd = channel_vector(op, "invstd", invstd_, b.input, C, acc);
  const Tensor weight = present(weight_) ? channel_vector(op, "weight", *weight_, b.input, C, acc) : Tensor();
  Tensor mean_dy, mean_dy_xmu;
  if (train) {
    mean_dy = channel_vector(op, "mean_dy", *mean_dy_, b.input, C, acc);
    mean_dy_xmu = channel_vector(op, "mean_dy_xmu", *mean_dy_xmu_, b.input, C, acc);
  }
  Tensor grad_in = at::empty_like(b.input);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.input.scalar_type(), "bn_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per-channel coefficients: k = invstd * weight, proj = invstd^2 * mean_dy_xmu.
    std::vector<acc_t> k(static_cast<size_t>(C)), proj(train ? static_cast<size_t>(C) : 0);
    const acc_t* is = invstd.const_data_ptr<acc_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      k[c] = w ? rm::backward_scale(is[c], w[c]) : is[c];
      if (train) proj[c] = rm::backward_proj(is[c], mean_dy_xmu.const_data_ptr<acc_t>()[c]);
    }
    const acc_t* kp = k.data();
    const scalar_t* x = b.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = b.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* o = relu ? b.output.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx = grad_in.mutable_data_ptr<scalar_t>();
    bool_dispatch(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      const auto grad = [&](int64_t i) {
        const acc_t g = static_cast<acc_t>(dy[i]);
        return kRelu ? rm::relu_backward_mask(g, static_cast<acc_t>(o[i])) : g;
      };
      if (!train) {
        elementwise_loop(geo, [&](int64_t i, int64_t c) {
          dx[i] = static_cast<scalar_t>(rm::bn_backward_elem_eval(grad(i), kp[c]));
        });
        return;
      }
      const acc_t* m = mean.const_data_ptr<acc_t>();
      const acc_t* mdy = mean_dy.const_data_ptr<acc_t>();
      const acc_t* pp = proj.data();
      elementwise_loop(geo, [&](int64_t i, int64_t c) {
        dx[i] = static_cast<scalar_t>(
            rm::bn_backward_elem(grad(i), static_cast<acc_t>(x[i]), m[c], mdy[c], pp[c], kp[c]));
      });
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
}

}  // namespace cpu
}  // namespace resnet_fused

// Per-element and per-partial formulas of the fused BatchNorm/ReLU/residual ops, shared by the CPU
// (csrc/cpu) and CUDA (csrc/cuda) kernels: one formula, two backends. The executable spec is
// resnet_fused/reference.py; the order of operations here follows it.
//
// `T` is the accumulation ("opmath") type: float for float/half/bfloat16 storage, double for double.
#pragma once

#include <c10/macros/Macros.h>

#include <limits>
#include <type_traits>

namespace resnet_fused {
namespace math {

// The two selections of the formulas below, for scalar `T`. A SIMD backend specializes `Select`
// for its vector type (csrc/cpu/bn_kernels_impl.h does for at::vec::Vectorized: a compare and a
// blend per lane, the same predicates); everything else here is plain arithmetic (+ - *), which
// vector types provide, so one formula serves scalar, SIMD and CUDA code.
template <typename T>
struct Select {
  // ReLU exactly as torch: `v < 0 -> 0`, so NaN passes through.
  C10_HOST_DEVICE static inline T relu(T v) {
    return v < T(0) ? T(0) : v;
  }
  // ReLU backward (threshold_backward semantics): the gradient is masked where the forward output
  // is <= 0, so a NaN output passes the gradient.
  C10_HOST_DEVICE static inline T relu_backward_mask(T grad, T output) {
    return output <= T(0) ? T(0) : grad;
  }
};

template <typename T>
C10_HOST_DEVICE inline T relu(T v) {
  return Select<T>::relu(v);
}

template <typename T>
C10_HOST_DEVICE inline T relu_backward_mask(T grad, T output) {
  return Select<T>::relu_backward_mask(grad, output);
}

// Gradient after the optional ReLU mask.
template <typename T>
C10_HOST_DEVICE inline T masked_grad(T grad, T output, bool relu) {
  return relu ? relu_backward_mask(grad, output) : grad;
}

// bn_apply without residual: x*scale + shift.
template <typename T>
C10_HOST_DEVICE inline T bn_affine(T x, T scale, T shift) {
  return x * scale + shift;
}

// The largest accumulation value `z` whose ReLU output, stored as scalar_t, is zero: 0 when the
// storage is the accumulation type; half the smallest subnormal for half/bfloat16 storage (those z
// round to zero, ties to even). So "stored relu(z) <= 0" is exactly "z <= relu_zero_bound".
// Host code (launchers pass the value to device code).
template <typename scalar_t, typename T>
inline T relu_zero_bound() {
  if constexpr (std::is_same<scalar_t, T>::value) {
    return T(0);
  } else {
    return static_cast<T>(std::numeric_limits<scalar_t>::denorm_min()) * T(0.5);
  }
}

// ReLU backward with the mask taken from the ReLU's input z = x*scale + shift, recomputed exactly
// as bn_apply computes it, instead of from the stored output (which then need not be kept or read).
// z - bound is exact near the bound (gradual underflow), so its sign is that of z - bound.
template <typename T>
C10_HOST_DEVICE inline T relu_backward_mask_from_input(T grad, T x, T scale, T shift, T zero_bound) {
  return relu_backward_mask(grad, bn_affine(x, scale, shift) - zero_bound);
}

// bn_apply with residual: (x*scale + shift) + residual', then ReLU if asked.
template <typename T>
C10_HOST_DEVICE inline T bn_apply_residual(T x, T scale, T shift, T residual, bool relu_on) {
  const T out = bn_affine(x, scale, shift) + residual;
  return relu_on ? relu(out) : out;
}

// bn_apply with the residual's own affine (the downsample branch's BatchNorm folded in):
// (x*scale + shift) + (r*res_scale + res_shift), then ReLU if asked.
template <typename T>
C10_HOST_DEVICE inline T bn_apply_residual_affine(
    T x, T scale, T shift, T r, T res_scale, T res_shift, bool relu_on) {
  return bn_apply_residual(x, scale, shift, bn_affine(r, res_scale, res_shift), relu_on);
}

template <typename T>
C10_HOST_DEVICE inline T bn_apply_plain(T x, T scale, T shift, bool relu_on) {
  const T out = bn_affine(x, scale, shift);
  return relu_on ? relu(out) : out;
}

// Per-channel coefficients of bn_backward_apply:
//   k    = invstd * weight              (weight None means 1)
//   proj = invstd^2 * mean_dy_xmu
template <typename T>
C10_HOST_DEVICE inline T backward_scale(T invstd, T weight) {
  return invstd * weight;
}

template <typename T>
C10_HOST_DEVICE inline T backward_proj(T invstd, T mean_dy_xmu) {
  return (invstd * invstd) * mean_dy_xmu;
}

// Training form (batch statistics): (g - mean_dy - (x - mean) * proj) * k.
template <typename T>
C10_HOST_DEVICE inline T bn_backward_elem(T g, T x, T mean, T mean_dy, T proj, T k) {
  return (g - mean_dy - (x - mean) * proj) * k;
}

// Eval form (statistics are constants): g * k.
template <typename T>
C10_HOST_DEVICE inline T bn_backward_elem_eval(T g, T k) {
  return g * k;
}

// ---- statistics ------------------------------------------------------------------------------
// Partial statistics of one chunk: element count, mean and M2 = sum((x - mean)^2). Partials are
// merged with Chan's formula, which is exact in exact arithmetic and does not cancel
// catastrophically for inputs whose mean is large compared with their spread.
template <typename T>
struct StatsPartial {
  T n;
  T mean;
  T m2;
};

// Chunk sums taken about a shift K (a sample of the chunk): s1 = sum(x - K), s2 = sum((x - K)^2).
// Since K is close to the chunk's data, s2 - s1^2/n does not cancel catastrophically.
template <typename T>
C10_HOST_DEVICE inline StatsPartial<T> stats_from_shifted_sums(T n, T shift, T s1, T s2) {
  StatsPartial<T> p;
  p.n = n;
  if (n > T(0)) {
    const T d = s1 / n;
    p.mean = shift + d;
    const T m2 = s2 - s1 * d;
    p.m2 = m2 > T(0) ? m2 : T(0);
  } else {
    p.mean = T(0);
    p.m2 = T(0);
  }
  return p;
}

// Chan's merge of partial b into partial a, given the weights wb = n_b / (n_a + n_b) and
// na_wb = n_a * wb (branch-free: for SIMD code that merges many channels whose partials share their
// counts; both counts must be > 0).
template <typename T>
C10_HOST_DEVICE inline void stats_merge_weighted(T& mean_a, T& m2_a, T mean_b, T m2_b, T wb, T na_wb) {
  const T delta = mean_b - mean_a;
  mean_a = mean_a + delta * wb;
  m2_a = m2_a + m2_b + delta * delta * na_wb;
}

template <typename T>
C10_HOST_DEVICE inline StatsPartial<T> stats_merge(const StatsPartial<T>& a, const StatsPartial<T>& b) {
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  StatsPartial<T> r{a.n + b.n, a.mean, a.m2};
  const T wb = b.n / r.n;
  stats_merge_weighted(r.mean, r.m2, b.mean, b.m2, wb, a.n * wb);
  return r;
}

// Biased variance of merged statistics (NaN for an empty channel, like torch's mean of nothing).
template <typename T>
C10_HOST_DEVICE inline T stats_biased_var(const StatsPartial<T>& p) {
  return p.m2 / p.n;
}

}  // namespace math
}  // namespace resnet_fused

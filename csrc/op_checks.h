// Argument checks and layout handling shared by the CPU ops (csrc/cpu/bn_cpu.cpp) and the CUDA ops
// (csrc/cuda/bn_cuda_ops.cpp): one set of error messages and one layout convention for both
// backends. Host code only (ATen tensors).
//
// Layouts: an input is processed as NCHW-contiguous or channels-last dense, without copies; any
// other layout is made contiguous first. Tensors that go with the input (residual, grad_out,
// output) are brought to the input's layout (a copy only when theirs differs), so one linear index
// addresses all of them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "op_geometry.h"

namespace resnet_fused {
namespace op_checks {

using at::Tensor;

inline void check_input(const char* op, const Tensor& input) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have rank >= 2 ([N, C, *]), got rank ", input.dim(),
              " with shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got dtype ", input.scalar_type());
}

// `backend` names the kernels in the message ("CPU", "CUDA").
inline void check_kernel_dtype(const char* op, at::ScalarType t, const char* backend) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": the ", backend, " kernels support float32, float64, bfloat16 and float16, got dtype ", t);
}

inline bool is_channels_last_dense(const Tensor& t) {
  return t.dim() >= 3 && t.movedim(1, -1).is_contiguous();
}

// The input in a layout the kernels handle: NCHW-contiguous or channels-last dense.
inline Tensor normalize_layout(const Tensor& input, Geometry& geo) {
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
  // One element per (n, c): both layouts address (n, c) at n*C + c; the [M, C] loops vectorize
  // across channels, the NCHW ones would see planes of one element.
  if (geo.S == 1) geo.channels_last = true;
  return x;
}

// `t` in the input's layout (copied only if its own layout differs).
inline Tensor match_layout(const Tensor& t, const Geometry& geo) {
  if (geo.S == 1) {
    return (t.is_contiguous() || is_channels_last_dense(t)) ? t : t.contiguous();
  }
  if (geo.channels_last) {
    return is_channels_last_dense(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.is_contiguous() ? t : t.contiguous();
}

// A tensor that goes with the input (grad_out, output, residual): same shape, dtype and device.
inline void check_like_input(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device(), " (tensors on different devices)");
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ",
              input.sizes(), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
              input.scalar_type(), ", got dtype ", t.scalar_type());
}

// A per-channel vector converted to the accumulation dtype (a tiny copy at most).
inline Tensor channel_vector(const char* op, const char* name, const Tensor& v, const Tensor& input,
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

inline bool present(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

// Accumulation dtype: float64 for float64 storage, float32 otherwise.
inline at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// bn_apply's operands, checked and in the kernels' layout, with `out` allocated and `args` filled
// (the caller launches when args.geo.numel > 0). The tensors keep args' pointers alive.
struct ApplyOperands {
  ApplyArgs args{};
  Tensor input, scale, shift, residual, res_scale, res_shift, out;
};

inline ApplyOperands apply_operands(const char* op, const Tensor& input_, const Tensor& scale_,
                                    const Tensor& shift_, const c10::optional<Tensor>& residual_,
                                    const c10::optional<Tensor>& res_scale_,
                                    const c10::optional<Tensor>& res_shift_, bool relu) {
  const bool has_res = present(residual_);
  const bool has_res_affine = present(res_scale_);
  TORCH_CHECK(has_res_affine == present(res_shift_), op,
              ": res_scale and res_shift must be given together (both or neither)");
  TORCH_CHECK(!has_res_affine || has_res, op, ": res_scale/res_shift need a residual");
  if (has_res) check_like_input(op, "residual", *residual_, input_);

  ApplyOperands o;
  ApplyArgs& a = o.args;
  o.input = normalize_layout(input_, a.geo);
  const int64_t C = a.geo.C;
  const auto acc = opmath_scalar_type(o.input.scalar_type());
  o.scale = channel_vector(op, "scale", scale_, o.input, C, acc);
  o.shift = channel_vector(op, "shift", shift_, o.input, C, acc);
  if (has_res) o.residual = match_layout(*residual_, a.geo);
  if (has_res_affine) {
    o.res_scale = channel_vector(op, "res_scale", *res_scale_, o.input, C, acc);
    o.res_shift = channel_vector(op, "res_shift", *res_shift_, o.input, C, acc);
  }
  o.out = at::empty_like(o.input);
  a.dtype = o.input.scalar_type();
  a.input = o.input.const_data_ptr();
  a.residual = has_res ? o.residual.const_data_ptr() : nullptr;
  a.scale = o.scale.const_data_ptr();
  a.shift = o.shift.const_data_ptr();
  a.res_scale = has_res_affine ? o.res_scale.const_data_ptr() : nullptr;
  a.res_shift = has_res_affine ? o.res_shift.const_data_ptr() : nullptr;
  a.out = o.out.mutable_data_ptr();
  a.relu = relu;
  return o;
}

// The backward ops' operands: checked, grad_out and output in the input's layout. The ReLU mask
// comes from `output` or, with mask_scale/mask_shift (the forward's BN affine), from the input
// itself (then mask_scale/mask_shift are per-channel vectors in the accumulation dtype).
struct BackwardOperands {
  Geometry geo;
  Tensor input, grad_out, output, mask_scale, mask_shift;
  bool mask_from_input = false;
};

inline BackwardOperands backward_operands(const char* op, const Tensor& grad_out_, const Tensor& input_,
                                          const c10::optional<Tensor>& output_, bool relu,
                                          const c10::optional<Tensor>& mask_scale_,
                                          const c10::optional<Tensor>& mask_shift_) {
  TORCH_CHECK(grad_out_.defined(), op, ": grad_out is undefined");
  check_like_input(op, "grad_out", grad_out_, input_);
  const bool has_output = present(output_);
  const bool from_input = present(mask_scale_);
  TORCH_CHECK(from_input == present(mask_shift_), op,
              ": mask_scale and mask_shift must be given together (both or neither)");
  TORCH_CHECK(!from_input || (relu && !has_output), op,
              ": mask_scale/mask_shift take the ReLU mask from the input: they need relu=True and no output");
  TORCH_CHECK(!relu || has_output || from_input, op,
              ": relu=True requires output (the forward output masks the gradient) or mask_scale/mask_shift");
  if (has_output) check_like_input(op, "output", *output_, input_);
  BackwardOperands b;
  b.input = normalize_layout(input_, b.geo);
  b.grad_out = match_layout(grad_out_, b.geo);
  b.mask_from_input = from_input;
  if (from_input) {
    const auto acc = opmath_scalar_type(b.input.scalar_type());
    b.mask_scale = channel_vector(op, "mask_scale", *mask_scale_, b.input, b.geo.C, acc);
    b.mask_shift = channel_vector(op, "mask_shift", *mask_shift_, b.input, b.geo.C, acc);
  } else if (relu) {
    b.output = match_layout(*output_, b.geo);
  }
  return b;
}

}  // namespace op_checks
}  // namespace resnet_fused

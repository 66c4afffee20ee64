// CPU implementations of the resnet_fused ops (schemas in csrc/ops.cpp, spec in
// resnet_fused/reference.py): argument checks, layouts, outputs, per-channel coefficients, and the
// choice of the kernels, which live in csrc/cpu/bn_kernels_impl.h (compiled once per CPU
// capability; interface csrc/cpu/bn_kernels.h). This file is compiled once, without ISA flags.
//
// Layouts: an input is processed in one of two dense layouts, without copies:
//   * NCHW  (`input.is_contiguous()`): viewed as [N, C, S], S = prod(spatial); inner loops run over S.
//   * NHWC  ("channels last": [N, *spatial, C] dense, C innermost, any rank >= 3): viewed as [M, C],
//     M = N*S; inner loops run over C. An input with S == 1 ([N, C], [N, C, 1, 1]) is both; it runs
//     as [M, C].
// Any other layout is made contiguous first. Tensors that go with the input (residual, grad_out,
// output) are brought to the input's layout (a copy only when theirs differs), so one linear index
// addresses all of them; outputs are `empty_like(input)` (same strides, same memory format).
//
// Kernels: the table for the capability torch itself runs (at::get_cpu_capability(), "DEFAULT",
// "AVX2" or "AVX512"; ATEN_CPU_CAPABILITY lowers it), or the best compiled one below it.

// Narrow ATen headers (not ATen/ATen.h) keep the compile short.
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "bn_math.h"
#include "op_checks.h"
#include "cpu/bn_kernels.h"

namespace resnet_fused {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// kernel choice
// ---------------------------------------------------------------------------------------------
const KernelTable& kernels() {
  static const KernelTable* const table = [] {
    const std::string cap = at::get_cpu_capability();
    (void)cap;
#ifdef RESNET_FUSED_CPU_AVX512
    if (cap == "AVX512") return &AVX512::kernel_table();
#endif
#ifdef RESNET_FUSED_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") return &AVX2::kernel_table();
#endif
    return &DEFAULT::kernel_table();
  }();
  return *table;
}

const char* compiled_capabilities() {
  return "DEFAULT"
#ifdef RESNET_FUSED_CPU_AVX2
         ",AVX2"
#endif
#ifdef RESNET_FUSED_CPU_AVX512
         ",AVX512"
#endif
      ;
}

namespace {

using at::Tensor;
namespace rm = ::resnet_fused::math;

// ---------------------------------------------------------------------------------------------
// validation and layout: shared with the CUDA ops (csrc/op_checks.h)
// ---------------------------------------------------------------------------------------------
using namespace ::resnet_fused::op_checks;

void check_kernel_dtype(const char* op, at::ScalarType t) {
  op_checks::check_kernel_dtype(op, t, "CPU");
}

// ---------------------------------------------------------------------------------------------
// bn_stats
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& input_) {
  constexpr const char* op = "bn_stats";
  check_input(op, input_);
  check_kernel_dtype(op, input_.scalar_type());
  StatsArgs a{};
  const Tensor input = normalize_layout(input_, a.geo);
  const auto acc = opmath_scalar_type(input.scalar_type());
  Tensor mean = at::empty({a.geo.C}, input.options().dtype(acc));
  Tensor var = at::empty({a.geo.C}, input.options().dtype(acc));
  if (a.geo.C == 0) return std::make_tuple(mean, var);
  a.dtype = input.scalar_type();
  a.input = input.const_data_ptr();
  a.mean = mean.mutable_data_ptr();
  a.var = var.mutable_data_ptr();
  kernels().bn_stats(a);
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
  check_kernel_dtype(op, input_.scalar_type());
  const ApplyOperands o = apply_operands(op, input_, scale_, shift_, residual_, res_scale_, res_shift_, relu);
  if (o.args.geo.numel > 0) kernels().bn_apply(o.args);
  return o.out;
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
// Checks every backward op starts with, before the shared operand checks (op_checks.h).
BackwardOperands checked_backward_operands(const char* op, const Tensor& grad_out_, const Tensor& input_,
                                           const c10::optional<Tensor>& output_, bool relu,
                                           const c10::optional<Tensor>& mask_scale_,
                                           const c10::optional<Tensor>& mask_shift_) {
  check_input(op, input_);
  check_kernel_dtype(op, input_.scalar_type());
  return backward_operands(op, grad_out_, input_, output_, relu, mask_scale_, mask_shift_);
}

std::tuple<Tensor, Tensor> bn_backward_reduce_cpu(const Tensor& grad_out_, const Tensor& input_,
                                                  const c10::optional<Tensor>& output_,
                                                  const Tensor& mean_, bool relu,
                                                  const c10::optional<Tensor>& mask_scale_,
                                                  const c10::optional<Tensor>& mask_shift_) {
  constexpr const char* op = "bn_backward_reduce";
  BackwardOperands b = checked_backward_operands(op, grad_out_, input_, output_, relu, mask_scale_, mask_shift_);
  const Geometry& geo = b.geo;
  const auto acc = opmath_scalar_type(b.input.scalar_type());
  const Tensor mean = channel_vector(op, "mean", mean_, b.input, geo.C, acc);
  Tensor sum_dy = at::empty({geo.C}, b.input.options().dtype(acc));
  Tensor sum_dy_xmu = at::empty({geo.C}, b.input.options().dtype(acc));
  if (geo.C == 0) return std::make_tuple(sum_dy, sum_dy_xmu);
  BackwardReduceArgs a{};
  a.geo = geo;
  a.dtype = b.input.scalar_type();
  a.grad_out = b.grad_out.const_data_ptr();
  a.input = b.input.const_data_ptr();
  a.output = relu && !b.mask_from_input ? b.output.const_data_ptr() : nullptr;
  a.mask_scale = b.mask_from_input ? b.mask_scale.const_data_ptr() : nullptr;
  a.mask_shift = b.mask_from_input ? b.mask_shift.const_data_ptr() : nullptr;
  a.mean = mean.const_data_ptr();
  a.sum_dy = sum_dy.mutable_data_ptr();
  a.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr();
  a.relu = relu;
  kernels().bn_backward_reduce(a);
  return std::make_tuple(sum_dy, sum_dy_xmu);
}

template <typename acc_t>
void backward_coefficients(int64_t C, const Tensor& invstd, const Tensor& weight, const Tensor& mean_dy_xmu,
                           Tensor& k, Tensor& proj) {
  const acc_t* is = invstd.const_data_ptr<acc_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* mdx = mean_dy_xmu.defined() ? mean_dy_xmu.const_data_ptr<acc_t>() : nullptr;
  acc_t* kp = k.mutable_data_ptr<acc_t>();
  acc_t* pp = mdx ? proj.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    kp[c] = w ? rm::backward_scale(is[c], w[c]) : is[c];
    if (pp) pp[c] = rm::backward_proj(is[c], mdx[c]);
  }
}

Tensor bn_backward_apply_cpu(const Tensor& grad_out_, const Tensor& input_, const c10::optional<Tensor>& output_,
                             const Tensor& mean_, const Tensor& invstd_, const c10::optional<Tensor>& weight_,
                             const c10::optional<Tensor>& mean_dy_, const c10::optional<Tensor>& mean_dy_xmu_,
                             bool relu, const c10::optional<Tensor>& mask_scale_,
                             const c10::optional<Tensor>& mask_shift_) {
  constexpr const char* op = "bn_backward_apply";
  const bool train = present(mean_dy_);
  TORCH_CHECK(train == present(mean_dy_xmu_), op,
              ": mean_dy and mean_dy_xmu must be given together (both or neither)");
  BackwardOperands b = checked_backward_operands(op, grad_out_, input_, output_, relu, mask_scale_, mask_shift_);
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
  if (geo.numel == 0) return grad_in;
  // Per-channel coefficients: k = invstd * weight, proj = invstd^2 * mean_dy_xmu.
  Tensor k = at::empty({C}, b.input.options().dtype(acc));
  Tensor proj = train ? at::empty({C}, b.input.options().dtype(acc)) : Tensor();
  if (acc == at::kDouble) {
    backward_coefficients<double>(C, invstd, weight, mean_dy_xmu, k, proj);
  } else {
    backward_coefficients<float>(C, invstd, weight, mean_dy_xmu, k, proj);
  }
  BackwardApplyArgs a{};
  a.geo = geo;
  a.dtype = b.input.scalar_type();
  a.grad_out = b.grad_out.const_data_ptr();
  a.input = b.input.const_data_ptr();
  a.output = relu && !b.mask_from_input ? b.output.const_data_ptr() : nullptr;
  a.mask_scale = b.mask_from_input ? b.mask_scale.const_data_ptr() : nullptr;
  a.mask_shift = b.mask_from_input ? b.mask_shift.const_data_ptr() : nullptr;
  a.mean = mean.const_data_ptr();
  a.k = k.const_data_ptr();
  a.mean_dy = train ? mean_dy.const_data_ptr() : nullptr;
  a.proj = train ? proj.const_data_ptr() : nullptr;
  a.grad_in = grad_in.mutable_data_ptr();
  a.relu = relu;
  kernels().bn_backward_apply(a);
  return grad_in;
}

// ---------------------------------------------------------------------------------------------
// max_pool2d_nhwc: inference max-pool of a channels-last tensor, no indices (FoldedResNet)
// ---------------------------------------------------------------------------------------------
Tensor max_pool2d_nhwc_cpu(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  constexpr const char* op = "max_pool2d_nhwc";
  TORCH_CHECK(input.defined() && input.dim() == 4, op, ": input must be a 4-d [N, C, H, W] tensor, got ",
              input.defined() ? input.sizes() : at::IntArrayRef{});
  // float32/float64 only: FoldedResNet's flat plan runs float32 (reduced-precision vectors would
  // need their own NaN handling, untested)
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got dtype ", input.scalar_type());
  TORCH_CHECK(input.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": input must be channels_last dense, got strides ", input.strides());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding take 2 values each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0, op, ": kernel_size and stride must be positive, got ",
                kernel_size, " and ", stride);
    TORCH_CHECK(padding[d] >= 0 && padding[d] <= kernel_size[d] / 2, op,
                ": padding must be between 0 and half the kernel size, got ", padding, " for kernel ", kernel_size);
  }
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OH = (H + 2 * padding[0] - kernel_size[0]) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - kernel_size[1]) / stride[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0, op, ": input of spatial size [", H, ", ", W, "] is too small for kernel ",
              kernel_size, " with padding ", padding);
  Tensor out = at::empty({N, C, OH, OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  MaxPoolArgs a{};
  a.dtype = input.scalar_type();
  a.input = input.const_data_ptr();
  a.output = out.mutable_data_ptr();
  a.N = N, a.H = H, a.W = W, a.C = C, a.OH = OH, a.OW = OW;
  a.kh = kernel_size[0], a.kw = kernel_size[1], a.sh = stride[0], a.sw = stride[1];
  a.ph = padding[0], a.pw = padding[1];
  kernels().max_pool2d_nhwc(a);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
  m.impl("max_pool2d_nhwc", &max_pool2d_nhwc_cpu);
}

}  // namespace cpu
}  // namespace resnet_fused

// CUDA implementations of the resnet_fused ops (schemas in csrc/ops.cpp, spec in
// resnet_fused/reference.py): argument checks, layouts, outputs, and the launch of the kernels of
// csrc/cuda/bn_cuda.cu (interface csrc/cuda/bn_cuda.h). Compiled by the host compiler (setup.py adds
// csrc/cuda/*.cpp to a CUDA build): nvcc only sees the kernels.
//
// Same semantics as the CPU ops (csrc/cpu/bn_cpu.cpp), check for check and layout for layout: an
// input is processed as NCHW-contiguous or channels-last dense (anything else is made contiguous),
// operands of the input's shape are brought to the input's layout, outputs are empty_like(input),
// per-channel vectors are converted to the accumulation dtype (float32, float64 for float64 input),
// statistics are (mean, biased var). In addition every tensor must be on the input's CUDA device:
// the dispatcher picks the CUDA kernel when any argument is a CUDA tensor, so a CPU input with a
// CUDA argument lands here too, and gets an error naming both devices before any kernel runs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "cuda/bn_cuda.h"
#include "op_checks.h"

namespace resnet_fused {
namespace cuda {

bool cuda_ops_compiled() {
  return true;
}

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// validation and layout: shared with the CPU ops (csrc/op_checks.h), plus the device checks
// ---------------------------------------------------------------------------------------------
using namespace ::resnet_fused::op_checks;

void check_cuda_input(const char* op, const Tensor& input) {
  op_checks::check_input(op, input);
  op_checks::check_kernel_dtype(op, input.scalar_type(), "CUDA");
}

// The CUDA kernel runs when any argument is a CUDA tensor: the input must be one. Names the first
// CUDA argument when it is not.
void check_input_on_cuda(const char* op, const Tensor& input,
                         std::initializer_list<std::pair<const char*, const Tensor*>> others) {
  if (input.is_cuda()) return;
  for (const auto& [name, t] : others) {
    if (t != nullptr && t->defined() && t->is_cuda()) {
      TORCH_CHECK(false, op, ": input is on ", input.device(), " but ", name, " is on ", t->device(),
                  " (tensors on different devices)");
    }
  }
  TORCH_CHECK(false, op, ": the CUDA kernel needs a CUDA input, got input on ", input.device());
}

const Tensor* opt(const c10::optional<Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

Tensor partials_buffer(const Geometry& geo, const Tensor& input) {
  return at::empty({reduce_partials_bytes(geo)}, input.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& input_) {
  constexpr const char* op = "bn_stats";
  check_cuda_input(op, input_);
  check_input_on_cuda(op, input_, {});
  const c10::cuda::CUDAGuard guard(input_.device());
  StatsArgs a{};
  const Tensor input = normalize_layout(input_, a.geo);
  const auto acc = opmath_scalar_type(input.scalar_type());
  Tensor mean = at::empty({a.geo.C}, input.options().dtype(acc));
  Tensor var = at::empty({a.geo.C}, input.options().dtype(acc));
  if (a.geo.C == 0) return std::make_tuple(mean, var);
  if (a.geo.numel == 0) {  // empty channels: NaN, like torch's mean over no elements
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return std::make_tuple(mean, var);
  }
  const Tensor partials = partials_buffer(a.geo, input);
  a.dtype = input.scalar_type();
  a.input = input.const_data_ptr();
  a.mean = mean.mutable_data_ptr();
  a.var = var.mutable_data_ptr();
  a.partials = partials.mutable_data_ptr();
  bn_stats_launch(a);
  return std::make_tuple(mean, var);
}

Tensor bn_apply_cuda(const Tensor& input_, const Tensor& scale_, const Tensor& shift_,
                     const c10::optional<Tensor>& residual_, const c10::optional<Tensor>& res_scale_,
                     const c10::optional<Tensor>& res_shift_, bool relu) {
  constexpr const char* op = "bn_apply";
  check_cuda_input(op, input_);
  check_input_on_cuda(op, input_, {{"scale", &scale_}, {"shift", &shift_}, {"residual", opt(residual_)},
                                   {"res_scale", opt(res_scale_)}, {"res_shift", opt(res_shift_)}});
  const c10::cuda::CUDAGuard guard(input_.device());
  const ApplyOperands o = apply_operands(op, input_, scale_, shift_, residual_, res_scale_, res_shift_, relu);
  if (o.args.geo.numel > 0) bn_apply_launch(o.args);
  return o.out;
}

std::tuple<Tensor, Tensor> bn_backward_reduce_cuda(const Tensor& grad_out_, const Tensor& input_,
                                                   const c10::optional<Tensor>& output_, const Tensor& mean_,
                                                   bool relu, const c10::optional<Tensor>& mask_scale_,
                                                   const c10::optional<Tensor>& mask_shift_) {
  constexpr const char* op = "bn_backward_reduce";
  check_cuda_input(op, input_);
  check_input_on_cuda(op, input_,
                      {{"grad_out", &grad_out_}, {"output", opt(output_)}, {"mean", &mean_},
                       {"mask_scale", opt(mask_scale_)}, {"mask_shift", opt(mask_shift_)}});
  const c10::cuda::CUDAGuard guard(input_.device());
  BackwardOperands b = backward_operands(op, grad_out_, input_, output_, relu, mask_scale_, mask_shift_);
  const Geometry& geo = b.geo;
  const auto acc = opmath_scalar_type(b.input.scalar_type());
  const Tensor mean = channel_vector(op, "mean", mean_, b.input, geo.C, acc);
  Tensor sum_dy = at::empty({geo.C}, b.input.options().dtype(acc));
  Tensor sum_dy_xmu = at::empty({geo.C}, b.input.options().dtype(acc));
  if (geo.C == 0) return std::make_tuple(sum_dy, sum_dy_xmu);
  if (geo.numel == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return std::make_tuple(sum_dy, sum_dy_xmu);
  }
  const Tensor partials = partials_buffer(geo, b.input);
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
  a.partials = partials.mutable_data_ptr();
  a.relu = relu;
  bn_backward_reduce_launch(a);
  return std::make_tuple(sum_dy, sum_dy_xmu);
}

Tensor bn_backward_apply_cuda(const Tensor& grad_out_, const Tensor& input_, const c10::optional<Tensor>& output_,
                              const Tensor& mean_, const Tensor& invstd_, const c10::optional<Tensor>& weight_,
                              const c10::optional<Tensor>& mean_dy_, const c10::optional<Tensor>& mean_dy_xmu_,
                              bool relu, const c10::optional<Tensor>& mask_scale_,
                              const c10::optional<Tensor>& mask_shift_) {
  constexpr const char* op = "bn_backward_apply";
  check_cuda_input(op, input_);
  check_input_on_cuda(op, input_,
                      {{"grad_out", &grad_out_}, {"output", opt(output_)}, {"mean", &mean_}, {"invstd", &invstd_},
                       {"weight", opt(weight_)}, {"mean_dy", opt(mean_dy_)}, {"mean_dy_xmu", opt(mean_dy_xmu_)},
                       {"mask_scale", opt(mask_scale_)}, {"mask_shift", opt(mask_shift_)}});
  const c10::cuda::CUDAGuard guard(input_.device());
  const bool train = present(mean_dy_);
  TORCH_CHECK(train == present(mean_dy_xmu_), op,
              ": mean_dy and mean_dy_xmu must be given together (both or neither)");
  BackwardOperands b = backward_operands(op, grad_out_, input_, output_, relu, mask_scale_, mask_shift_);
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
  BackwardApplyArgs a{};
  a.geo = geo;
  a.dtype = b.input.scalar_type();
  a.grad_out = b.grad_out.const_data_ptr();
  a.input = b.input.const_data_ptr();
  a.output = relu && !b.mask_from_input ? b.output.const_data_ptr() : nullptr;
  a.mask_scale = b.mask_from_input ? b.mask_scale.const_data_ptr() : nullptr;
  a.mask_shift = b.mask_from_input ? b.mask_shift.const_data_ptr() : nullptr;
  a.mean = mean.const_data_ptr();
  a.invstd = invstd.const_data_ptr();
  a.weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  a.mean_dy = train ? mean_dy.const_data_ptr() : nullptr;
  a.mean_dy_xmu = train ? mean_dy_xmu.const_data_ptr() : nullptr;
  a.grad_in = grad_in.mutable_data_ptr();
  a.relu = relu;
  bn_backward_apply_launch(a);
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &bn_backward_apply_cuda);
}

}  // namespace cuda
}  // namespace resnet_fused

// Interface between the CUDA op implementations (csrc/cuda/bn_cuda_ops.cpp: validation, layouts,
// outputs, registration; compiled by the host compiler) and the CUDA kernels and their launchers
// (csrc/cuda/bn_cuda.cu, compiled by nvcc). Raw pointers only: neither side sees the other's headers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "op_geometry.h"

namespace resnet_fused {
namespace cuda {

using Geometry = ::resnet_fused::Geometry;  // csrc/op_geometry.h

// Per-channel vectors are dense device arrays of length C in the accumulation type (double for
// double input, float otherwise). Tensors of the input's shape are dense in the input's layout and
// share its dtype. Launchers run on the current CUDA stream of the current device (the caller sets
// the device) and check every launch.

// Reductions write per-block partials to `partials` (a scratch device buffer of at least
// reduce_partials_bytes(geo) bytes), then merge them per channel in a fixed order: deterministic.
int64_t reduce_partials_bytes(const Geometry& geo);

struct StatsArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* input;
  void* mean;  // out, [C]
  void* var;   // out, [C], biased
  void* partials;
};

using ApplyArgs = ::resnet_fused::ApplyArgs;  // csrc/op_geometry.h

struct BackwardReduceArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* grad_out;
  const void* input;
  const void* output;  // the ReLU output masking grad_out; read only when relu
  const void* mean;
  void* sum_dy;        // out, [C]
  void* sum_dy_xmu;    // out, [C]
  void* partials;
  const void* mask_scale;  // non-null (with mask_shift): the ReLU mask from input*mask_scale + mask_shift
  const void* mask_shift;  // ([C], accumulation type); output is then not read
  bool relu;
};

struct BackwardApplyArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* grad_out;
  const void* input;        // read in the training form only
  const void* output;       // read only when relu
  const void* mean;         // training form only
  const void* invstd;
  const void* weight;       // nullptr: 1
  const void* mean_dy;      // nullptr: eval form g * invstd * weight
  const void* mean_dy_xmu;  // training form only
  void* grad_in;
  const void* mask_scale;  // as in BackwardReduceArgs (the input is then read in the eval form too)
  const void* mask_shift;
  bool relu;
};

// numel > 0 and C > 0 for every launcher (the ops handle empty tensors without a launch).
void bn_stats_launch(const StatsArgs& a);
void bn_apply_launch(const ApplyArgs& a);
void bn_backward_reduce_launch(const BackwardReduceArgs& a);
void bn_backward_apply_launch(const BackwardApplyArgs& a);

// Defined in bn_cuda.cu, for build_info().
const char* compiled_cuda_version();
bool cuda_compiled();
// Defined in bn_cuda_ops.cpp: the ops' CUDA kernels are compiled in and registered.
bool cuda_ops_compiled();

}  // namespace cuda
}  // namespace resnet_fused

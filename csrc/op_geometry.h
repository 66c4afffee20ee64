// The view every kernel takes of a dense input, and the arguments of the elementwise apply kernel,
// shared by the CPU kernels (csrc/cpu/bn_kernels.h) and the CUDA kernels (csrc/cuda/bn_cuda.h).
// Plain data: seen by host compilers for every CPU capability and by nvcc.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resnet_fused {

// A dense input viewed as [N, C, S] (NCHW-contiguous) or [M = N*S, C] (channels last); S == 1 runs
// as channels last (both layouts address (n, c) at n*C + c).
struct Geometry {
  bool channels_last = false;
  int64_t N = 0, C = 0, S = 0;  // S = prod(spatial sizes)
  int64_t numel = 0;
};

// Per-channel vectors are dense, length C, in the accumulation type (double for double input,
// float otherwise); tensors of the input's shape are dense in the input's layout, its dtype.
struct ApplyArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* input;
  const void* residual;   // nullptr: none
  const void* scale;
  const void* shift;
  const void* res_scale;  // nullptr: residual added as is
  const void* res_shift;
  void* out;
  bool relu;
};

}  // namespace resnet_fused

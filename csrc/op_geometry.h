// The view every kernel takes of a dense input, shared by the CPU kernels (csrc/cpu/bn_kernels.h)
// and the CUDA kernels (csrc/cuda/bn_cuda.h). Plain data: seen by host compilers for every CPU
// capability and by nvcc.
#pragma once

#include <cstdint>

namespace resnet_fused {

// A dense input viewed as [N, C, S] (NCHW-contiguous) or [M = N*S, C] (channels last); S == 1 runs
// as channels last (both layouts address (n, c) at n*C + c).
struct Geometry {
  bool channels_last = false;
  int64_t N = 0, C = 0, S = 0;  // S = prod(spatial sizes)
  int64_t numel = 0;
};

}  // namespace resnet_fused

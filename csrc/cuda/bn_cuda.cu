// CUDA side of resnet_fused. MINIMAL for now: the CUDA kernels of the ops (registered with
// TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m)) are a later issue. This file proves the CUDA build works
// (nvcc, the shared math header, the c10/cuda headers) and tells build_info what was compiled.
//
// Include c10/cuda headers only: ATen/cuda/CUDAContext.h pulls cusparse.h, which the CI toolkit lacks.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "bn_math.h"

namespace resnet_fused {
namespace cuda {

namespace {

#define RESNET_FUSED_STR2(x) #x
#define RESNET_FUSED_STR(x) RESNET_FUSED_STR2(x)

// Instantiates the shared formulas in device code so a host-only construct in bn_math.h fails the
// build here, not in the later issue that writes the kernels.
template <typename T>
__global__ void math_smoke_kernel(const T* x, T* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    namespace rm = ::resnet_fused::math;
    const T a = rm::bn_apply_residual_affine(x[i], T(2), T(1), x[i], T(0.5), T(-1), true);
    const T g = rm::masked_grad(a, x[i], true);
    const T b = rm::bn_backward_elem(g, x[i], T(0), T(0), rm::backward_proj(T(1), T(0)),
                                     rm::backward_scale(T(1), T(1)));
    rm::StatsPartial<T> p = rm::stats_merge(rm::stats_from_shifted_sums(T(1), x[i], T(0), T(0)),
                                            rm::stats_from_shifted_sums(T(1), b, T(0), T(0)));
    y[i] = rm::stats_biased_var(p) + rm::bn_backward_elem_eval(rm::bn_apply_plain(b, T(1), T(0), false), T(1));
  }
}

template __global__ void math_smoke_kernel<float>(const float*, float*, int64_t);
template __global__ void math_smoke_kernel<double>(const double*, double*, int64_t);

}  // namespace

bool cuda_compiled() {
  return true;
}

// The nvcc that compiled this file, "major.minor".
const char* compiled_cuda_version() {
  return RESNET_FUSED_STR(__CUDACC_VER_MAJOR__) "." RESNET_FUSED_STR(__CUDACC_VER_MINOR__);
}

}  // namespace cuda
}  // namespace resnet_fused

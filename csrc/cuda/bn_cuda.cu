// CUDA kernels of the resnet_fused ops and their launchers. Validation, layouts and outputs are
// bn_cuda_ops.cpp's job; the interface is csrc/cuda/bn_cuda.h; the spec is resnet_fused/reference.py;
// the per-element formulas are csrc/bn_math.h, the same functions the CPU kernels call.
//
// Written for obvious correctness first:
//   * elementwise (bn_apply, bn_backward_apply): a grid-stride loop with int64 indices. When every
//     operand is 16-byte aligned, each thread loads and stores whole 16-byte vectors (4 float,
//     8 half/bfloat16, 2 double) and the last numel % vec elements run scalar; otherwise every
//     element runs scalar. The channel of element i is (i / S) % C in NCHW and i % C in channels
//     last, stepped incrementally within a vector (no division per element).
//   * reductions (bn_stats, bn_backward_reduce): stage 1, a grid of (channel, part) blocks, each
//     thread accumulating its elements (statistics: Welford, as Chan merges of one element;
//     backward: sums in the accumulation type), the block merged in shared memory in a fixed tree
//     order, one double-precision partial per (channel, part); stage 2, one block per channel
//     merging its partials in a fixed order. No atomics: results repeat bit for bit.
//     NCHW: the threads of a block read consecutive elements of a channel's planes; channels last:
//     a block is 32 channels x 8 rows, a warp reads 32 consecutive channels of one row.
// float/half/bfloat16 storage computes in float, double in double. Every launch is on the current
// stream and is checked.
//
// Include c10/cuda headers only: ATen/cuda/CUDAContext.h pulls cusparse.h, which the CI toolkit lacks.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bn_math.h"
#include "cuda/bn_cuda.h"

namespace resnet_fused {
namespace cuda {

namespace {

namespace rm = ::resnet_fused::math;

#define RESNET_FUSED_STR2(x) #x
#define RESNET_FUSED_STR(x) RESNET_FUSED_STR2(x)

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // grid-stride loops cover the rest
constexpr int64_t kMaxParts = 65535;               // gridDim.y limit
// Elements per thread that stage 1 aims at (short per-thread sums in the accumulation type).
constexpr int64_t kPerThread = 16;
// Channels-last stage-1 blocks: kTileC channels x kTileR rows.
constexpr int kTileC = 32;
constexpr int kTileR = kThreads / kTileC;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// f(scalar_t{}) for the storage dtype (bn_cuda_ops.cpp has checked it is one of these four).
template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      f(float{});
      break;
    case c10::ScalarType::Double:
      f(double{});
      break;
    case c10::ScalarType::BFloat16:
      f(c10::BFloat16{});
      break;
    case c10::ScalarType::Half:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "resnet_fused CUDA kernels: unsupported dtype ", dtype);
  }
}

// ---------------------------------------------------------------------------------------------
// elementwise
// ---------------------------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

template <typename scalar_t, int NIn>
struct InPtrs {
  const scalar_t* p[NIn];
};

// Element i's position: r = i % inner, c = (i / inner) % C (inner = S in NCHW, 1 in channels last),
// advanced one element at a time without a division.
struct ChannelCursor {
  int64_t r, c;
  __device__ ChannelCursor(int64_t i, int64_t inner, int64_t C) {
    const int64_t q = i / inner;
    r = i - q * inner;
    c = q % C;
  }
  __device__ void next(int64_t inner, int64_t C) {
    if (++r == inner) {
      r = 0;
      if (++c == C) c = 0;
    }
  }
};

template <typename scalar_t, int NIn, typename Op>
__device__ inline void elementwise_one(const InPtrs<scalar_t, NIn>& in, scalar_t* out, int64_t i, int64_t c,
                                       const Op& op) {
  using acc_t = typename OpMath<scalar_t>::type;
  acc_t v[NIn];
#pragma unroll
  for (int s = 0; s < NIn; ++s) v[s] = static_cast<acc_t>(in.p[s][i]);
  out[i] = static_cast<scalar_t>(op(v, c));
}

// Every pointer 16-byte aligned: whole vectors, then the numel % kVec tail element by element.
template <typename scalar_t, int NIn, typename Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_vec_kernel(InPtrs<scalar_t, NIn> in, scalar_t* out, int64_t numel, int64_t inner, int64_t C, Op op) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using V = AlignedVec<scalar_t, kVec>;
  const int64_t nvec = numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    V x[NIn];
#pragma unroll
    for (int s = 0; s < NIn; ++s) x[s] = reinterpret_cast<const V*>(in.p[s])[v];
    V o;
    ChannelCursor cur(v * kVec, inner, C);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t a[NIn];
#pragma unroll
      for (int s = 0; s < NIn; ++s) a[s] = static_cast<acc_t>(x[s].val[j]);
      o.val[j] = static_cast<scalar_t>(op(a, cur.c));
      cur.next(inner, C);
    }
    reinterpret_cast<V*>(out)[v] = o;
  }
  for (int64_t i = nvec * kVec + tid; i < numel; i += stride) {
    elementwise_one(in, out, i, (i / inner) % C, op);
  }
}

// Any alignment (e.g. a view at an odd storage offset): element by element.
template <typename scalar_t, int NIn, typename Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_scalar_kernel(InPtrs<scalar_t, NIn> in, scalar_t* out, int64_t numel, int64_t inner, int64_t C,
                              Op op) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    elementwise_one(in, out, i, (i / inner) % C, op);
  }
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t, typename Op>
void launch_elementwise(const Geometry& geo, const scalar_t* const* in, scalar_t* out, const Op& op) {
  constexpr int NIn = Op::kIn;
  constexpr int kVec = 16 / sizeof(scalar_t);
  InPtrs<scalar_t, NIn> ptrs;
  bool aligned = aligned16(out);
  for (int s = 0; s < NIn; ++s) {
    ptrs.p[s] = in[s];
    aligned = aligned && aligned16(in[s]);
  }
  const int64_t inner = geo.channels_last ? 1 : geo.S;
  const int64_t work = aligned ? std::max<int64_t>(geo.numel / kVec, 1) : geo.numel;
  const int64_t blocks = std::min(ceil_div(work, kThreads), kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (aligned) {
    elementwise_vec_kernel<scalar_t, NIn, Op>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ptrs, out, geo.numel, inner, geo.C, op);
  } else {
    elementwise_scalar_kernel<scalar_t, NIn, Op>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ptrs, out, geo.numel, inner, geo.C, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// bn_apply. kMode 0: no residual; 1: residual as is; 2: residual with its own affine.
// Inputs: v[0] = input, v[1] = residual.
template <typename acc_t, int kMode, bool kRelu>
struct ApplyOp {
  static constexpr int kIn = kMode == 0 ? 1 : 2;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* res_scale;
  const acc_t* res_shift;
  __device__ acc_t operator()(const acc_t* v, int64_t c) const {
    if constexpr (kMode == 0) {
      return rm::bn_apply_plain(v[0], scale[c], shift[c], kRelu);
    } else if constexpr (kMode == 1) {
      return rm::bn_apply_residual(v[0], scale[c], shift[c], v[1], kRelu);
    } else {
      return rm::bn_apply_residual_affine(v[0], scale[c], shift[c], v[1], res_scale[c], res_shift[c], kRelu);
    }
  }
};

template <typename scalar_t, int kMode, bool kRelu>
void bn_apply_typed(const ApplyArgs& a) {
  using acc_t = typename OpMath<scalar_t>::type;
  const ApplyOp<acc_t, kMode, kRelu> op{static_cast<const acc_t*>(a.scale), static_cast<const acc_t*>(a.shift),
                                        static_cast<const acc_t*>(a.res_scale),
                                        static_cast<const acc_t*>(a.res_shift)};
  const scalar_t* in[2] = {static_cast<const scalar_t*>(a.input), static_cast<const scalar_t*>(a.residual)};
  launch_elementwise<scalar_t>(a.geo, in, static_cast<scalar_t*>(a.out), op);
}

template <typename scalar_t, int kMode>
void bn_apply_relu(const ApplyArgs& a) {
  if (a.relu) {
    bn_apply_typed<scalar_t, kMode, true>(a);
  } else {
    bn_apply_typed<scalar_t, kMode, false>(a);
  }
}

// How the ReLU backward mask is obtained: none, from the forward output, or from the input
// (recomputing the forward's z = x*mask_scale + mask_shift).
enum class Mask { kNone, kFromOutput, kFromInput };

// bn_backward_apply. Inputs: v[0] = grad_out, then input (training form, or the mask from it), then
// output (kFromOutput). Coefficients as the CPU op computes them: k = invstd * weight (invstd when
// weight is None), proj = invstd^2 * mean_dy_xmu.
template <typename acc_t, bool kTrain, Mask kMask>
struct BackwardApplyOp {
  static constexpr bool kReadsInput = kTrain || kMask == Mask::kFromInput;
  static constexpr int kIn = 1 + (kReadsInput ? 1 : 0) + (kMask == Mask::kFromOutput ? 1 : 0);
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* mean_dy;
  const acc_t* mean_dy_xmu;
  const acc_t* mask_scale;
  const acc_t* mask_shift;
  acc_t zero_bound;
  __device__ acc_t operator()(const acc_t* v, int64_t c) const {
    const acc_t is = invstd[c];
    const acc_t k = weight != nullptr ? rm::backward_scale(is, weight[c]) : is;
    acc_t g = v[0];
    if constexpr (kMask == Mask::kFromOutput) g = rm::relu_backward_mask(g, v[kIn - 1]);
    if constexpr (kMask == Mask::kFromInput) {
      g = rm::relu_backward_mask_from_input(g, v[1], mask_scale[c], mask_shift[c], zero_bound);
    }
    if constexpr (kTrain) {
      return rm::bn_backward_elem(g, v[1], mean[c], mean_dy[c], rm::backward_proj(is, mean_dy_xmu[c]), k);
    } else {
      return rm::bn_backward_elem_eval(g, k);
    }
  }
};

template <typename scalar_t, bool kTrain, Mask kMask>
void bn_backward_apply_typed(const BackwardApplyArgs& a) {
  using acc_t = typename OpMath<scalar_t>::type;
  using Op = BackwardApplyOp<acc_t, kTrain, kMask>;
  const Op op{static_cast<const acc_t*>(a.mean), static_cast<const acc_t*>(a.invstd),
              static_cast<const acc_t*>(a.weight), static_cast<const acc_t*>(a.mean_dy),
              static_cast<const acc_t*>(a.mean_dy_xmu), static_cast<const acc_t*>(a.mask_scale),
              static_cast<const acc_t*>(a.mask_shift), rm::relu_zero_bound<scalar_t, acc_t>()};
  const scalar_t* in[3];
  int n = 0;
  in[n++] = static_cast<const scalar_t*>(a.grad_out);
  if (Op::kReadsInput) in[n++] = static_cast<const scalar_t*>(a.input);
  if (kMask == Mask::kFromOutput) in[n++] = static_cast<const scalar_t*>(a.output);
  launch_elementwise<scalar_t>(a.geo, in, static_cast<scalar_t*>(a.grad_in), op);
}

// ---------------------------------------------------------------------------------------------
// reductions: stage 1 (per-block partials), stage 2 (per-channel merge in a fixed order)
// ---------------------------------------------------------------------------------------------
// A reducer `Red` provides: Acc (per-thread accumulator), Part (double-precision partial),
// init(c), add(acc, i, c) for element i of channel c, to_part(acc), empty(), merge(a, b),
// finish(part, c).

// Parts per channel: about kPerThread elements per thread, at most kMaxParts.
int64_t parts_per_channel(const Geometry& geo) {
  const int64_t len = geo.N * geo.S;  // elements per channel
  const int64_t per_block = geo.channels_last ? int64_t(kTileR) * kPerThread : int64_t(kThreads) * kPerThread;
  return std::max<int64_t>(1, std::min(ceil_div(len, per_block), kMaxParts));
}

// Fixed-order tree over sh[0 .. n) (n a power of two) with stride `step` between entries.
template <typename Red, typename Part>
__device__ inline void tree_merge(const Red& red, Part* sh, int idx, int n, int step) {
  for (int w = n / 2; w > 0; w /= 2) {
    if (idx < w) sh[idx * step] = red.merge(sh[idx * step], sh[(idx + w) * step]);
    __syncthreads();
  }
}

// NCHW: block (c, p) reduces elements [p*per_block, (p+1)*per_block) of channel c's N*S elements
// (element e = n*S + s sits at (n*C + c)*S + s); consecutive threads read consecutive elements.
template <typename Red>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(Red red, int64_t N, int64_t C, int64_t S, int64_t per_block, typename Red::Part* partials) {
  using Part = typename Red::Part;
  __shared__ Part sh[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t P = gridDim.y;
  const int64_t begin = p * per_block;
  const int64_t end = begin + per_block < N * S ? begin + per_block : N * S;
  typename Red::Acc acc = red.init(c);
  int64_t e = begin + threadIdx.x;
  if (e < end) {
    int64_t n = e / S, s = e - n * S;
    for (; e < end; e += blockDim.x) {
      red.add(acc, (n * C + c) * S + s, c);
      s += blockDim.x;
      if (s >= S) {
        n += s / S;
        s %= S;
      }
    }
  }
  sh[threadIdx.x] = red.to_part(acc);
  __syncthreads();
  tree_merge(red, sh, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) partials[c * P + p] = sh[0];
}

// Channels last: block (cb, p) reduces channels [cb*kTileC, +kTileC) over rows
// [p*per_block, (p+1)*per_block); a warp reads kTileC consecutive channels of one row.
template <typename Red>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc_kernel(Red red, int64_t M, int64_t C, int64_t per_block, typename Red::Part* partials) {
  using Part = typename Red::Part;
  __shared__ Part sh[kTileR * kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  const int64_t p = blockIdx.y;
  const int64_t P = gridDim.y;
  const int64_t begin = p * per_block;
  const int64_t end = begin + per_block < M ? begin + per_block : M;
  const bool active = c < C;
  typename Red::Acc acc = red.init(active ? c : 0);
  if (active) {
    for (int64_t r = begin + ty; r < end; r += kTileR) red.add(acc, r * C + c, c);
  }
  sh[ty * kTileC + tx] = red.to_part(acc);
  __syncthreads();
  tree_merge(red, sh + tx, ty, kTileR, kTileC);
  if (ty == 0 && active) partials[c * P + p] = sh[tx];
}

// One block per channel: thread t merges partials t, t + kThreads, ... in order, then a fixed tree.
template <typename Red>
__global__ void __launch_bounds__(kThreads) merge_kernel(Red red, const typename Red::Part* partials, int64_t P) {
  using Part = typename Red::Part;
  __shared__ Part sh[kThreads];
  const int64_t c = blockIdx.x;
  Part acc = red.empty();
  for (int64_t p = threadIdx.x; p < P; p += kThreads) acc = red.merge(acc, partials[c * P + p]);
  sh[threadIdx.x] = acc;
  __syncthreads();
  tree_merge(red, sh, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) red.finish(sh[0], c);
}

template <typename Red>
void launch_reduce(const Geometry& geo, const Red& red, void* partials) {
  using Part = typename Red::Part;
  Part* parts = static_cast<Part*>(partials);
  const int64_t P = parts_per_channel(geo);
  const int64_t len = geo.N * geo.S;
  const int64_t per_block = ceil_div(len, P);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (geo.channels_last) {
    const dim3 grid(static_cast<unsigned>(ceil_div(geo.C, kTileC)), static_cast<unsigned>(P));
    reduce_nhwc_kernel<Red><<<grid, dim3(kTileC, kTileR), 0, stream>>>(red, len, geo.C, per_block, parts);
  } else {
    const dim3 grid(static_cast<unsigned>(geo.C), static_cast<unsigned>(P));
    reduce_nchw_kernel<Red><<<grid, kThreads, 0, stream>>>(red, geo.N, geo.C, geo.S, per_block, parts);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_kernel<Red><<<static_cast<unsigned>(geo.C), kThreads, 0, stream>>>(red, parts, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Statistics: per thread, Welford (a Chan merge of one element: the shared formula of bn_math.h),
// partials and merges as (count, mean, M2) in double, biased variance M2 / count.
template <typename scalar_t>
struct StatsRed {
  using acc_t = typename OpMath<scalar_t>::type;
  using Acc = rm::StatsPartial<acc_t>;
  using Part = rm::StatsPartial<double>;
  const scalar_t* x;
  acc_t* mean;
  acc_t* var;
  __device__ Acc init(int64_t) const {
    return Acc{acc_t(0), acc_t(0), acc_t(0)};
  }
  __device__ void add(Acc& a, int64_t i, int64_t) const {
    a = rm::stats_merge(a, Acc{acc_t(1), static_cast<acc_t>(x[i]), acc_t(0)});
  }
  __device__ Part to_part(const Acc& a) const {
    return Part{static_cast<double>(a.n), static_cast<double>(a.mean), static_cast<double>(a.m2)};
  }
  __device__ Part empty() const {
    return Part{0.0, 0.0, 0.0};
  }
  __device__ Part merge(const Part& a, const Part& b) const {
    return rm::stats_merge(a, b);
  }
  __device__ void finish(const Part& p, int64_t c) const {
    mean[c] = static_cast<acc_t>(p.mean);
    var[c] = static_cast<acc_t>(rm::stats_biased_var(p));
  }
};

struct SumPair {
  double s1, s2;
};

// Backward reduce: per thread, sums of g and g*(x - mean) in the accumulation type (g masked as
// kMask says); partials and merges in double.
template <typename scalar_t, Mask kMask>
struct BackwardRed {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Acc {
    acc_t s1, s2, mean, mask_scale, mask_shift;
  };
  using Part = SumPair;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* out;
  const acc_t* mean;
  const acc_t* mask_scale;
  const acc_t* mask_shift;
  acc_t zero_bound;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  __device__ Acc init(int64_t c) const {
    if constexpr (kMask == Mask::kFromInput) {
      return Acc{acc_t(0), acc_t(0), mean[c], mask_scale[c], mask_shift[c]};
    } else {
      return Acc{acc_t(0), acc_t(0), mean[c], acc_t(0), acc_t(0)};
    }
  }
  __device__ void add(Acc& a, int64_t i, int64_t) const {
    acc_t g = static_cast<acc_t>(dy[i]);
    const acc_t xi = static_cast<acc_t>(x[i]);
    if constexpr (kMask == Mask::kFromOutput) g = rm::relu_backward_mask(g, static_cast<acc_t>(out[i]));
    if constexpr (kMask == Mask::kFromInput) {
      g = rm::relu_backward_mask_from_input(g, xi, a.mask_scale, a.mask_shift, zero_bound);
    }
    a.s1 = a.s1 + g;
    a.s2 = a.s2 + g * (xi - a.mean);
  }
  __device__ Part to_part(const Acc& a) const {
    return Part{static_cast<double>(a.s1), static_cast<double>(a.s2)};
  }
  __device__ Part empty() const {
    return Part{0.0, 0.0};
  }
  __device__ Part merge(const Part& a, const Part& b) const {
    return Part{a.s1 + b.s1, a.s2 + b.s2};
  }
  __device__ void finish(const Part& p, int64_t c) const {
    sum_dy[c] = static_cast<acc_t>(p.s1);
    sum_dy_xmu[c] = static_cast<acc_t>(p.s2);
  }
};

}  // namespace

int64_t reduce_partials_bytes(const Geometry& geo) {
  const int64_t part = std::max(sizeof(rm::StatsPartial<double>), sizeof(SumPair));
  return std::max<int64_t>(1, geo.C * parts_per_channel(geo)) * part;
}

void bn_stats_launch(const StatsArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename OpMath<scalar_t>::type;
    const StatsRed<scalar_t> red{static_cast<const scalar_t*>(a.input), static_cast<acc_t*>(a.mean),
                                 static_cast<acc_t*>(a.var)};
    launch_reduce(a.geo, red, a.partials);
  });
}

void bn_apply_launch(const ApplyArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.residual == nullptr) {
      bn_apply_relu<scalar_t, 0>(a);
    } else if (a.res_scale == nullptr) {
      bn_apply_relu<scalar_t, 1>(a);
    } else {
      bn_apply_relu<scalar_t, 2>(a);
    }
  });
}

void bn_backward_reduce_launch(const BackwardReduceArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename OpMath<scalar_t>::type;
    const auto* dy = static_cast<const scalar_t*>(a.grad_out);
    const auto* x = static_cast<const scalar_t*>(a.input);
    const auto* out = static_cast<const scalar_t*>(a.output);
    const auto* mean = static_cast<const acc_t*>(a.mean);
    const auto* msc = static_cast<const acc_t*>(a.mask_scale);
    const auto* msh = static_cast<const acc_t*>(a.mask_shift);
    const acc_t zb = rm::relu_zero_bound<scalar_t, acc_t>();
    auto* sdy = static_cast<acc_t*>(a.sum_dy);
    auto* sdx = static_cast<acc_t*>(a.sum_dy_xmu);
    if (a.relu && msc != nullptr) {
      launch_reduce(a.geo, BackwardRed<scalar_t, Mask::kFromInput>{dy, x, out, mean, msc, msh, zb, sdy, sdx},
                    a.partials);
    } else if (a.relu) {
      launch_reduce(a.geo, BackwardRed<scalar_t, Mask::kFromOutput>{dy, x, out, mean, msc, msh, zb, sdy, sdx},
                    a.partials);
    } else {
      launch_reduce(a.geo, BackwardRed<scalar_t, Mask::kNone>{dy, x, out, mean, msc, msh, zb, sdy, sdx}, a.partials);
    }
  });
}

void bn_backward_apply_launch(const BackwardApplyArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const bool train = a.mean_dy != nullptr;
    const Mask mask = !a.relu ? Mask::kNone : (a.mask_scale != nullptr ? Mask::kFromInput : Mask::kFromOutput);
    if (train) {
      if (mask == Mask::kFromInput) {
        bn_backward_apply_typed<scalar_t, true, Mask::kFromInput>(a);
      } else if (mask == Mask::kFromOutput) {
        bn_backward_apply_typed<scalar_t, true, Mask::kFromOutput>(a);
      } else {
        bn_backward_apply_typed<scalar_t, true, Mask::kNone>(a);
      }
    } else if (mask == Mask::kFromInput) {
      bn_backward_apply_typed<scalar_t, false, Mask::kFromInput>(a);
    } else if (mask == Mask::kFromOutput) {
      bn_backward_apply_typed<scalar_t, false, Mask::kFromOutput>(a);
    } else {
      bn_backward_apply_typed<scalar_t, false, Mask::kNone>(a);
    }
  });
}

bool cuda_compiled() {
  return true;
}

// The nvcc that compiled this file, "major.minor".
const char* compiled_cuda_version() {
  return RESNET_FUSED_STR(__CUDACC_VER_MAJOR__) "." RESNET_FUSED_STR(__CUDACC_VER_MINOR__);
}

}  // namespace cuda
}  // namespace resnet_fused

// CPU kernels of the resnet_fused ops: raw-pointer loops, vectorized with at::vec::Vectorized and
// parallelized with at::parallel_for. Validation, layouts and outputs are bn_cpu.cpp's job; the
// interface is csrc/cpu/bn_kernels.h; the spec is resnet_fused/reference.py; the per-element
// formulas are csrc/bn_math.h (shared with the CUDA kernels).
//
// This file is the kernel SOURCE, compiled once per CPU capability (DEFAULT, AVX2, AVX512) through
// the wrappers csrc/cpu/capability/bn_kernels_<CAP>.cpp, which setup.py compiles with
// -DCPU_CAPABILITY=<CAP> -DCPU_CAPABILITY_<CAP> and the capability's ISA flags (as ATen compiles its
// native/cpu kernels). at::vec::Vectorized then has that capability's width, and everything here
// lives in resnet_fused::cpu::<CAP> (functions in an anonymous namespace: no symbol is shared
// between the three objects except the kernel table).
//
// Memory passes (each primitive reads its operands once and writes its output once):
//   bn_stats            read input
//   bn_apply            read input (+ residual), write out
//   bn_backward_reduce  read grad_out, input (+ output when relu masks with it)
//   bn_backward_apply   read grad_out (+ input in training form or to mask with)
//                       (+ output when relu masks with it), write grad_in
// Outputs of 8 MiB or more are written with streaming (non-temporal) stores where the capability
// has them: no read-for-ownership of the output lines, no eviction of the inputs.
// Layouts, without copies: NCHW ([N, C, S]): vector loops along each (n, c) plane with per-channel
// scalars broadcast; channels last ([M, C]): vector loops along the channels of each row with
// per-channel vectors (padded copies of the coefficients; per-chunk per-channel accumulators in L1).
// Allocations: a padded coefficient copy and a partials buffer per call, per-channel accumulator
// arrays per thread (channels last); never in a loop.
// float32/float16/bfloat16 compute in float (16-bit types are converted to two float vectors),
// float64 in double. All indexing is int64.
//
// Reductions are deterministic whatever the thread count: the work is cut into chunks that depend
// only on the shape (Plan), each chunk is reduced by one thread in a fixed order
// (vector lanes, then the lanes summed in order, then a scalar tail), the chunk partials go to a
// [chunks, C] buffer in double, and each channel's partials are merged in chunk order. Float sums
// never run over more than a few dozen elements: they are added into double every kFlush steps.
// Statistics are two-pass over cache-resident pieces (NCHW: the chunk; channels last: L1-sized
// blocks of rows, merged with Chan's formula): their mean, then the sums of the deviations from it
// (read from cache; the next piece is prefetched meanwhile, so memory is read once and stays
// busy), turned into (mean, M2) partials and merged with Chan's formula: no catastrophic
// cancellation for large means or for outliers, wherever they sit.
// Results may differ in the last bits between capabilities (vector widths, FMA), not between runs.

#ifndef CPU_CAPABILITY
#error "bn_kernels_impl.h is compiled by the wrappers in csrc/cpu/capability/ with -DCPU_CAPABILITY=..."
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>

#include "bn_math.h"
#include "cpu/bn_kernels.h"

// The selections of bn_math.h (ReLU, ReLU-backward mask) for SIMD vectors: the same predicates,
// lane by lane (a compare, then a blend), so NaN behaves as in the scalar formula.
namespace resnet_fused {
namespace math {
template <typename T>
struct Select<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V relu(const V& v) {
    const V zero(T(0));
    return V::blendv(v, zero, v < zero);
  }
  static inline V relu_backward_mask(const V& grad, const V& output) {
    const V zero(T(0));
    return V::blendv(grad, zero, output <= zero);
  }
};
}  // namespace math
}  // namespace resnet_fused

namespace resnet_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
namespace rm = ::resnet_fused::math;

#define RESNET_FUSED_CAP_STR2(x) #x
#define RESNET_FUSED_CAP_STR(x) RESNET_FUSED_CAP_STR2(x)

constexpr int64_t kGrain = 32768;  // elements below which work stays serial (ATen's GRAIN_SIZE)

// f(scalar_t{}) for the storage dtype (bn_cpu.cpp has checked it is one of these four). Not
// AT_DISPATCH: its error path would put out-of-line c10 functions compiled with this capability's
// ISA flags into the object, where the linker could pick them for code of another capability.
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
      break;
  }
}

// Non-temporal ("streaming") stores of whole vectors to addresses aligned to the vector size: the
// written lines go to memory without being read first (no read-for-ownership) and without
// evicting the inputs from the caches. Used for outputs larger than kStreamBytes, which would
// leave the caches before anyone reads them again anyway. DEFAULT: ordinary stores.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasStream = true;
#else
constexpr bool kHasStream = false;
#endif

template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

// Orders this thread's streaming stores before what follows (the end of the parallel region).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

constexpr int64_t kStreamBytes = int64_t(1) << 23;  // 8 MiB

// d[l] += v[l] for every lane l of v, in double (d holds Vectorized<acc_t>::size() doubles).
inline void add_lanes_to_double(const Vectorized<double>& v, double* d) {
  (Vectorized<double>::loadu(d) + v).store(d);
}

inline void add_lanes_to_double(const Vectorized<float>& v, double* d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
  _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), lo));
  _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), hi));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
  _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), lo));
  _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), hi));
#else
  alignas(64) float l[Vectorized<float>::size()];
  v.store(l);
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) d[i] += static_cast<double>(l[i]);
#endif
}


// ---------------------------------------------------------------------------------------------
// loads and stores in the accumulation type
// ---------------------------------------------------------------------------------------------
// One "step" is kStep consecutive elements of a scalar_t stream, held as kN vectors of acc_t:
// float/double: one vector; bfloat16/half: one 16-bit vector converted to two float vectors.
template <typename scalar_t, typename = void>
struct Vio {
  using acc_t = scalar_t;
  using AVec = Vectorized<acc_t>;
  static constexpr int kN = 1;
  static constexpr int64_t kStep = AVec::size();
  static inline void load(const scalar_t* p, AVec* v) {
    v[0] = AVec::loadu(p);
  }
  static inline void load(const scalar_t* p, int64_t n, AVec* v) {
    v[0] = AVec::loadu(p, n);
  }
  static inline void store(scalar_t* p, const AVec* v) {
    v[0].store(p);
  }
  static inline void store(scalar_t* p, int64_t n, const AVec* v) {
    v[0].store(p, static_cast<int>(n));
  }
  // p aligned to the vector size.
  static inline void store_stream(scalar_t* p, const AVec* v) {
    stream_store(p, v[0]);
  }
};

template <typename scalar_t>
struct Vio<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using AVec = Vectorized<float>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int kN = 2;
  static constexpr int64_t kStep = SVec::size();
  static_assert(kStep == 2 * AVec::size(), "a 16-bit vector converts to two float vectors");
  static inline void load(const scalar_t* p, AVec* v) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(SVec::loadu(p));
    v[0] = a;
    v[1] = b;
  }
  static inline void load(const scalar_t* p, int64_t n, AVec* v) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(SVec::loadu(p, static_cast<int16_t>(n)));
    v[0] = a;
    v[1] = b;
  }
  static inline void store(scalar_t* p, const AVec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
  static inline void store(scalar_t* p, int64_t n, const AVec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, static_cast<int>(n));
  }
  static inline void store_stream(scalar_t* p, const AVec* v) {
    stream_store(p, at::vec::convert_from_float<scalar_t>(v[0], v[1]));
  }
};

// Channels last: per-channel coefficient vectors padded with zeros to a whole number of steps, so
// that every per-channel load is a full aligned-or-not vector load. One small allocation per call.
template <typename acc_t>
struct Padded {
  std::unique_ptr<acc_t[]> data;
  int64_t stride = 0;
  Padded(const acc_t* const* src, int count, int64_t C, int64_t step) {
    stride = (C + step - 1) / step * step;
    data.reset(new acc_t[static_cast<size_t>(stride * std::max(count, 1))]);
    for (int k = 0; k < count; ++k) {
      acc_t* d = data.get() + k * stride;
      std::copy(src[k], src[k] + C, d);
      std::fill(d + C, d + stride, acc_t(0));
    }
  }
  const acc_t* operator[](int k) const {
    return data.get() + k * stride;
  }
};

// ---------------------------------------------------------------------------------------------
// elementwise skeleton: out[i] = op(in_0[i], ..., coef_0[c], ...) for every element
// ---------------------------------------------------------------------------------------------
// `op(const AVec* xs, const AVec* cs) -> AVec` combines NIn input vectors and NCoef per-channel
// coefficient vectors (the formulas of bn_math.h). Tails use partial loads and stores.
template <int NIn, int NCoef, typename scalar_t, typename Op>
void elementwise(const Geometry& geo, const std::array<const scalar_t*, NIn>& in, scalar_t* out,
                 const std::array<const typename Vio<scalar_t>::acc_t*, NCoef>& coef, const Op& op) {
  using IO = Vio<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int kN = IO::kN;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = AVec::size();
  if (geo.numel == 0) return;

  // Streaming stores for large outputs (see stream_store), on vector-aligned addresses.
  constexpr int64_t kAlign = kStep * static_cast<int64_t>(sizeof(scalar_t));  // one vector, in bytes
  const bool stream = kHasStream && geo.numel * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;

  // One step of `n` elements (n == kStep: full vectors) at linear offset `off`; kStream: a full
  // step stored with a streaming store (out + off aligned).
  const auto step = [&](auto stream_c, int64_t off, int64_t n, const AVec (&cv)[NCoef][kN]) {
    constexpr bool kStream = decltype(stream_c)::value;
    AVec xv[NIn][kN];
    for (int s = 0; s < NIn; ++s) {
      if (kStream || n == kStep) {
        IO::load(in[s] + off, xv[s]);
      } else {
        IO::load(in[s] + off, n, xv[s]);
      }
    }
    AVec ov[kN];
    for (int v = 0; v < kN; ++v) {
      AVec xs[NIn];
      AVec cs[NCoef];
      for (int s = 0; s < NIn; ++s) xs[s] = xv[s][v];
      for (int k = 0; k < NCoef; ++k) cs[k] = cv[k][v];
      ov[v] = op(xs, cs);
    }
    if constexpr (kStream) {
      IO::store_stream(out + off, ov);
    } else if (n == kStep) {
      IO::store(out + off, ov);
    } else {
      IO::store(out + off, n, ov);
    }
  };
  const std::false_type plain{};
  const std::true_type streaming{};

  const int64_t C = geo.C, S = geo.S;
  if (!geo.channels_last) {
    // [i0, i1) within one plane: channel c = (i0 / S) % C.
    const auto segment = [&](int64_t i0, int64_t i1) {
      const int64_t c = (i0 / S) % C;
      AVec cv[NCoef][kN];
      for (int k = 0; k < NCoef; ++k) {
        for (int v = 0; v < kN; ++v) cv[k][v] = AVec(coef[k][c]);
      }
      int64_t i = i0;
      if (stream) {
        // Ordinary stores up to the first aligned address, streaming ones for whole vectors.
        const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + i) % kAlign) /
                            static_cast<int64_t>(sizeof(scalar_t));
        if (mis != 0) {
          const int64_t h = std::min(kStep - mis, i1 - i);
          step(plain, i, h, cv);
          i += h;
        }
        for (; i + kStep <= i1; i += kStep) step(streaming, i, kStep, cv);
      } else {
        for (; i + kStep <= i1; i += kStep) step(plain, i, kStep, cv);
      }
      if (i < i1) step(plain, i, i1 - i, cv);
    };
    at::parallel_for(0, geo.numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t seg_end = std::min(end, (i / S + 1) * S);
        segment(i, seg_end);
        i = seg_end;
      }
      if (stream) stream_fence();
    });
  } else {
    const Padded<acc_t> pc(coef.data(), NCoef, C, kStep);
    const int64_t M = geo.N * S;
    // Rows start on aligned addresses when the output does and C is a whole number of vectors.
    const bool stream_rows = stream && C % kStep == 0 && reinterpret_cast<uintptr_t>(out) % kAlign == 0;
    const auto row = [&](auto stream_c, int64_t r) {
      const int64_t base = r * C;
      for (int64_t cb = 0; cb < C; cb += kStep) {
        AVec cv[NCoef][kN];
        for (int k = 0; k < NCoef; ++k) {
          for (int v = 0; v < kN; ++v) cv[k][v] = AVec::loadu(pc[k] + cb + v * W);
        }
        step(stream_c, base + cb, std::min(kStep, C - cb), cv);
      }
    };
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      if (stream_rows) {
        for (int64_t r = r0; r < r1; ++r) row(streaming, r);
        stream_fence();
      } else {
        for (int64_t r = r0; r < r1; ++r) row(plain, r);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// reduction skeleton: two per-channel sums over chunks fixed by the shape
// ---------------------------------------------------------------------------------------------
// NCHW: a chunk is one channel x planes [n0, n1) x spatial range [s0, s0 + piece). Planes longer
// than kNchwMaxPiece are cut in pieces; short planes are grouped to about kNchwMinChunk elements.
constexpr int64_t kNchwMaxPiece = 16384;
constexpr int64_t kNchwMinChunk = 4096;
// Channels last: a chunk is rows [r0, r0 + rows) x channels [c0, c0 + Cb), Cb <= kNhwcChannels
// (whole rows for every ResNet width), about kNhwcChunk elements (at least kNhwcMinRows rows).
constexpr int64_t kNhwcChannels = 2048;
constexpr int64_t kNhwcChunk = 65536;
constexpr int64_t kNhwcMinRows = 16;
// acc_t accumulators are added into double every kFlush loop iterations (NCHW: two steps; channels
// last: rows), so that no float sum runs over more than a handful of elements.
constexpr int kFlush = 32;
// Channels-last statistics: two passes over blocks of rows of about this many elements (in L1).
constexpr int64_t kNhwcSubBlock = 16384;

struct Plan {
  bool channels_last = false;
  int64_t N = 0, C = 0, S = 0;
  // NCHW
  int64_t planes_per_chunk = 1, piece = 0, pieces = 0, plane_blocks = 0;
  // channels last
  int64_t M = 0, rows = 0, row_blocks = 0, Cb = 0, chan_blocks = 0;
  int64_t chunks = 0;  // chunks per channel: partials are [chunks, C]

  explicit Plan(const Geometry& geo) : channels_last(geo.channels_last), N(geo.N), C(geo.C), S(geo.S) {
    if (geo.numel == 0) return;
    if (!channels_last) {
      if (S > kNchwMaxPiece) {
        piece = kNchwMaxPiece;
        pieces = (S + piece - 1) / piece;
        planes_per_chunk = 1;
      } else {
        piece = S;
        pieces = 1;
        planes_per_chunk = std::max<int64_t>(1, kNchwMinChunk / S);
      }
      plane_blocks = (N + planes_per_chunk - 1) / planes_per_chunk;
      chunks = plane_blocks * pieces;
    } else {
      M = N * S;
      Cb = std::min(C, kNhwcChannels);
      chan_blocks = (C + Cb - 1) / Cb;
      rows = std::max(kNhwcMinRows, kNhwcChunk / Cb);
      row_blocks = (M + rows - 1) / rows;
      chunks = row_blocks;
    }
  }
  // Elements of one channel in chunk j (the same for every channel).
  int64_t count(int64_t j) const {
    if (!channels_last) {
      const int64_t nb = j / pieces, p = j % pieces;
      const int64_t n0 = nb * planes_per_chunk, n1 = std::min(N, n0 + planes_per_chunk);
      const int64_t s0 = p * piece, s1 = std::min(S, s0 + piece);
      return (n1 - n0) * (s1 - s0);
    }
    const int64_t r0 = j * rows;
    return std::min(M, r0 + rows) - r0;
  }
};

// Reduces every chunk of every channel. `red` provides, for T = AVec and T = acc_t:
//   static constexpr bool kCentered   true: two-pass statistics of input 0: the mean of the chunk
//                                     (NCHW) or of an L1-sized block of rows (channels last) is
//                                     the constant, from a first sweep while the data is in cache
//                                     (memory is read once); channels last writes (mean, M2)
//                                     partials itself, merging its blocks with Chan's formula;
//   static constexpr int kParams      per-channel constants per element (1 when kCentered);
//   acc_t param(c, k)                 otherwise: the k-th per-channel constant (e.g. a given mean);
//   void accum(const T* xs, const T* ps, T& s1, T& s2)   adds one element (NIn input values, kParams
//                                     constants; also called with T = double for scalar tails);
//   void finish(int64_t n, acc_t param, double s1, double s2, double& o1, double& o2)
// and the chunk's (o1, o2) are written to p1[j * C + c], p2[j * C + c].
template <int NIn, typename scalar_t, typename Red>
void chunked_reduce(const Plan& plan, const std::array<const scalar_t*, NIn>& in, const Red& red,
                    double* p1, double* p2) {
  using IO = Vio<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int kN = IO::kN;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = AVec::size();
  const int64_t N = plan.N, C = plan.C, S = plan.S, chunks = plan.chunks;
  if (chunks == 0) return;
  // The sweep of the first (centering) pass: a plain sum of input 0.
  constexpr int kP = Red::kParams;
  static_assert(!Red::kCentered || kP == 1, "centered reductions have one constant: the block mean");
  const auto sum_of_input0 = [](const auto* xs, const auto*, auto& s1, auto&) { s1 = s1 + xs[0]; };
  const auto red_accum = [&](const auto* xs, const auto* ps, auto& s1, auto& s2) { red.accum(xs, ps, s1, s2); };

  if (!plan.channels_last) {
    const int64_t elems = std::min(plan.planes_per_chunk, N) * plan.piece;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(elems, 1));
    at::parallel_for(0, C * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        // Tasks in memory order (plane block, channel, piece); chunk j = nb * pieces + p.
        const int64_t p = t % plan.pieces;
        const int64_t c = (t / plan.pieces) % C;
        const int64_t nb = t / (plan.pieces * C);
        const int64_t j = nb * plan.pieces + p;
        const int64_t n0 = nb * plan.planes_per_chunk, n1 = std::min(N, n0 + plan.planes_per_chunk);
        const int64_t s0 = p * plan.piece, s_end = std::min(S, s0 + plan.piece);
        const int64_t count = (n1 - n0) * (s_end - s0);
        // One sweep over the chunk in a fixed order. Blocks of at most kFlush iterations of two
        // steps accumulate into 2 * kN fresh vector accumulator pairs (acc_t, in registers), which
        // are then added lane by lane into double (no float sum runs over more than 2 * kFlush
        // elements); then the lanes are summed in order and the scalar tail (double) is added.
        const auto sweep = [&](const auto& acc_fn, const acc_t* par, int64_t prefetch, double& r1, double& r2) {
          AVec vpar[kP];
          double dpar[kP];
          for (int k = 0; k < kP; ++k) {
            vpar[k] = AVec(par[k]);
            dpar[k] = static_cast<double>(par[k]);
          }
          constexpr int kA = 2 * kN;
          alignas(64) double d1[W] = {}, d2[W] = {};
          double t1 = 0.0, t2 = 0.0;
          for (int64_t n = n0; n < n1; ++n) {
            const int64_t base = (n * C + c) * S;
            int64_t s = s0;
            while (s + kStep <= s_end) {
              AVec a1[kA], a2[kA];
              for (int u = 0; u < kA; ++u) {
                a1[u] = AVec(acc_t(0));
                a2[u] = AVec(acc_t(0));
              }
              for (int it = 0; it < kFlush && s + 2 * kStep <= s_end; ++it, s += 2 * kStep) {
                if (prefetch != 0) {
                  for (int q = 0; q < NIn; ++q) {
                    for (int64_t b = 0; b < 2 * kStep * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
                      __builtin_prefetch(reinterpret_cast<const char*>(in[q] + base + s + prefetch) + b);
                    }
                  }
                }
                for (int h = 0; h < 2; ++h) {
                  AVec xv[NIn][kN];
                  for (int q = 0; q < NIn; ++q) IO::load(in[q] + base + s + h * kStep, xv[q]);
                  for (int v = 0; v < kN; ++v) {
                    AVec xs[NIn];
                    for (int q = 0; q < NIn; ++q) xs[q] = xv[q][v];
                    acc_fn(xs, vpar, a1[h * kN + v], a2[h * kN + v]);
                  }
                }
              }
              if (s + kStep <= s_end && s + 2 * kStep > s_end) {  // one last single step
                AVec xv[NIn][kN];
                for (int q = 0; q < NIn; ++q) IO::load(in[q] + base + s, xv[q]);
                for (int v = 0; v < kN; ++v) {
                  AVec xs[NIn];
                  for (int q = 0; q < NIn; ++q) xs[q] = xv[q][v];
                  acc_fn(xs, vpar, a1[v], a2[v]);
                }
                s += kStep;
              }
              for (int u = 1; u < kA; ++u) {
                a1[0] = a1[0] + a1[u];
                a2[0] = a2[0] + a2[u];
              }
              add_lanes_to_double(a1[0], d1);
              add_lanes_to_double(a2[0], d2);
            }
            for (; s < s_end; ++s) {
              double xs[NIn];
              for (int q = 0; q < NIn; ++q) xs[q] = static_cast<double>(static_cast<acc_t>(in[q][base + s]));
              acc_fn(xs, dpar, t1, t2);
            }
          }
          r1 = 0.0;
          r2 = 0.0;
          for (int64_t l = 0; l < W; ++l) {
            r1 += d1[l];
            r2 += d2[l];
          }
          r1 += t1;
          r2 += t2;
        };
        acc_t par[kP];
        double s1, s2;
        int64_t prefetch = 0;
        if constexpr (Red::kCentered) {
          par[0] = acc_t(0);
          sweep(sum_of_input0, par, 0, s1, s2);
          par[0] = static_cast<acc_t>(s1 / static_cast<double>(count));
          // The second sweep reads the chunk from cache: meanwhile, prefetch the next task's chunk
          // (the same offsets one plane, or one piece, further on).
          prefetch = t + 1 < end ? (plan.pieces == 1 ? S : plan.piece) : 0;
        } else {
          for (int k = 0; k < kP; ++k) par[k] = red.param(c, k);
        }
        sweep(red_accum, par, prefetch, s1, s2);
        red.finish(count, par[0], s1, s2, p1[j * C + c], p2[j * C + c]);
      }
    });
    return;
  }

  const int64_t M = plan.M, Cb = plan.Cb, rows = plan.rows;
  const int64_t tasks = plan.row_blocks * plan.chan_blocks;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(std::min(rows, M) * Cb, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    // Per-channel accumulators of one chunk, padded to whole channel groups (see kGroupSteps
    // below; a group is a whole number of steps): one allocation per thread.
    constexpr int64_t kGroup = (kN == 1 ? 4 : 2) * kStep;
    const int64_t cmax = (std::min(C, Cb) + kGroup - 1) / kGroup * kGroup;
    std::unique_ptr<acc_t[]> acc_buf(new acc_t[static_cast<size_t>((2 + kP) * cmax)]);
    std::unique_ptr<double[]> dbl_buf(new double[static_cast<size_t>(2 * cmax)]);
    acc_t* const par = acc_buf.get();  // kP arrays of cmax: par + k * cmax
    acc_t* const a1 = par + kP * cmax;
    acc_t* const a2 = a1 + cmax;
    double* const d1 = dbl_buf.get();
    double* const d2 = d1 + cmax;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / plan.chan_blocks;
      const int64_t c0 = (t % plan.chan_blocks) * Cb, c1 = std::min(C, c0 + Cb);
      const int64_t r0 = j * rows, r1 = std::min(M, r0 + rows);
      const int64_t cn = c1 - c0;
      const int64_t cpad = (cn + kStep - 1) / kStep * kStep;
      if constexpr (Red::kCentered) {
        static_assert(NIn == 1, "centered reductions read one input");
        // Two-pass over L1-sized blocks of rows: the block's per-channel mean K (first pass,
        // row by row, the only pass that reads memory), then the sums of x - K and (x - K)^2
        // (second pass from L1, channel group by channel group with the accumulators in
        // registers); the block's (mean, M2) is merged into the chunk's (d1, d2) with Chan's
        // formula (the counts are the same for every channel: a plain loop over channels).
        const int64_t sub = std::clamp<int64_t>(kNhwcSubBlock / cpad, 1, kFlush);
        // Rows that may be prefetched: this chunk's, and the next task's when they follow.
        const int64_t prefetch_end = (plan.chan_blocks == 1 && t + 1 < end) ? std::min(M, r1 + rows) : r1;
        std::fill(d1, d1 + cpad, 0.0);
        std::fill(d2, d2 + cpad, 0.0);
        double n_acc = 0.0;
        for (int64_t ra = r0; ra < r1; ra += sub) {
          const int64_t rb = std::min(r1, ra + sub);
          const double nb = static_cast<double>(rb - ra);
          std::fill(a1, a1 + cpad, acc_t(0));
          {
            // Local copies: the stores to a1 must not make the compiler reload these.
            const scalar_t* const x0 = in[0] + c0;
            const int64_t ld = C, n_full = cn / kStep * kStep, n_tail = cn - n_full;
            acc_t* const acc = a1;
            // The same rows of the next block (prefetched here, read after this block's second
            // pass): keeps memory busy while the second pass computes from cache.
            const int64_t ahead = (rb + (rb - ra) <= prefetch_end) ? (rb - ra) * ld : 0;
            for (int64_t r = ra; r < rb; ++r) {
              const scalar_t* const row = x0 + r * ld;
              if (ahead != 0) {
                for (int64_t b = 0; b < cn * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
                  __builtin_prefetch(reinterpret_cast<const char*>(row + ahead) + b, 0, 2);
                }
              }
              for (int64_t cv = 0; cv < n_full; cv += kStep) {
                AVec xv[kN];
                IO::load(row + cv, xv);
                for (int v = 0; v < kN; ++v) (AVec::loadu(acc + cv + v * W) + xv[v]).store(acc + cv + v * W);
              }
              if (n_tail != 0) {
                AVec xv[kN];
                IO::load(row + n_full, n_tail, xv);
                for (int v = 0; v < kN; ++v) (AVec::loadu(acc + n_full + v * W) + xv[v]).store(acc + n_full + v * W);
              }
            }
          }
          for (int64_t c = 0; c < cpad; ++c) par[c] = static_cast<acc_t>(static_cast<double>(a1[c]) / nb);
          constexpr int kGroupSteps = kGroup / kStep;  // 4 vector accumulator pairs per group
          constexpr int kGV = kGroupSteps * kN;
          // One channel group [g0, g0 + kGroup) over the block's rows; kFull: every step of the
          // group is inside the channel block (no partial loads, fully unrolled).
          const auto group = [&](auto full_c, int64_t g0) {
            constexpr bool kFull = decltype(full_c)::value;
            AVec P[kGV], A1[kGV], A2[kGV];
            for (int k = 0; k < kGV; ++k) {
              P[k] = AVec::loadu(par + g0 + k * W);  // within the arrays: cmax is whole groups
              A1[k] = AVec(acc_t(0));
              A2[k] = AVec(acc_t(0));
            }
            for (int64_t r = ra; r < rb; ++r) {
              const scalar_t* row = in[0] + r * C + c0 + g0;
              for (int k = 0; k < kGroupSteps; ++k) {
                AVec xv[kN];
                if constexpr (kFull) {
                  IO::load(row + k * kStep, xv);
                } else {
                  const int64_t n = std::clamp<int64_t>(cn - g0 - k * kStep, 0, kStep);
                  IO::load(row + k * kStep, n, xv);  // n == 0: nothing read, all lanes zero
                }
                for (int v = 0; v < kN; ++v) red.accum(&xv[v], &P[k * kN + v], A1[k * kN + v], A2[k * kN + v]);
              }
            }
            for (int k = 0; k < kGV; ++k) {
              A1[k].store(a1 + g0 + k * W);
              A2[k].store(a2 + g0 + k * W);
            }
          };
          int64_t g0 = 0;
          for (; g0 + kGroup <= cn; g0 += kGroup) group(std::true_type{}, g0);
          if (g0 < cn) group(std::false_type{}, g0);
          const double wb = nb / (n_acc + nb), na_wb = n_acc * wb;
          for (int64_t c = 0; c < cpad; ++c) {
            const double s1 = static_cast<double>(a1[c]), s2 = static_cast<double>(a2[c]);
            const double dm = s1 / nb;
            rm::stats_merge_weighted(d1[c], d2[c], static_cast<double>(par[c]) + dm, std::max(s2 - s1 * dm, 0.0),
                                     wb, na_wb);
          }
          n_acc += nb;
        }
        for (int64_t c = 0; c < cn; ++c) {
          p1[j * C + c0 + c] = d1[c];
          p2[j * C + c0 + c] = d2[c];
        }
      } else {
        // One pass, row by row, per-channel acc_t accumulators in L1 added into double (d1, d2)
        // every kFlush rows.
        for (int k = 0; k < kP; ++k) {
          for (int64_t c = 0; c < cpad; ++c) par[k * cmax + c] = c < cn ? red.param(c0 + c, k) : acc_t(0);
        }
        std::fill(d1, d1 + cpad, 0.0);
        std::fill(d2, d2 + cpad, 0.0);
        for (int64_t ra = r0; ra < r1; ra += kFlush) {
          std::fill(a1, a1 + cpad, acc_t(0));
          std::fill(a2, a2 + cpad, acc_t(0));
          // Local copies: the stores to a1, a2 must not make the compiler reload these.
          std::array<const scalar_t*, NIn> x0;
          for (int q = 0; q < NIn; ++q) x0[q] = in[q] + c0;
          const int64_t ld = C, n_full = cn / kStep * kStep, n_tail = cn - n_full;
          acc_t* const acc1 = a1;
          acc_t* const acc2 = a2;
          const acc_t* const pp = par;
          const auto step = [&](int64_t off, int64_t cv, int64_t n) {
            AVec xv[NIn][kN];
            for (int q = 0; q < NIn; ++q) {
              if (n == kStep) {
                IO::load(x0[q] + off + cv, xv[q]);
              } else {
                IO::load(x0[q] + off + cv, n, xv[q]);  // zero-filled lanes land in the padding
              }
            }
            for (int v = 0; v < kN; ++v) {
              AVec xs[NIn];
              for (int q = 0; q < NIn; ++q) xs[q] = xv[q][v];
              const int64_t o = cv + v * W;
              AVec s1 = AVec::loadu(acc1 + o), s2 = AVec::loadu(acc2 + o);
              AVec ps[kP];
              for (int k = 0; k < kP; ++k) ps[k] = AVec::loadu(pp + k * cmax + o);
              red.accum(xs, ps, s1, s2);
              s1.store(acc1 + o);
              s2.store(acc2 + o);
            }
          };
          for (int64_t r = ra; r < std::min(r1, ra + kFlush); ++r) {
            const int64_t off = r * ld;
            for (int64_t cv = 0; cv < n_full; cv += kStep) step(off, cv, kStep);
            if (n_tail != 0) step(off, n_full, n_tail);
          }
          for (int64_t c = 0; c < cpad; ++c) {
            d1[c] += static_cast<double>(a1[c]);
            d2[c] += static_cast<double>(a2[c]);
          }
        }
        for (int64_t c = 0; c < cn; ++c) {
          red.finish(r1 - r0, par[c], d1[c], d2[c], p1[j * C + c0 + c], p2[j * C + c0 + c]);  // par[c]: k = 0
        }
      }
    }
  });
}

// A [chunks, C] double buffer pair for the chunk partials (one allocation per call).
struct Partials {
  std::unique_ptr<double[]> data;
  double* p1 = nullptr;
  double* p2 = nullptr;
  explicit Partials(int64_t n) : data(new double[static_cast<size_t>(std::max<int64_t>(2 * n, 1))]) {
    p1 = data.get();
    p2 = data.get() + n;
  }
};

// Channel block for the merges (vectorizable loops over channels for each chunk in order).
constexpr int64_t kMergeBlock = 256;

// ---------------------------------------------------------------------------------------------
// bn_stats
// ---------------------------------------------------------------------------------------------
// Per chunk: the chunk's mean K (first sweep), then sums of d = x - K and d^2 (second sweep, from
// cache): the corrected two-pass algorithm, robust to outliers anywhere in the chunk. The
// (mean, M2) partials are merged with Chan's formula.
template <typename scalar_t>
struct StatsRed {
  using acc_t = typename Vio<scalar_t>::acc_t;
  static constexpr bool kCentered = true;
  static constexpr int kParams = 1;
  template <typename T>
  void accum(const T* xs, const T* shift, T& s1, T& s2) const {
    const T d = xs[0] - shift[0];
    s1 = s1 + d;
    s2 = s2 + d * d;
  }
  void finish(int64_t n, acc_t shift, double s1, double s2, double& mean, double& m2) const {
    const rm::StatsPartial<double> p =
        rm::stats_from_shifted_sums<double>(static_cast<double>(n), static_cast<double>(shift), s1, s2);
    mean = p.mean;
    m2 = p.m2;
  }
};

void bn_stats_kernel(const StatsArgs& a) {
  const Geometry& geo = a.geo;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename Vio<scalar_t>::acc_t;
    acc_t* mean = static_cast<acc_t*>(a.mean);
    acc_t* var = static_cast<acc_t*>(a.var);
    const int64_t C = geo.C;
    const Plan plan(geo);
    if (plan.chunks == 0) {  // empty channels: NaN, like torch's mean over no elements
      std::fill(mean, mean + C, std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(var, var + C, std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    const scalar_t* x = static_cast<const scalar_t*>(a.input);
    Partials parts(plan.chunks * C);
    chunked_reduce<1, scalar_t>(plan, {x}, StatsRed<scalar_t>{}, parts.p1, parts.p2);
    // Chan merges in chunk order, vectorizable across the channels of a block.
    at::parallel_for(0, C, kMergeBlock, [&](int64_t begin, int64_t end) {
      alignas(64) double m[kMergeBlock], q[kMergeBlock];
      for (int64_t b0 = begin; b0 < end; b0 += kMergeBlock) {
        const int64_t bn = std::min(kMergeBlock, end - b0);
        std::copy(parts.p1 + b0, parts.p1 + b0 + bn, m);
        std::copy(parts.p2 + b0, parts.p2 + b0 + bn, q);
        double n_tot = static_cast<double>(plan.count(0));
        for (int64_t j = 1; j < plan.chunks; ++j) {
          const double nj = static_cast<double>(plan.count(j));
          const double wb = nj / (n_tot + nj);
          const double na_wb = n_tot * wb;
          const double* pm = parts.p1 + j * C + b0;
          const double* pq = parts.p2 + j * C + b0;
          for (int64_t c = 0; c < bn; ++c) rm::stats_merge_weighted(m[c], q[c], pm[c], pq[c], wb, na_wb);
          n_tot += nj;
        }
        for (int64_t c = 0; c < bn; ++c) {
          mean[b0 + c] = static_cast<acc_t>(m[c]);
          var[b0 + c] = static_cast<acc_t>(rm::stats_biased_var(rm::StatsPartial<double>{n_tot, m[c], q[c]}));
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// bn_apply
// ---------------------------------------------------------------------------------------------
template <bool kRelu, typename scalar_t>
void bn_apply_typed(const ApplyArgs& a) {
  using acc_t = typename Vio<scalar_t>::acc_t;
  const scalar_t* x = static_cast<const scalar_t*>(a.input);
  scalar_t* y = static_cast<scalar_t*>(a.out);
  const acc_t* sc = static_cast<const acc_t*>(a.scale);
  const acc_t* sh = static_cast<const acc_t*>(a.shift);
  if (a.residual == nullptr) {
    elementwise<1, 2, scalar_t>(a.geo, {x}, y, {sc, sh}, [](const auto* v, const auto* c) {
      return rm::bn_apply_plain(v[0], c[0], c[1], kRelu);
    });
    return;
  }
  const scalar_t* r = static_cast<const scalar_t*>(a.residual);
  if (a.res_scale == nullptr) {
    elementwise<2, 2, scalar_t>(a.geo, {x, r}, y, {sc, sh}, [](const auto* v, const auto* c) {
      return rm::bn_apply_residual(v[0], c[0], c[1], v[1], kRelu);
    });
    return;
  }
  const acc_t* rsc = static_cast<const acc_t*>(a.res_scale);
  const acc_t* rsh = static_cast<const acc_t*>(a.res_shift);
  elementwise<2, 4, scalar_t>(a.geo, {x, r}, y, {sc, sh, rsc, rsh}, [](const auto* v, const auto* c) {
    return rm::bn_apply_residual_affine(v[0], c[0], c[1], v[1], c[2], c[3], kRelu);
  });
}

void bn_apply_kernel(const ApplyArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.relu) {
      bn_apply_typed<true, scalar_t>(a);
    } else {
      bn_apply_typed<false, scalar_t>(a);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// bn_backward_reduce
// ---------------------------------------------------------------------------------------------
// How the ReLU backward mask is obtained.
enum class Mask { kNone, kFromOutput, kFromInput };

// Inputs: xs[0] = grad_out, xs[1] = input, xs[2] = output (kFromOutput). Constants: mean, then
// (kFromInput) the forward's BN affine mask_scale, mask_shift.
template <Mask kMask, typename scalar_t>
struct BackwardRed {
  using acc_t = typename Vio<scalar_t>::acc_t;
  static constexpr bool kCentered = false;
  static constexpr int kParams = kMask == Mask::kFromInput ? 3 : 1;
  const acc_t* mean;
  const acc_t* mask_scale;
  const acc_t* mask_shift;
  acc_t zero_bound;
  acc_t param(int64_t c, int k) const {
    return k == 0 ? mean[c] : (k == 1 ? mask_scale[c] : mask_shift[c]);
  }
  template <typename T>
  void accum(const T* xs, const T* ps, T& s1, T& s2) const {
    T g = xs[0];
    if constexpr (kMask == Mask::kFromOutput) g = rm::relu_backward_mask(g, xs[2]);
    if constexpr (kMask == Mask::kFromInput) {
      if constexpr (std::is_same<T, double>::value && !std::is_same<acc_t, double>::value) {
        // scalar tails run in double: recompute the forward's z in acc_t, as bn_apply did
        const acc_t z = rm::bn_affine(static_cast<acc_t>(xs[1]), static_cast<acc_t>(ps[1]),
                                      static_cast<acc_t>(ps[2]));
        g = rm::relu_backward_mask(g, static_cast<T>(z - zero_bound));
      } else {
        g = rm::relu_backward_mask_from_input(g, xs[1], ps[1], ps[2], T(zero_bound));
      }
    }
    s1 = s1 + g;
    s2 = s2 + g * (xs[1] - ps[0]);
  }
  void finish(int64_t, acc_t, double s1, double s2, double& o1, double& o2) const {
    o1 = s1;
    o2 = s2;
  }
};

template <Mask kMask, typename scalar_t>
void bn_backward_reduce_typed(const BackwardReduceArgs& a) {
  using acc_t = typename Vio<scalar_t>::acc_t;
  const Geometry& geo = a.geo;
  const int64_t C = geo.C;
  acc_t* sdy = static_cast<acc_t*>(a.sum_dy);
  acc_t* sdx = static_cast<acc_t*>(a.sum_dy_xmu);
  const Plan plan(geo);
  if (plan.chunks == 0) {
    std::fill(sdy, sdy + C, acc_t(0));
    std::fill(sdx, sdx + C, acc_t(0));
    return;
  }
  const scalar_t* dy = static_cast<const scalar_t*>(a.grad_out);
  const scalar_t* x = static_cast<const scalar_t*>(a.input);
  const BackwardRed<kMask, scalar_t> red{static_cast<const acc_t*>(a.mean), static_cast<const acc_t*>(a.mask_scale),
                                         static_cast<const acc_t*>(a.mask_shift),
                                         rm::relu_zero_bound<scalar_t, acc_t>()};
  Partials parts(plan.chunks * C);
  if constexpr (kMask == Mask::kFromOutput) {
    chunked_reduce<3, scalar_t>(plan, {dy, x, static_cast<const scalar_t*>(a.output)}, red, parts.p1, parts.p2);
  } else {
    chunked_reduce<2, scalar_t>(plan, {dy, x}, red, parts.p1, parts.p2);
  }
  at::parallel_for(0, C, kMergeBlock, [&](int64_t begin, int64_t end) {
    alignas(64) double t1[kMergeBlock], t2[kMergeBlock];
    for (int64_t b0 = begin; b0 < end; b0 += kMergeBlock) {
      const int64_t bn = std::min(kMergeBlock, end - b0);
      std::copy(parts.p1 + b0, parts.p1 + b0 + bn, t1);
      std::copy(parts.p2 + b0, parts.p2 + b0 + bn, t2);
      for (int64_t j = 1; j < plan.chunks; ++j) {
        const double* q1 = parts.p1 + j * C + b0;
        const double* q2 = parts.p2 + j * C + b0;
        for (int64_t c = 0; c < bn; ++c) {
          t1[c] += q1[c];
          t2[c] += q2[c];
        }
      }
      for (int64_t c = 0; c < bn; ++c) {
        sdy[b0 + c] = static_cast<acc_t>(t1[c]);
        sdx[b0 + c] = static_cast<acc_t>(t2[c]);
      }
    }
  });
}

void bn_backward_reduce_kernel(const BackwardReduceArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.relu && a.mask_scale != nullptr) {
      bn_backward_reduce_typed<Mask::kFromInput, scalar_t>(a);
    } else if (a.relu) {
      bn_backward_reduce_typed<Mask::kFromOutput, scalar_t>(a);
    } else {
      bn_backward_reduce_typed<Mask::kNone, scalar_t>(a);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// bn_backward_apply
// ---------------------------------------------------------------------------------------------
template <Mask kMask, typename scalar_t>
void bn_backward_apply_typed(const BackwardApplyArgs& a) {
  using acc_t = typename Vio<scalar_t>::acc_t;
  const scalar_t* dy = static_cast<const scalar_t*>(a.grad_out);
  const scalar_t* x = static_cast<const scalar_t*>(a.input);
  const scalar_t* o = static_cast<const scalar_t*>(a.output);
  scalar_t* dx = static_cast<scalar_t*>(a.grad_in);
  const acc_t* k = static_cast<const acc_t*>(a.k);
  const acc_t* msc = static_cast<const acc_t*>(a.mask_scale);
  const acc_t* msh = static_cast<const acc_t*>(a.mask_shift);
  const acc_t zb = rm::relu_zero_bound<scalar_t, acc_t>();
  if (a.mean_dy == nullptr) {  // eval form: the input is read only for the mask from it
    if constexpr (kMask == Mask::kFromInput) {
      elementwise<2, 3, scalar_t>(a.geo, {dy, x}, dx, {k, msc, msh}, [zb](const auto* v, const auto* c) {
        using V = std::decay_t<decltype(v[0])>;
        return rm::bn_backward_elem_eval(rm::relu_backward_mask_from_input(v[0], v[1], c[1], c[2], V(zb)), c[0]);
      });
    } else if constexpr (kMask == Mask::kFromOutput) {
      elementwise<2, 1, scalar_t>(a.geo, {dy, o}, dx, {k}, [](const auto* v, const auto* c) {
        return rm::bn_backward_elem_eval(rm::relu_backward_mask(v[0], v[1]), c[0]);
      });
    } else {
      elementwise<1, 1, scalar_t>(a.geo, {dy}, dx, {k}, [](const auto* v, const auto* c) {
        return rm::bn_backward_elem_eval(v[0], c[0]);
      });
    }
    return;
  }
  const acc_t* m = static_cast<const acc_t*>(a.mean);
  const acc_t* mdy = static_cast<const acc_t*>(a.mean_dy);
  const acc_t* pj = static_cast<const acc_t*>(a.proj);
  if constexpr (kMask == Mask::kFromInput) {
    elementwise<2, 6, scalar_t>(a.geo, {dy, x}, dx, {m, mdy, pj, k, msc, msh}, [zb](const auto* v, const auto* c) {
      using V = std::decay_t<decltype(v[0])>;
      return rm::bn_backward_elem(rm::relu_backward_mask_from_input(v[0], v[1], c[4], c[5], V(zb)), v[1], c[0], c[1],
                                  c[2], c[3]);
    });
  } else if constexpr (kMask == Mask::kFromOutput) {
    elementwise<3, 4, scalar_t>(a.geo, {dy, x, o}, dx, {m, mdy, pj, k}, [](const auto* v, const auto* c) {
      return rm::bn_backward_elem(rm::relu_backward_mask(v[0], v[2]), v[1], c[0], c[1], c[2], c[3]);
    });
  } else {
    elementwise<2, 4, scalar_t>(a.geo, {dy, x}, dx, {m, mdy, pj, k}, [](const auto* v, const auto* c) {
      return rm::bn_backward_elem(v[0], v[1], c[0], c[1], c[2], c[3]);
    });
  }
}

void bn_backward_apply_kernel(const BackwardApplyArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.relu && a.mask_scale != nullptr) {
      bn_backward_apply_typed<Mask::kFromInput, scalar_t>(a);
    } else if (a.relu) {
      bn_backward_apply_typed<Mask::kFromOutput, scalar_t>(a);
    } else {
      bn_backward_apply_typed<Mask::kNone, scalar_t>(a);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// max_pool2d_nhwc (inference: FoldedResNet's flat plan)
// ---------------------------------------------------------------------------------------------
// out[n, oh, ow, c] = max over the window's in-bounds input pixels, channels innermost: one
// vector of channels at a time, no indices (ATen's CPU max_pool2d always computes them). NaN
// propagates as in ATen (any NaN in the window gives NaN); the window is never empty
// (padding <= kernel / 2, checked by the op).
template <typename scalar_t>
void max_pool2d_nhwc_typed(const MaxPoolArgs& a) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const scalar_t* in = static_cast<const scalar_t*>(a.input);
  scalar_t* out = static_cast<scalar_t*>(a.output);
  const int64_t C = a.C, H = a.H, Wi = a.W, OH = a.OH, OW = a.OW;
  const scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
  const int64_t pixels = a.N * OH * OW;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C * a.kh * a.kw, 1));
  at::parallel_for(0, pixels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t ow = p % OW, oh = (p / OW) % OH, n = p / (OW * OH);
      const int64_t h0 = oh * a.sh - a.ph, w0 = ow * a.sw - a.pw;
      const int64_t hs = std::max<int64_t>(h0, 0), he = std::min<int64_t>(h0 + a.kh, H);
      const int64_t ws = std::max<int64_t>(w0, 0), we = std::min<int64_t>(w0 + a.kw, Wi);
      const scalar_t* base = in + n * H * Wi * C;
      scalar_t* o = out + p * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        Vec m(lowest);
        for (int64_t h = hs; h < he; ++h) {
          for (int64_t w = ws; w < we; ++w) m = at::vec::maximum(m, Vec::loadu(base + (h * Wi + w) * C + c));
        }
        m.store(o + c);
      }
      for (; c < C; ++c) {
        scalar_t m = lowest;
        for (int64_t h = hs; h < he; ++h) {
          for (int64_t w = ws; w < we; ++w) {
            const scalar_t v = base[(h * Wi + w) * C + c];
            if (v > m || v != v) m = v;  // ATen's rule: a NaN wins
            if (m != m) break;
          }
        }
        o[c] = m;
      }
    }
  });
}

void max_pool2d_nhwc_kernel(const MaxPoolArgs& a) {  // float32 / float64 (checked by the op)
  if (a.dtype == c10::ScalarType::Float) {
    max_pool2d_nhwc_typed<float>(a);
  } else if (a.dtype == c10::ScalarType::Double) {
    max_pool2d_nhwc_typed<double>(a);
  }
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table{RESNET_FUSED_CAP_STR(CPU_CAPABILITY), &bn_stats_kernel, &bn_apply_kernel,
                                 &bn_backward_reduce_kernel, &bn_backward_apply_kernel, &max_pool2d_nhwc_kernel};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace resnet_fused

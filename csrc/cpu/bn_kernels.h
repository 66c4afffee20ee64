// Interface between the CPU op implementations (csrc/cpu/bn_cpu.cpp: validation, layouts, outputs)
// and the CPU kernels (csrc/cpu/bn_kernels_impl.h: raw-pointer loops with at::vec + at::parallel_for).
//
// The kernel source is compiled once per CPU capability, as ATen compiles its cpu/ kernels: each
// wrapper in csrc/cpu/capability/ includes it and setup.py compiles that wrapper with
// -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name> and the capability's ISA flags, so
// at::vec::Vectorized has that width and everything lands in the namespace
// resnet_fused::cpu::<name>. bn_cpu.cpp picks one table at run time (torch's own choice,
// at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY). This header includes no at::vec
// header: it is seen by code compiled for different ISAs.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "op_geometry.h"

namespace resnet_fused {
namespace cpu {

using Geometry = ::resnet_fused::Geometry;  // csrc/op_geometry.h

// Per-channel vectors (`const void*` below) are dense, length C, in the accumulation type
// (double for double input, float otherwise). Tensors of the input's shape are dense in the
// input's layout and share its dtype.
struct StatsArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* input;
  void* mean;  // out, [C]
  void* var;   // out, [C], biased
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
  const void* mask_scale;  // non-null (with mask_shift): the ReLU mask from input*mask_scale + mask_shift
  const void* mask_shift;  // ([C], accumulation type); output is then not read
  bool relu;
};

struct BackwardApplyArgs {
  Geometry geo;
  c10::ScalarType dtype;
  const void* grad_out;
  const void* input;
  const void* output;   // read only when relu
  const void* mean;     // training form only
  const void* k;        // invstd * weight
  const void* mean_dy;  // nullptr: eval form g * k
  const void* proj;     // invstd^2 * mean_dy_xmu (training form)
  void* grad_in;
  const void* mask_scale;  // as in BackwardReduceArgs (the input is then read in the eval form too)
  const void* mask_shift;
  bool relu;
};

// Channels-last max-pool without indices: input [N, H, W, C] dense, output [N, OH, OW, C] dense.
struct MaxPoolArgs {
  c10::ScalarType dtype;
  const void* input;
  void* output;
  int64_t N, H, W, C, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
};

struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512"
  void (*bn_stats)(const StatsArgs&);
  void (*bn_apply)(const ApplyArgs&);
  void (*bn_backward_reduce)(const BackwardReduceArgs&);
  void (*bn_backward_apply)(const BackwardApplyArgs&);
  void (*max_pool2d_nhwc)(const MaxPoolArgs&);
};

// One definition per compiled capability (setup.py defines RESNET_FUSED_CPU_<name> for each).
namespace DEFAULT {
const KernelTable& kernel_table();
}
#ifdef RESNET_FUSED_CPU_AVX2
namespace AVX2 {
const KernelTable& kernel_table();
}
#endif
#ifdef RESNET_FUSED_CPU_AVX512
namespace AVX512 {
const KernelTable& kernel_table();
}
#endif

// The table the ops run (chosen once, from at::get_cpu_capability()), and what was compiled
// (comma-separated, e.g. "DEFAULT,AVX2,AVX512"). Defined in bn_cpu.cpp.
const KernelTable& kernels();
const char* compiled_capabilities();

}  // namespace cpu
}  // namespace resnet_fused

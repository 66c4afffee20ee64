// The CPU kernels (csrc/cpu/bn_kernels_impl.h) compiled for the AVX2 capability: setup.py compiles
// this file with -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 and the AVX2 ISA flags.
#if !defined(CPU_CAPABILITY_AVX2)
#error "compile with setup.py's per-capability flags (-DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 ...)"
#endif
#include "cpu/bn_kernels_impl.h"

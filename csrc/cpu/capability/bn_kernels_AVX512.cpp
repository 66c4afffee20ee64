// The CPU kernels (csrc/cpu/bn_kernels_impl.h) compiled for the AVX512 capability: setup.py compiles
// this file with -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 and the AVX512 ISA flags.
#if !defined(CPU_CAPABILITY_AVX512)
#error "compile with setup.py's per-capability flags (-DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 ...)"
#endif
#include "cpu/bn_kernels_impl.h"

// The CPU kernels (csrc/cpu/bn_kernels_impl.h) compiled for the DEFAULT capability: setup.py compiles
// this file with -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT and no ISA flags.
#if !defined(CPU_CAPABILITY_DEFAULT)
#error "compile with setup.py's per-capability flags (-DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT ...)"
#endif
#include "cpu/bn_kernels_impl.h"

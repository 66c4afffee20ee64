// Schemas of the resnet_fused ops and the pybind11 module `resnet_fused._C`.
//
// Importing `resnet_fused._C` loads this library, which registers the schemas below (TORCH_LIBRARY)
// and the CPU kernels (csrc/cpu, TORCH_LIBRARY_IMPL; compiled once per CPU capability, the one torch
// runs is used: build_info() says which) and, in a CUDA build, the CUDA kernels (csrc/cuda,
// TORCH_LIBRARY_IMPL for the CUDA key). The semantics are those of resnet_fused/reference.py.

// Light includes on purpose (torch/extension.h would double this file's compile time): the module
// only returns a dict, so plain pybind11 is enough.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "cpu/bn_kernels.h"

#ifndef RESNET_FUSED_TORCH_VERSION
#define RESNET_FUSED_TORCH_VERSION "unknown"
#endif

#ifdef RESNET_FUSED_WITH_CUDA
#include "cuda/bn_cuda.h"
#endif

TORCH_LIBRARY(resnet_fused, m) {
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_apply(Tensor input, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
      "Tensor? res_shift, bool relu) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, bool relu, "
      "Tensor? mask_scale=None, Tensor? mask_shift=None) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "bn_backward_apply(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? mean_dy, Tensor? mean_dy_xmu, bool relu, Tensor? mask_scale=None, "
      "Tensor? mask_shift=None) -> Tensor");
  // Inference helper, CPU only (FoldedResNet's flat plan): a channels-last max-pool without indices.
  m.def("max_pool2d_nhwc(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["built_with_torch"] = std::string(RESNET_FUSED_TORCH_VERSION);
#ifdef RESNET_FUSED_WITH_CUDA
  info["cuda"] = resnet_fused::cuda::cuda_compiled();
  info["cuda_version"] = std::string(resnet_fused::cuda::compiled_cuda_version());
  // The ops' CUDA kernels, registered for the CUDA dispatch key (csrc/cuda/bn_cuda_ops.cpp).
  info["cuda_ops"] = resnet_fused::cuda::cuda_ops_compiled();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_ops"] = false;
#endif
  // CPU kernels: compiled once per CPU capability; the one torch itself runs is used.
  const std::string compiled = resnet_fused::cpu::compiled_capabilities();
  pybind11::list caps;
  for (size_t begin = 0; begin <= compiled.size();) {
    const size_t end = std::min(compiled.find(',', begin), compiled.size());
    caps.append(compiled.substr(begin, end - begin));
    begin = end + 1;
  }
  const std::string used = resnet_fused::cpu::kernels().capability;
  info["cpu_capabilities_compiled"] = caps;
  info["cpu_capability_used"] = used;
  info["cpu_kernels"] = "at::vec (" + used + ") + at::parallel_for";
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // torch's Python side must be initialized before torch.ops.resnet_fused is used; the library
  // itself finds libtorch through its rpath.
  pybind11::module_::import("torch");
  m.doc() = "resnet_fused compiled ops: importing this module registers torch.ops.resnet_fused.*";
  m.def("build_info", &build_info,
        "What was compiled: built_with_torch, cuda (CUDA sources compiled in), cuda_version, cuda_ops, "
        "cpu_kernels, cpu_capabilities_compiled (e.g. ['DEFAULT', 'AVX2', 'AVX512']), cpu_capability_used "
        "(the one torch.backends.cpu.get_cpu_capability() names, or the best compiled one below it)");
}

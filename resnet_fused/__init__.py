"""resnet_fused: fused BatchNorm/ReLU/residual kernels for torchvision ResNets.

    import resnet_fused
    model = torchvision.models.resnet50()
    resnet_fused.swap_blocks(model)          # same parameters, fused blocks and stem (FusedResNet)
    resnet_fused.build_info()                # what was built: C++/CUDA kernels, Triton, torch
    resnet_fused.convert_sync_batchnorm(model)  # BatchNorm synchronized across DDP ranks (CPU and GPU)

Backends: ``cpu`` (C++), ``cuda`` (CUDA C++), ``triton``, ``reference`` (pure PyTorch);
see :mod:`resnet_fused.backends`.
"""
from . import models, ops
from ._extension import build_info
from .backends import available_backends, backend_for, get_backend, set_backend, use_backend
from .blocks import FusedBasicBlock, FusedBottleneck
from .convert import SwapReport, swap_blocks, unswap_blocks
from .fold import fold_bn
from .resnet import FusedResNet
from .sync_bn import SyncBatchNorm, convert_sync_batchnorm

ops.register_cpp_ops()

__version__ = "0.1.0"
__all__ = [
    "FusedBasicBlock", "FusedBottleneck", "FusedResNet", "swap_blocks", "unswap_blocks", "SwapReport", "fold_bn",
    "SyncBatchNorm", "convert_sync_batchnorm",
    "available_backends", "backend_for", "get_backend", "set_backend", "use_backend",
    "build_info", "models", "ops", "__version__",
]

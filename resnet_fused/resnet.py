"""``FusedResNet``: torchvision's ``ResNet`` whose stem BatchNorm+ReLU is one fused unit.

Only ``_forward_impl`` differs from torchvision's: the stem ``conv1 -> bn1 -> relu`` runs as the conv
followed by :func:`resnet_fused.units.bn_relu` (one apply pass forward; backward masks with the saved
output inside the BN backward kernels: no separate ReLU passes), then ``maxpool``, ``layer1..4``,
``avgpool``, ``flatten`` and ``fc`` exactly as torchvision calls them. On the ``triton`` backend the
stem conv is the Triton conv whose epilogue computes ``bn1``'s statistics (no ``bn_stats`` pass).

A stem the unit does not reproduce exactly (another norm layer, BN without affine or running
statistics, a conv with bias or non-zero padding mode, an activation other than ``nn.ReLU``, hooks
on ``conv1``/``bn1``/``relu``) runs torchvision's ``_forward_impl``, as does ``torch.fx`` tracing
(``fold_bn`` traces the model to find its conv/BN pairs).

Activation layout (``FusedResNet.activation_memory_format``): on the CPU (the ``cpu`` and
``reference`` backends, whose convolutions are ATen's oneDNN ones), for float32 and bfloat16 with
oneDNN enabled, a large enough NCHW input is turned channels_last once, before the stem, so every
convolution and fused kernel after it runs channels_last. Measured on the 2-core AVX512 development
VM (ResNet-50, NCHW parameters, interleaved): channels_last was faster from N*H*W = 200k pixels on
(training step at batch 4 and 224x224 1.10x for torchvision itself, 8 x 160x160 1.07x, 8 x 224x224
1.17x; inference at 4 and 8 x 224x224 1.13x and 1.17x) and slower at 100k and below (batch 8 at
112x112 0.98x, ResNet-18 0.91x; batch 1 at 224x224 0.86x). ``"auto"`` converts from
``channels_last_min_pixels`` = 2**17 on (between the two measured ranges; tune it per machine
with ``bench/layout_ab.py``),
``"channels_last"`` always, ``"preserve"`` never (as torchvision). ``torch.compile`` makes the same
kind of choice (inductor's layout optimization). The parameters keep their own format (and their
gradients: autograd copies the 3x3 convs' channels-last weight gradients back, 17 copies a step in
ResNet-50); the logits have none; the input's gradient comes back in the input's layout. Hooks on
the submodules see channels_last activations (same values).

Built by :func:`resnet_fused.swap_blocks` (a class swap: same tensors and state_dict) or directly
with torchvision's ``ResNet`` constructor arguments.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends, ops, sync_bn, triton_units, units
from .blocks import _conv_out_hw, _has_hooks, _is_plain_conv, check_input, has_global_module_hooks

__all__ = ["FusedResNet"]


def _pool_out_hw(pool: nn.Module, h: int, w: int) -> Optional[Tuple[int, int]]:
    """Output size of the stem's max-pool (``nn.MaxPool2d``, or ``nn.Identity``); None for any
    other module, whose output size is not predicted."""
    if type(pool) is nn.Identity:
        return h, w
    if not isinstance(pool, nn.MaxPool2d):
        return None

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    out = []
    for size, k, s, p, d in zip((h, w), pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                                pair(pool.padding), pair(pool.dilation)):
        num = size + 2 * p - d * (k - 1) - 1
        o = (math.ceil(num / s) if pool.ceil_mode else num // s) + 1
        if pool.ceil_mode and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    return out[0], out[1]


_ACTIVATION_FORMATS = ("auto", "channels_last", "preserve")
_CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's; float64 runs THNN convs
_MKLDNN_BUILT = torch.backends.mkldnn.is_available()  # once: dynamo does not trace the call
_ATEN_CONV_BACKENDS = ("cpu", "reference")  # ATen's (oneDNN) convs; triton runs its own stem conv


class FusedResNet(ResNet):
    """torchvision ``ResNet`` whose stem BN+ReLU runs one fused autograd unit."""

    #: ``"auto"``: channels_last activations on the CPU (float32/bfloat16, oneDNN enabled) for
    #: inputs of at least ``channels_last_min_pixels`` N*H*W, the input's format otherwise;
    #: ``"channels_last"``: on the CPU whatever the size; ``"preserve"``: always the input's format
    #: (module docstring). Class attributes; set them on an instance to change one model.
    activation_memory_format: str = "auto"
    channels_last_min_pixels: int = 2 ** 17

    def activation_input(self, x: Tensor) -> Tensor:
        """``x`` in the memory format the network runs in (see ``activation_memory_format``)."""
        setting = self.activation_memory_format
        if setting == "preserve" or x.dim() != 4:
            return x
        if setting == "auto" and x.shape[0] * x.shape[2] * x.shape[3] < self.channels_last_min_pixels:
            return x
        if (x.device.type == "cpu" and x.dtype in _CHANNELS_LAST_DTYPES and _MKLDNN_BUILT
                and torch.backends.mkldnn.enabled
                and backends.backend_for(x.device, x.dtype) in _ATEN_CONV_BACKENDS):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def fused_supported(self) -> bool:
        """True when ``forward`` runs the fused stem (else torchvision's ``_forward_impl`` runs)."""
        conv, bn, relu = self.conv1, self.bn1, self.relu
        return (_is_plain_conv(conv) and not _has_hooks(conv)
                and units.is_supported_norm(bn) and not _has_hooks(bn)
                and type(relu) is nn.ReLU and not _has_hooks(relu))

    def _validate(self, x: Tensor) -> None:
        """Errors that name the problem, raised before any kernel runs or state changes."""
        name = type(self).__name__
        if self.activation_memory_format not in _ACTIVATION_FORMATS:
            raise ValueError(f"{name}.activation_memory_format must be one of {_ACTIVATION_FORMATS}, "
                             f"got {self.activation_memory_format!r}")
        conv = self.conv1
        check_input(name, x, conv, "model")
        # synchronized BN: group/device errors now; one value per channel is fine across ranks
        # (the global count is checked after the statistics are gathered)
        world = sync_bn.sync_world_size(self.bn1, x.device)
        n = x.shape[0]
        h, w = _conv_out_hw(conv, x.shape[2], x.shape[3])
        if h <= 0 or w <= 0:
            raise ValueError(f"{name}: input of spatial size {tuple(x.shape[2:])} is too small for {conv}")
        if units.uses_batch_stats(self.bn1) and n * h * w == 1 and world == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {torch.Size([n, conv.out_channels, h, w])}")
        pooled = _pool_out_hw(self.maxpool, h, w)
        if pooled is not None:
            self._validate_blocks(n, *pooled)

    def _validate_blocks(self, n: int, h: int, w: int) -> None:
        """The blocks' BatchNorms get more than one value per channel in training, checked before
        the stem runs, so that no running statistics change in a call that would fail in a later
        block (torchvision itself updates the earlier layers' statistics, then fails). Follows
        torchvision's block structure; stops at anything else (a module of the user's)."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if not isinstance(layer, nn.Sequential):
                return
            for block in layer:
                convs = [getattr(block, c, None) for c in ("conv1", "conv2", "conv3")]
                norms = [getattr(block, b, None) for b in ("bn1", "bn2", "bn3")]
                if not isinstance(block, (BasicBlock, Bottleneck)):
                    return
                for conv, norm in zip(convs, norms):
                    if conv is None:
                        break
                    if not isinstance(conv, nn.Conv2d):
                        return
                    h, w = _conv_out_hw(conv, h, w)
                    if h <= 0 or w <= 0:
                        raise ValueError(f"{type(self).__name__}: input too small: {conv} in a block "
                                         f"would get an output of spatial size {(h, w)}")
                    if (units.uses_batch_stats(norm) and n * h * w == 1
                            and sync_bn.sync_world_size(norm) == 1):
                        raise ValueError("Expected more than 1 value per channel when training, got input "
                                         f"size {torch.Size([n, conv.out_channels, h, w])} (raised before any "
                                         "layer ran, so no running statistics changed)")

    def _fused_stem(self, x: Tensor) -> Tensor:
        if triton_units.stem_applies(self, x):  # statistics from the Triton conv's epilogue
            y, state = triton_units.stem_conv_stats(self, x)
        else:
            # A module call: under autocast the conv runs in the autocast dtype, and the unit
            # accepts that input with float32 BN parameters, as the blocks' units do.
            y = self.conv1(x)
            state = units.prepare_bn(self.bn1, y, sync_bn.synchronizer_for(self.bn1))
        out = units.bn_relu(y, state)
        units.update_running_stats([state])  # after the kernels succeeded
        return out

    def _max_pool(self, x: Tensor) -> Tensor:
        """``self.maxpool(x)``, faster on the CPU. ATen's CPU max-pool is about 14x slower on NCHW
        input than on channels_last (8x64x112x112, 2 threads: 28 vs 2 ms), so an NCHW input is
        pooled through a channels_last copy and converted back (2 copies, same values and
        indices); without autograd the pool is the C++ kernel without indices
        (:func:`resnet_fused.ops.max_pool2d_inference`). A max-pool with hooks (or global module
        hooks) is called as a module."""
        pool = self.maxpool
        if (type(pool) is not nn.MaxPool2d or _has_hooks(pool) or x.device.type != "cpu" or x.dim() != 4
                or has_global_module_hooks()):
            return pool(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            return ops.max_pool2d_inference(x, pool)
        return ops.max_pool2d_inference(x.contiguous(memory_format=torch.channels_last), pool).contiguous()

    def _forward_impl(self, x: Tensor) -> Tensor:
        # fx tracing (fold_bn's, the user's): torchvision's graph, whose control flow does not
        # depend on the input
        if isinstance(x, torch.fx.Proxy) or not self.fused_supported():
            return super()._forward_impl(x)
        self._validate(x)
        x = self._fused_stem(self.activation_input(x))
        x = self._max_pool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

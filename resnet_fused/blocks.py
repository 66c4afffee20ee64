"""Drop-in replacements for torchvision's ResNet blocks.

``FusedBasicBlock`` / ``FusedBottleneck`` subclass torchvision's ``BasicBlock`` / ``Bottleneck``:
same constructor, submodules, state_dict keys and constructor errors (their ``__init__`` is
torchvision's). Only ``forward`` differs: it runs the autograd units of :mod:`resnet_fused.units`
when the block's configuration is one they reproduce exactly, and torchvision's own forward
otherwise (another norm layer, BN without affine or running statistics, hooks on inner modules).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import sync_bn, triton_units, units
from .units import BNState

__all__ = ["FusedBasicBlock", "FusedBottleneck"]


def _is_plain_conv(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.bias is None)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def has_global_module_hooks() -> bool:
    """``nn.modules.module.register_module_forward_(pre_)hook`` hooks are set: every module call
    must stay a module call."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> Tuple[int, int]:
    out = []
    for size, k, s, p, d in zip((h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def check_input(name: str, x: Tensor, conv1: nn.Conv2d, owner: str) -> None:
    """The input checks of a fused module (``name``: its class, ``owner``: "block" or "model"),
    made before any kernel runs: a 4-D floating tensor with ``conv1``'s input channels, on the
    device and in the dtype of its parameters (another dtype only under autocast)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != conv1.in_channels:
        raise ValueError(f"{name}: expected {conv1.in_channels} input channels, got "
                         f"{x.shape[1]} (input shape {tuple(x.shape)})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")
    weight = conv1.weight
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but the {owner}'s parameters are on "
                         f"{weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the {owner}'s parameter "
                        f"dtype {weight.dtype} (convert one of them, or run under torch.autocast)")


class _FusedBlockMixin:
    """Shared by both blocks: configuration check, input validation, the block-end unit."""

    # (norm, conv that consumes its ReLU output) pairs of the BN+ReLU+conv units, then the last norm
    def _units(self) -> Tuple[List[Tuple[nn.Module, nn.Conv2d]], nn.Module]:
        raise NotImplementedError

    def _downsample_parts(self) -> Optional[Tuple[nn.Conv2d, nn.Module]]:
        """(conv, norm) when the downsample branch is the standard ``Sequential(conv1x1, norm)``
        whose BN can be applied inside the block-end pass."""
        ds = self.downsample
        if (type(ds) is nn.Sequential and len(ds) == 2 and not _has_hooks(ds)
                and type(ds[0]) is nn.Conv2d and ds[0].padding_mode == "zeros"
                and units.is_supported_norm(ds[1]) and not _has_hooks(ds[1])):
            return ds[0], ds[1]
        return None

    def fused_supported(self) -> bool:
        """True when ``forward`` runs the fused units (else torchvision's forward runs)."""
        pairs, last_norm = self._units()
        norms = [n for n, _ in pairs] + [last_norm]
        if not all(units.is_supported_norm(n) and not _has_hooks(n) for n in norms):
            return False
        if not all(_is_plain_conv(c) and not _has_hooks(c) for _, c in pairs):
            return False
        return type(self.relu) is nn.ReLU and not _has_hooks(self.relu)

    def _validate(self, x: Tensor) -> None:
        """Errors that name the problem, raised before any kernel runs or state changes."""
        name = type(self).__name__
        check_input(name, x, self.conv1, "block")
        # BN in training needs more than one value per channel (same error as torch)
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        pairs, last_norm = self._units()
        convs = [self.conv1] + [c for _, c in pairs]
        norms = [nrm for nrm, _ in pairs] + [last_norm]
        ds = self._downsample_parts()
        # synchronized BN: group/device errors now; one value per channel is fine across ranks
        # (the global count is checked after the statistics are gathered)
        worlds = [sync_bn.sync_world_size(norm, x.device)
                  for norm in norms + ([ds[1]] if ds is not None else [])]
        for conv, norm, world in zip(convs, norms, worlds):
            h, w = _conv_out_hw(conv, h, w)
            if h <= 0 or w <= 0:
                raise ValueError(f"{name}: input of spatial size {tuple(x.shape[2:])} is too small "
                                 f"for {conv}")
            if units.uses_batch_stats(norm) and n * h * w == 1 and world == 1:
                raise ValueError("Expected more than 1 value per channel when training, got input "
                                 f"size {torch.Size([n, conv.out_channels, h, w])}")
        if ds is not None and units.uses_batch_stats(ds[1]) and worlds[-1] == 1:
            hd, wd = _conv_out_hw(ds[0], x.shape[2], x.shape[3])
            if n * hd * wd == 1:
                raise ValueError("Expected more than 1 value per channel when training, got input "
                                 f"size {torch.Size([n, ds[0].out_channels, hd, wd])}")

    def _conv_weight(self, conv: nn.Conv2d, like: Tensor) -> Tensor:
        # Under autocast the first conv (a module call) already ran in the autocast dtype; the
        # convs inside the units must see weights of that dtype too. A differentiable cast, so the
        # gradient reaches the float32 parameter.
        weight = conv.weight
        return weight if weight.dtype == like.dtype else weight.to(like.dtype)

    def _strided_downsample(self, x: Tensor, ds_conv: nn.Conv2d) -> bool:
        """conv1 and the strided 1x1 downsample conv as one node (units.conv_and_strided_downsample):
        both plain convs without hooks (they are not module calls there)."""
        return (_is_plain_conv(self.conv1) and not _has_hooks(self.conv1)
                and _is_plain_conv(ds_conv) and not _has_hooks(ds_conv)
                and units.strided_downsample_applies(x, self.conv1, ds_conv))

    def _fused_forward(self, x: Tensor) -> Tensor:
        if triton_units.applies(self, x):  # Triton convs: BN+ReLU prologue, statistics epilogue
            return triton_units.fused_forward(self, x)
        pairs, last_norm = self._units()
        states: List[BNState] = []
        ds = self._downsample_parts()
        y_ds = None
        if ds is not None and self._strided_downsample(x, ds[0]):
            y, y_ds = units.conv_and_strided_downsample(x, self.conv1, self.conv1.weight, ds[0], ds[0].weight)
        else:
            y = self.conv1(x)
        for norm, conv in pairs:
            state = units.prepare_bn(norm, y, sync_bn.synchronizer_for(norm))
            states.append(state)
            y = units.bn_relu_conv(y, state, conv, self._conv_weight(conv, y))
        last = units.prepare_bn(last_norm, y, sync_bn.synchronizer_for(last_norm))
        states.append(last)
        if ds is not None:
            if y_ds is None:
                y_ds = ds[0](x)
            if y_ds.dtype != y.dtype:
                y_ds = y_ds.to(y.dtype)
            ds_state = units.prepare_bn(ds[1], y_ds, sync_bn.synchronizer_for(ds[1]))
            states.append(ds_state)
            out = units.bn_add_relu(y, last, y_ds=y_ds, bn_ds=ds_state)
        else:
            identity = x if self.downsample is None else self.downsample(x)
            if identity.dtype != y.dtype:
                identity = identity.to(y.dtype)
            out = units.bn_add_relu(y, last, identity)
        units.update_running_stats(states)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused_supported():
            return super().forward(x)
        self._validate(x)
        return self._fused_forward(x)


class FusedBasicBlock(_FusedBlockMixin, BasicBlock):
    """torchvision ``BasicBlock`` whose forward runs fused BN/ReLU/residual units."""

    def _units(self):
        return [(self.bn1, self.conv2)], self.bn2


class FusedBottleneck(_FusedBlockMixin, Bottleneck):
    """torchvision ``Bottleneck`` whose forward runs fused BN/ReLU/residual units."""

    def _units(self):
        return [(self.bn1, self.conv2), (self.bn2, self.conv3)], self.bn3

"""The fused blocks' forward on the ``triton`` backend: every conv of the block is the Triton
implicit-GEMM conv with a BN-statistics epilogue, and each BN+ReLU that feeds a conv is that conv's
prologue (DESIGN.md: "In Triton the BN+ReLU is the conv's prologue").

Forward of a block (BasicBlock; Bottleneck has one more inner unit)::

    y1, stats1 = conv1(x)                                  # statistics epilogue
    y2, stats2 = conv2(relu(y1*scale1 + shift1))           # prologue + statistics epilogue
    out = relu(bn2(y2) + identity | bn_ds(y_ds))           # units.bn_add_relu, as on every backend

so no ``bn_stats`` pass runs and the BN+ReLU output never exists in forward memory.

Backward: the conv gradients come from ATen's ``convolution_backward`` (this part has no Triton conv
backward). As in :class:`resnet_fused.units._BNReLUConv` (whose backward this reuses), it recomputes
``a = relu(bn(y))`` in memory once for ATen and masks the BN+ReLU backward with it. What a Triton conv
backward (recompute in its prologue, mask from the saved input) would save is quantified by
bench/traffic_model.py (plans ``triton`` vs ``triton_conv_backward``).

A ResNet's stem (:class:`resnet_fused.FusedResNet`) takes the same conv: ``y, stats = conv1(x)``
(statistics epilogue), then :func:`resnet_fused.units.bn_relu` (its output feeds the max-pool, so
there is no next conv to take the BN+ReLU as a prologue).

Statistics are non-differentiable outputs: the next unit's backward returns the complete gradient of
its input, statistics terms included (the contract of :mod:`resnet_fused.units`).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from . import ops, sync_bn, units
from .units import BNState

__all__ = ["applies", "fused_forward", "stem_applies", "stem_conv_stats"]


class _ConvStats(torch.autograd.Function):
    """``z = conv(x)`` and ``z``'s batch statistics (epilogue); the gradient is ATen's."""

    @staticmethod
    def forward(ctx, x, conv_weight, stride, padding, dilation, groups):
        z, mean, var = ops.conv2d_bn_stats(x, conv_weight, None, None, False, stride, padding,
                                           dilation, groups)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.save_for_backward(x, conv_weight)
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        x, conv_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_z, x, conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_w, False])
        return grad_x, grad_w, None, None, None, None


# the plain function behind the staticmethod: torch.compile refuses one Function calling another's
# backward through the class attribute (it expects its own backward context there)
_bn_relu_conv_backward = units._BNReLUConv.__dict__["backward"].__func__


class _BNReLUConvStats(units._BNReLUConv):
    """:class:`units._BNReLUConv` whose forward is one Triton conv (BN+ReLU prologue, statistics
    epilogue); same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, conv_weight, stride, padding, dilation, groups,
                batch_stats):
        scale, shift = units._scale_shift(mean, invstd, weight, bias)
        z, z_mean, z_var = ops.conv2d_bn_stats(y, conv_weight, scale, shift, True, stride, padding,
                                               dilation, groups)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.batch_stats = batch_stats
        ctx.sync = None   # never synchronized: applies() sends synchronized norms to the units' path
        ctx.save_for_backward(y, mean, invstd, weight, scale, shift, conv_weight)  # as the unit saves
        ctx.mark_non_differentiable(z_mean, z_var)
        return z, z_mean, z_var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        return _bn_relu_conv_backward(ctx, grad_z)


def _conv_args(conv: nn.Conv2d):
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _state(bn: nn.Module, y: Tensor, mean: Tensor, var: Tensor) -> BNState:
    """units.prepare_bn with the batch statistics the conv epilogue already computed."""
    if not units.uses_batch_stats(bn):
        return units.prepare_bn(bn, y)   # running statistics: no pass over y
    invstd = torch.rsqrt(var + bn.eps)
    return BNState(bn, mean, invstd, bn.weight, bn.bias, True, var, y.numel() // y.shape[1])


def applies(block: nn.Module, x: Tensor) -> bool:
    """True when ``block`` (configuration already checked by ``fused_supported``) runs this path:
    the triton backend runs ``x``, no autocast (the units' weight casts are not wired here), and
    conv1 and the downsample conv are plain convs (they are not module calls here, so no hooks)."""
    from .blocks import _has_hooks, _is_plain_conv

    if not ops.triton_conv_in_use(x) or torch.is_autocast_enabled(x.device.type):
        return False
    pairs, last_norm = block._units()
    norms = [n for n, _ in pairs] + [last_norm] + ([block.downsample[1]] if block._downsample_parts() else [])
    if any(sync_bn.sync_world_size(n) > 1 for n in norms):
        return False  # synchronized statistics: the units' path, which exchanges them between ranks
    convs = [block.conv1] + [c for _, c in pairs]
    ds = block._downsample_parts()
    if block.downsample is not None:
        if ds is None:
            return False
        convs.append(ds[0])
    return all(_is_plain_conv(c) and not _has_hooks(c) and c.weight.dtype == x.dtype for c in convs)


def fused_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's training/eval forward on the triton backend (see the module docstring)."""
    pairs, last_norm = block._units()
    states: List[BNState] = []
    y, mean, var = _ConvStats.apply(x, block.conv1.weight, *_conv_args(block.conv1))
    for norm, conv in pairs:
        state = _state(norm, y, mean, var)
        states.append(state)
        y, mean, var = _BNReLUConvStats.apply(y, state.mean, state.invstd, state.weight, state.bias,
                                              conv.weight, *_conv_args(conv), state.batch_stats)
    last = _state(last_norm, y, mean, var)
    states.append(last)
    ds = block._downsample_parts()
    if ds is not None:
        y_ds, mean_ds, var_ds = _ConvStats.apply(x, ds[0].weight, *_conv_args(ds[0]))
        ds_state = _state(ds[1], y_ds, mean_ds, var_ds)
        states.append(ds_state)
        out = units.bn_add_relu(y, last, y_ds=y_ds, bn_ds=ds_state)
    else:
        out = units.bn_add_relu(y, last, x)
    units.update_running_stats(states)
    return out


def stem_applies(model: nn.Module, x: Tensor) -> bool:
    """True when a ResNet's stem (configuration already checked by ``FusedResNet.fused_supported``)
    runs its conv here: the conditions of :func:`applies` for ``conv1`` and ``bn1``."""
    # under autocast: the units' path (the ATen conv module call runs in the autocast dtype)
    if not ops.triton_conv_in_use(x) or torch.is_autocast_enabled(x.device.type):
        return False
    if sync_bn.sync_world_size(model.bn1) > 1:
        return False  # synchronized statistics: the units' path exchanges them between ranks
    return model.conv1.weight.dtype == x.dtype


def stem_conv_stats(model: nn.Module, x: Tensor) -> Tuple[Tensor, BNState]:
    """``y = conv1(x)`` with ``bn1``'s statistics from the conv epilogue (no ``bn_stats`` pass)."""
    y, mean, var = _ConvStats.apply(x, model.conv1.weight, *_conv_args(model.conv1))
    return y, _state(model.bn1, y, mean, var)

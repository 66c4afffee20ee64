"""The autograd units of DESIGN.md, built on the primitives of :mod:`resnet_fused.ops`.

* :func:`bn_relu_conv` — ``conv(relu(bn(y)))`` that saves only ``y`` and the per-channel statistics
  and recomputes ``a = relu(bn(y))`` in backward for ATen's conv backward (eager torchvision keeps
  ``a`` alive); the BN+ReLU backward then takes its ReLU mask from ``y`` and the forward's
  scale/shift inside the kernels, so ``a`` is not read again.
* :func:`bn_add_relu` — the block end ``relu(bn(y) + identity)``, where the identity is either a
  tensor or ``bn_ds(y_ds)`` (the downsample branch's BatchNorm, applied in the same pass).
* :func:`bn_relu` — ``relu(bn(y))`` of a ResNet's stem (its output feeds the max-pool, which keeps
  it alive anyway: saving it costs no memory and gives the backward its ReLU mask).

A BatchNorm is described by :class:`BNState`: the statistics the forward normalizes with (batch
statistics in training, running statistics otherwise) and its affine parameters. The statistics are
computed outside the autograd Functions from a detached input; each Function's backward returns the
*complete* gradient of its input, statistics terms included, so autograd never sees the statistics.
Running statistics are updated by :func:`update_running_stats` only after every kernel of a block has
succeeded, so a failing call leaves module state untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import ops
from .reference import opmath_dtype
from .sync_bn import StatsSync, SyncBatchNorm


@dataclass
class BNState:
    """What one BatchNorm contributes to a fused pass."""

    module: nn.Module
    mean: Tensor            # per-channel, accumulation dtype
    invstd: Tensor          # per-channel, accumulation dtype
    weight: Tensor          # gamma (a parameter or, for FrozenBatchNorm2d, a buffer)
    bias: Tensor            # beta
    batch_stats: bool       # True: normalizes with this batch's statistics (training)
    var: Optional[Tensor] = None  # biased batch variance, for the running-statistics update
    count: int = 0                # elements per channel in this batch (all ranks' when synchronized)
    sync: Optional[StatsSync] = None  # synchronized BN: the collectives of this forward/backward


def uses_batch_stats(bn: nn.Module) -> bool:
    return isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) and bn.training


def prepare_bn(bn: nn.Module, y: Tensor, sync: Optional[StatsSync] = None) -> BNState:
    """Statistics for normalizing ``y`` with ``bn`` (no module state is changed here). With a
    ``sync`` (synchronized BN in training), the statistics are the global batch's."""
    acc = opmath_dtype(y.dtype)
    if uses_batch_stats(bn):
        mean, var = ops.bn_stats(y.detach())
        count = y.numel() // y.shape[1]
        if sync is not None:
            mean, var, count = sync.stats(mean, var, count)
        invstd = torch.rsqrt(var + bn.eps)
        return BNState(bn, mean, invstd, bn.weight, bn.bias, True, var, count, sync)
    # eval-mode BatchNorm2d or FrozenBatchNorm2d: running statistics are constants
    mean = bn.running_mean.detach().to(acc)
    invstd = torch.rsqrt(bn.running_var.detach().to(acc) + bn.eps)
    return BNState(bn, mean, invstd, bn.weight, bn.bias, False)


def update_running_stats(states: Sequence[BNState]) -> None:
    """nn.BatchNorm2d's running-statistics update (momentum, momentum=None cumulative average,
    unbiased variance, num_batches_tracked), for every BN that normalized with batch statistics."""
    with torch.no_grad():
        for s in states:
            if not s.batch_stats:
                continue
            bn = s.module
            bn.num_batches_tracked.add_(1)
            if s.count == 0:  # an empty batch: torch counts it but leaves the statistics alone
                continue
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = s.var * (s.count / (s.count - 1))
            bn.running_mean.mul_(1 - factor).add_(s.mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    acc = mean.dtype
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - mean * scale
    return scale, shift


def _bn_input_grad(grad: Tensor, y: Tensor, relu_out: Optional[Tensor], mean: Tensor, invstd: Tensor,
                   weight: Tensor, batch_stats: bool, need_input: bool,
                   sync: Optional[StatsSync] = None,
                   relu_affine: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """BN(+ReLU) backward: (grad_y, grad_weight, grad_bias). With ``relu_out`` the gradient is
    masked where that ReLU output is <= 0 inside the kernels; with ``relu_affine`` = the forward's
    (scale, shift), where ``relu(y*scale + shift)`` is, recomputed in the kernels from ``y`` (no
    output read); with neither, ``grad`` is already masked. With ``sync`` the input gradient uses
    all ranks' sums; parameter gradients stay local."""
    relu = relu_out is not None or relu_affine is not None
    msc, msh = relu_affine if relu_affine is not None else (None, None)
    sum_dy, sum_dy_xmu = ops.bn_backward_reduce(grad, y, relu_out, mean, relu, msc, msh)
    grad_y = None
    if need_input:
        if batch_stats:
            count = y.numel() // y.shape[1]
            tot_dy, tot_dy_xmu = sum_dy, sum_dy_xmu
            if sync is not None:
                tot_dy, tot_dy_xmu, count = sync.grads(sum_dy, sum_dy_xmu)
            grad_y = ops.bn_backward_apply(grad, y, relu_out, mean, invstd, weight, tot_dy / count,
                                           tot_dy_xmu / count, relu, msc, msh)
        else:
            grad_y = ops.bn_backward_apply(grad, y, relu_out, mean, invstd, weight, None, None, relu, msc, msh)
    return grad_y, (sum_dy_xmu * invstd).to(weight.dtype), sum_dy.to(weight.dtype)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, conv_weight, stride, padding, dilation, groups,
                batch_stats, sync=None):
        scale, shift = _scale_shift(mean, invstd, weight, bias)
        a = ops.bn_apply(y, scale, shift, None, None, None, True)
        z = torch.ops.aten.convolution(a, conv_weight, None, stride, padding, dilation, False,
                                       [0, 0], groups)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.batch_stats = batch_stats
        ctx.sync = sync
        # scale/shift (C values each) are kept for the recompute rather than derived again
        # from (mean, invstd, weight, bias) in backward: three fewer small ops per unit.
        ctx.save_for_backward(y, mean, invstd, weight, scale, shift, conv_weight)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        y, mean, invstd, weight, scale, shift, conv_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_y, need_w, need_b, need_cw = (ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                                           ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        a = ops.bn_apply(y, scale, shift, None, None, None, True)  # recompute, never saved
        need_a = need_y or need_w or need_b
        grad_a, grad_cw, _ = torch.ops.aten.convolution_backward(
            grad_z, a, conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_a, need_cw, False])
        del a  # ATen's conv backward was its only reader: the ReLU mask is recomputed from y below
        grad_y = grad_w = grad_b = None
        if need_a:
            grad_a = grad_a.contiguous(memory_format=_memory_format(y))
            grad_y, grad_w, grad_b = _bn_input_grad(grad_a, y, None, mean, invstd, weight,
                                                    ctx.batch_stats, need_y, ctx.sync, (scale, shift))
        return (grad_y, None, None, grad_w if need_w else None, grad_b if need_b else None,
                grad_cw if need_cw else None, None, None, None, None, None, None)


def bn_relu_conv(y: Tensor, bn: BNState, conv: nn.Conv2d, conv_weight: Tensor) -> Tensor:
    """``conv(relu(bn(y)))``; saves ``y`` and statistics, recomputes the BN+ReLU in backward."""
    return _BNReLUConv.apply(y, bn.mean, bn.invstd, bn.weight, bn.bias, conv_weight,
                             list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups,
                             bn.batch_stats, bn.sync)


class _BNAddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, batch_stats, residual,
                y_ds, mean_ds, invstd_ds, weight_ds, bias_ds, batch_stats_ds, sync=None, sync_ds=None):
        scale, shift = _scale_shift(mean, invstd, weight, bias)
        if y_ds is not None:
            res_scale, res_shift = _scale_shift(mean_ds, invstd_ds, weight_ds, bias_ds)
            out = ops.bn_apply(y, scale, shift, y_ds, res_scale, res_shift, True)
        else:
            out = ops.bn_apply(y, scale, shift, residual, None, None, True)
        ctx.batch_stats = (batch_stats, batch_stats_ds)
        ctx.sync = (sync, sync_ds)
        ctx.has_ds = y_ds is not None
        ctx.save_for_backward(y, mean, invstd, weight, out, y_ds, mean_ds, invstd_ds, weight_ds)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, mean, invstd, weight, out, y_ds, mean_ds, invstd_ds, weight_ds = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_out = grad_out.contiguous(memory_format=_memory_format(out))
        # The ReLU-masked gradient is needed by both branches (and is the identity's gradient):
        # masking once and running the BN backward primitives unmasked reads less memory than
        # masking inside each of them.
        grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grads: List[Optional[Tensor]] = [None] * 15
        if need[0] or need[3] or need[4]:
            gy, gw, gb = _bn_input_grad(grad, y, None, mean, invstd, weight, ctx.batch_stats[0], need[0],
                                        ctx.sync[0])
            grads[0], grads[3], grads[4] = gy, gw if need[3] else None, gb if need[4] else None
        if ctx.has_ds:
            if need[7] or need[10] or need[11]:
                gy, gw, gb = _bn_input_grad(grad, y_ds, None, mean_ds, invstd_ds, weight_ds,
                                            ctx.batch_stats[1], need[7], ctx.sync[1])
                grads[7], grads[10], grads[11] = gy, gw if need[10] else None, gb if need[11] else None
        elif need[6]:
            grads[6] = grad
        return tuple(grads)


def bn_add_relu(y: Tensor, bn: BNState, identity: Optional[Tensor] = None,
                y_ds: Optional[Tensor] = None, bn_ds: Optional[BNState] = None) -> Tensor:
    """``relu(bn(y) + identity)``, or ``relu(bn(y) + bn_ds(y_ds))`` in one pass."""
    if y_ds is not None:
        return _BNAddReLU.apply(y, bn.mean, bn.invstd, bn.weight, bn.bias, bn.batch_stats, None,
                                y_ds, bn_ds.mean, bn_ds.invstd, bn_ds.weight, bn_ds.bias, bn_ds.batch_stats,
                                bn.sync, bn_ds.sync)
    return _BNAddReLU.apply(y, bn.mean, bn.invstd, bn.weight, bn.bias, bn.batch_stats, identity,
                            None, None, None, None, None, None, bn.sync, None)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mean, invstd, weight, bias, batch_stats, sync=None):
        scale, shift = _scale_shift(mean, invstd, weight, bias)
        a = ops.bn_apply(y, scale, shift, None, None, None, True)
        ctx.batch_stats = batch_stats
        ctx.sync = sync
        # scale/shift, not the output: the BN backward kernels recompute the ReLU mask from y (which
        # they read anyway), so the output is read by nobody here (the max-pool keeps its own).
        ctx.save_for_backward(y, mean, invstd, weight, scale, shift)
        return a

    @staticmethod
    def backward(ctx, grad_a):
        y, mean, invstd, weight, scale, shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_y = grad_w = grad_b = None
        if need[0] or need[3] or need[4]:
            grad_a = grad_a.contiguous(memory_format=_memory_format(y))
            grad_y, grad_w, grad_b = _bn_input_grad(grad_a, y, None, mean, invstd, weight,
                                                    ctx.batch_stats, need[0], ctx.sync, (scale, shift))
        return (grad_y, None, None, grad_w if need[3] else None, grad_b if need[4] else None,
                None, None)


def bn_relu(y: Tensor, bn: BNState) -> Tensor:
    """``relu(bn(y))`` in one pass; backward recomputes the ReLU mask from ``y`` inside the BN
    kernels (no ReLU backward pass, the output is not read)."""
    return _BNReLU.apply(y, bn.mean, bn.invstd, bn.weight, bn.bias, bn.batch_stats, bn.sync)


def strided_downsample_applies(x: Tensor, conv1: nn.Conv2d, ds_conv: nn.Conv2d) -> bool:
    """True when :func:`conv_and_strided_downsample` runs a block's first conv and its downsample
    conv: a 1x1, unpadded, undilated, bias-free downsample conv with stride > 1 on a CPU tensor in
    training (gradients wanted), without autocast (the module calls take care of casting there).
    Measured where it pays: ATen's CPU backward of a strided 1x1 conv materializes a zero-filled
    full-size input gradient (8x256x56x56 at ResNet-50 batch 8: ~14 ms of copying), which autograd
    then adds to conv1's input gradient in another pass."""
    return (x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and ds_conv.kernel_size == (1, 1) and ds_conv.padding == (0, 0)
            and ds_conv.dilation == (1, 1) and ds_conv.stride != (1, 1) and ds_conv.bias is None
            and x.dtype == conv1.weight.dtype == ds_conv.weight.dtype
            and (x.requires_grad or conv1.weight.requires_grad or ds_conv.weight.requires_grad))


class _ConvAndStridedDownsample(torch.autograd.Function):
    """``(conv1(x), ds_conv(x))`` for a strided 1x1 ``ds_conv``. Backward: the downsample's input
    gradient is nonzero only on the stride grid, so it is computed on that grid (a 1x1 stride-1
    backward) and added in place into conv1's fresh input gradient there, instead of ATen's
    zero-filled full-size gradient plus autograd's accumulation pass."""

    @staticmethod
    def forward(ctx, x, w1, w_ds, conv1_args, ds_stride, ds_groups):
        stride, padding, dilation, groups = conv1_args
        y1 = torch.ops.aten.convolution(x, w1, None, stride, padding, dilation, False, [0, 0], groups)
        y_ds = torch.ops.aten.convolution(x, w_ds, None, ds_stride, [0, 0], [1, 1], False, [0, 0], ds_groups)
        ctx.conv1_args, ctx.ds_stride, ctx.ds_groups = conv1_args, ds_stride, ds_groups
        ctx.save_for_backward(x, w1, w_ds)
        return y1, y_ds

    @staticmethod
    def backward(ctx, grad_y1, grad_ds):
        x, w1, w_ds = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv1_args
        need_x, need_w1, need_wds = ctx.needs_input_grad[:3]
        grad_x = grad_w1 = grad_wds = None
        if need_x or need_w1:
            grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
                grad_y1, x, w1, None, stride, padding, dilation, False, [0, 0], groups,
                [need_x, need_w1, False])
        if need_wds:
            _, grad_wds, _ = torch.ops.aten.convolution_backward(
                grad_ds, x, w_ds, None, ctx.ds_stride, [0, 0], [1, 1], False, [0, 0], ctx.ds_groups,
                [False, True, False])
        if need_x:
            sh, sw = ctx.ds_stride
            grid = x[:, :, ::sh, ::sw]
            # only the input's shape is read for an input gradient: an unfilled stand-in
            # (a strided view would be copied by ATen's contiguous())
            shape_only = torch.empty(grid.shape, dtype=x.dtype, device=x.device,
                                     memory_format=_memory_format(x))
            grad_grid, _, _ = torch.ops.aten.convolution_backward(
                grad_ds, shape_only, w_ds, None, [1, 1], [0, 0], [1, 1], False, [0, 0], ctx.ds_groups,
                [True, False, False])
            grad_x[:, :, ::sh, ::sw].add_(grad_grid)
        return grad_x, grad_w1, grad_wds, None, None, None


def conv_and_strided_downsample(x: Tensor, conv1: nn.Conv2d, w1: Tensor, ds_conv: nn.Conv2d,
                                w_ds: Tensor) -> Tuple[Tensor, Tensor]:
    """``(conv1(x), ds_conv(x))`` as one autograd node (see :class:`_ConvAndStridedDownsample`);
    only where :func:`strided_downsample_applies`."""
    return _ConvAndStridedDownsample.apply(
        x, w1, w_ds, (list(conv1.stride), list(conv1.padding), list(conv1.dilation), conv1.groups),
        list(ds_conv.stride), ds_conv.groups)


_BATCHNORMS = (nn.BatchNorm2d, SyncBatchNorm, nn.SyncBatchNorm)


def is_supported_norm(bn: nn.Module) -> bool:
    """Norm layers the fused units reproduce exactly: BatchNorm2d (or a synchronized one: ours or
    torch's nn.SyncBatchNorm) with affine parameters and running statistics, and torchvision's
    FrozenBatchNorm2d (an eval-mode affine transform)."""
    if type(bn) is FrozenBatchNorm2d:
        return True
    # torch 2.14's BatchNorm2d(bias=False) is affine with a None bias: not reproduced by the units
    return (type(bn) in _BATCHNORMS and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and bn.weight is not None and bn.bias is not None)

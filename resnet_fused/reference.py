"""Pure-PyTorch versions of every primitive: the executable spec and the fallback backend.

Every backend (C++ CPU, CUDA, Triton) must agree with these functions. Conventions shared by all:

* ``input`` is ``[N, C, *spatial]``; per-channel vectors are ``[C]`` in the *accumulation* dtype
  (``opmath_dtype(input.dtype)``: float64 for float64 input, float32 otherwise).
* Outputs that have the shape of ``input`` keep its dtype and memory format.
* ReLU follows torch exactly: forward ``x < 0 -> 0`` (NaN passes through), backward masks the
  gradient where ``output <= 0`` (``threshold_backward`` semantics, so NaN outputs pass the gradient).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a storage dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape([1, -1] + [1] * (ndim - 2))


def _reduce_dims(t: Tensor):
    return [0] + list(range(2, t.dim()))


def bn_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and *biased* variance, in the accumulation dtype.

    Two-pass (mean first, then the mean of squared deviations): no catastrophic cancellation for
    inputs whose mean is large compared with their spread.
    """
    x = input.to(opmath_dtype(input.dtype))
    dims = _reduce_dims(x)
    mean = x.mean(dim=dims)
    var = (x - _per_channel(mean, x.dim())).square().mean(dim=dims)
    return mean, var


def bn_apply(
    input: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    res_scale: Optional[Tensor] = None,
    res_shift: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """``relu?(input*scale + shift + residual')`` per channel, where ``residual'`` is
    ``residual*res_scale + res_shift`` when the residual affine is given (the downsample branch's
    BatchNorm folded into this pass), ``residual`` itself otherwise."""
    acc = opmath_dtype(input.dtype)
    nd = input.dim()
    out = input.to(acc) * _per_channel(scale.to(acc), nd) + _per_channel(shift.to(acc), nd)
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _per_channel(res_scale.to(acc), nd) + _per_channel(res_shift.to(acc), nd)
        out = out + r
    if relu:
        out = torch.where(out < 0, torch.zeros((), dtype=acc, device=out.device), out)
    return out.to(input.dtype).contiguous(memory_format=_memory_format(input))


def relu_zero_bound(dtype: torch.dtype) -> float:
    """Largest accumulation-dtype value whose ReLU output rounds to zero in ``dtype``: 0 for
    float32/float64 storage; half the smallest subnormal for float16/bfloat16 (ties round to even,
    i.e. to zero). The ReLU output ``relu(z)`` stored in ``dtype`` is ``<= 0`` exactly when
    ``z <= relu_zero_bound(dtype)``."""
    if dtype in (torch.float32, torch.float64):
        return 0.0
    # the smallest subnormal: smallest normal * eps (eps = 2^-mantissa bits)
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def _check_mask_source(output: Optional[Tensor], mask_scale: Optional[Tensor], mask_shift: Optional[Tensor],
                       relu: bool) -> None:
    if (mask_scale is None) != (mask_shift is None):
        raise ValueError("mask_scale and mask_shift must be given together")
    if mask_scale is not None and (output is not None or not relu):
        raise ValueError("mask_scale/mask_shift take the ReLU mask from the input: they need relu=True "
                         "and no output")
    if relu and output is None and mask_scale is None:
        raise ValueError("relu=True needs the forward output (or mask_scale/mask_shift) to mask the gradient")


def _masked_grad(grad_out: Tensor, input: Tensor, output: Optional[Tensor], relu: bool, acc: torch.dtype,
                 mask_scale: Optional[Tensor] = None, mask_shift: Optional[Tensor] = None) -> Tensor:
    """The ReLU-masked gradient: masked where the forward's ReLU output is <= 0, the output being
    ``output`` or, with ``mask_scale``/``mask_shift``, ``relu(input*mask_scale + mask_shift)``
    recomputed exactly as :func:`bn_apply` computes it (so the output need not be kept)."""
    g = grad_out.to(acc)
    if not relu:
        return g
    zero = torch.zeros((), dtype=acc, device=g.device)
    if mask_scale is not None:
        nd = input.dim()
        z = input.to(acc) * _per_channel(mask_scale.to(acc), nd) + _per_channel(mask_shift.to(acc), nd)
        return torch.where(z <= relu_zero_bound(input.dtype), zero, g)
    return torch.where(output <= 0, zero, g)


def bn_backward_reduce(
    grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor, relu: bool,
    mask_scale: Optional[Tensor] = None, mask_shift: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * (input - mean))`` with ``g`` the ReLU-masked gradient.

    The mask comes from ``output`` (the forward's ReLU output) or, with ``mask_scale`` and
    ``mask_shift`` (the forward's BN affine, ``relu=True`` and no ``output``), from the input
    itself: see :func:`_masked_grad`. BN parameter gradients follow: ``grad_bias = sum_dy``,
    ``grad_weight = sum_dy_xmu * invstd``.
    """
    _check_mask_source(output, mask_scale, mask_shift, relu)
    acc = opmath_dtype(input.dtype)
    g = _masked_grad(grad_out, input, output, relu, acc, mask_scale, mask_shift)
    dims = _reduce_dims(g)
    xmu = input.to(acc) - _per_channel(mean.to(acc), input.dim())
    return g.sum(dim=dims), (g * xmu).sum(dim=dims)


def bn_backward_apply(
    grad_out: Tensor,
    input: Tensor,
    output: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    mean_dy: Optional[Tensor],
    mean_dy_xmu: Optional[Tensor],
    relu: bool,
    mask_scale: Optional[Tensor] = None,
    mask_shift: Optional[Tensor] = None,
) -> Tensor:
    """Gradient w.r.t. the BN input, one elementwise pass.

    With batch statistics (``mean_dy``/``mean_dy_xmu`` = the reduce sums divided by the per-channel
    element count, possibly a global count under synchronized BN)::

        grad_in = (g - mean_dy - (x - mean) * invstd**2 * mean_dy_xmu) * invstd * weight

    Without (eval-mode / frozen BN, the statistics are constants): ``grad_in = g * invstd * weight``.
    ``weight=None`` means 1. The ReLU mask as in :func:`bn_backward_reduce`.
    """
    if (mean_dy is None) != (mean_dy_xmu is None):
        raise ValueError("mean_dy and mean_dy_xmu must be given together")
    _check_mask_source(output, mask_scale, mask_shift, relu)
    acc = opmath_dtype(input.dtype)
    nd = input.dim()
    g = _masked_grad(grad_out, input, output, relu, acc, mask_scale, mask_shift)
    k = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
    if mean_dy is not None:
        xmu = input.to(acc) - _per_channel(mean.to(acc), nd)
        proj = _per_channel((invstd.to(acc) ** 2) * mean_dy_xmu.to(acc), nd)
        g = g - _per_channel(mean_dy.to(acc), nd) - xmu * proj
    out = g * _per_channel(k, nd)
    return out.to(input.dtype).contiguous(memory_format=_memory_format(input))


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format

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


def _masked_grad(grad_out: Tensor, output: Optional[Tensor], relu: bool, acc: torch.dtype) -> Tensor:
    g = grad_out.to(acc)
    if relu:
        if output is None:
            raise ValueError("relu=True needs the forward output to mask the gradient")
        g = torch.where(output <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    return g


def bn_backward_reduce(
    grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor, relu: bool
) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * (input - mean))`` with ``g`` the ReLU-masked gradient.

    BN parameter gradients follow: ``grad_bias = sum_dy``, ``grad_weight = sum_dy_xmu * invstd``.
    """
    acc = opmath_dtype(input.dtype)
    g = _masked_grad(grad_out, output, relu, acc)
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
) -> Tensor:
    """Gradient w.r.t. the BN input, one elementwise pass.

    With batch statistics (``mean_dy``/``mean_dy_xmu`` = the reduce sums divided by the per-channel
    element count, possibly a global count under synchronized BN)::

        grad_in = (g - mean_dy - (x - mean) * invstd**2 * mean_dy_xmu) * invstd * weight

    Without (eval-mode / frozen BN, the statistics are constants): ``grad_in = g * invstd * weight``.
    ``weight=None`` means 1.
    """
    if (mean_dy is None) != (mean_dy_xmu is None):
        raise ValueError("mean_dy and mean_dy_xmu must be given together")
    acc = opmath_dtype(input.dtype)
    nd = input.dim()
    g = _masked_grad(grad_out, output, relu, acc)
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

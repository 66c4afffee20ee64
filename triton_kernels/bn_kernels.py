"""Triton kernels of the BatchNorm primitives and their launchers (semantics: resnet_fused/reference.py).

Layout. Every kernel sees its ``[N, C, *spatial]`` tensors as a 3-d index space ``[N', HW', C]``
with strides ``(s_n, s_hw, s_c)`` and works on 2-d tiles ``[BLOCK_HW, BLOCK_C]`` of one ``n``:

* NCHW (contiguous, ``HW > 1``): ``[N, HW, C]`` with strides ``(C*HW, 1, HW)``: the spatial index is
  the contiguous one, tiles are long in ``BLOCK_HW`` and narrow in ``BLOCK_C``;
* channels_last (or ``HW == 1``, e.g. ``[N, C]``): ``[1, N*HW, C]`` with strides ``(0, C, 1)``:
  rows of ``C`` contiguous values, tiles are wide in ``BLOCK_C``.

Any other strided input is made contiguous first (the reference's outputs are contiguous then too).
All index arithmetic that can reach the tensor size is done in int64 (tensors over 2^31 elements).

Numerics. Storage float32/float16/bfloat16, accumulation float32. Reductions are two-stage and
deterministic (no atomics): a partial kernel writes one result per (program, channel), a merge
kernel combines them in a fixed order.

* ``bn_stats``: data are shifted by a per-channel pivot (the channel's first element) so that every
  mean below is of the order of the spread; each tile gives (count, mean, M2) by an exact two-pass
  over the tile in registers;
  a program merges its tiles with Chan's formula, and ``bn_stats_merge_kernel`` merges the programs'
  partials (chunks of ``BLOCK_P`` partials combined by the grouped form of the same formula). Only
  deviations from means are ever squared, so a mean 1e3 times the spread does not cancel.
* ``bn_backward_reduce``: per-program partial sums, summed by ``bn_backward_reduce_merge_kernel``.

ReLU follows torch exactly: forward ``x < 0 -> 0`` (NaN passes), backward masks where the forward
output ``<= 0`` (NaN outputs pass the gradient).

The launchers call every kernel through ``torch.library.wrap_triton`` so that they can be the body
of a ``torch.library.triton_op`` (CUDA); under ``TRITON_INTERPRET=1`` ``wrap_triton`` returns the
interpreted kernel itself and the launchers run eagerly on CPU tensors.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile(t, num_hw_blocks, HW, C, c, c_mask, stride_n, stride_hw, stride_c,
          BLOCK_HW: tl.constexpr):
    """Offsets and mask of tile ``t`` (= n * num_hw_blocks + hw block) for channels ``c``."""
    t = t.to(tl.int64)
    n = t // num_hw_blocks
    hb = t - n * num_hw_blocks
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    r_mask = hw < HW
    offs = n * stride_n + hw[:, None] * stride_hw + c.to(tl.int64)[None, :] * stride_c
    mask = r_mask[:, None] & c_mask[None, :]
    return offs, mask, r_mask


@triton.jit
def bn_stats_partial_kernel(x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr,
                            HW, C, stride_n, stride_hw, stride_c,
                            num_hw_blocks, num_tiles, tiles_per_prog,
                            BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-program (count, mean, M2) of ``tiles_per_prog`` consecutive tiles, per channel."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Shift by a pivot, the channel's first element: the means merged below are then of the order
    # of the spread, and float32 rounds them relative to the spread, not to a large mean.
    pivot = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, tiles_per_prog):
        t = pid_s.to(tl.int64) * tiles_per_prog + i
        offs, mask, r_mask = _tile(t, num_hw_blocks, HW, C, c, c_mask, stride_n, stride_hw, stride_c,
                                   BLOCK_HW)
        r_mask = r_mask & (t < num_tiles)
        mask = mask & (t < num_tiles)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot[None, :]
        # exact two-pass statistics of the tile (masked elements: zero in the sum, out of M2)
        t_count = tl.sum(r_mask.to(tl.float32), axis=0)
        t_mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / tl.maximum(t_count, 1.0)
        d = tl.where(mask, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        # Chan: merge the tile into the program's running statistics
        new_count = count + t_count
        w = t_count / tl.maximum(new_count, 1.0)
        delta = t_mean - mean
        mean = mean + delta * w
        m2 = m2 + t_m2 + delta * delta * (count * w)
        count = new_count
    out = pid_s.to(tl.int64) * C + c
    tl.store(part_count_ptr + out, count, mask=c_mask)
    tl.store(part_mean_ptr + out, mean, mask=c_mask)
    tl.store(part_m2_ptr + out, m2, mask=c_mask)


@triton.jit
def bn_stats_merge_kernel(x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr,
                          num_parts, C, stride_c, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the [num_parts, C] partials (means relative to the pivot ``x[0, c, 0]``) in a fixed
    order: mean and biased variance per channel."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    pivot = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < num_parts)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        pc = tl.load(part_count_ptr + offs, mask=mask, other=0.0)
        pm = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        pm2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        # grouped Chan: the chunk's count, mean and M2
        b_count = tl.sum(pc, axis=0)
        b_mean = tl.sum(pc * pm, axis=0) / tl.maximum(b_count, 1.0)
        dev = tl.where(mask, pm - b_mean[None, :], 0.0)
        b_m2 = tl.sum(pm2, axis=0) + tl.sum(pc * dev * dev, axis=0)
        # merged into the running statistics
        new_count = count + b_count
        w = b_count / tl.maximum(new_count, 1.0)
        delta = b_mean - mean
        mean = mean + delta * w
        m2 = m2 + b_m2 + delta * delta * (count * w)
        count = new_count
    var = m2 / tl.maximum(count, 1.0)  # count > 0 on every channel: the launcher handles empty inputs
    tl.store(mean_ptr + c, pivot + mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)


@triton.jit
def bn_apply_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr, out_ptr,
                    HW, C, stride_n, stride_hw, stride_c, num_hw_blocks,
                    HAS_RESIDUAL: tl.constexpr, RES_AFFINE: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = relu?(x*scale + shift + (res*res_scale + res_shift | res))``, one tile per program."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    offs, mask, r_mask = _tile(pid, num_hw_blocks, HW, C, c, c_mask, stride_n, stride_hw, stride_c,
                               BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            rs = tl.load(res_scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            rb = tl.load(res_shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            r = r * rs[None, :] + rb[None, :]
        y = y + r
    if RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_backward_reduce_kernel(grad_ptr, x_ptr, y_ptr, mean_ptr, mask_scale_ptr, mask_shift_ptr, zero_bound,
                              part_dy_ptr, part_dy_xmu_ptr,
                              HW, C, stride_n, stride_hw, stride_c,
                              num_hw_blocks, num_tiles, tiles_per_prog,
                              RELU: tl.constexpr, MASK_FROM_INPUT: tl.constexpr,
                              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-program partial ``sum(g)`` and ``sum(g * (x - mean))``; ``g`` masked where ``y <= 0``
    or, with ``MASK_FROM_INPUT``, where ``x*mask_scale + mask_shift <= zero_bound`` (the forward's
    ReLU output recomputed, see reference.relu_zero_bound)."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if MASK_FROM_INPUT:
        msc = tl.load(mask_scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        msh = tl.load(mask_shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, tiles_per_prog):
        t = pid_s.to(tl.int64) * tiles_per_prog + i
        offs, mask, r_mask = _tile(t, num_hw_blocks, HW, C, c, c_mask, stride_n, stride_hw, stride_c,
                                   BLOCK_HW)
        mask = mask & (t < num_tiles)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MASK_FROM_INPUT:
            z = x * msc[None, :] + msh[None, :]
            g = tl.where(z - zero_bound <= 0, 0.0, g)
        elif RELU:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0)
            g = tl.where(y <= 0, 0.0, g)
        xmu = tl.where(mask, x - mean[None, :], 0.0)
        sum_dy += tl.sum(g, axis=0)
        sum_dy_xmu += tl.sum(g * xmu, axis=0)
    out = pid_s.to(tl.int64) * C + c
    tl.store(part_dy_ptr + out, sum_dy, mask=c_mask)
    tl.store(part_dy_xmu_ptr + out, sum_dy_xmu, mask=c_mask)


@triton.jit
def bn_backward_reduce_merge_kernel(part_dy_ptr, part_dy_xmu_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
                                    num_parts, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second stage of ``bn_backward_reduce``: sums the [num_parts, C] partials in a fixed order."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < num_parts)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        acc_dy += tl.sum(tl.load(part_dy_ptr + offs, mask=mask, other=0.0), axis=0)
        acc_dy_xmu += tl.sum(tl.load(part_dy_xmu_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(sum_dy_ptr + c, acc_dy, mask=c_mask)
    tl.store(sum_dy_xmu_ptr + c, acc_dy_xmu, mask=c_mask)


@triton.jit
def bn_backward_apply_kernel(grad_ptr, x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr,
                             mean_dy_ptr, mean_dy_xmu_ptr, mask_scale_ptr, mask_shift_ptr, zero_bound, out_ptr,
                             HW, C, stride_n, stride_hw, stride_c, num_hw_blocks,
                             RELU: tl.constexpr, MASK_FROM_INPUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_STATS: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """``grad_in = (g - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight``
    (without the statistics terms when ``HAS_STATS`` is false), one tile per program; ``g`` masked
    as in ``bn_backward_reduce_kernel``."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    offs, mask, r_mask = _tile(pid, num_hw_blocks, HW, C, c, c_mask, stride_n, stride_hw, stride_c,
                               BLOCK_HW)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        k = invstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        k = invstd
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_STATS or MASK_FROM_INPUT:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MASK_FROM_INPUT:
        msc = tl.load(mask_scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        msh = tl.load(mask_shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        z = x * msc[None, :] + msh[None, :]
        g = tl.where(z - zero_bound <= 0, 0.0, g)
    elif RELU:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        g = tl.where(y <= 0, 0.0, g)
    if HAS_STATS:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        mean_dy = tl.load(mean_dy_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        mean_dy_xmu = tl.load(mean_dy_xmu_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        proj = (invstd * invstd) * mean_dy_xmu
        g = g - mean_dy[None, :] - (x - mean[None, :]) * proj[None, :]
    out = g * k[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED = not isinstance(bn_apply_kernel, triton.runtime.jit.JITFunction)
"""True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU tensors)."""

# Launch parameters. Tests shrink them to drive the multi-tile loops and multi-chunk merges on
# small inputs; the interpreter runs programs one after another, so it gets fewer, larger ones.
TUNING = {
    "target_elems": 4096,      # elements per tile (BLOCK_HW * BLOCK_C)
    "max_block_hw": 1024,      # longest tile along a contiguous spatial axis (NCHW)
    "max_block_c": 128,        # widest tile along a contiguous channel axis (channels_last)
    "max_programs": 16 if INTERPRETED else 1024,  # reduction programs per launch (all channel blocks)
    "merge_block_p": 64,       # partials merged per chunk in the second stage
    "merge_block_c": 64,       # channels per merge program
}


# ------------------------------------------------------------------------------------------------
# layout and launch geometry
# ------------------------------------------------------------------------------------------------
class Layout(NamedTuple):
    memory_format: torch.memory_format
    n: int          # N'
    hw: int         # HW'
    c: int          # C
    stride_n: int
    stride_hw: int
    stride_c: int
    c_fast: bool    # channels are the contiguous axis


def output_memory_format(input: Tensor) -> torch.memory_format:
    """Memory format of the kernels' full-size outputs (the reference's rule)."""
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) \
            and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def layout_of(input: Tensor) -> Tuple[Tensor, Layout]:
    """``input`` in one of the two layouts the kernels index (a copy only for other strides)."""
    fmt = output_memory_format(input)
    input = input.contiguous(memory_format=fmt)
    n, c = input.shape[0], input.shape[1]
    hw = math.prod(input.shape[2:])
    if fmt == torch.channels_last or hw == 1:
        return input, Layout(fmt, 1, n * hw, c, 0, c, 1, True)
    return input, Layout(fmt, n, hw, c, c * hw, 1, hw, False)


def _as_layout(t: Tensor, layout: Layout) -> Tensor:
    """A same-shape tensor (grad_out, output, residual) in the input's layout."""
    return t.contiguous(memory_format=layout.memory_format)


def _blocks(layout: Layout) -> Tuple[int, int]:
    target = TUNING["target_elems"]
    if layout.c_fast:
        block_c = min(triton.next_power_of_2(layout.c), TUNING["max_block_c"])
        block_hw = max(1, min(triton.next_power_of_2(layout.hw), target // block_c))
    else:
        block_hw = min(triton.next_power_of_2(layout.hw), TUNING["max_block_hw"])
        block_c = max(1, min(triton.next_power_of_2(layout.c), target // block_hw))
    return block_hw, block_c


def _reduction_geometry(layout: Layout, block_hw: int, block_c: int):
    """(num_hw_blocks, num_tiles, splits, tiles_per_prog, channel blocks) of a two-stage reduction."""
    num_hw_blocks = triton.cdiv(layout.hw, block_hw)
    num_tiles = layout.n * num_hw_blocks
    c_blocks = triton.cdiv(layout.c, block_c)
    splits = max(1, min(num_tiles, TUNING["max_programs"] // c_blocks))
    tiles_per_prog = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_prog)
    return num_hw_blocks, num_tiles, splits, tiles_per_prog, c_blocks


def _merge_blocks(channels: int) -> Tuple[int, int]:
    return TUNING["merge_block_p"], min(triton.next_power_of_2(channels), TUNING["merge_block_c"])


def _device_guard(t: Tensor):
    # Triton launches on the current device: make it the tensors' device (multi-GPU eager calls).
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _check_dtype(op: str, input: Tensor) -> None:
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton backend supports float32, float16 and bfloat16 inputs, "
                        f"got {input.dtype}")


def _vector(v: Tensor) -> Tensor:
    return v.contiguous()


# ------------------------------------------------------------------------------------------------
# launchers (same arguments, order and results as resnet_fused.reference)
# ------------------------------------------------------------------------------------------------
def bn_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in float32 (two-stage Welford/Chan, deterministic)."""
    _check_dtype("bn_stats", input)
    x, lay = layout_of(input)
    mean = torch.empty((lay.c,), dtype=torch.float32, device=input.device)
    var = torch.empty((lay.c,), dtype=torch.float32, device=input.device)
    if lay.c == 0:
        return mean, var
    if lay.n * lay.hw == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    block_hw, block_c = _blocks(lay)
    num_hw_blocks, num_tiles, splits, tiles_per_prog, c_blocks = _reduction_geometry(lay, block_hw, block_c)
    # separate buffers, not views of one: the kernels' outputs stay plain tensors for functionalization
    part_count, part_mean, part_m2 = (torch.empty((splits, lay.c), dtype=torch.float32, device=input.device)
                                      for _ in range(3))
    merge_p, merge_c = _merge_blocks(lay.c)
    with _device_guard(input):
        wrap_triton(bn_stats_partial_kernel)[(splits, c_blocks)](
            x, part_count, part_mean, part_m2, lay.hw, lay.c, lay.stride_n, lay.stride_hw,
            lay.stride_c, num_hw_blocks, num_tiles, tiles_per_prog, BLOCK_HW=block_hw, BLOCK_C=block_c)
        wrap_triton(bn_stats_merge_kernel)[(triton.cdiv(lay.c, merge_c),)](
            x, part_count, part_mean, part_m2, mean, var, splits, lay.c, lay.stride_c,
            BLOCK_P=merge_p, BLOCK_C=merge_c)
    return mean, var


def bn_apply(input: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
             res_scale: Optional[Tensor], res_shift: Optional[Tensor], relu: bool) -> Tensor:
    """``relu?(input*scale + shift + residual')`` in one pass (see reference.bn_apply)."""
    _check_dtype("bn_apply", input)
    if (res_scale is None) != (res_shift is None):
        raise ValueError("bn_apply: res_scale and res_shift must be given together")
    if res_scale is not None and residual is None:
        raise ValueError("bn_apply: res_scale/res_shift need a residual")
    x, lay = layout_of(input)
    out = torch.empty_like(x, memory_format=lay.memory_format)
    if out.numel() == 0:
        return out
    block_hw, block_c = _blocks(lay)
    num_hw_blocks = triton.cdiv(lay.hw, block_hw)
    has_res = residual is not None
    affine = res_scale is not None
    res = _as_layout(residual, lay) if has_res else x
    scale, shift = _vector(scale), _vector(shift)
    rs = _vector(res_scale) if affine else scale
    rb = _vector(res_shift) if affine else shift
    grid = (lay.n * num_hw_blocks, triton.cdiv(lay.c, block_c))
    with _device_guard(input):
        wrap_triton(bn_apply_kernel)[grid](
            x, scale, shift, res, rs, rb, out, lay.hw, lay.c, lay.stride_n, lay.stride_hw,
            lay.stride_c, num_hw_blocks, HAS_RESIDUAL=has_res, RES_AFFINE=affine, RELU=bool(relu),
            BLOCK_HW=block_hw, BLOCK_C=block_c)
    return out


def _mask_source(output: Optional[Tensor], mask_scale: Optional[Tensor], mask_shift: Optional[Tensor],
                 relu: bool) -> bool:
    """Checks the ReLU mask's source; True when it is the input (mask_scale/mask_shift)."""
    if (mask_scale is None) != (mask_shift is None):
        raise ValueError("mask_scale and mask_shift must be given together")
    if mask_scale is not None and (output is not None or not relu):
        raise ValueError("mask_scale/mask_shift take the ReLU mask from the input: they need relu=True and no output")
    if relu and output is None and mask_scale is None:
        raise ValueError("relu=True needs the forward output (or mask_scale/mask_shift) to mask the gradient")
    return mask_scale is not None


def _zero_bound(dtype: torch.dtype) -> float:
    """reference.relu_zero_bound, without importing the package (this module stands alone)."""
    if dtype in (torch.float32, torch.float64):
        return 0.0
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def bn_backward_reduce(grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor,
                       relu: bool, mask_scale: Optional[Tensor] = None,
                       mask_shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)``, ``sum(g * (input - mean))`` (float32), ``g`` ReLU-masked (from
    ``output``, or from ``input*mask_scale + mask_shift``)."""
    _check_dtype("bn_backward_reduce", input)
    from_input = _mask_source(output, mask_scale, mask_shift, relu)
    x, lay = layout_of(input)
    sum_dy = torch.zeros((lay.c,), dtype=torch.float32, device=input.device)
    sum_dy_xmu = torch.zeros((lay.c,), dtype=torch.float32, device=input.device)
    if lay.c == 0 or lay.n * lay.hw == 0:
        return sum_dy, sum_dy_xmu
    g = _as_layout(grad_out, lay)
    y = _as_layout(output, lay) if relu and not from_input else x
    mean = _vector(mean)
    msc, msh = (_vector(mask_scale), _vector(mask_shift)) if from_input else (mean, mean)
    block_hw, block_c = _blocks(lay)
    num_hw_blocks, num_tiles, splits, tiles_per_prog, c_blocks = _reduction_geometry(lay, block_hw, block_c)
    part_dy, part_dy_xmu = (torch.empty((splits, lay.c), dtype=torch.float32, device=input.device)
                            for _ in range(2))
    merge_p, merge_c = _merge_blocks(lay.c)
    with _device_guard(input):
        wrap_triton(bn_backward_reduce_kernel)[(splits, c_blocks)](
            g, x, y, mean, msc, msh, _zero_bound(input.dtype), part_dy, part_dy_xmu, lay.hw, lay.c,
            lay.stride_n, lay.stride_hw, lay.stride_c, num_hw_blocks, num_tiles, tiles_per_prog,
            RELU=bool(relu), MASK_FROM_INPUT=from_input, BLOCK_HW=block_hw, BLOCK_C=block_c)
        wrap_triton(bn_backward_reduce_merge_kernel)[(triton.cdiv(lay.c, merge_c),)](
            part_dy, part_dy_xmu, sum_dy, sum_dy_xmu, splits, lay.c, BLOCK_P=merge_p, BLOCK_C=merge_c)
    return sum_dy, sum_dy_xmu


def bn_backward_apply(grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor,
                      invstd: Tensor, weight: Optional[Tensor], mean_dy: Optional[Tensor],
                      mean_dy_xmu: Optional[Tensor], relu: bool, mask_scale: Optional[Tensor] = None,
                      mask_shift: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. the BN input in one pass (see reference.bn_backward_apply)."""
    _check_dtype("bn_backward_apply", input)
    if (mean_dy is None) != (mean_dy_xmu is None):
        raise ValueError("mean_dy and mean_dy_xmu must be given together")
    from_input = _mask_source(output, mask_scale, mask_shift, relu)
    x, lay = layout_of(input)
    out = torch.empty_like(x, memory_format=lay.memory_format)
    if out.numel() == 0:
        return out
    g = _as_layout(grad_out, lay)
    y = _as_layout(output, lay) if relu and not from_input else x
    invstd = _vector(invstd)
    has_weight = weight is not None
    has_stats = mean_dy is not None
    mean = _vector(mean)
    w = _vector(weight) if has_weight else invstd
    mdy = _vector(mean_dy) if has_stats else invstd
    mdyx = _vector(mean_dy_xmu) if has_stats else invstd
    msc, msh = (_vector(mask_scale), _vector(mask_shift)) if from_input else (invstd, invstd)
    block_hw, block_c = _blocks(lay)
    num_hw_blocks = triton.cdiv(lay.hw, block_hw)
    grid = (lay.n * num_hw_blocks, triton.cdiv(lay.c, block_c))
    with _device_guard(input):
        wrap_triton(bn_backward_apply_kernel)[grid](
            g, x, y, mean, invstd, w, mdy, mdyx, msc, msh, _zero_bound(input.dtype), out, lay.hw, lay.c,
            lay.stride_n, lay.stride_hw, lay.stride_c, num_hw_blocks, RELU=bool(relu),
            MASK_FROM_INPUT=from_input, HAS_WEIGHT=has_weight, HAS_STATS=has_stats,
            BLOCK_HW=block_hw, BLOCK_C=block_c)
    return out

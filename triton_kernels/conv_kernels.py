"""Triton 2-d convolution (forward) as an implicit GEMM over channels_last input, with a fused
epilogue: ``relu?(conv(x, w) * scale + shift + residual)`` per output channel, one kernel.

What it covers: every convolution of the torchvision ResNet family (1x1, 3x3, the 7x7 stem), any
stride, padding and dilation, and groups (ResNeXt). Used by folded inference models
(:func:`resnet_fused.fold_bn`): the BatchNorm is folded into ``w`` and ``shift`` (the conv bias),
and the block's residual add and ReLU are the epilogue.

GEMM view, per group ``g``: ``out[m, co] = sum_k A[m, k] * B[k, co]`` with

* ``m = (n, oh, ow)`` the output pixel (``M = N * OH * OW`` rows),
* ``co`` the output channel within the group (``C_OUT_G`` columns),
* ``k = (kh, kw, ci)`` the filter tap and input channel within the group, ``ci`` fastest
  (``K = KH * KW * C_IN_G``): with NHWC input, consecutive ``k`` are contiguous in memory, and a
  ``BLOCK_K`` chunk lies within one tap whenever ``C_IN_G`` is a multiple of it (every ResNet conv
  but the stem and small ResNeXt groups), where it is one contiguous run of channels.

``A`` is never materialized: each program gathers its ``[BLOCK_M, BLOCK_K]`` slice from the input
(zero outside the padded border) and its ``[BLOCK_K, BLOCK_N]`` slice of the filter, and accumulates
``tl.dot`` in float32. Offsets are int64 (inputs and outputs over 2^31 elements).

Layouts. The input is converted to channels_last when it is not (one copy; the kernel takes any
strides, but NHWC makes the ``k`` loads contiguous); the output is always channels_last. Weight and
residual are read through their strides (a channels_last weight, ``[C_out, KH, KW, C_in/g]`` in
memory, gives contiguous weight loads too).

Numerics. float32/float16/bfloat16 storage, float32 accumulation and epilogue. float32 dots follow
the cuDNN convolution setting they replace (``torch.backends.cudnn.conv.fp32_precision``): "ieee"
there gives full float32 dots (parity <= 1e-5), tf32 (torch's default for convs) gives tf32 dots.
Under ``TRITON_INTERPRET=1`` bfloat16 is emulated (numpy has no bfloat16: the interpreter keeps the
bits in uint16): ``tl.dot`` on it is silently wrong, so the operands are cast to float32 before the
dot (``UPCAST``), and its float32->bfloat16 cast truncates instead of rounding to nearest, so the
kernel stores float32 and torch rounds the output. float16 runs its real path there.

Launch configurations: a small table per shape class (:data:`GPU_CONFIGS`), autotuned with
``triton.autotune`` on a GPU; under the interpreter each class has exactly one config
(:data:`INTERPRETER_CONFIGS`: multi-config autotuning benchmarks on a GPU).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def conv2d_nhwc_fwd_kernel(
        x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
        in_scale_ptr, in_shift_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr,
        H, W, C_IN_G, OH, OW, C_OUT, C_OUT_G, M, K_TOTAL,
        sx_n, sx_c, sx_h, sx_w,
        sw_o, sw_i, sw_h, sw_w,
        sr_n, sr_c, sr_h, sr_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KW: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        RELU: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, STATS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` output tile of group ``program_id(2)``; ``out`` is NHWC-contiguous.

    ``PROLOGUE``: the input is ``relu?(x*in_scale + in_shift)`` per input channel, applied as it is
    loaded, to in-bounds elements only (zero padding stays zero). ``STATS``: the tile's per-channel
    (count, mean, M2) of the stored output go to row ``program_id(0)`` of the partial buffers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    # output pixels of this tile (int64: N*OH*OW*C may exceed 2^31)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = m < M
    ow = m % OW
    t = m // OW
    oh = t % OH
    n = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = n * sx_n + (g * C_IN_G) * sx_c
    # output channels of this tile
    co_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = co_g < C_OUT_G
    co = g * C_OUT_G + co_g.to(tl.int64)
    w_col = co * sw_o

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K_TOTAL
        ci = k % C_IN_G
        tap = k // C_IN_G
        kw = tap % KW
        kh = tap // KW
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        a_mask = (m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        a_offs = x_row[:, None] + ih * sx_h + iw * sx_w + ci.to(tl.int64)[None, :] * sx_c
        a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
        if PROLOGUE:
            # the previous BN(+ReLU), in float32, rounded to the storage dtype as bn_apply stores it
            cin = g * C_IN_G + ci.to(tl.int64)
            s_in = tl.load(in_scale_ptr + cin, mask=k_mask, other=0.0).to(tl.float32)
            b_in = tl.load(in_shift_ptr + cin, mask=k_mask, other=0.0).to(tl.float32)
            af = a.to(tl.float32) * s_in[None, :] + b_in[None, :]
            if IN_RELU:
                af = tl.where(af < 0, 0.0, af)
            af = tl.where(a_mask, af, 0.0)  # padding (and masked rows) stay zero, not relu(shift)
            a = af if UPCAST else af.to(x_ptr.dtype.element_ty)
        w_row = ci.to(tl.int64) * sw_i + kh * sw_h + kw * sw_w
        b = tl.load(w_ptr + (w_row[:, None] + w_col[None, :]), mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # epilogue in float32: per-channel affine (folded BN / bias), residual, ReLU
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        r_offs = (n * sr_n + oh * sr_h + ow * sr_w)[:, None] + co[None, :] * sr_c
        acc = acc + tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # torch.relu: NaN passes
    tl.store(out_ptr + (m[:, None] * C_OUT + co[None, :]), acc.to(out_ptr.dtype.element_ty), mask=mask)
    if STATS:
        # statistics of the values as stored (rounded to the output dtype), exact two-pass within
        # the tile; tiles are merged by bn_kernels.bn_stats_merge_kernel (Chan, fixed order)
        v = tl.where(mask, acc.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        t_count = tl.sum(m_mask.to(tl.float32), axis=0)
        t_mean = tl.sum(v, axis=0) / tl.maximum(t_count, 1.0)
        # corrected mean: the float32 sum of large values is off by many ulps of the spread, and the
        # merge's between-tile term would inherit that; the deviations' sum is accurate
        t_mean += tl.sum(tl.where(mask, v - t_mean[None, :], 0.0), axis=0) / tl.maximum(t_count, 1.0)
        d = tl.where(mask, v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        p_offs = pid_m.to(tl.int64) * C_OUT + co
        tl.store(part_count_ptr + p_offs, tl.zeros([BLOCK_N], dtype=tl.float32) + t_count, mask=n_mask)
        tl.store(part_mean_ptr + p_offs, t_mean, mask=n_mask)
        tl.store(part_m2_ptr + p_offs, t_m2, mask=n_mask)


INTERPRETED = not isinstance(conv2d_nhwc_fwd_kernel, triton.runtime.jit.JITFunction)
"""True when the kernel was decorated under ``TRITON_INTERPRET=1`` (it runs on CPU tensors)."""


# ------------------------------------------------------------------------------------------------
# launch configurations per shape class
# ------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps=4, stages=3):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Candidates for triton.autotune on a GPU (not yet measured on one: starting points of the usual
# implicit-GEMM shapes). tl.dot needs every block dimension >= 16.
GPU_CONFIGS = {
    # few output channels per group: ResNeXt's grouped 3x3 (4 to 32 channels per group)
    "narrow": [_cfg(128, 16, 32, 4, 4), _cfg(64, 16, 64, 2, 4), _cfg(128, 32, 32, 4, 3),
               _cfg(256, 16, 32, 4, 3)],
    # few output pixels, many channels: late stages at small resolution
    "small_m": [_cfg(32, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 3), _cfg(16, 128, 64, 4, 4),
                _cfg(64, 64, 64, 4, 4)],
    "default": [_cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 4, 4), _cfg(64, 128, 32, 4, 4),
                _cfg(64, 64, 32, 4, 4)],
}
# Exactly one per class under the interpreter (it cannot benchmark). It runs programs one after
# another at a roughly fixed cost per loop iteration, so its blocks are large.
INTERPRETER_CONFIGS = {
    "narrow": [_cfg(64, 16, 64)],
    "small_m": [_cfg(16, 128, 128)],
    "default": [_cfg(64, 64, 64)],
}
NARROW = 32      # output channels per group below which "narrow" applies
SMALL_M = 1024   # output pixels (N*OH*OW) below which "small_m" applies


def shape_class(m: int, c_out_g: int) -> str:
    """The config table a convolution uses."""
    if c_out_g < NARROW:
        return "narrow"
    if m < SMALL_M:
        return "small_m"
    return "default"


_AUTOTUNE_KEY = ["M", "C_IN_G", "C_OUT_G", "K_TOTAL", "OH", "OW"]
CONFIGS = INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS
TUNED_KERNELS = {cls: triton.autotune(configs=cfgs, key=_AUTOTUNE_KEY)(conv2d_nhwc_fwd_kernel)
                 for cls, cfgs in CONFIGS.items()}
"""shape class -> the autotuned kernel (one Autotuner per class over the same jit function)."""
# The statistics epilogue writes one partial row per BLOCK_M tile, so the launcher must know
# BLOCK_M before the launch: these autotuners vary everything but BLOCK_M (the class's first).
STATS_BLOCK_M = {cls: cfgs[0].kwargs["BLOCK_M"] for cls, cfgs in CONFIGS.items()}
STATS_TUNED_KERNELS = {
    cls: triton.autotune(configs=[c for c in cfgs if c.kwargs["BLOCK_M"] == STATS_BLOCK_M[cls]],
                         key=_AUTOTUNE_KEY)(conv2d_nhwc_fwd_kernel)
    for cls, cfgs in CONFIGS.items()}


# ------------------------------------------------------------------------------------------------
# validation and geometry (shared by the launcher and the fake kernel)
# ------------------------------------------------------------------------------------------------
class ConvGeometry(NamedTuple):
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    oh: int
    ow: int
    groups: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]


def _pair(op: str, what: str, v: Sequence[int], minimum: int) -> Tuple[int, int]:
    v = tuple(int(x) for x in v)
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or any(x < minimum for x in v):
        raise ValueError(f"{op}: {what} must be 1 or 2 integers >= {minimum}, got {v}")
    return v


def _check_vector(op: str, what: str, v: Optional[Tensor], c_out: int, device) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != c_out:
        raise ValueError(f"{op}: {what} must have shape [{c_out}] (one value per output channel), "
                         f"got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{op}: {what} must have a floating dtype, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{op}: {what} is on {v.device} but input is on {device}")


def conv_geometry(input: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                  stride, padding, dilation, groups: int, residual: Optional[Tensor],
                  op: str = "conv2d_bias_act") -> ConvGeometry:
    """Validates the arguments (clear errors before any launch) and returns the geometry."""
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be [N, C, H, W], got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be [C_out, C_in/groups, KH, KW], got shape {tuple(weight.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton conv supports float32, float16 and bfloat16 inputs, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    n, c_in, h, w = input.shape
    c_out, c_in_g, kh, kw = weight.shape
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: input channels ({c_in}) and output channels ({c_out}) must both be "
                         f"divisible by groups ({groups})")
    if c_in_g * groups != c_in:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} expects {c_in_g * groups} input channels "
                         f"(C_in/groups = {c_in_g}, groups = {groups}), input has {c_in}")
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1 or kh < 1 or kw < 1:
        raise ValueError(f"{op}: kernel {kh}x{kw} (dilation {dilation}) does not fit the padded input "
                         f"{h + 2 * padding[0]}x{w + 2 * padding[1]}")
    _check_vector(op, "scale", scale, c_out, input.device)
    _check_vector(op, "shift", shift, c_out, input.device)
    if residual is not None:
        if tuple(residual.shape) != (n, c_out, oh, ow):
            raise ValueError(f"{op}: residual must have the output's shape {(n, c_out, oh, ow)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{op}: residual dtype {residual.dtype} differs from input dtype {input.dtype}")
        if residual.device != input.device:
            raise ValueError(f"{op}: residual is on {residual.device} but input is on {input.device}")
    return ConvGeometry(n, c_in, h, w, c_out, kh, kw, oh, ow, groups, stride, padding, dilation)


def empty_output(input: Tensor, geo: ConvGeometry) -> Tensor:
    """The output: always channels_last (the fake kernel uses the same)."""
    return torch.empty((geo.n, geo.c_out, geo.oh, geo.ow), dtype=input.dtype, device=input.device,
                       memory_format=torch.channels_last)


def fp32_input_precision(device: torch.device) -> str:
    """``tl.dot`` precision of float32 operands: that of the cuDNN convs this kernel replaces."""
    if device.type != "cuda":
        return "ieee"
    prec = torch.backends.cudnn.conv.fp32_precision
    if prec == "none":  # inherits from the cuDNN, then the global setting
        prec = torch.backends.cudnn.fp32_precision
    if prec == "none":
        prec = torch.backends.fp32_precision
    if prec == "none":
        prec = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32" if prec == "tf32" else "ieee"


def _device_guard(t: Tensor):
    # Triton launches on the current device: make it the tensors' device (multi-GPU eager calls).
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
def conv2d_bias_act(input: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                    residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu?(conv2d(input, weight) * scale + shift + residual)`` (per output channel), one kernel;
    the output is channels_last."""
    geo = conv_geometry(input, weight, scale, shift, stride, padding, dilation, groups, residual)
    out = empty_output(input, geo)
    if out.numel() == 0:
        return out
    emulated_bf16 = INTERPRETED and input.dtype == torch.bfloat16
    if emulated_bf16:  # stored in float32, rounded by torch below (the interpreter's cast truncates)
        out = out.float()
    x = input.contiguous(memory_format=torch.channels_last)
    c_in_g, c_out_g = geo.c_in // geo.groups, geo.c_out // geo.groups
    m = geo.n * geo.oh * geo.ow
    k_total = c_in_g * geo.kh * geo.kw
    has_scale, has_shift, has_res = scale is not None, shift is not None, residual is not None
    # unused pointers get an input tensor (never read: the constexpr switch removes the load); not
    # the output, so that no argument aliases the one the kernel writes (torch.compile's analysis)
    scale_t = scale.contiguous() if has_scale else weight
    shift_t = shift.contiguous() if has_shift else weight
    res = residual if has_res else x
    # only float32 operands read it; others keep Triton's default
    precision = fp32_input_precision(input.device) if input.dtype == torch.float32 else "tf32"
    kernel = TUNED_KERNELS[shape_class(m, c_out_g)]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out_g, meta["BLOCK_N"]), geo.groups)

    with _device_guard(input):
        wrap_triton(kernel)[grid](
            x, weight, scale_t, shift_t, res, out, weight, weight, weight, weight, weight,
            geo.h, geo.w, c_in_g, geo.oh, geo.ow, geo.c_out, c_out_g, m, k_total,
            *x.stride(), *weight.stride(), *res.stride(),
            *geo.stride, *geo.padding, *geo.dilation,
            KW=geo.kw, HAS_SCALE=has_scale, HAS_SHIFT=has_shift, HAS_RESIDUAL=has_res, RELU=bool(relu),
            UPCAST=emulated_bf16, INPUT_PRECISION=precision, PROLOGUE=False, IN_RELU=False, STATS=False)
    return out.to(input.dtype) if emulated_bf16 else out


def conv2d_bn_stats(input: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                    in_relu: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``out = conv2d(relu?(input*in_scale + in_shift), weight)`` (per input channel; the prologue is
    applied as the input is loaded and never written) and ``out``'s per-channel mean and biased
    variance (float32) from the statistics epilogue: per-tile (count, mean, M2) partials merged by
    ``bn_stats_merge_kernel`` in a fixed order (no atomics). ``out`` is channels_last."""
    from . import bn_kernels as K

    op = "conv2d_bn_stats"
    geo = conv_geometry(input, weight, None, None, stride, padding, dilation, groups, None, op=op)
    check_prologue(op, input, in_scale, in_shift, in_relu)
    out = empty_output(input, geo)
    mean = torch.empty((geo.c_out,), dtype=torch.float32, device=input.device)
    var = torch.empty((geo.c_out,), dtype=torch.float32, device=input.device)
    m = geo.n * geo.oh * geo.ow
    if geo.c_out == 0:
        return out, mean, var
    if m == 0:  # as bn_stats on an empty batch
        return out, mean.fill_(float("nan")), var.fill_(float("nan"))
    emulated_bf16 = INTERPRETED and input.dtype == torch.bfloat16
    if emulated_bf16:
        out = out.float()
    x = input.contiguous(memory_format=torch.channels_last)
    c_in_g, c_out_g = geo.c_in // geo.groups, geo.c_out // geo.groups
    k_total = c_in_g * geo.kh * geo.kw
    prologue = in_scale is not None
    s_in = in_scale.contiguous() if prologue else weight
    b_in = in_shift.contiguous() if prologue else weight
    cls = shape_class(m, c_out_g)
    block_m = STATS_BLOCK_M[cls]
    parts = triton.cdiv(m, block_m)
    part_count, part_mean, part_m2 = (torch.empty((parts, geo.c_out), dtype=torch.float32,
                                                  device=input.device) for _ in range(3))
    precision = fp32_input_precision(input.device) if input.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out_g, meta["BLOCK_N"]), geo.groups)

    merge_p, merge_c = K._merge_blocks(geo.c_out)
    # partial means are absolute (no pivot): each tile's M2 is an exact two-pass around its own mean
    pivot = torch.zeros((geo.c_out,), dtype=torch.float32, device=input.device)
    with _device_guard(input):
        wrap_triton(STATS_TUNED_KERNELS[cls])[grid](
            x, weight, weight, weight, x, out, s_in, b_in, part_count, part_mean, part_m2,
            geo.h, geo.w, c_in_g, geo.oh, geo.ow, geo.c_out, c_out_g, m, k_total,
            *x.stride(), *weight.stride(), *x.stride(),
            *geo.stride, *geo.padding, *geo.dilation,
            KW=geo.kw, HAS_SCALE=False, HAS_SHIFT=False, HAS_RESIDUAL=False, RELU=False,
            UPCAST=emulated_bf16, INPUT_PRECISION=precision, PROLOGUE=prologue, IN_RELU=bool(in_relu),
            STATS=True)
        wrap_triton(K.bn_stats_merge_kernel)[(triton.cdiv(geo.c_out, merge_c),)](
            pivot, part_count, part_mean, part_m2, mean, var, parts, geo.c_out, 1,
            BLOCK_P=merge_p, BLOCK_C=merge_c)
    return (out.to(input.dtype) if emulated_bf16 else out), mean, var


def check_prologue(op: str, input: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                   in_relu: bool) -> None:
    """Errors before any launch: the prologue's vectors are per *input* channel, given together."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{op}: in_scale and in_shift must be given together")
    if in_relu and in_scale is None:
        raise ValueError(f"{op}: in_relu=True is the prologue's ReLU and needs in_scale/in_shift")
    c_in = input.shape[1]
    for what, v in (("in_scale", in_scale), ("in_shift", in_shift)):
        if v is None:
            continue
        if v.dim() != 1 or v.shape[0] != c_in:
            raise ValueError(f"{op}: {what} must have shape [{c_in}] (one value per input channel), "
                             f"got {tuple(v.shape)}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{op}: {what} must have a floating dtype, got {v.dtype}")
        if v.device != input.device:
            raise ValueError(f"{op}: {what} is on {v.device} but input is on {input.device}")

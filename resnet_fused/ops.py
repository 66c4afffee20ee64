"""The Python face of the fused primitives: backend dispatch, fake (meta) kernels, autograd.

Modules (blocks, units, convert) call only the functions here, never a kernel directly. Each
function validates its arguments (the same clear errors whatever the backend), asks
:func:`resnet_fused.backends.backend_for` which backend runs the tensor, and calls that backend's
kernel: ``torch.ops.resnet_fused.*`` (C++ CPU, and later CUDA), the Triton ops, or
:mod:`resnet_fused.reference`.

The custom ops are functional (no input is mutated), so ``torch.library.opcheck`` passes and
autograd is registered for the differentiable ones (``bn_stats``, ``bn_apply``). The two backward
primitives are used inside the autograd units' own backward and have no autograd of their own.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _extension, backends, reference
from .reference import opmath_dtype

__all__ = ["bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply", "opmath_dtype"]

OP_NAMES = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply")


# --------------------------------------------------------------------------------------------
# argument checks shared by every backend
# --------------------------------------------------------------------------------------------
def _check_input(op: str, input: Tensor) -> int:
    if input.dim() < 2:
        raise ValueError(f"{op}: input must be [N, C, ...] (rank >= 2), got shape {tuple(input.shape)}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"{op}: input must have a floating dtype, got {input.dtype}")
    return input.shape[1]


def _check_channel_vector(op: str, what: str, v: Optional[Tensor], channels: int, device) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != channels:
        raise ValueError(f"{op}: {what} must have shape [{channels}] (one value per channel), "
                         f"got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{op}: {what} must have a floating dtype, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{op}: {what} is on {v.device} but input is on {device}")


def _check_like_input(op: str, what: str, t: Optional[Tensor], input: Tensor) -> None:
    if t is None:
        return
    if t.shape != input.shape:
        raise ValueError(f"{op}: {what} must have the input's shape {tuple(input.shape)}, got {tuple(t.shape)}")
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {what} must have the input's dtype {input.dtype}, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{op}: {what} is on {t.device} but input is on {input.device}")


# --------------------------------------------------------------------------------------------
# backend dispatch
# --------------------------------------------------------------------------------------------
def _kernel(op: str, input: Tensor) -> Callable:
    backend = backends.backend_for(input.device, input.dtype)
    if backend == "reference":
        return getattr(reference, op)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.resnet_fused, op)
    if backend == "triton":
        # backend_for() has loaded and registered the Triton ops (lazily: TRITON_INTERPRET is read
        # when they are imported); plain torch.ops access keeps this traceable by torch.compile.
        return getattr(torch.ops.resnet_fused_triton, op)
    raise AssertionError(f"unhandled backend {backend!r}")


def bn_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (accumulation dtype)."""
    _check_input("bn_stats", input)
    return _kernel("bn_stats", input)(input)


def bn_apply(input: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
             res_scale: Optional[Tensor] = None, res_shift: Optional[Tensor] = None,
             relu: bool = False) -> Tensor:
    """``relu?(input*scale + shift + residual')`` in one pass; see :func:`reference.bn_apply`."""
    c = _check_input("bn_apply", input)
    for what, v in (("scale", scale), ("shift", shift), ("res_scale", res_scale), ("res_shift", res_shift)):
        _check_channel_vector("bn_apply", what, v, c, input.device)
    _check_like_input("bn_apply", "residual", residual, input)
    if (res_scale is None) != (res_shift is None):
        raise ValueError("bn_apply: res_scale and res_shift must be given together")
    if res_scale is not None and residual is None:
        raise ValueError("bn_apply: res_scale/res_shift need a residual")
    return _kernel("bn_apply", input)(input, scale, shift, residual, res_scale, res_shift, relu)


def _check_mask_source(op: str, output: Optional[Tensor], mask_scale: Optional[Tensor],
                       mask_shift: Optional[Tensor], relu: bool, c: int, input: Tensor) -> None:
    if (mask_scale is None) != (mask_shift is None):
        raise ValueError(f"{op}: mask_scale and mask_shift must be given together")
    if mask_scale is not None:
        if not relu or output is not None:
            raise ValueError(f"{op}: mask_scale/mask_shift take the ReLU mask from the input: they need "
                             "relu=True and output=None")
        _check_channel_vector(op, "mask_scale", mask_scale, c, input.device)
        _check_channel_vector(op, "mask_shift", mask_shift, c, input.device)
    elif relu and output is None:
        raise ValueError(f"{op}: relu=True needs the forward output (or mask_scale/mask_shift) to mask "
                         "the gradient")


def bn_backward_reduce(grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor,
                       relu: bool, mask_scale: Optional[Tensor] = None,
                       mask_shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)``, ``sum(g*(x-mean))`` with the ReLU-masked gradient ``g``; the mask
    from ``output`` or, with ``mask_scale``/``mask_shift``, from ``input`` (see
    :func:`reference.bn_backward_reduce`)."""
    c = _check_input("bn_backward_reduce", input)
    _check_like_input("bn_backward_reduce", "grad_out", grad_out, input)
    _check_like_input("bn_backward_reduce", "output", output, input)
    _check_channel_vector("bn_backward_reduce", "mean", mean, c, input.device)
    _check_mask_source("bn_backward_reduce", output, mask_scale, mask_shift, relu, c, input)
    return _kernel("bn_backward_reduce", input)(grad_out, input, output, mean, relu, mask_scale, mask_shift)


def bn_backward_apply(grad_out: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor,
                      invstd: Tensor, weight: Optional[Tensor], mean_dy: Optional[Tensor],
                      mean_dy_xmu: Optional[Tensor], relu: bool, mask_scale: Optional[Tensor] = None,
                      mask_shift: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. the BN input in one pass; see :func:`reference.bn_backward_apply`."""
    c = _check_input("bn_backward_apply", input)
    _check_like_input("bn_backward_apply", "grad_out", grad_out, input)
    _check_like_input("bn_backward_apply", "output", output, input)
    for what, v in (("mean", mean), ("invstd", invstd), ("weight", weight), ("mean_dy", mean_dy),
                    ("mean_dy_xmu", mean_dy_xmu)):
        _check_channel_vector("bn_backward_apply", what, v, c, input.device)
    if (mean_dy is None) != (mean_dy_xmu is None):
        raise ValueError("bn_backward_apply: mean_dy and mean_dy_xmu must be given together")
    _check_mask_source("bn_backward_apply", output, mask_scale, mask_shift, relu, c, input)
    return _kernel("bn_backward_apply", input)(grad_out, input, output, mean, invstd, weight, mean_dy,
                                                mean_dy_xmu, relu, mask_scale, mask_shift)


# --------------------------------------------------------------------------------------------
# fake kernels and autograd of the C++ ops (registered once the extension has defined them)
# --------------------------------------------------------------------------------------------
def _channel_vector_like(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=opmath_dtype(input.dtype))


def _fake_bn_stats(input):
    return _channel_vector_like(input), _channel_vector_like(input)


def _fake_bn_apply(input, scale, shift, residual, res_scale, res_shift, relu):
    return torch.empty_like(input)


def _fake_bn_backward_reduce(grad_out, input, output, mean, relu, mask_scale=None, mask_shift=None):
    return _channel_vector_like(input), _channel_vector_like(input)


def _fake_bn_backward_apply(grad_out, input, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu,
                            mask_scale=None, mask_shift=None):
    return torch.empty_like(input)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape([1, -1] + [1] * (ndim - 2))


def _bn_stats_setup(ctx, inputs, output):
    (input,) = inputs
    ctx.save_for_backward(input, output[0])


def _bn_stats_backward(ctx, grad_mean, grad_var):
    input, mean = ctx.saved_tensors
    acc = opmath_dtype(input.dtype)
    count = input.numel() // input.shape[1]
    nd = input.dim()
    grad = torch.zeros(input.shape, dtype=acc, device=input.device)
    if grad_mean is not None:
        grad = grad + _per_channel(grad_mean.to(acc), nd) / count
    if grad_var is not None:
        xmu = input.to(acc) - _per_channel(mean, nd)
        grad = grad + xmu * _per_channel(grad_var.to(acc), nd) * (2.0 / count)
    return grad.to(input.dtype)


def _bn_apply_setup(ctx, inputs, output):
    input, scale, shift, residual, res_scale, res_shift, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.dtypes = (scale.dtype, shift.dtype, None if res_scale is None else res_scale.dtype)
    ctx.save_for_backward(input, scale, residual, res_scale, output if relu else None)


def _bn_apply_backward(ctx, grad_out):
    # grad wrt input = g*scale, wrt scale = sum(g*input), wrt shift = sum(g): the BN backward
    # primitives with mean 0 and invstd 1 compute exactly these.
    input, scale, residual, res_scale, output = ctx.saved_tensors
    relu = ctx.relu
    grad_out = grad_out.contiguous(memory_format=reference._memory_format(input))
    zeros = torch.zeros_like(scale, dtype=opmath_dtype(input.dtype))
    ones = torch.ones_like(zeros)
    sum_dy, sum_dy_x = bn_backward_reduce(grad_out, input, output, zeros, relu)
    grad_input = bn_backward_apply(grad_out, input, output, zeros, ones, scale, None, None, relu)
    grads = [grad_input, sum_dy_x.to(ctx.dtypes[0]), sum_dy.to(ctx.dtypes[1]), None, None, None, None]
    if ctx.has_residual:
        grads[3] = bn_backward_apply(grad_out, residual, output, zeros, ones, res_scale, None, None, relu)
        if res_scale is not None:
            _, sum_dy_r = bn_backward_reduce(grad_out, residual, output, zeros, relu)
            grads[4] = sum_dy_r.to(ctx.dtypes[2])
            grads[5] = sum_dy.to(ctx.dtypes[2])
    return tuple(grads)


_registered = False


def _pool_out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _fake_max_pool2d_nhwc(input, kernel_size, stride, padding):
    n, c, h, w = input.shape
    oh, ow = (_pool_out_size(v, k, st, p) for v, k, st, p in zip((h, w), kernel_size, stride, padding))
    return input.new_empty((n, c, oh, ow)).contiguous(memory_format=torch.channels_last)


def register_cpp_ops() -> bool:
    """Register fake kernels and autograd for the C++ ops; True when the extension is loaded."""
    global _registered
    if _registered:
        return True
    if not _extension.cpp_available():
        return False
    lib = "resnet_fused::"
    torch.library.register_fake(lib + "bn_stats")(_fake_bn_stats)
    torch.library.register_fake(lib + "bn_apply")(_fake_bn_apply)
    torch.library.register_fake(lib + "bn_backward_reduce")(_fake_bn_backward_reduce)
    torch.library.register_fake(lib + "bn_backward_apply")(_fake_bn_backward_apply)
    torch.library.register_fake(lib + "max_pool2d_nhwc")(_fake_max_pool2d_nhwc)
    torch.library.register_autograd(lib + "bn_stats", _bn_stats_backward, setup_context=_bn_stats_setup)
    torch.library.register_autograd(lib + "bn_apply", _bn_apply_backward, setup_context=_bn_apply_setup)
    _registered = True
    return True


# --------------------------------------------------------------------------------------------
# inference: conv + bias (+ residual) + ReLU of the folded blocks
# --------------------------------------------------------------------------------------------
def conv_bias_act(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                  groups: int, residual: Optional[Tensor] = None, relu: bool = True,
                  residual_is_scratch: bool = False) -> Tensor:
    """``relu?(conv2d(input, weight, bias) + residual)`` for folded (BatchNorm-free) blocks.

    Under the ``triton`` backend (chosen, or ``auto`` on CUDA) this is one Triton implicit-GEMM kernel
    with bias, residual and ReLU as its epilogue (``resnet_fused_triton::conv2d_bias_act``; output
    channels_last, autograd through ``aten.convolution_backward``). On CPU in inference (no autograd,
    not being compiled) it is one oneDNN convolution with the bias, residual add and ReLU as fused
    post-ops on a pre-packed weight (``_mkldnn_conv_bias_act``); elsewhere the public-API path runs:
    ATen conv, then the add and ReLU in place on the fresh conv output (a convolution's backward does
    not need its output, so autograd stays correct).

    ``residual_is_scratch``: the caller owns ``residual`` and never reads it again, so the oneDNN
    path may accumulate the convolution into it (oneDNN's in-place sum post-op,
    ``mkldnn._convolution_pointwise_``) and return it: no output allocation, one operand fewer in
    memory (measured on the folded ResNet-50 at batch 8: 187 ms instead of 231 ms a forward).
    Ignored by the other paths.
    """
    # Only the triton backend has a conv kernel of its own; the others keep their ATen/oneDNN path
    # (so e.g. use_backend("cuda") on a GPU still runs folded models through cuDNN).
    if backends.get_backend() in ("auto", "triton") and \
            backends.backend_for(input.device, input.dtype) == "triton":
        # validated by the op itself (also its fake kernel) before any launch
        return torch.ops.resnet_fused_triton.conv2d_bias_act(
            input, weight, None, bias, list(stride), list(padding), list(dilation), groups, residual, relu)
    if _mkldnn_eligible(input, weight, residual):
        return _mkldnn_conv_bias_act(input, weight, bias, stride, padding, dilation, groups, residual, relu,
                                     residual_is_scratch)
    out = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual)
    if relu:
        out = torch.relu_(out)
    return out


_ONEDNN_PREPACKED = True


@contextlib.contextmanager
def use_onednn_prepacked(enabled: bool) -> Iterator[None]:
    """Whether :func:`conv_bias_act` may take the oneDNN path (fused post-ops on pre-packed
    weights) for the duration; ``False`` runs the public-API path (ATen ``conv2d`` with bias, then
    add and ReLU in place), which still uses oneDNN inside ATen's convolution. Process-wide, for
    benchmarks that compare the two paths (``torch.backends.mkldnn.flags(enabled=False)`` would
    also take oneDNN away from ATen's own convolution)."""
    global _ONEDNN_PREPACKED
    before, _ONEDNN_PREPACKED = _ONEDNN_PREPACKED, bool(enabled)
    try:
        yield
    finally:
        _ONEDNN_PREPACKED = before


def _mkldnn_eligible(input: Tensor, weight: Tensor, residual: Optional[Tensor]) -> bool:
    if not _ONEDNN_PREPACKED:
        return False
    if torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available():
        return False
    if not torch.backends.mkldnn.enabled or input.device.type != "cpu" or input.dim() != 4:
        return False
    if input.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return False
    return residual is None or (residual.shape[0] == input.shape[0] and residual.dtype == input.dtype)


# Pre-packed (opaque, oneDNN-layout) weights cannot be pickled, deep-copied or saved, so they are
# not module state: this cache maps the plain weight tensor to its packed copies, per input shape and
# weight version (an in-place update such as load_state_dict repacks), and dies with the weight.
# Keyed by id() with a weakref callback: tensors cannot be dict keys by value (== is elementwise).
_PACKED_WEIGHTS: dict = {}
_MAX_PACKED_SHAPES = 4


def _packed_cache_of(weight: Tensor) -> dict:
    key = id(weight)
    entry = _PACKED_WEIGHTS.get(key)
    if entry is None or entry[0]() is not weight:
        ref = weakref.ref(weight, lambda _, key=key: _PACKED_WEIGHTS.pop(key, None))
        entry = _PACKED_WEIGHTS[key] = (ref, {})
    return entry[1]


def prepared_conv(weight: Tensor, input_shape, stride, padding, dilation, groups: int) -> tuple:
    """(packed weight, padding, stride, dilation) as the oneDNN ops take them, cached per weight for
    an input shape, the weight's version and storage (an in-place update repacks)."""
    input_shape = tuple(input_shape)
    per_weight = _packed_cache_of(weight)
    key = (input_shape, weight._version, weight.data_ptr())
    prepared = per_weight.get(key)
    if prepared is None:
        if len(per_weight) >= _MAX_PACKED_SHAPES:
            per_weight.clear()
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(padding), list(stride), list(dilation), groups, list(input_shape))
        prepared = per_weight[key] = (packed, list(padding), list(stride), list(dilation))
    return prepared


def _packed_weight(weight: Tensor, input: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    return prepared_conv(weight, input.shape, stride, padding, dilation, groups)[0]


# The oneDNN ops (private ATen ops, pinned by tests/test_fold.py), resolved once.
ONEDNN_POINTWISE = torch.ops.mkldnn._convolution_pointwise.default
ONEDNN_POINTWISE_BINARY = torch.ops.mkldnn._convolution_pointwise.binary
ONEDNN_POINTWISE_INPLACE = torch.ops.mkldnn._convolution_pointwise_.binary


def _mkldnn_conv_bias_act(input, weight, bias, stride, padding, dilation, groups, residual, relu,
                          residual_is_scratch=False):
    packed, pad, strd, dil = prepared_conv(weight, input.shape, stride, padding, dilation, groups)
    if residual is None:
        return ONEDNN_POINTWISE(input, packed, bias, pad, strd, dil, groups, "relu" if relu else "none", [], None)
    out_format = torch.channels_last if input.is_contiguous(memory_format=torch.channels_last) \
        and not input.is_contiguous() else torch.contiguous_format
    residual = residual.contiguous(memory_format=out_format)
    if residual_is_scratch:  # accumulate into the caller's dead buffer (or the copy just made)
        return ONEDNN_POINTWISE_INPLACE(residual, input, packed, bias, pad, strd, dil, groups, "add", None,
                                  "relu" if relu else None, [], None)
    return ONEDNN_POINTWISE_BINARY(input, residual, packed, bias, pad, strd, dil, groups, "add", None,
                             "relu" if relu else None, [], None)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pool2d_inference(input: Tensor, pool: nn.MaxPool2d) -> Tensor:
    """``pool(input)`` without autograd: the C++ channels-last max-pool (``resnet_fused::max_pool2d_nhwc``,
    no indices; ATen's CPU max_pool2d always computes them, 2.5-3x slower at a ResNet stem's output)
    for a float32/float64 channels-last CPU input, else the module itself. Same values as ATen,
    NaN propagation included (tests/test_max_pool.py)."""
    k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    if (input.dim() == 4 and input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices
            and all(0 <= pi <= ki // 2 for pi, ki in zip(p, k))
            and all(_pool_out_size(v, ki, si, pi) > 0 for v, ki, si, pi in zip(input.shape[2:], k, s, p))
            and input.is_contiguous(memory_format=torch.channels_last) and _extension.cpp_available()
            and not (torch.is_grad_enabled() and input.requires_grad)):
        return torch.ops.resnet_fused.max_pool2d_nhwc(input, list(k), list(s), list(p))
    return pool(input)


def onednn_inference_path(input: Tensor, weight: Tensor) -> bool:
    """True when :func:`conv_bias_act` would take the oneDNN path for ``input`` and weights like
    ``weight``: a folded block checks this once, then calls the oneDNN ops for each of its convs
    itself (their inputs are the block's own fresh conv outputs, on the same device and dtype,
    without autograd), which skips the per-call dispatch of :func:`conv_bias_act`."""
    if backends.get_backend() in ("auto", "triton") and \
            backends.backend_for(input.device, input.dtype) == "triton":
        return False
    return _mkldnn_eligible(input, weight, None)


# --------------------------------------------------------------------------------------------
# training on the triton backend: conv with a BN+ReLU prologue and a BN-statistics epilogue
# --------------------------------------------------------------------------------------------
def triton_conv_in_use(input: Tensor) -> bool:
    """True when the ``triton`` backend (chosen, or ``auto`` on CUDA) runs ``input``; then the fused
    blocks run their convs through :func:`conv2d_bn_stats` (the other backends keep ATen's conv)."""
    return (backends.get_backend() in ("auto", "triton")
            and backends.backend_for(input.device, input.dtype) == "triton")


def conv2d_bn_stats(input: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                    in_relu: bool, stride, padding, dilation, groups: int
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """``z = conv2d(relu?(input*in_scale + in_shift), weight)`` and ``z``'s per-channel mean and
    biased variance, one Triton kernel (prologue + statistics epilogue) and a small merge. Triton
    backend only (no gradient of its own: see :mod:`resnet_fused.triton_units`)."""
    if not triton_conv_in_use(input):
        raise RuntimeError("conv2d_bn_stats runs on the triton backend only (use_backend('triton'), or "
                           f"'auto' on CUDA); the backend for {input.device}/{input.dtype} is "
                           f"{backends.backend_for(input.device, input.dtype)!r}")
    # validated by the op itself (also its fake kernel) before any launch
    return torch.ops.resnet_fused_triton.conv2d_bn_stats(
        input, weight, in_scale, in_shift, in_relu, list(stride), list(padding), list(dilation), groups)

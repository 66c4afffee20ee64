"""The Triton primitives as torch custom ops ``resnet_fused_triton::*``.

One dispatch key holds one kernel, so these are ops of their own, with the schemas of the C++ ops
``resnet_fused::*`` (csrc/ops.cpp; tests/triton/test_registration.py keeps them equal):

* on a GPU (kernels compiled by Triton): ``torch.library.triton_op`` whose body launches the kernels
  through ``wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernels;
* under ``TRITON_INTERPRET=1``: a plain ``torch.library.custom_op`` around the same launchers
  (``triton_op`` runs eagerly there but fails ``opcheck`` and ``torch.compile``).

Both get fake kernels that mirror the launchers' output layout, and autograd for ``bn_stats`` and
``bn_apply`` with the formulas of :mod:`resnet_fused.ops` (imported, not copied).

``conv2d_bias_act`` (conv_kernels.py: implicit-GEMM conv with a scale/shift/residual/ReLU epilogue)
has no C++ twin; its autograd masks the gradient by the ReLU and calls
``aten.convolution_backward``, so a folded model stays differentiable on this backend.

``conv2d_bn_stats`` (the training conv: BN+ReLU prologue on its input, BN-statistics epilogue on its
output) has no C++ twin and no autograd of its own: its gradients are those of the autograd units in
:mod:`resnet_fused.triton_units`, which call it inside their forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import bn_kernels as K
from . import conv_kernels as CK

NAMESPACE = "resnet_fused_triton"

SCHEMAS = {
    "bn_stats": "(Tensor input) -> (Tensor mean, Tensor var)",
    "bn_apply": "(Tensor input, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
                "Tensor? res_shift, bool relu) -> Tensor",
    "bn_backward_reduce": "(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, bool relu, "
                          "Tensor? mask_scale=None, Tensor? mask_shift=None) "
                          "-> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "bn_backward_apply": "(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
                         "Tensor? weight, Tensor? mean_dy, Tensor? mean_dy_xmu, bool relu, "
                         "Tensor? mask_scale=None, Tensor? mask_shift=None) -> Tensor",
    "conv2d_bias_act": "(Tensor input, Tensor weight, Tensor? scale, Tensor? shift, int[] stride, "
                       "int[] padding, int[] dilation, int groups, Tensor? residual, bool relu) -> Tensor",
    "conv2d_bn_stats": "(Tensor input, Tensor weight, Tensor? in_scale, Tensor? in_shift, bool in_relu, "
                       "int[] stride, int[] padding, int[] dilation, int groups) "
                       "-> (Tensor out, Tensor mean, Tensor var)",
}

LAUNCHERS = {
    "bn_stats": K.bn_stats,
    "bn_apply": K.bn_apply,
    "bn_backward_reduce": K.bn_backward_reduce,
    "bn_backward_apply": K.bn_backward_apply,
    "conv2d_bias_act": CK.conv2d_bias_act,
    "conv2d_bn_stats": CK.conv2d_bn_stats,
}

OP_KIND = "custom_op" if K.INTERPRETED else "triton_op"
"""How the ops were registered: ``custom_op`` under the interpreter, ``triton_op`` otherwise."""


# ------------------------------------------------------------------------------------------------
# fake kernels: the launchers' output layout (per-channel results in float32)
# ------------------------------------------------------------------------------------------------
def _channel_vector(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=torch.float32)


def _like_input(input: Tensor) -> Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=K.output_memory_format(input))


def _fake_bn_stats(input):
    return _channel_vector(input), _channel_vector(input)


def _fake_bn_apply(input, scale, shift, residual, res_scale, res_shift, relu):
    return _like_input(input)


def _fake_bn_backward_reduce(grad_out, input, output, mean, relu, mask_scale=None, mask_shift=None):
    return _channel_vector(input), _channel_vector(input)


def _fake_bn_backward_apply(grad_out, input, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu,
                            mask_scale=None, mask_shift=None):
    return _like_input(input)


def _fake_conv2d_bias_act(input, weight, scale, shift, stride, padding, dilation, groups, residual, relu):
    geo = CK.conv_geometry(input, weight, scale, shift, stride, padding, dilation, groups, residual)
    return CK.empty_output(input, geo)


def _fake_conv2d_bn_stats(input, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
    geo = CK.conv_geometry(input, weight, None, None, stride, padding, dilation, groups, None,
                           op="conv2d_bn_stats")
    CK.check_prologue("conv2d_bn_stats", input, in_scale, in_shift, in_relu)
    out = CK.empty_output(input, geo)
    return out, out.new_empty((geo.c_out,), dtype=torch.float32), out.new_empty((geo.c_out,), dtype=torch.float32)


FAKES = {
    "bn_stats": _fake_bn_stats,
    "bn_apply": _fake_bn_apply,
    "bn_backward_reduce": _fake_bn_backward_reduce,
    "bn_backward_apply": _fake_bn_backward_apply,
    "conv2d_bias_act": _fake_conv2d_bias_act,
    "conv2d_bn_stats": _fake_conv2d_bn_stats,
}


# ------------------------------------------------------------------------------------------------
# autograd of conv2d_bias_act: out = relu?(conv(x, w) * scale + shift + residual)
# ------------------------------------------------------------------------------------------------
def _conv_setup(ctx, inputs, output):
    input, weight, scale, shift, stride, padding, dilation, groups, residual, relu = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation), int(groups))
    ctx.relu = relu
    ctx.has = (shift is not None, residual is not None)
    ctx.dtypes = (None if scale is None else scale.dtype, None if shift is None else shift.dtype)
    ctx.save_for_backward(input, weight, scale, output if relu else None)


def _conv_backward(ctx, grad_out):
    input, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need = ctx.needs_input_grad
    g = grad_out.float()
    if ctx.relu:
        g = torch.where(output <= 0, 0.0, g)  # torch's threshold_backward: NaN outputs pass
    grads = [None] * 10
    if ctx.has[0] and need[3]:
        grads[3] = g.sum((0, 2, 3)).to(ctx.dtypes[1])
    if ctx.has[1] and need[8]:
        grads[8] = g.to(grad_out.dtype)
    if scale is not None and need[2]:
        # d/dscale needs conv(x) itself: recomputed (the forward never stores it)
        conv = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)
        grads[2] = (g * conv.float()).sum((0, 2, 3)).to(ctx.dtypes[0])
    if need[0] or need[1]:
        g_conv = g if scale is None else g * scale.float().reshape(1, -1, 1, 1)
        gi, gw, _ = torch.ops.aten.convolution_backward(
            g_conv.to(input.dtype), input, weight, None, stride, padding, dilation, False, [0, 0],
            groups, [need[0], need[1], False])
        grads[0], grads[1] = gi, gw
    return tuple(grads)


def _register():
    from resnet_fused.ops import (_bn_apply_backward, _bn_apply_setup, _bn_stats_backward,
                                  _bn_stats_setup)

    define = torch.library.custom_op if K.INTERPRETED else torch.library.triton_op
    ops = {}
    for name, launcher in LAUNCHERS.items():
        op = define(f"{NAMESPACE}::{name}", launcher, mutates_args=(), schema=SCHEMAS[name])
        op.register_fake(FAKES[name])
        ops[name] = op
    ops["bn_stats"].register_autograd(_bn_stats_backward, setup_context=_bn_stats_setup)
    ops["bn_apply"].register_autograd(_bn_apply_backward, setup_context=_bn_apply_setup)
    ops["conv2d_bias_act"].register_autograd(_conv_backward, setup_context=_conv_setup)
    return ops


CUSTOM_OPS = _register()
"""name -> the ``CustomOpDef`` (custom_op or triton_op)."""


def op(name: str):
    """``torch.ops.resnet_fused_triton.<name>`` (called with the reference's positional arguments)."""
    if name not in LAUNCHERS:
        raise KeyError(f"no triton op {name!r}; the triton ops are {', '.join(LAUNCHERS)}")
    return getattr(getattr(torch.ops, NAMESPACE), name)

"""The Triton primitives as torch custom ops ``resnet_fused_triton::*``.

One dispatch key holds one kernel, so these are ops of their own, with the schemas of the C++ ops
``resnet_fused::*`` (csrc/ops.cpp; tests/triton/test_registration.py keeps them equal):

* on a GPU (kernels compiled by Triton): ``torch.library.triton_op`` whose body launches the kernels
  through ``wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernels;
* under ``TRITON_INTERPRET=1``: a plain ``torch.library.custom_op`` around the same launchers
  (``triton_op`` runs eagerly there but fails ``opcheck`` and ``torch.compile``).

Both get fake kernels that mirror the launchers' output layout, and autograd for ``bn_stats`` and
``bn_apply`` with the formulas of :mod:`resnet_fused.ops` (imported, not copied).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import bn_kernels as K

NAMESPACE = "resnet_fused_triton"

SCHEMAS = {
    "bn_stats": "(Tensor input) -> (Tensor mean, Tensor var)",
    "bn_apply": "(Tensor input, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
                "Tensor? res_shift, bool relu) -> Tensor",
    "bn_backward_reduce": "(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, bool relu) "
                          "-> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "bn_backward_apply": "(Tensor grad_out, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
                         "Tensor? weight, Tensor? mean_dy, Tensor? mean_dy_xmu, bool relu) -> Tensor",
}

LAUNCHERS = {
    "bn_stats": K.bn_stats,
    "bn_apply": K.bn_apply,
    "bn_backward_reduce": K.bn_backward_reduce,
    "bn_backward_apply": K.bn_backward_apply,
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


def _fake_bn_backward_reduce(grad_out, input, output, mean, relu):
    return _channel_vector(input), _channel_vector(input)


def _fake_bn_backward_apply(grad_out, input, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu):
    return _like_input(input)


FAKES = {
    "bn_stats": _fake_bn_stats,
    "bn_apply": _fake_bn_apply,
    "bn_backward_reduce": _fake_bn_backward_reduce,
    "bn_backward_apply": _fake_bn_backward_apply,
}


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
    return ops


CUSTOM_OPS = _register()
"""name -> the ``CustomOpDef`` (custom_op or triton_op)."""


def op(name: str):
    """``torch.ops.resnet_fused_triton.<name>`` (called with the reference's positional arguments)."""
    if name not in LAUNCHERS:
        raise KeyError(f"no triton op {name!r}; the triton ops are {', '.join(LAUNCHERS)}")
    return getattr(getattr(torch.ops, NAMESPACE), name)

"""The Triton ops as torch ops: schemas equal to the C++ ops', opcheck, autograd, dispatch through
resnet_fused.ops, the backend error without the interpreter, and torch.compile (GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, INTERPRET, TOL_GRAD, TOL_OUT, rel_err

import resnet_fused
from resnet_fused import reference as R

OP_NAMES = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply")
CL = torch.channels_last


def _rand(*shape, fmt=None):
    t = torch.randn(shape, device=DEVICE)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _vec(c, lo=-1.0, hi=1.0):
    return torch.rand(c, device=DEVICE) * (hi - lo) + lo


def _sample_args(name, fmt=None, relu=True, train=True, residual="affine"):
    """Arguments of ``name`` on a small odd-sized input (same order as the reference)."""
    shape = (2, 3, 5, 7)
    c = shape[1]
    x = _rand(*shape, fmt=fmt)
    if name == "bn_stats":
        return (x,)
    if name == "bn_apply":
        res = None if residual == "none" else _rand(*shape, fmt=fmt)
        rs, rb = (_vec(c), _vec(c)) if residual == "affine" else (None, None)
        return (x, _vec(c, 0.5, 1.5), _vec(c), res, rs, rb, relu)
    out = R.bn_apply(x, _vec(c, 0.5, 1.5), _vec(c), None, None, None, True) if relu else None
    grad = _rand(*shape, fmt=fmt)
    mean = R.bn_stats(x)[0]
    if name == "bn_backward_reduce":
        return (grad, x, out, mean, relu)
    mean_dy, mean_dy_xmu = (_vec(c), _vec(c)) if train else (None, None)
    return (grad, x, out, mean, _vec(c, 0.5, 2.0), _vec(c, 0.5, 1.5), mean_dy, mean_dy_xmu, relu)


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def test_kernels_available_and_op_kind(T):
    from resnet_fused.triton_kernels import registration

    assert T.KERNELS_AVAILABLE is True and T.KERNELS_ERROR is None
    assert registration.OP_KIND == ("custom_op" if INTERPRET else "triton_op")


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_returns_the_registered_op(T, name):
    assert T.op(name) is getattr(torch.ops.resnet_fused_triton, name)
    with pytest.raises(KeyError, match="bn_stats"):
        T.op("conv_bn_relu_missing")


def _signature(schema):
    return ([(a.name, str(a.type)) for a in schema.arguments],
            [(r.name, str(r.type)) for r in schema.returns])


@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_equals_cpp_schema(T, name):
    if not resnet_fused._extension.cpp_available():
        pytest.skip("resnet_fused._C (the C++ ops) is not built")
    triton_schema = getattr(torch.ops.resnet_fused_triton, name).default._schema
    cpp_schema = getattr(torch.ops.resnet_fused, name).default._schema
    assert _signature(triton_schema) == _signature(cpp_schema)
    assert not triton_schema.is_mutable
    assert triton_schema.name == f"resnet_fused_triton::{name}"


@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_matches_reference_signature(T, name):
    import inspect

    params = list(inspect.signature(getattr(R, name)).parameters)
    schema = getattr(torch.ops.resnet_fused_triton, name).default._schema
    assert [a.name for a in schema.arguments] == params


OPCHECK_CASES = [
    ("bn_stats", dict()),
    ("bn_stats", dict(fmt=CL)),
    ("bn_apply", dict(residual="affine", relu=True)),
    ("bn_apply", dict(residual="plain", relu=False, fmt=CL)),
    ("bn_apply", dict(residual="none", relu=True)),
    ("bn_backward_reduce", dict(relu=True)),
    ("bn_backward_reduce", dict(relu=False, fmt=CL)),
    ("bn_backward_apply", dict(relu=True, train=True)),
    ("bn_backward_apply", dict(relu=False, train=False, fmt=CL)),
]


@pytest.mark.parametrize("name,kwargs", OPCHECK_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
                              for n, kw in OPCHECK_CASES])
def test_opcheck(T, name, kwargs):
    """Schema, fake (meta) kernel, autograd registration, AOT dispatch: the plain custom ops under
    the interpreter, the triton_ops on a GPU."""
    args = _sample_args(name, **kwargs)
    if name in ("bn_stats", "bn_apply"):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dim() == 4 else a
                     for a in args)
    torch.library.opcheck(getattr(torch.ops.resnet_fused_triton, name), args)


@pytest.mark.parametrize("name", ["bn_apply", "bn_backward_apply"])
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_fake_matches_real_layout(T, name, fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _sample_args(name, fmt=fmt)
    real = getattr(torch.ops.resnet_fused_triton, name)(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = getattr(torch.ops.resnet_fused_triton, name)(*fake_args)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


# ------------------------------------------------------------------------------------------------
# autograd of bn_stats and bn_apply (resnet_fused.ops formulas) against the reference's autograd
# ------------------------------------------------------------------------------------------------
def _grads(fn, args):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(1234)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    return [l.grad for l in leaves if isinstance(l, torch.Tensor)]


@pytest.mark.parametrize("residual", ["none", "plain", "affine"])
def test_bn_apply_autograd(T, residual):
    args = _sample_args("bn_apply", residual=residual, relu=True)
    got = _grads(torch.ops.resnet_fused_triton.bn_apply, args)
    ref = _grads(R.bn_apply, args)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if g is not None:
            assert rel_err(g, r) <= TOL_GRAD


def test_bn_stats_autograd(T):
    args = _sample_args("bn_stats", fmt=CL)
    (got,) = _grads(torch.ops.resnet_fused_triton.bn_stats, args)
    (ref,) = _grads(R.bn_stats, args)
    assert rel_err(got, ref) <= TOL_GRAD


# ------------------------------------------------------------------------------------------------
# the backend: resnet_fused.ops dispatches to these ops
# ------------------------------------------------------------------------------------------------
def test_backend_dispatches_to_triton_ops(T):
    with resnet_fused.use_backend("triton"):
        assert resnet_fused.backend_for(DEVICE, torch.float32) == "triton"
        for name in OP_NAMES:
            args = _sample_args(name)
            got = getattr(resnet_fused.ops, name)(*args)
            direct = getattr(torch.ops.resnet_fused_triton, name)(*args)
            got = got if isinstance(got, tuple) else (got,)
            direct = direct if isinstance(direct, tuple) else (direct,)
            assert all(torch.equal(a, b) for a, b in zip(got, direct))
    assert "triton" in resnet_fused.available_backends(DEVICE)


def test_triton_backend_on_cpu_without_interpreter_is_an_error():
    """Without TRITON_INTERPRET=1 the triton backend cannot run CPU tensors: a BackendError, never a
    silent fallback (checked in a fresh process: the variable is read at import)."""
    code = (
        "import torch, resnet_fused\n"
        "from resnet_fused.backends import BackendError\n"
        "assert 'triton' not in resnet_fused.available_backends('cpu')\n"
        "with resnet_fused.use_backend('triton'):\n"
        "    for call in (lambda: resnet_fused.backend_for('cpu'),\n"
        "                 lambda: resnet_fused.ops.bn_stats(torch.randn(2, 3, 4, 4))):\n"
        "        try:\n"
        "            call()\n"
        "        except BackendError as e:\n"
        "            assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "        else:\n"
        "            raise SystemExit('no BackendError')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------------
# GPU only: torch.compile through triton_op, and the same through resnet_fused.ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_torch_compile_fullgraph_through_triton_op(T, fmt):
    ops = torch.ops.resnet_fused_triton

    def step(x, weight, bias, res, grad):
        mean, var = ops.bn_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
        scale = weight * invstd
        shift = bias - mean * scale
        out = ops.bn_apply(x, scale, shift, res, None, None, True)
        sum_dy, sum_dy_xmu = ops.bn_backward_reduce(grad, x, out, mean, True)
        count = x.numel() // x.shape[1]
        gx = ops.bn_backward_apply(grad, x, out, mean, invstd, weight, sum_dy / count,
                                   sum_dy_xmu / count, True)
        return out, gx, sum_dy, sum_dy_xmu

    x, res, grad = _rand(4, 16, 9, 11, fmt=fmt), _rand(4, 16, 9, 11, fmt=fmt), _rand(4, 16, 9, 11, fmt=fmt)
    weight, bias = _vec(16, 0.5, 1.5), _vec(16)
    eager = step(x, weight, bias, res, grad)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x, weight, bias, res, grad)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= TOL_OUT
    assert compiled[0].stride() == eager[0].stride()


@pytest.mark.cuda
def test_torch_compile_autograd_through_triton_op(T):
    def f(x, scale, shift, res):
        return torch.ops.resnet_fused_triton.bn_apply(x, scale, shift, res, None, None, True).square().sum()

    args = [_rand(2, 8, 5, 7).requires_grad_(), _vec(8).requires_grad_(), _vec(8).requires_grad_(),
            _rand(2, 8, 5, 7).requires_grad_()]
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True)(*args)
    grads = torch.autograd.grad(loss, args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref_loss = R.bn_apply(*ref_args[:4], None, None, True).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_args)
    assert rel_err(loss, ref_loss) <= TOL_OUT
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= TOL_GRAD

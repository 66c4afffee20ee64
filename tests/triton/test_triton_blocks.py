"""The fused blocks on the Triton backend against torchvision's BasicBlock / Bottleneck.

Same state_dict (copy.deepcopy + resnet_fused.swap_blocks, non-trivial BN affine parameters and
running statistics), 2 SGD steps in training mode comparing outputs (<= 1e-5), input and every
parameter gradient (<= 1e-4) and the running statistics (<= 1e-5) at each step, then eval-mode
outputs and gradients. On this backend the blocks run resnet_fused/triton_units.py (every conv the
Triton conv with BN+ReLU prologue and statistics epilogue); the op-log test checks that it does.
Shapes are small: the interpreter is slow.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import (OpLog, DEVICE, TOL_GRAD, TOL_OUT, TOL_STATS, block_factory, compare_buffers,
                      compare_grads, make_pair, rel_err)

import resnet_fused

CL = torch.channels_last

CONFIGS = {
    "basic": (dict(kind="basic", inplanes=8, planes=8), (2, 8, 5, 7)),
    "basic-ds-stride2": (dict(kind="basic", inplanes=4, planes=8, stride=2, downsample=True), (2, 4, 7, 9)),
    "basic-ds-batch1": (dict(kind="basic", inplanes=4, planes=8, stride=2, downsample=True), (1, 4, 7, 9)),
    "bottleneck": (dict(kind="bottleneck", inplanes=16, planes=4), (2, 16, 5, 6)),
    "bottleneck-ds-stride2": (dict(kind="bottleneck", inplanes=8, planes=4, stride=2, downsample=True),
                              (2, 8, 7, 9)),
}


def _fused_output(out):
    return out.grad_fn is not None and "BNAddReLU" in type(out.grad_fn).__name__


def _fwd_bwd(ref, fused, x):
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    grad = torch.randn_like(out_r)
    out_r.backward(grad)
    out_f.backward(grad)
    return out_r, out_f, xr, xf


def _check(what, ref, fused, out_r, out_f, xr, xf, fmt):
    assert _fused_output(out_f), f"{what}the fused path did not run"
    if fmt is CL:
        assert out_f.is_contiguous(memory_format=CL), f"{what}output is not channels_last"
    err = rel_err(out_f, out_r)
    assert err <= TOL_OUT, f"{what}output rel_err {err:.3g}"
    err = rel_err(xf.grad, xr.grad)
    assert err <= TOL_GRAD, f"{what}input grad rel_err {err:.3g}"
    compare_grads(ref, fused, TOL_GRAD, what)


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_block_parity_on_triton(T, ieee_fp32, config, fmt):
    kwargs, shape = CONFIGS[config]
    ref, fused = make_pair(block_factory(**kwargs), how="swap")
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    if fmt is CL:
        ref, fused = ref.to(memory_format=CL), fused.to(memory_format=CL)

    def draw():
        x = torch.randn(shape, device=DEVICE)
        return x if fmt is None else x.contiguous(memory_format=CL)

    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    with resnet_fused.use_backend("triton"):
        assert resnet_fused.backend_for(DEVICE, torch.float32) == "triton"
        ref.train()
        fused.train()
        for step in range(2):
            what = f"step {step}: "
            out_r, out_f, xr, xf = _fwd_bwd(ref, fused, draw())
            _check(what, ref, fused, out_r, out_f, xr, xf, fmt)
            for opt in (opt_r, opt_f):
                opt.step()
                opt.zero_grad()
            compare_buffers(ref, fused, TOL_STATS, what)
            # next step from the same state (see tests/test_blocks.py::_sync)
            fused.load_state_dict(ref.state_dict())
            opt_f.load_state_dict(opt_r.state_dict())
        ref.eval()
        fused.eval()
        out_r, out_f, xr, xf = _fwd_bwd(ref, fused, draw())
        _check("eval: ", ref, fused, out_r, out_f, xr, xf, fmt)
        with torch.no_grad():
            x = draw()
            err = rel_err(fused(x), ref(x))
            assert err <= TOL_OUT, f"eval, no_grad: output rel_err {err:.3g}"


TRITON_CONV = "resnet_fused_triton.conv2d_bn_stats.default"


@pytest.mark.parametrize("config,convs,inner", [("basic-ds-stride2", 3, 1), ("bottleneck-ds-stride2", 4, 2)])
def test_triton_training_path_op_log(T, config, convs, inner):
    """Guards the parity test: in training under use_backend('triton') every conv of the block is
    the Triton conv with the statistics epilogue (the inner ones with the BN+ReLU prologue), no
    separate bn_stats and no ATen conv runs in forward; backward is ATen's conv backward on the
    recomputed BN+ReLU output and the Triton BN backward primitives."""
    kwargs, shape = CONFIGS[config]
    _, fused = make_pair(block_factory(**kwargs), how="swap")
    fused = fused.to(DEVICE).train()
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    fwd, bwd = OpLog(), OpLog()
    with resnet_fused.use_backend("triton"):
        with fwd.mode:
            out = fused(x)
        with bwd.mode:
            out.sum().backward()
    assert fwd.count(TRITON_CONV) == convs, fwd.calls
    assert fwd.count(TRITON_CONV, lambda a: a[2] is not None and a[4] is True) == inner
    names = {f for f, _ in fwd.calls + bwd.calls}
    assert not any("bn_stats" in n and n != TRITON_CONV for n in names), names
    assert "aten.convolution.default" not in {f for f, _ in fwd.calls}
    assert fwd.count("resnet_fused_triton.bn_apply.default") == 1          # the block end only
    assert bwd.count("aten.convolution_backward.default") == convs
    assert bwd.count("resnet_fused_triton.bn_apply.default") == inner      # the recomputed BN+ReLU
    assert not any(n.startswith("resnet_fused.") for n in names), names  # no C++ op on this backend
    assert bwd.count("resnet_fused_triton.bn_backward_apply.default") >= inner + 2
    assert x.grad is not None and all(p.grad is not None for p in fused.parameters())


def test_other_backends_keep_their_path(T):
    """The triton path is a dispatch point only for the triton backend: the reference backend runs
    bn_stats and ATen's conv as before."""
    kwargs, shape = CONFIGS["basic-ds-stride2"]
    _, fused = make_pair(block_factory(**kwargs), how="swap")
    fused = fused.to(DEVICE).train()
    log = OpLog()
    with resnet_fused.use_backend("reference"), log.mode:
        fused(torch.randn(shape, device=DEVICE))
    assert log.count(TRITON_CONV) == 0 and log.count("aten.convolution.default") == 3


def test_fused_block_compiles_without_graph_breaks_on_triton(T):
    """The backend is resolved at trace time; the Triton ops trace without graph breaks."""
    kwargs, shape = CONFIGS["basic-ds-stride2"]
    _, fused = make_pair(block_factory(**kwargs), how="swap")
    fused = fused.to(DEVICE).train()
    x = torch.randn(shape, device=DEVICE)
    with resnet_fused.use_backend("triton"):
        assert torch._dynamo.explain(fused)(x).graph_break_count == 0
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, out_e = compiled(xc), fused(xe)
        out_c.sum().backward()
        out_e.sum().backward()
    assert rel_err(out_c, out_e) <= TOL_OUT and rel_err(xc.grad, xe.grad) <= TOL_GRAD


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", ["basic-ds-stride2", "bottleneck-ds-stride2"])
def test_block_reduced_precision_on_triton(T, config, dtype):
    """bfloat16/float16 storage (float32 accumulation): outputs <= 1e-2 against torchvision's own
    blocks in that dtype, in training and in eval mode."""
    from conftest import TOL_BF16_OUT

    kwargs, shape = CONFIGS[config]
    ref, fused = make_pair(block_factory(**kwargs), how="swap")
    ref, fused = ref.to("cuda", dtype), fused.to("cuda", dtype)
    with resnet_fused.use_backend("triton"):
        for train in (True, False):
            ref.train(train)
            fused.train(train)
            x = torch.randn(shape, device="cuda", dtype=dtype)
            out_r, out_f, _, _ = _fwd_bwd(ref, fused, x)
            assert _fused_output(out_f) and out_f.dtype == dtype
            err = rel_err(out_f, out_r)
            assert err <= TOL_BF16_OUT, f"train={train}: output rel_err {err:.3g}"


@pytest.mark.cuda
def test_fused_block_compiles_with_inductor_on_triton(T, ieee_fp32):
    """On a GPU the training conv is a triton_op: inductor compiles the block's forward and backward
    (no graph break) with eager's results."""
    kwargs, shape = CONFIGS["bottleneck-ds-stride2"]
    _, fused = make_pair(block_factory(**kwargs), how="swap")
    fused = fused.to("cuda").train()
    eager = copy.deepcopy(fused)
    x = torch.randn(shape, device="cuda")
    with resnet_fused.use_backend("triton"):
        compiled = torch.compile(fused, fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, out_e = compiled(xc), eager(xe)
        grad = torch.randn_like(out_e)
        out_c.backward(grad)
        out_e.backward(grad)
    assert rel_err(out_c, out_e) <= TOL_OUT and rel_err(xc.grad, xe.grad) <= TOL_GRAD
    compare_grads(eager, fused, TOL_GRAD, "compiled: ")
    compare_buffers(eager, fused, TOL_STATS, "compiled: ")


def test_synchronized_bn_takes_the_units_path(T, monkeypatch):
    """Statistics synchronized across ranks are exchanged by the units' path only: a block whose
    norms span more than one process must not take the Triton conv-epilogue path (it would
    normalize with local statistics)."""
    from resnet_fused import sync_bn, triton_units

    kwargs, shape = CONFIGS["basic-ds-stride2"]
    _, fused = make_pair(block_factory(**kwargs), how="swap")
    fused = fused.to(DEVICE).train()
    x = torch.randn(shape, device=DEVICE)
    with resnet_fused.use_backend("triton"):
        assert triton_units.applies(fused, x)
        monkeypatch.setattr(sync_bn, "sync_world_size", lambda bn, device=None: 2)
        assert not triton_units.applies(fused, x)

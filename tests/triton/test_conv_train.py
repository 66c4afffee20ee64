"""The training conv ``resnet_fused_triton::conv2d_bn_stats`` (triton_kernels/conv_kernels.py): the
BN+ReLU prologue against the composed PyTorch ``conv2d(relu(x*scale + shift))`` (padded borders
included: the padding must stay zero, not become ``relu(shift)``), the statistics epilogue against
``torch.var_mean`` (multi-tile, multi-chunk merge, a mean 1e3 times the std), argument errors before
any launch, opcheck. GPU-only tests (reduced precision, compile) carry the ``cuda`` marker.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, INTERPRET, TOL_BF16_OUT, TOL_OUT, TOL_STATS, rel_err

CL = torch.channels_last

# name -> (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
SHAPES = {
    "3x3-s1-pad1": (2, 8, 5, 7, 16, 3, 1, 1, 1, 1),
    "3x3-s2-pad1": (2, 12, 7, 9, 20, 3, 2, 1, 1, 1),
    "7x7-s2-pad3-batch1": (1, 3, 11, 9, 16, 7, 2, 3, 1, 1),
    "1x1-s2": (2, 16, 7, 5, 40, 1, 2, 0, 1, 1),
    "dilated-3x3": (1, 8, 9, 8, 16, 3, 1, 2, 2, 1),
    "grouped-3x3-g4": (2, 16, 5, 6, 16, 3, 1, 1, 1, 4),
    "large-m": (4, 8, 17, 17, 24, 3, 1, 1, 1, 1),            # default class: BLOCK_M 64, 19 tiles
}


@pytest.fixture(scope="module")
def CK(T):
    from resnet_fused.triton_kernels import conv_kernels

    assert conv_kernels.INTERPRETED == INTERPRET
    return conv_kernels


def _args(shape, dtype=torch.float32, fmt=CL, prologue=True, relu=True, shift_mean=0.0):
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups = shape
    x = torch.randn(n, c_in, h, w, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c_out, c_in // groups, k, k, device=DEVICE) / (c_in // groups * k * k) ** 0.5).to(dtype)
    scale = torch.rand(c_in, device=DEVICE) + 0.5 if prologue else None
    # shifts of both signs: positive ones would turn zero padding into relu(shift) if misapplied
    shift = torch.randn(c_in, device=DEVICE) + shift_mean if prologue else None
    return (x, weight, scale, shift, relu and prologue, [stride] * 2, [padding] * 2, [dilation] * 2, groups)


def _composed(x, weight, scale, shift, relu, stride, padding, dilation, groups):
    """The prologue composed in PyTorch: the BN+ReLU output in x's dtype (as bn_apply stores it),
    then F.conv2d (zero padding of that output)."""
    a = x.float()
    if scale is not None:
        a = a * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    if relu:
        a = torch.relu(a)
    a = a.to(x.dtype)
    return F.conv2d(a.float(), weight.float(), None, stride, padding, dilation, groups)


def _op(*args):
    return torch.ops.resnet_fused_triton.conv2d_bn_stats(*args)


def _check_stats(out, mean, var, tol):
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    err_m, err_v = rel_err(mean, ref_mean), rel_err(var, ref_var)
    assert err_m <= tol and err_v <= tol, f"mean rel_err {err_m:.3g}, var rel_err {err_v:.3g}"


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_prologue_and_stats_vs_pytorch(CK, ieee_fp32, name, fmt):
    args = _args(SHAPES[name], fmt=fmt, shift_mean=0.5)
    out, mean, var = _op(*args)
    ref = _composed(*args)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    err = rel_err(out, ref)
    assert err <= TOL_OUT, f"output rel_err {err:.3g}"
    _check_stats(out, mean, var, TOL_STATS)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "affine-only"])
def test_padding_stays_zero(CK, ieee_fp32, relu):
    """A large positive shift: relu(x*scale + shift) is far from 0 everywhere inside, so applying the
    prologue to the padding would change every border output. Compared border and interior apart."""
    args = list(_args(SHAPES["3x3-s1-pad1"], relu=relu, shift_mean=5.0))
    out, _, _ = _op(*args)
    ref = _composed(*args)
    border = torch.ones_like(ref, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    assert rel_err(out[border], ref[border]) <= TOL_OUT
    assert rel_err(out[~border], ref[~border]) <= TOL_OUT
    # the check can fail: the prologue applied to the padding too gives a clearly different border
    x, w, sc, sh = args[:4]
    a = F.pad(x, (1, 1, 1, 1)) * sc.reshape(1, -1, 1, 1) + sh.reshape(1, -1, 1, 1)
    wrong = F.conv2d(torch.relu(a) if relu else a, w)
    assert rel_err(wrong[border], ref[border]) > 1e-2


def test_no_prologue_is_a_plain_conv(CK, ieee_fp32):
    args = _args(SHAPES["3x3-s2-pad1"], prologue=False)
    out, mean, var = _op(*args)
    ref = F.conv2d(args[0], args[1], None, args[5], args[6], args[7], args[8])
    assert rel_err(out, ref) <= TOL_OUT
    _check_stats(out, mean, var, TOL_STATS)


def test_stats_multi_chunk_merge(CK, ieee_fp32, small_tiles):
    """small_tiles shrinks the merge chunks (BLOCK_P 2, BLOCK_C 2): the merge kernel's chunk loop runs
    over the conv's 16-row tiles (small_m class), with a ragged last tile."""
    args = _args((2, 8, 7, 5, 40, 3, 1, 1, 1, 1))   # M = 70: 5 tiles of 16 rows
    assert CK.STATS_BLOCK_M[CK.shape_class(70, 40)] == 16 or not INTERPRET
    out, mean, var = _op(*args)
    _check_stats(out, mean, var, TOL_STATS)


def test_stats_large_mean(CK, ieee_fp32):
    """Output mean 1e3 times its std (positive weights on a shifted input): variance rel_err <= 1e-4."""
    n, c_in, h, w, c_out = 4, 8, 9, 9, 8
    x = torch.randn(n, c_in, h, w, device=DEVICE).contiguous(memory_format=CL)
    weight = torch.rand(c_out, c_in, 3, 3, device=DEVICE) + 0.1
    wsum = weight.sum((1, 2, 3))
    # a = 1e3 + s*x (no ReLU, no padding): out = 1e3*sum(w) + s*conv(x), std ~ s*||w||
    s = float((wsum / weight.flatten(1).norm(dim=1)).min()) / 1.5
    scale = torch.full((c_in,), s, device=DEVICE)
    shift = torch.full((c_in,), 1e3, device=DEVICE)
    out, mean, var = _op(x, weight, scale, shift, False, [1, 1], [0, 0], [1, 1], 1)
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    ratio = float((ref_mean.abs() / ref_var.sqrt()).min())
    assert ratio >= 1e3, f"the test's data have mean/std {ratio:.3g}, not ~1e3"
    err_v = rel_err(var, ref_var)
    assert err_v <= 1e-4, f"var rel_err {err_v:.3g} at mean/std {ratio:.3g}"
    assert rel_err(mean, ref_mean) <= TOL_STATS


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's emulated bfloat16 path")
def test_bfloat16_interpreted(CK):
    args = _args(SHAPES["3x3-s2-pad1"], dtype=torch.bfloat16)
    out, mean, var = _op(*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, _composed(*args)) <= TOL_BF16_OUT
    _check_stats(out, mean, var, TOL_BF16_OUT)


def test_errors_before_launch(CK):
    x, w, sc, sh, relu, stride, padding, dilation, groups = _args(SHAPES["3x3-s1-pad1"])
    with pytest.raises(ValueError, match="per input channel"):
        _op(x, w, sc[:-1], sh[:-1], True, stride, padding, dilation, groups)
    with pytest.raises(ValueError, match="given together"):
        _op(x, w, sc, None, True, stride, padding, dilation, groups)
    with pytest.raises(ValueError, match="in_relu=True"):
        _op(x, w, None, None, True, stride, padding, dilation, groups)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        _op(x.double(), w.double(), sc, sh, True, stride, padding, dilation, groups)
    with pytest.raises(ValueError, match="expects 16 input channels"):
        _op(x, torch.randn(16, 16, 3, 3, device=DEVICE), sc, sh, True, stride, padding, dilation, groups)


def test_opcheck_and_fake(CK):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _args(SHAPES["grouped-3x3-g4"])
    torch.library.opcheck(torch.ops.resnet_fused_triton.conv2d_bn_stats, args,
                          test_utils=("test_schema", "test_faketensor"))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out, mean, var = _op(*fake)
    assert out.shape == (2, 16, 5, 6) and out.is_contiguous(memory_format=CL)
    assert mean.shape == var.shape == (16,) and mean.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_cuda(CK, dtype):
    args = _args(SHAPES["large-m"], dtype=dtype)
    out, mean, var = _op(*args)
    assert out.dtype == dtype
    assert rel_err(out, _composed(*args)) <= TOL_BF16_OUT
    _check_stats(out, mean, var, TOL_BF16_OUT)


@pytest.mark.cuda
def test_compiles_through_triton_op(CK, ieee_fp32):
    """On a GPU the op is a triton_op: inductor sees the kernels (no graph break, same results)."""
    from resnet_fused.triton_kernels import registration

    assert registration.OP_KIND == "triton_op"
    args = _args(SHAPES["3x3-s2-pad1"])
    fn = torch.compile(lambda *a: _op(*a), fullgraph=True)
    got, ref = fn(*args), _op(*args)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= TOL_OUT

"""Each Triton primitive against resnet_fused.reference (the spec): odd sizes, channel counts that are
not multiples of the block, batch 1, rank 2 and 3, NCHW and channels_last, with and without residual
(and its affine), ReLU on and off, train (batch statistics) and eval forms of the backward, the
default tiles and tiny tiles (``small_tiles``: several tiles per reduction program, several merge
chunks). Fresh random inputs per test (the ``seed`` fixture of tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, TOL_OUT, rel_err

from resnet_fused import reference as R

CL = torch.channels_last
TOL_F32 = 1e-5          # float32 against the reference (DESIGN.md)
TOL_LARGE_MEAN = 1e-4   # variance of inputs whose mean is 1e3 times their std

# (shape, memory formats to try)
SHAPES = {
    "odd-3x5x7x9": ((3, 5, 7, 9), (None, CL)),
    "batch1": ((1, 6, 4, 5), (None, CL)),
    "channels-19": ((2, 19, 3, 3), (None, CL)),      # not a multiple of any block width
    "spatial-1x1": ((5, 9, 1, 1), (None, CL)),
    "rank2": ((13, 7), (None,)),
    "rank3": ((2, 3, 37), (None,)),
}
SHAPE_FORMATS = [(name, fmt) for name, (_, fmts) in SHAPES.items() for fmt in fmts]
SHAPE_IDS = [f"{name}-{'cl' if fmt is CL else 'nchw'}" for name, fmt in SHAPE_FORMATS]


@pytest.fixture(params=["default-tiles", "small-tiles"])
def tiles(request, K):
    if request.param == "small-tiles":
        request.getfixturevalue("small_tiles")
    return request.param


def _rand(shape, fmt=None, dtype=torch.float32, scale=1.0, offset=0.0):
    t = torch.randn(shape, dtype=torch.float32, device=DEVICE) * scale + offset
    t = t.to(dtype)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _vec(c, lo=-1.0, hi=1.0):
    return torch.rand(c, device=DEVICE) * (hi - lo) + lo


def _assert_like(out, input):
    assert out.shape == input.shape and out.dtype == input.dtype and out.device == input.device
    fmt = R._memory_format(input)
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} are not {fmt}"


def _shape(name):
    return SHAPES[name][0]


# ------------------------------------------------------------------------------------------------
# bn_stats
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt", SHAPE_FORMATS, ids=SHAPE_IDS)
def test_bn_stats(T, name, fmt, tiles):
    x = _rand(_shape(name), fmt, scale=2.0, offset=0.5)
    mean, var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x)
    for got in (mean, var):
        assert got.dtype == torch.float32 and got.shape == (x.shape[1],)
    assert rel_err(mean, ref_mean) <= TOL_F32
    assert rel_err(var, ref_var) <= TOL_F32


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("std,mean", [(1e-3, 1.0), (1.0, 1e3), (0.5, -500.0)])
def test_bn_stats_large_mean(T, fmt, std, mean, tiles):
    """Mean 1e3 times the std: no catastrophic cancellation (against a float64 reference)."""
    shape = (4, 6, 17, 19) if tiles == "default-tiles" else (2, 3, 9, 7)
    x = _rand(shape, fmt, scale=std, offset=mean)
    got_mean, got_var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x.double())
    assert rel_err(got_var, ref_var) <= TOL_LARGE_MEAN
    assert rel_err(got_mean, ref_mean) <= TOL_F32


def test_bn_stats_per_channel_offsets(T, small_tiles):
    """Channels with very different means and spreads are reduced independently."""
    c = 11
    x = _rand((3, c, 5, 6))
    offsets = torch.linspace(-1e3, 1e3, c, device=DEVICE).reshape(1, c, 1, 1)
    scales = torch.logspace(-2, 1, c, device=DEVICE).reshape(1, c, 1, 1)
    x = (x * scales + offsets).contiguous(memory_format=CL)
    mean, var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x.double())
    assert rel_err(mean, ref_mean) <= TOL_F32
    per_channel = (var.double() - ref_var).abs() / ref_var
    assert per_channel.max().item() <= TOL_LARGE_MEAN


def test_bn_stats_deterministic(T, small_tiles):
    x = _rand((2, 5, 7, 6), scale=3.0, offset=2.0)
    first = T.op("bn_stats")(x)
    for _ in range(2):
        again = T.op("bn_stats")(x)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_several_channel_blocks_at_default_tiles(T, K, fmt):
    """More channels than the widest tile: several channel blocks, the last one masked."""
    c = K.TUNING["max_block_c"] + 3
    shape = (2, c, 3, 2)
    x, res, grad = _rand(shape, fmt, offset=1.0), _rand(shape, fmt), _rand(shape, fmt)
    mean, var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x)
    assert rel_err(mean, ref_mean) <= TOL_F32 and rel_err(var, ref_var) <= TOL_F32
    scale, shift = _vec(c), _vec(c)
    out = T.op("bn_apply")(x, scale, shift, res, None, None, True)
    assert rel_err(out, R.bn_apply(x, scale, shift, res, None, None, True)) <= TOL_F32
    sums = T.op("bn_backward_reduce")(grad, x, out, mean, True)
    refs = R.bn_backward_reduce(grad, x, out, mean, True)
    assert all(rel_err(a, b) <= TOL_F32 for a, b in zip(sums, refs))
    args = (grad, x, out, mean, torch.rsqrt(var + 1e-5), scale, refs[0] / 6, refs[1] / 6, True)
    assert rel_err(T.op("bn_backward_apply")(*args), R.bn_backward_apply(*args)) <= TOL_F32


def test_bn_stats_empty_batch(T):
    x = torch.empty((0, 4, 3, 3), device=DEVICE)
    mean, var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x)
    torch.testing.assert_close(mean, ref_mean, equal_nan=True)
    torch.testing.assert_close(var, ref_var, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# bn_apply
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", ["none", "plain", "affine"])
@pytest.mark.parametrize("name,fmt", SHAPE_FORMATS, ids=SHAPE_IDS)
def test_bn_apply(T, name, fmt, residual, relu, tiles):
    shape = _shape(name)
    x = _rand(shape, fmt)
    c = shape[1]
    scale, shift = _vec(c, 0.5, 1.5), _vec(c)
    res = rs = rb = None
    if residual != "none":
        res = _rand(shape, fmt)
    if residual == "affine":
        rs, rb = _vec(c, 0.5, 1.5), _vec(c)
    out = T.op("bn_apply")(x, scale, shift, res, rs, rb, relu)
    ref = R.bn_apply(x, scale, shift, res, rs, rb, relu)
    _assert_like(out, x)
    assert rel_err(out, ref) <= TOL_F32
    if relu:
        assert (out >= 0).all() and (out == 0).any()


def test_bn_apply_relu_is_torchs(T):
    """ReLU forward as torch: x < 0 -> 0, NaN passes through, -0.0 stays."""
    x = _rand((2, 3, 4, 4))
    x[0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    scale, shift = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    out = T.op("bn_apply")(x, scale, shift, None, None, None, True)
    ref = R.bn_apply(x, scale, shift, None, None, None, True)
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 2] == float("inf")
    torch.testing.assert_close(out, torch.relu(x), equal_nan=True, rtol=0, atol=0)


def test_bn_apply_mixed_layouts(T):
    """Residual in another memory format than the input; a non-contiguous (sliced) input."""
    shape = (2, 5, 6, 7)
    scale, shift, rs, rb = _vec(5), _vec(5), _vec(5), _vec(5)
    x = _rand(shape, CL)
    res = _rand(shape)
    out = T.op("bn_apply")(x, scale, shift, res, rs, rb, True)
    _assert_like(out, x)
    assert rel_err(out, R.bn_apply(x, scale, shift, res, rs, rb, True)) <= TOL_F32
    big = _rand((2, 5, 6, 14))
    sliced = big[..., ::2]
    assert not sliced.is_contiguous()
    out = T.op("bn_apply")(sliced, scale, shift, res, None, None, False)
    ref = R.bn_apply(sliced, scale, shift, res, None, None, False)
    assert out.is_contiguous() and ref.is_contiguous()
    assert rel_err(out, ref) <= TOL_F32


def test_bn_apply_vector_dtypes(T):
    """Per-channel vectors in another dtype than the accumulation dtype (cast like the reference)."""
    x = _rand((2, 4, 3, 5))
    scale, shift = _vec(4).double(), _vec(4).to(torch.bfloat16)
    out = T.op("bn_apply")(x, scale, shift, None, None, None, False)
    assert rel_err(out, R.bn_apply(x, scale, shift, None, None, None, False)) <= TOL_F32


# ------------------------------------------------------------------------------------------------
# backward primitives
# ------------------------------------------------------------------------------------------------
def _relu_output(x, c):
    """A real BN+ReLU output of ``x`` (exact zeros where masked), in x's layout."""
    return R.bn_apply(x, _vec(c, 0.5, 1.5), _vec(c, -0.3, 0.3), None, None, None, True)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("name,fmt", SHAPE_FORMATS, ids=SHAPE_IDS)
def test_bn_backward_reduce(T, name, fmt, relu, tiles):
    shape = _shape(name)
    c = shape[1]
    x = _rand(shape, fmt, scale=1.5, offset=0.7)
    grad = _rand(shape, fmt)
    out = _relu_output(x, c) if relu else None
    mean = R.bn_stats(x)[0]
    sum_dy, sum_dy_xmu = T.op("bn_backward_reduce")(grad, x, out, mean, relu)
    ref_dy, ref_dy_xmu = R.bn_backward_reduce(grad, x, out, mean, relu)
    for got in (sum_dy, sum_dy_xmu):
        assert got.dtype == torch.float32 and got.shape == (c,)
    assert rel_err(sum_dy, ref_dy) <= TOL_F32
    assert rel_err(sum_dy_xmu, ref_dy_xmu) <= TOL_F32


def test_bn_backward_reduce_output_unused_without_relu(T):
    """relu=False ignores ``output``; relu=True without it is an error (as the reference)."""
    x, g = _rand((2, 3, 4, 4)), _rand((2, 3, 4, 4))
    mean = _vec(3)
    junk = torch.full_like(x, -1.0)
    a = T.op("bn_backward_reduce")(g, x, junk, mean, False)
    b = T.op("bn_backward_reduce")(g, x, None, mean, False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(Exception, match="relu=True needs"):
        T.op("bn_backward_reduce")(g, x, None, mean, True)


def test_backward_relu_mask_is_torchs(T):
    """Backward masks where output <= 0 (threshold_backward); NaN outputs pass the gradient."""
    shape = (2, 3, 4, 4)
    x, g = _rand(shape), _rand(shape)
    out = torch.relu(_rand(shape))
    out[0, 0, 0, :2] = torch.tensor([float("nan"), -0.0])
    mean, invstd, ones = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), torch.ones(3, device=DEVICE)
    got = T.op("bn_backward_apply")(g, x, out, mean, invstd, ones, None, None, True)
    torch.testing.assert_close(got, torch.ops.aten.threshold_backward(g, out, 0), rtol=0, atol=0)
    sums = T.op("bn_backward_reduce")(g, x, out, mean, True)
    refs = R.bn_backward_reduce(g, x, out, mean, True)
    for a, b in zip(sums, refs):
        assert rel_err(a, b) <= TOL_F32


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("form", ["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("name,fmt", SHAPE_FORMATS, ids=SHAPE_IDS)
def test_bn_backward_apply(T, name, fmt, relu, form, weight, tiles):
    shape = _shape(name)
    c = shape[1]
    x = _rand(shape, fmt, scale=1.5, offset=0.7)
    grad = _rand(shape, fmt)
    out = _relu_output(x, c) if relu else None
    mean, var = R.bn_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    w = _vec(c, 0.5, 1.5) if weight else None
    mean_dy = mean_dy_xmu = None
    if form == "train":
        count = x.numel() // c
        sum_dy, sum_dy_xmu = R.bn_backward_reduce(grad, x, out, mean, relu)
        mean_dy, mean_dy_xmu = sum_dy / count, sum_dy_xmu / count
    got = T.op("bn_backward_apply")(grad, x, out, mean, invstd, w, mean_dy, mean_dy_xmu, relu)
    ref = R.bn_backward_apply(grad, x, out, mean, invstd, w, mean_dy, mean_dy_xmu, relu)
    _assert_like(got, x)
    assert rel_err(got, ref) <= TOL_F32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,fmt", SHAPE_FORMATS, ids=SHAPE_IDS)
def test_backward_mask_from_input(T, name, fmt, dtype, tiles):
    """mask_scale/mask_shift: the ReLU mask recomputed from the input, as the reference does and as
    masking with the output of the Triton bn_apply does (scales of both signs)."""
    shape = _shape(name)
    c = shape[1]
    x = _rand(shape, fmt, dtype=dtype, scale=1.5, offset=0.2)
    grad = _rand(shape, fmt, dtype=dtype)
    sc, sh = _vec(c, -1.5, 1.5), _vec(c, -0.3, 0.3)
    out = T.op("bn_apply")(x, sc, sh, None, None, None, True)
    mean, var = R.bn_stats(x)
    invstd, w = torch.rsqrt(var + 1e-5), _vec(c, 0.5, 1.5)
    sums = T.op("bn_backward_reduce")(grad, x, None, mean, True, sc, sh)
    for got, ref, from_out in zip(sums, R.bn_backward_reduce(grad, x, None, mean, True, sc, sh),
                                  T.op("bn_backward_reduce")(grad, x, out, mean, True)):
        assert rel_err(got, ref) <= TOL_F32 and rel_err(got, from_out) <= TOL_F32
    count = x.numel() // c
    tol = TOL_F32 if dtype == torch.float32 else STORAGE_TOL[dtype]
    for stats in ((sums[0] / count, sums[1] / count), (None, None)):
        got = T.op("bn_backward_apply")(grad, x, None, mean, invstd, w, *stats, True, sc, sh)
        _assert_like(got, x)
        assert rel_err(got, R.bn_backward_apply(grad, x, None, mean, invstd, w, *stats, True, sc, sh)) <= tol
        assert rel_err(got, T.op("bn_backward_apply")(grad, x, out, mean, invstd, w, *stats, True)) <= tol


def test_mask_from_input_at_the_rounding_boundary(T):
    """bfloat16 storage: z = tiny/2 (tiny: the smallest subnormal) rounds to a zero ReLU output
    (masked), z = 0.75*tiny does not;
    z = 0 is masked and NaN passes the gradient, exactly as threshold_backward on the output."""
    info = torch.finfo(torch.bfloat16)
    # normal inputs (the interpreter flushes subnormal bfloat16 loads); z = x*scale is subnormal
    x = torch.tensor([info.smallest_normal, 0.0, float("nan"), 1.0], device=DEVICE).to(torch.bfloat16)
    x = x.reshape(1, 1, 4, 1).expand(2, 2, 4, 1).contiguous()
    sc, sh = torch.tensor([info.eps / 2, 0.75 * info.eps], device=DEVICE), torch.zeros(2, device=DEVICE)
    g = torch.ones_like(x)
    zeros, ones = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    got = T.op("bn_backward_apply")(g, x, None, zeros, ones, None, None, None, True, sc, sh)
    assert torch.equal(got, R.bn_backward_apply(g, x, None, zeros, ones, None, None, None, True, sc, sh))
    assert got[0, :, :, 0].float().tolist() == [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]]


def test_bn_backward_apply_argument_errors(T):
    x, g = _rand((2, 3, 4, 4)), _rand((2, 3, 4, 4))
    v = _vec(3)
    with pytest.raises(Exception, match="given together"):
        T.op("bn_backward_apply")(g, x, None, v, v, None, v, None, False)
    with pytest.raises(Exception, match="relu=True needs"):
        T.op("bn_backward_apply")(g, x, None, v, v, None, None, None, True)
    with pytest.raises(Exception, match="mask_scale and mask_shift must be given together"):
        T.op("bn_backward_apply")(g, x, None, v, v, None, None, None, True, v, None)
    with pytest.raises(Exception, match="need relu=True and no output"):
        T.op("bn_backward_reduce")(g, x, g, v, True, v, v)


def test_unsupported_dtype_is_a_clear_error(T):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(Exception, match="float32, float16 and bfloat16"):
        T.op("bn_stats")(x)


# ------------------------------------------------------------------------------------------------
# reduced-precision storage (float32 accumulation); runs interpreted too where numpy allows
# ------------------------------------------------------------------------------------------------
STORAGE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_reduced_precision_storage(T, dtype, fmt):
    shape = (2, 5, 6, 7)
    c = shape[1]
    x = _rand(shape, fmt, dtype=dtype, scale=1.5, offset=0.5)
    res, grad = _rand(shape, fmt, dtype=dtype), _rand(shape, fmt, dtype=dtype)
    scale, shift, rs, rb = _vec(c), _vec(c), _vec(c), _vec(c)
    tol = STORAGE_TOL[dtype]
    # per-channel results are float32 sums of the stored values: float32 tolerances
    mean, var = T.op("bn_stats")(x)
    ref_mean, ref_var = R.bn_stats(x)
    assert mean.dtype == torch.float32
    assert rel_err(mean, ref_mean) <= TOL_F32 and rel_err(var, ref_var) <= TOL_F32
    out = T.op("bn_apply")(x, scale, shift, res, rs, rb, True)
    _assert_like(out, x)
    assert rel_err(out, R.bn_apply(x, scale, shift, res, rs, rb, True)) <= tol
    sums = T.op("bn_backward_reduce")(grad, x, out, mean, True)
    refs = R.bn_backward_reduce(grad, x, out, mean, True)
    for a, b in zip(sums, refs):
        assert a.dtype == torch.float32 and rel_err(a, b) <= TOL_F32
    invstd, w = torch.rsqrt(var + 1e-5), _vec(c, 0.5, 1.5)
    count = x.numel() // c
    args = (grad, x, out, mean, invstd, w, refs[0] / count, refs[1] / count, True)
    got = T.op("bn_backward_apply")(*args)
    _assert_like(got, x)
    assert rel_err(got, R.bn_backward_apply(*args)) <= tol


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.slow
def test_int64_offsets_over_2_31_elements(T):
    """A bfloat16 tensor of more than 2^31 elements (DESIGN.md: indices are int64)."""
    n, c, hw = 2, 4, 2**28 + 5  # 2^31 + 40 elements, 4.3 GB in bfloat16
    x = torch.randn((n, c, hw), device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    mean, var = T.op("bn_stats")(x)
    ref_var, ref_mean = torch.var_mean(x.transpose(0, 1).reshape(c, -1).float(), dim=1, correction=0)
    assert rel_err(mean, ref_mean) <= TOL_F32 and rel_err(var, ref_var) <= TOL_F32
    scale, shift = _vec(c), _vec(c)
    out = T.op("bn_apply")(x, scale, shift, None, None, None, True)
    tail = x[-1, :, -1000:]  # the last elements, beyond 2^31
    ref_tail = torch.relu(tail.float() * scale[:, None] + shift[:, None]).to(torch.bfloat16)
    torch.testing.assert_close(out[-1, :, -1000:], ref_tail, rtol=1e-2, atol=1e-2)
    assert rel_err(out[0, :, :1000], torch.relu(x[0, :, :1000].float() * scale[:, None]
                                                + shift[:, None])) <= 1e-2

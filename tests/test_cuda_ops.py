"""The CUDA kernels (csrc/cuda, registered for the CUDA dispatch key of ``torch.ops.resnet_fused.*``).

Without a GPU (CI): the build checks run — a CUDA toolkit and a CUDA torch must give a build with
the CUDA kernels compiled in and registered for every op that has a CPU kernel (a CUDA part that
silently failed to build fails here), and the ``cuda`` backend must be offered for CUDA tensors.
Tests marked ``cuda`` run the kernels on a GPU against :mod:`resnet_fused.reference` and the fused
blocks against torchvision; they are skipped (and reported skipped) where no GPU is visible.

The per-element formulas are shared with the CPU kernels (csrc/bn_math.h); their float64 parity
with the reference on the CPU is tests/test_cpp_ops.py (float64 cases, 1e-12).
"""
from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

try:
    import resnet_fused._C as _C
except Exception as exc:  # not built, or built against another torch
    pytest.skip(f"resnet_fused._C cannot be imported ({type(exc).__name__}: {exc}); build it with "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

import resnet_fused
from resnet_fused import backends, reference
from resnet_fused import ops as rf_ops

from conftest import TOL_BF16_OUT, TOL_F64, TOL_GRAD, TOL_OUT, TOL_STATS, block_factory, make_pair, rel_err

OPS = torch.ops.resnet_fused
OP_NAMES = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply")
CL = torch.channels_last


# ------------------------------------------------------------------------------------------------
# build and registration (CPU: these run in CI)
# ------------------------------------------------------------------------------------------------
def _toolkit_present() -> bool:
    """A CUDA toolkit as setup.py looks for one (nvcc on PATH, $CUDA_HOME/$CUDA_PATH, /usr/local/cuda*)."""
    if shutil.which("nvcc"):
        return True
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += glob.glob("/usr/local/cuda-*")
    return any(r and os.path.isfile(os.path.join(r, "bin", "nvcc")) for r in roots)


def test_cuda_kernels_are_built_where_a_toolkit_is():
    """With nvcc and a CUDA build of torch, the CUDA part must have been compiled in: a CUDA build
    that failed (or was skipped without being asked to) turns CI red here, not silently CPU-only."""
    if os.environ.get("RESNET_FUSED_SKIP_CUDA", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("RESNET_FUSED_SKIP_CUDA is set: the CUDA sources were skipped on purpose")
    if torch.version.cuda is None or not _toolkit_present():
        pytest.skip(f"no CUDA build to expect (torch.version.cuda={torch.version.cuda}, "
                    f"nvcc found: {_toolkit_present()})")
    info = _C.build_info()
    assert info["cuda"] is True, info
    assert info["cuda_ops"] is True, info
    assert info["cuda_version"], info
    assert resnet_fused.build_info()["cuda_ops"] is True


def _ops_with_kernel(key: str):
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("resnet_fused::")]
    return sorted(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key))


# CPU-only by design: the channels-last max-pool of FoldedResNet's CPU flat plan
CPU_ONLY_OPS = ("resnet_fused::max_pool2d_nhwc",)


def test_every_op_with_a_cpu_kernel_has_a_cuda_kernel():
    """Except CPU_ONLY_OPS, which must have no CUDA kernel (so the list stays true)."""
    cpu = _ops_with_kernel("CPU")
    assert set(CPU_ONLY_OPS) <= set(cpu)
    assert set(f"resnet_fused::{n}" for n in OP_NAMES) <= set(cpu)
    if not _C.build_info()["cuda_ops"]:
        assert _ops_with_kernel("CUDA") == []  # a CPU-only build registers none, and says so
        pytest.skip("CPU-only build: no CUDA kernels to check")
    for name in cpu:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert has_cuda != (name in CPU_ONLY_OPS), f"{name}: CUDA kernel registered: {has_cuda}"


def test_cuda_backend_is_offered_for_cuda_tensors():
    """The `cuda` backend has kernels for CUDA tensors exactly when the CUDA ops are compiled in;
    `auto` on CUDA picks triton then cuda. (Resolution needs no GPU.)"""
    cuda_ops = bool(_C.build_info()["cuda_ops"])
    assert ("cuda" in resnet_fused.available_backends("cuda")) is cuda_ops
    assert "cuda" not in resnet_fused.available_backends("cpu")
    if not cuda_ops:
        pytest.skip("CPU-only build")
    with resnet_fused.use_backend("cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            assert resnet_fused.backend_for("cuda", dtype) == "cuda"
        with pytest.raises(backends.BackendError, match=r"\bcpu\b"):
            resnet_fused.backend_for("cpu")
    with resnet_fused.use_backend("auto"):
        triton_ok = backends._unavailable_reason("triton", "cuda", torch.float32) is None
        assert resnet_fused.backend_for("cuda", torch.float32) == ("triton" if triton_ok else "cuda")
        assert resnet_fused.backend_for("cuda", torch.float64) == "cuda"  # triton has no float64


# ------------------------------------------------------------------------------------------------
# GPU: the ops against the reference
# ------------------------------------------------------------------------------------------------
needs_cuda_ops = pytest.mark.skipif(not _C.build_info()["cuda_ops"], reason="CUDA kernels not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: TOL_OUT, torch.float16: TOL_BF16_OUT, torch.bfloat16: TOL_BF16_OUT, torch.float64: TOL_F64}

# Odd sizes; numel % (16-byte vector) != 0 (vector body plus scalar tail); rank 2/3/5; one element
# per (n, c); channel counts beyond one 32-channel tile with a partial tile; several stage-1 parts
# per channel (NCHW: more than 4096 elements per channel; channels last: more than 128 rows).
SHAPES = [
    (3, 5, 7, 9),
    (3, 7, 1, 5),
    (2, 3),
    (2, 3, 5),
    (2, 3, 4, 5, 3),
    (5, 40, 1, 1),
    (4, 64, 20, 20),
    (2, 3, 130, 131),
    (3, 70, 11, 13),
    (2, 300, 3, 5),
    (8, 64, 56, 56),
    (2, 2100, 3, 3),
]


def _layouts(shape):
    return [False, True] if len(shape) >= 3 else [False]


CASES = [(s, cl) for s in SHAPES for cl in _layouts(s)]
CASE_IDS = [f"{'x'.join(map(str, s))}-{'cl' if cl else 'nchw'}" for s, cl in CASES]


def to_layout(t, channels_last):
    if not channels_last or t.dim() < 3:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def rand(shape, dtype, channels_last=False, mean=0.0, std=1.0, device="cuda"):
    t = torch.randn(shape, dtype=torch.float64, device=device) * std + mean
    return to_layout(t.to(dtype), channels_last)


def vec(c, lo=-1.0, hi=1.0, dtype=torch.float32, device="cuda"):
    return (torch.rand(c, dtype=torch.float64, device=device) * (hi - lo) + lo).to(dtype)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu(*ts):
    return [None if t is None else t.cpu() for t in ts]


def check(ours, ref, dtype, what=""):
    assert ours.is_cuda, what
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} vs reference {ref.dtype}"
    assert ours.shape == ref.shape, what
    err = rel_err(ours, ref)
    assert err <= TOL[dtype], f"{what}: rel_err {err:.3e} > {TOL[dtype]:.0e}"


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Full float32 convs/matmuls on the GPU (torch 2.14 defaults cuDNN convs to TF32)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.allow_tf32,
              torch.backends.cuda.matmul.allow_tf32)
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before[:2]
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before[2:]


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_stats(shape, channels_last, dtype):
    x = rand(shape, dtype, channels_last, mean=0.5, std=2.0)
    mean, var = OPS.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x.cpu())
    assert mean.dtype == var.dtype == acc_dtype(dtype)
    check(mean, ref_mean, dtype, "mean")
    check(var, ref_var, dtype, "var")


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("residual", [None, "plain", "affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_apply(shape, channels_last, dtype, residual, relu):
    c = shape[1]
    x = rand(shape, dtype, channels_last)
    scale, shift = vec(c, 0.5, 1.5), vec(c)
    res = rand(shape, dtype, channels_last) if residual else None
    rs, rsh = (vec(c, 0.5, 1.5), vec(c)) if residual == "affine" else (None, None)
    out = OPS.bn_apply(x, scale, shift, res, rs, rsh, relu)
    ref = reference.bn_apply(*cpu(x, scale, shift, res, rs, rsh), relu)
    check(out, ref, dtype)
    assert out.stride() == x.stride(), "output must keep the input's memory format"
    if relu:
        assert (out >= 0).all()


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_backward_reduce(shape, channels_last, dtype, relu):
    c = shape[1]
    x = rand(shape, dtype, channels_last, mean=0.3)
    grad = rand(shape, dtype, channels_last)
    output = rand(shape, dtype, channels_last)  # ~half negative: the mask matters
    mean = vec(c, dtype=acc_dtype(dtype))
    sum_dy, sum_dy_xmu = OPS.bn_backward_reduce(grad, x, output, mean, relu)
    ref_dy, ref_dy_xmu = reference.bn_backward_reduce(*cpu(grad, x, output, mean), relu)
    assert sum_dy.dtype == sum_dy_xmu.dtype == acc_dtype(dtype)
    check(sum_dy, ref_dy, dtype, "sum_dy")
    check(sum_dy_xmu, ref_dy_xmu, dtype, "sum_dy_xmu")


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("form", ["train", "eval", "eval-noweight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_backward_apply(shape, channels_last, dtype, form, relu):
    c = shape[1]
    x = rand(shape, dtype, channels_last, mean=0.3)
    grad = rand(shape, dtype, channels_last)
    output = rand(shape, dtype, channels_last)
    mean, invstd = vec(c), vec(c, 0.5, 2.0)
    weight = None if form == "eval-noweight" else vec(c, 0.5, 1.5)
    mean_dy, mean_dy_xmu = (vec(c), vec(c)) if form == "train" else (None, None)
    out = OPS.bn_backward_apply(grad, x, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu)
    ref = reference.bn_backward_apply(*cpu(grad, x, output, mean, invstd, weight, mean_dy, mean_dy_xmu), relu)
    check(out, ref, dtype)
    assert out.stride() == x.stride(), "grad_input must keep the input's memory format"


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_backward_mask_from_input(shape, channels_last, dtype):
    """mask_scale/mask_shift: the ReLU mask recomputed from the input (scales of both signs)."""
    c = shape[1]
    x = rand(shape, dtype, channels_last, mean=0.3)
    grad = rand(shape, dtype, channels_last)
    scale, shift = vec(c, -1.5, 1.5), vec(c)
    mean, invstd, weight = vec(c, dtype=acc_dtype(dtype)), vec(c, 0.5, 2.0), vec(c, 0.5, 1.5)
    sums = OPS.bn_backward_reduce(grad, x, None, mean, True, scale, shift)
    refs = reference.bn_backward_reduce(*cpu(grad, x, None, mean), True, *cpu(scale, shift))
    for ours, ref in zip(sums, refs):
        check(ours, ref, dtype, "bn_backward_reduce (mask from input)")
    for stats in ((vec(c), vec(c)), (None, None)):
        dx = OPS.bn_backward_apply(grad, x, None, mean, invstd, weight, *stats, True, scale, shift)
        ref = reference.bn_backward_apply(*cpu(grad, x, None, mean, invstd, weight, *stats), True, *cpu(scale, shift))
        check(dx, ref, dtype, "bn_backward_apply (mask from input)")
        assert dx.stride() == x.stride()


def _misaligned(shape, dtype, channels_last, offset=1):
    """A dense view at a storage offset of `offset` elements: not 16-byte aligned (scalar path)."""
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + offset, dtype=torch.float64, device="cuda").to(dtype)
    if channels_last:
        perm = [shape[0], *shape[2:], shape[1]]
        return base[offset:].view(perm).movedim(-1, 1)
    return base[offset:].view(shape)


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("which", ["input", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((4, 64, 20, 20), False), ((4, 64, 20, 20), True),
                                                 ((3, 5, 7, 9), False), ((2, 300, 3, 5), True)],
                         ids=["aligned-size-nchw", "aligned-size-cl", "odd-nchw", "odd-cl"])
def test_misaligned_operands_take_the_scalar_path(shape, channels_last, dtype, which):
    """Operands at an odd storage offset (slice views): every op still matches the reference."""
    c = shape[1]
    x = _misaligned(shape, dtype, channels_last) if which == "input" else rand(shape, dtype, channels_last)
    other = _misaligned(shape, dtype, channels_last) if which == "residual" else rand(shape, dtype, channels_last)
    assert (x.data_ptr() % 16 != 0) == (which == "input")
    assert (other.data_ptr() % 16 != 0) == (which == "residual")
    v = [vec(c, 0.5, 1.5) for _ in range(4)]
    check(OPS.bn_apply(x, v[0], v[1], other, v[2], v[3], True),
          reference.bn_apply(*cpu(x, v[0], v[1], other, v[2], v[3]), True), dtype, "bn_apply")
    for ours, ref in zip(OPS.bn_stats(x), reference.bn_stats(x.cpu())):
        check(ours, ref, dtype, "bn_stats")
    mean = vec(c)
    for ours, ref in zip(OPS.bn_backward_reduce(other, x, other, mean, True),
                         reference.bn_backward_reduce(*cpu(other, x, other, mean), True)):
        check(ours, ref, dtype, "bn_backward_reduce")
    check(OPS.bn_backward_apply(other, x, other, mean, v[0], v[1], v[2], v[3], True),
          reference.bn_backward_apply(*cpu(other, x, other, mean, v[0], v[1], v[2], v[3]), True), dtype,
          "bn_backward_apply")


@pytest.mark.cuda
@needs_cuda_ops
def test_operands_in_other_layouts_and_non_dense_input():
    shape, c = (2, 6, 5, 7), 6
    x = rand(shape, torch.float32, True)
    other = rand(shape, torch.float32, False)
    scale, shift, mean, invstd = vec(c), vec(c), vec(c), vec(c, 0.5, 2.0)
    out = OPS.bn_apply(x, scale, shift, other, scale, shift, True)
    check(out, reference.bn_apply(*cpu(x, scale, shift, other, scale, shift), True), torch.float32)
    assert out.stride() == x.stride()
    strided = rand((3, 4, 10, 9), torch.float32)[:, :, ::2, 1:]
    for ours, ref in zip(OPS.bn_stats(strided), reference.bn_stats(strided.cpu())):
        check(ours, ref, torch.float32)
    dx = OPS.bn_backward_apply(other, x, other, mean, invstd, scale, shift, mean, True)
    check(dx, reference.bn_backward_apply(*cpu(other, x, other, mean, invstd, scale, shift, mean), True),
          torch.float32)


@pytest.mark.cuda
@needs_cuda_ops
def test_per_channel_vectors_in_any_floating_dtype():
    for dtype, vdtype in [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.float32), (torch.float32, torch.bfloat16)]:
        x, res = rand((2, 4, 5, 3), dtype), rand((2, 4, 5, 3), dtype)
        v = [vec(4, 0.5, 1.5, vdtype) for _ in range(4)]
        check(OPS.bn_apply(x, v[0], v[1], res, v[2], v[3], True),
              reference.bn_apply(*cpu(x, v[0], v[1], res, v[2], v[3]), True), dtype)


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bn_stats_large_mean(channels_last):
    """mean = 1e3 x std: the variance keeps rel_err <= 1e-4 in float32 (no cancellation)."""
    shape, c = (16, 80, 9, 9), 80
    offsets = (vec(c, 0.5, 1.0) * 1e3).reshape(1, c, 1, 1)
    x = to_layout(rand(shape, torch.float32) + offsets, channels_last)
    mean, var = OPS.bn_stats(x)
    true_mean, true_var = reference.bn_stats(x.double().cpu())
    assert rel_err(var, true_var) <= 1e-4
    assert rel_err(mean, true_mean) <= 1e-6


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_reductions_are_deterministic(channels_last):
    shape = (16, 72, 30, 30)
    x = rand(shape, torch.float32, channels_last, mean=3.0)
    grad, out = rand(shape, torch.float32, channels_last), rand(shape, torch.float32, channels_last)
    mean = vec(72)
    first = [*OPS.bn_stats(x), *OPS.bn_backward_reduce(grad, x, out, mean, True)]
    second = [*OPS.bn_stats(x), *OPS.bn_backward_reduce(grad, x, out, mean, True)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@needs_cuda_ops
def test_empty_batch():
    x = torch.empty(0, 3, 4, 4, device="cuda")
    mean, var = OPS.bn_stats(x)
    assert mean.shape == var.shape == (3,) and mean.isnan().all() and var.isnan().all()
    v = torch.ones(3, device="cuda")
    assert OPS.bn_apply(x, v, v, None, None, None, True).shape == x.shape
    sum_dy, sum_dy_xmu = OPS.bn_backward_reduce(x, x, None, v, False)
    assert (sum_dy == 0).all() and (sum_dy_xmu == 0).all()


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_through_relu_like_torch(dtype):
    x = rand((2, 3, 4, 5), dtype)
    x[0, 1, 2, 3] = float("nan")
    scale, shift = vec(3), vec(3)
    out = OPS.bn_apply(x, scale, shift, None, None, None, True)
    ref = reference.bn_apply(*cpu(x, scale, shift), None, None, None, True)
    assert torch.equal(out.isnan().cpu(), ref.isnan()) and out[0, 1, 2, 3].isnan()
    grad = rand((2, 3, 4, 5), dtype)
    dx = OPS.bn_backward_apply(grad, x, out, scale, shift.abs() + 0.5, None, None, None, True)
    ref_dx = reference.bn_backward_apply(*cpu(grad, x, out, scale, shift.abs() + 0.5), None, None, None, True)
    torch.testing.assert_close(dx.cpu(), ref_dx, equal_nan=True, atol=0, rtol=0)
    assert dx[0, 1, 2, 3] != 0  # a NaN output passes the gradient (threshold_backward semantics)


@pytest.mark.cuda
@needs_cuda_ops
def test_runs_on_the_current_stream():
    """Work queued on a side stream sees the kernels' results after that stream's synchronize."""
    x = rand((8, 64, 56, 56), torch.float32)
    scale, shift = vec(64), vec(64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = OPS.bn_apply(x, scale, shift, None, None, None, True)
        mean, _ = OPS.bn_stats(x)
    side.synchronize()
    check(out, reference.bn_apply(*cpu(x, scale, shift), None, None, None, True), torch.float32)
    check(mean, reference.bn_stats(x.cpu())[0], torch.float32)


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_on_cuda(dtype, channels_last):
    from test_ops import _op_calls, _op_samples  # the CPU opcheck cases, moved to the GPU

    s = {k: v.cuda() for k, v in _op_samples(dtype, channels_last).items()}
    for op, args in _op_calls(s):
        torch.library.opcheck(op, args)


@pytest.mark.cuda
@needs_cuda_ops
def test_gradcheck_through_the_cuda_backend():
    y = (torch.randn(2, 3, 3, 4, dtype=torch.float64, device="cuda") + 3).requires_grad_()
    res = torch.randn_like(y, requires_grad=True)
    vs = [(torch.rand(3, dtype=torch.float64, device="cuda") + 0.5).requires_grad_() for _ in range(4)]
    with resnet_fused.use_backend("cuda"):
        assert torch.autograd.gradcheck(rf_ops.bn_stats, (y,))
        assert torch.autograd.gradcheck(lambda *a: rf_ops.bn_apply(*a, relu=True), (y, *vs[:2], res, *vs[2:]))


# ------------------------------------------------------------------------------------------------
# GPU: mixed devices are clear errors before any kernel runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda_ops
def test_mixed_cpu_and_cuda_arguments_name_the_devices():
    x = rand((2, 3, 4, 4), torch.float32)
    v = vec(3)
    xc, vc = x.cpu(), v.cpu()
    with pytest.raises(RuntimeError, match=r"scale is on cpu but input is on cuda:0"):
        OPS.bn_apply(x, vc, v, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"input is on cpu but scale is on cuda:0"):
        OPS.bn_apply(xc, v, vc, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"residual is on cpu but input is on cuda:0"):
        OPS.bn_apply(x, v, v, xc, None, None, False)
    with pytest.raises(RuntimeError, match=r"grad_out is on cpu but input is on cuda:0"):
        OPS.bn_backward_reduce(xc, x, None, v, False)
    with pytest.raises(RuntimeError, match=r"input is on cpu but mean is on cuda:0"):
        OPS.bn_backward_reduce(xc, xc, None, v, False)
    with pytest.raises(RuntimeError, match=r"weight is on cpu but input is on cuda:0"):
        OPS.bn_backward_apply(x, x, None, v, v, vc, None, None, False)
    with pytest.raises(ValueError, match=r"scale is on cpu but input is on cuda:0"):
        rf_ops.bn_apply(x, vc, v)


# ------------------------------------------------------------------------------------------------
# GPU: the fused blocks under use_backend("cuda") against torchvision
# ------------------------------------------------------------------------------------------------
BLOCKS = {
    "basic": (dict(kind="basic", inplanes=16, planes=16), (3, 16, 7, 9)),
    "basic-ds-stride2": (dict(kind="basic", inplanes=8, planes=16, stride=2, downsample=True), (3, 8, 9, 11)),
    "bottleneck": (dict(kind="bottleneck", inplanes=32, planes=8), (2, 32, 7, 9)),
    "bottleneck-ds-stride2": (dict(kind="bottleneck", inplanes=16, planes=8, stride=2, downsample=True),
                              (2, 16, 9, 13)),
}


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fused_block_matches_torchvision(name, memory_format):
    from test_blocks import run_parity  # the CPU parity harness: 3 SGD steps, then eval

    kwargs, shape = BLOCKS[name]
    ref, fused = make_pair(block_factory(**kwargs))
    ref, fused = ref.cuda(), fused.cuda()
    if memory_format is not None:
        ref, fused = ref.to(memory_format=memory_format), fused.to(memory_format=memory_format)
    with resnet_fused.use_backend("cuda"):
        run_parity(ref, fused, shape, memory_format=memory_format, tol_out=TOL_OUT, tol_grad=TOL_GRAD,
                   tol_stats=TOL_STATS,
                   make_input=lambda shape, dtype: torch.randn(shape, dtype=dtype, device="cuda"))


@pytest.mark.cuda
@needs_cuda_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["basic-ds-stride2", "bottleneck-ds-stride2"])
def test_fused_block_under_autocast(name, memory_format, dtype):
    """CUDA autocast: the convs output `dtype`, BN gets `dtype` input with float32 parameters.
    Outputs (training and eval) within 1e-2 of torchvision's under the same autocast."""
    kwargs, shape = BLOCKS[name]
    ref, fused = make_pair(block_factory(**kwargs))
    mf = memory_format or torch.contiguous_format
    ref, fused = ref.to("cuda", memory_format=mf), fused.to("cuda", memory_format=mf)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        fused.train(mode == "train")
        x = torch.randn(shape, device="cuda").contiguous(memory_format=mf)
        with torch.autocast("cuda", dtype=dtype):
            out_ref = ref(x)
            with resnet_fused.use_backend("cuda"):
                out = fused(x)
        assert out.dtype == out_ref.dtype == dtype, mode
        if memory_format is CL:
            assert out.is_contiguous(memory_format=CL), mode
        err = rel_err(out, out_ref)
        assert err <= TOL_BF16_OUT, f"{mode} output rel_err {err:.3g} > {TOL_BF16_OUT}"

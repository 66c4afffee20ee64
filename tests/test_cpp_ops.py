"""The C++ CPU kernels (``torch.ops.resnet_fused.*`` from ``resnet_fused._C``) against the spec,
:mod:`resnet_fused.reference`: values, dtypes, memory formats, robustness of the statistics,
determinism, NaN propagation, and argument validation."""
import pytest
import torch

try:
    import resnet_fused._C as _C
except Exception as exc:  # not built, or built against another torch
    pytest.skip(f"resnet_fused._C cannot be imported ({type(exc).__name__}: {exc}); build it with "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

from resnet_fused import reference

OPS = torch.ops.resnet_fused

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}

# Odd sizes, batch 1, rank 2/3/5, one element per (n, c), and shapes that span several reduction
# chunks (csrc/cpu/bn_kernels_impl.h, Plan) in both layouts: NCHW planes over 16384 elements cut in
# pieces, short planes grouped by about 4096 elements (more than one group); channels last: more
# than 1024 rows at C=64, more than 2048 channels (two channel blocks), channel counts that are not
# whole vectors (tails).
SHAPES = [
    (3, 5, 7, 9),
    (1, 4, 6, 6),
    (2, 3),
    (2, 3, 5),
    (2, 3, 4, 5, 3),
    (5, 40, 1, 1),
    (2, 3, 50, 47),
    (40, 6, 7, 9),
    (80, 3, 7, 9),
    (2, 3, 130, 131),
    (3, 70, 11, 13),
    (4, 64, 20, 20),
    (2, 300, 3, 5),
    (2, 2100, 3, 3),
]


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm()).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def to_layout(t, channels_last):
    """Channels-last strides for any rank >= 3 ([N, *spatial, C] dense); NCHW otherwise."""
    if not channels_last or t.dim() < 3:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def rand(shape, g, dtype, channels_last=False, mean=0.0, std=1.0):
    t = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return to_layout(t.to(dtype), channels_last)


def vec(c, g, lo=-1.0, hi=1.0, dtype=torch.float32):
    return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_close(ours, ref, dtype):
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    assert err <= TOL[dtype], f"rel_err {err:.3e} > {TOL[dtype]:.0e}"


def layouts(shape):
    return [False, True] if len(shape) >= 3 else [False]


CASES = [(s, cl) for s in SHAPES for cl in layouts(s)]
CASE_IDS = [f"{'x'.join(map(str, s))}-{'cl' if cl else 'nchw'}" for s, cl in CASES]


# ------------------------------------------------------------------------------------------------
# build info and schemas
# ------------------------------------------------------------------------------------------------
def test_build_info():
    info = _C.build_info()
    assert info["built_with_torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert info["cuda_version"] is None or isinstance(info["cuda_version"], str)
    assert (info["cuda_version"] is not None) == info["cuda"]
    assert isinstance(info["cpu_kernels"], str) and info["cpu_kernels"]


def test_build_info_reports_the_cpu_capability():
    """Kernels are compiled per CPU capability; the one used is torch's own choice (or the best
    compiled one below it)."""
    info = _C.build_info()
    compiled, used = info["cpu_capabilities_compiled"], info["cpu_capability_used"]
    assert compiled[0] == "DEFAULT" and set(compiled) <= {"DEFAULT", "AVX2", "AVX512"}
    assert used in compiled
    torch_cap = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if torch_cap in order:
        assert used == max((c for c in compiled if order.index(c) <= order.index(torch_cap)), key=order.index)
    assert used in info["cpu_kernels"]


_CAPABILITY_CHECK = r"""
import torch, resnet_fused._C as C
from resnet_fused import reference
OPS = torch.ops.resnet_fused
info = C.build_info()
assert info["cpu_capability_used"] == "{cap}", info
def err(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm()).item()
g = torch.Generator().manual_seed(0)
for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)]:
    for shape, cl in [((3, 70, 11, 13), False), ((3, 70, 11, 13), True), ((2, 3, 130, 131), False),
                      ((4, 64, 20, 20), True), ((2, 300, 3, 5), True), ((64, 33), False),
                      ((2, 5, 501, 503), False), ((4, 64, 91, 91), True)]:
        mk = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format)
        x, r, dy, o = mk() + 0.5, mk(), mk(), mk()
        c = shape[1]
        v = [torch.rand(c, generator=g) + 0.5 for _ in range(6)]
        m = torch.randn(c, generator=g).to(reference.opmath_dtype(dtype))
        pairs = list(zip(OPS.bn_stats(x), reference.bn_stats(x)))
        pairs.append((OPS.bn_apply(x, v[0], v[1], r, v[2], v[3], True),
                      reference.bn_apply(x, v[0], v[1], r, v[2], v[3], True)))
        pairs += list(zip(OPS.bn_backward_reduce(dy, x, o, m, True), reference.bn_backward_reduce(dy, x, o, m, True)))
        pairs.append((OPS.bn_backward_apply(dy, x, o, m, v[0], v[1], v[2], v[3], True),
                      reference.bn_backward_apply(dy, x, o, m, v[0], v[1], v[2], v[3], True)))
        # the ReLU mask from the input (v[4] - 1: scales of both signs)
        sc, sh = v[4] - 1.0, v[5] - 1.0
        pairs += list(zip(OPS.bn_backward_reduce(dy, x, None, m, True, sc, sh),
                          reference.bn_backward_reduce(dy, x, None, m, True, sc, sh)))
        pairs.append((OPS.bn_backward_apply(dy, x, None, m, v[0], v[1], v[2], v[3], True, sc, sh),
                      reference.bn_backward_apply(dy, x, None, m, v[0], v[1], v[2], v[3], True, sc, sh)))
        for i, (a, b) in enumerate(pairs):
            assert a.dtype == b.dtype and a.stride() == b.stride(), (dtype, shape, cl, i)
            assert err(a, b) <= tol, (dtype, shape, cl, i, err(a, b))
# the channels-last max-pool (FoldedResNet): equal to ATen's, NaN included, vector body and tail
for dtype in (torch.float32, torch.float64):
    x = torch.randn(2, 37, 9, 11, dtype=dtype)
    x.view(-1)[::53] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    a = OPS.max_pool2d_nhwc(x, [3, 3], [2, 2], [1, 1])
    b = torch.nn.functional.max_pool2d(x, 3, 2, 1)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), dtype
print("ok")
"""


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_every_compiled_capability_matches_the_reference(cap):
    """Each compiled variant, forced through ATEN_CPU_CAPABILITY (which lowers torch's choice and so
    ours), in a fresh process: every op, dtype and layout against the reference."""
    import os
    import subprocess
    import sys

    if cap not in _C.build_info()["cpu_capabilities_compiled"]:
        pytest.skip(f"{cap} kernels not compiled on this platform")
    order = ["DEFAULT", "AVX2", "AVX512"]
    if order.index(cap) > order.index(torch.backends.cpu.get_cpu_capability()
                                      if torch.backends.cpu.get_cpu_capability() in order else "DEFAULT"):
        pytest.skip(f"this CPU does not run {cap}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    done = subprocess.run([sys.executable, "-c", _CAPABILITY_CHECK.replace("{cap}", cap)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_triton_kernels_package_mapping(tmp_path):
    """setup.py maps the top-level folder triton_kernels/ to `resnet_fused.triton_kernels`; the
    mapping must hold in editable installs too, from any directory (importing it needs no GPU)."""
    import subprocess
    import sys

    code = "import resnet_fused.triton_kernels as t; print(t.KERNELS_AVAILABLE)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name,args", [
    ("bn_stats", ["input"]),
    ("bn_apply", ["input", "scale", "shift", "residual", "res_scale", "res_shift", "relu"]),
    ("bn_backward_reduce", ["grad_out", "input", "output", "mean", "relu", "mask_scale", "mask_shift"]),
    ("bn_backward_apply", ["grad_out", "input", "output", "mean", "invstd", "weight", "mean_dy",
                           "mean_dy_xmu", "relu", "mask_scale", "mask_shift"]),
])
def test_schema_argument_names(name, args):
    schema = getattr(OPS, name).default._schema
    assert [a.name for a in schema.arguments] == args


# ------------------------------------------------------------------------------------------------
# values against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_stats(shape, channels_last, dtype):
    x = rand(shape, gen(1), dtype, channels_last, mean=0.5, std=2.0)
    mean, var = OPS.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x)
    assert mean.dtype == var.dtype == acc_dtype(dtype)
    check_close(mean, ref_mean, dtype)
    check_close(var, ref_var, dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("residual", [None, "plain", "affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_apply(shape, channels_last, dtype, residual, relu):
    g = gen(2)
    c = shape[1]
    x = rand(shape, g, dtype, channels_last)
    scale, shift = vec(c, g, 0.5, 1.5), vec(c, g)
    res = rand(shape, g, dtype, channels_last) if residual else None
    rs, rsh = (vec(c, g, 0.5, 1.5), vec(c, g)) if residual == "affine" else (None, None)
    out = OPS.bn_apply(x, scale, shift, res, rs, rsh, relu)
    ref = reference.bn_apply(x, scale, shift, res, rs, rsh, relu)
    check_close(out, ref, dtype)
    assert out.stride() == x.stride(), "output must keep the input's memory format"
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_backward_reduce(shape, channels_last, dtype, relu):
    g = gen(3)
    c = shape[1]
    x = rand(shape, g, dtype, channels_last, mean=0.3)
    grad = rand(shape, g, dtype, channels_last)
    output = rand(shape, g, dtype, channels_last)  # ~half negative: the mask matters
    mean = vec(c, g, dtype=acc_dtype(dtype))
    sum_dy, sum_dy_xmu = OPS.bn_backward_reduce(grad, x, output, mean, relu)
    ref_dy, ref_dy_xmu = reference.bn_backward_reduce(grad, x, output, mean, relu)
    assert sum_dy.dtype == sum_dy_xmu.dtype == acc_dtype(dtype)
    check_close(sum_dy, ref_dy, dtype)
    check_close(sum_dy_xmu, ref_dy_xmu, dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("form", ["train", "eval", "eval-noweight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_bn_backward_apply(shape, channels_last, dtype, form, relu):
    g = gen(4)
    c = shape[1]
    x = rand(shape, g, dtype, channels_last, mean=0.3)
    grad = rand(shape, g, dtype, channels_last)
    output = rand(shape, g, dtype, channels_last)
    mean, invstd = vec(c, g), vec(c, g, 0.5, 2.0)
    weight = None if form == "eval-noweight" else vec(c, g, 0.5, 1.5)
    mean_dy, mean_dy_xmu = (vec(c, g), vec(c, g)) if form == "train" else (None, None)
    out = OPS.bn_backward_apply(grad, x, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu)
    ref = reference.bn_backward_apply(grad, x, output, mean, invstd, weight, mean_dy, mean_dy_xmu, relu)
    check_close(out, ref, dtype)
    assert out.stride() == x.stride(), "grad_input must keep the input's memory format"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=CASE_IDS)
def test_backward_mask_from_input(shape, channels_last, dtype):
    """mask_scale/mask_shift: the ReLU mask recomputed from the input equals the mask of the output
    our own bn_apply writes (bit for bit), and matches the reference."""
    g = gen(13)
    c = shape[1]
    x = rand(shape, g, dtype, channels_last, mean=0.3)
    grad = rand(shape, g, dtype, channels_last)
    scale, shift = vec(c, g, -1.5, 1.5), vec(c, g)   # negative scales too: gamma < 0 is legal
    out = OPS.bn_apply(x, scale, shift, None, None, None, True)
    mean, invstd, weight = vec(c, g, dtype=acc_dtype(dtype)), vec(c, g, 0.5, 2.0), vec(c, g, 0.5, 1.5)
    sums = OPS.bn_backward_reduce(grad, x, None, mean, True, scale, shift)
    for ours, from_out, ref in zip(sums, OPS.bn_backward_reduce(grad, x, out, mean, True),
                                   reference.bn_backward_reduce(grad, x, None, mean, True, scale, shift)):
        assert torch.equal(ours, from_out)
        check_close(ours, ref, dtype)
    for mean_dy, mean_dy_xmu in ((vec(c, g), vec(c, g)), (None, None)):
        dx = OPS.bn_backward_apply(grad, x, None, mean, invstd, weight, mean_dy, mean_dy_xmu, True, scale, shift)
        assert torch.equal(dx, OPS.bn_backward_apply(grad, x, out, mean, invstd, weight, mean_dy, mean_dy_xmu, True))
        check_close(dx, reference.bn_backward_apply(grad, x, None, mean, invstd, weight, mean_dy, mean_dy_xmu,
                                                    True, scale, shift), dtype)
        assert dx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_mask_from_input_at_the_rounding_boundary(dtype):
    """z = x*scale + shift that is positive but rounds to a zero ReLU output in the storage dtype
    (half the smallest subnormal, a tie to even) is masked, the next value up is not; z == 0 and
    -0.0 are masked; NaN passes the gradient, as threshold_backward on the stored output does."""
    info = torch.finfo(dtype)
    # z = smallest normal * scale (a normal input: no subnormal input to flush anywhere); channel 0:
    # scale eps/2 -> z = half the smallest subnormal (output 0); channel 1: 0.75*eps -> rounds up
    x = torch.tensor([info.smallest_normal, 0.0, -0.0, float("nan")], dtype=torch.float64).to(dtype)
    x = x.reshape(1, 1, 4, 1).expand(2, 2, 4, 1).contiguous()
    scale, shift = torch.tensor([info.eps / 2, 0.75 * info.eps]), torch.zeros(2)
    grad = torch.ones_like(x)
    out = OPS.bn_apply(x, scale, shift, None, None, None, True)
    zero, one = torch.zeros((), dtype=torch.float32), torch.ones((), dtype=torch.float32)
    mean, invstd = torch.zeros(2), torch.ones(2)
    dx = OPS.bn_backward_apply(grad, x, None, mean, invstd, None, None, None, True, scale, shift)
    assert torch.equal(dx, OPS.bn_backward_apply(grad, x, out, mean, invstd, None, None, None, True))
    assert torch.equal(dx, reference.bn_backward_apply(grad, x, None, mean, invstd, None, None, None, True,
                                                       scale, shift))
    assert dx[0, 0, 0, 0] == zero and dx[0, 1, 0, 0] == one and dx[0, 0, 1, 0] == zero and dx[0, 0, 2, 0] == zero
    assert dx[0, 0, 3, 0] == one
    sums = OPS.bn_backward_reduce(grad, x, None, mean, True, scale, shift)
    assert torch.equal(sums[0], OPS.bn_backward_reduce(grad, x, out, mean, True)[0])


def test_float16_is_supported():
    g = gen(5)
    x = rand((2, 3, 5, 7), g, torch.float16)
    scale, shift = vec(3, g), vec(3, g)
    check_close(OPS.bn_apply(x, scale, shift, None, None, None, True),
                reference.bn_apply(x, scale, shift, None, None, None, True), torch.float16)
    for ours, ref in zip(OPS.bn_stats(x), reference.bn_stats(x)):
        check_close(ours, ref, torch.float16)


def test_per_channel_vectors_in_any_floating_dtype():
    """float64 / bfloat16 vectors with float32 input, float32 vectors with bfloat16 input (autocast)."""
    g = gen(6)
    for dtype, vdtype in [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                          (torch.bfloat16, torch.float32), (torch.float64, torch.float32)]:
        x = rand((2, 4, 5, 3), g, dtype)
        res = rand((2, 4, 5, 3), g, dtype)
        v = [vec(4, g, 0.5, 1.5, vdtype) for _ in range(4)]
        check_close(OPS.bn_apply(x, v[0], v[1], res, v[2], v[3], True),
                    reference.bn_apply(x, v[0], v[1], res, v[2], v[3], True), dtype)
        sums = OPS.bn_backward_reduce(res, x, None, v[0], False)
        for ours, ref in zip(sums, reference.bn_backward_reduce(res, x, None, v[0], False)):
            check_close(ours, ref, dtype)
        check_close(OPS.bn_backward_apply(res, x, None, v[0], v[1], v[2], v[3], v[0], False),
                    reference.bn_backward_apply(res, x, None, v[0], v[1], v[2], v[3], v[0], False), dtype)


def test_non_dense_input_is_handled():
    """A strided view (neither NCHW nor channels last) is copied; results as the reference."""
    g = gen(7)
    base = rand((3, 4, 10, 9), g, torch.float32)
    x = base[:, :, ::2, 1:]
    res = rand((3, 4, 5, 8), g, torch.float32, channels_last=True)
    scale, shift = vec(4, g), vec(4, g)
    out = OPS.bn_apply(x, scale, shift, res, None, None, True)
    check_close(out, reference.bn_apply(x, scale, shift, res, None, None, True), torch.float32)
    assert out.is_contiguous()
    for ours, ref in zip(OPS.bn_stats(x), reference.bn_stats(x)):
        check_close(ours, ref, torch.float32)


@pytest.mark.parametrize("input_cl", [False, True], ids=["input-nchw", "input-cl"])
def test_operands_in_another_layout_than_input(input_cl):
    """residual / grad_out / output in the other memory format: made to match the input's."""
    g = gen(8)
    shape, c = (2, 6, 5, 7), 6
    x = rand(shape, g, torch.float32, input_cl)
    other = [rand(shape, g, torch.float32, not input_cl) for _ in range(3)]
    scale, shift, mean, invstd = vec(c, g), vec(c, g), vec(c, g), vec(c, g, 0.5, 2.0)
    out = OPS.bn_apply(x, scale, shift, other[0], scale, shift, True)
    check_close(out, reference.bn_apply(x, scale, shift, other[0], scale, shift, True), torch.float32)
    assert out.stride() == x.stride()
    for ours, ref in zip(OPS.bn_backward_reduce(other[1], x, other[2], mean, True),
                         reference.bn_backward_reduce(other[1], x, other[2], mean, True)):
        check_close(ours, ref, torch.float32)
    dx = OPS.bn_backward_apply(other[1], x, other[2], mean, invstd, scale, shift, mean, True)
    check_close(dx, reference.bn_backward_apply(other[1], x, other[2], mean, invstd, scale, shift, mean, True),
                torch.float32)
    assert dx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((2, 5, 501, 503), False), ((4, 64, 91, 91), True),
                                                 ((2, 70, 150, 151), True)],
                         ids=["nchw-odd-planes", "cl-whole-vectors", "cl-channel-tail"])
def test_large_outputs(shape, channels_last, dtype):
    """Outputs of 8 MiB or more take the streaming-store path (vector-aligned stores after a peeled
    head in NCHW planes; whole rows in channels last when C is a whole number of vectors)."""
    g = gen(14)
    c = shape[1]
    scale = 1 if dtype != torch.bfloat16 else 2  # bfloat16: twice the elements for 8 MiB
    shape = (shape[0] * scale,) + shape[1:]
    x, res, grad, out = (rand(shape, g, dtype, channels_last) for _ in range(4))
    assert x.numel() * x.element_size() >= 8 << 20
    v = [vec(c, g, 0.5, 1.5) for _ in range(6)]
    check_close(OPS.bn_apply(x, v[0], v[1], res, v[2], v[3], True),
                reference.bn_apply(x, v[0], v[1], res, v[2], v[3], True), dtype)
    mean = vec(c, g, dtype=acc_dtype(dtype))
    check_close(OPS.bn_backward_apply(grad, x, out, mean, v[4], v[5], v[0], v[1], True),
                reference.bn_backward_apply(grad, x, out, mean, v[4], v[5], v[0], v[1], True), dtype)


@pytest.mark.parametrize("shape", [(6, 40, 1, 1), (6, 40)], ids=["Nx40x1x1", "Nx40"])
def test_one_element_per_channel_any_dense_layout(shape):
    """S == 1: NCHW and channels-last strides address (n, c) alike; no operand is copied and the
    results match the reference whichever strides each operand has."""
    g = gen(13)
    c = shape[1]
    x = rand(shape, g, torch.float32, channels_last=True)
    res = rand(shape, g, torch.float32, channels_last=False)
    grad, out = rand(shape, g, torch.float32, True), rand(shape, g, torch.float32, False)
    scale, shift, mean, invstd = vec(c, g), vec(c, g), vec(c, g), vec(c, g, 0.5, 2.0)
    check_close(OPS.bn_apply(x, scale, shift, res, scale, shift, True),
                reference.bn_apply(x, scale, shift, res, scale, shift, True), torch.float32)
    for ours, ref in zip(OPS.bn_backward_reduce(grad, x, out, mean, True),
                         reference.bn_backward_reduce(grad, x, out, mean, True)):
        check_close(ours, ref, torch.float32)
    check_close(OPS.bn_backward_apply(grad, x, out, mean, invstd, scale, shift, mean, True),
                reference.bn_backward_apply(grad, x, out, mean, invstd, scale, shift, mean, True), torch.float32)
    for ours, ref in zip(OPS.bn_stats(x), reference.bn_stats(x)):
        check_close(ours, ref, torch.float32)


def test_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    mean, var = OPS.bn_stats(x)
    assert mean.shape == var.shape == (3,) and mean.isnan().all() and var.isnan().all()
    v = torch.ones(3)
    assert OPS.bn_apply(x, v, v, None, None, None, True).shape == x.shape
    sum_dy, _ = OPS.bn_backward_reduce(x, x, None, v, False)
    assert (sum_dy == 0).all()


# ------------------------------------------------------------------------------------------------
# statistics robustness, determinism, NaN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,channels_last", [((8, 4, 16, 16), False), ((8, 4, 16, 16), True),
                                                 ((4, 3, 64, 64), False), ((16, 80, 9, 9), True)])
def test_bn_stats_large_mean(shape, channels_last):
    """mean = 1e3 x std: the variance keeps rel_err <= 1e-4 in float32 (no cancellation)."""
    g = gen(9)
    c = shape[1]
    x = rand(shape, g, torch.float32, channels_last)
    offsets = (vec(c, g, 0.5, 1.0) * 1e3).reshape([1, c] + [1] * (len(shape) - 2))
    x = to_layout(x + offsets, channels_last)  # std 1, mean 500..1000 per channel
    mean, var = OPS.bn_stats(x)
    true_mean, true_var = reference.bn_stats(x.double())  # exact statistics of the float32 data
    assert rel_err(var, true_var) <= 1e-4
    assert rel_err(mean, true_mean) <= 1e-6


@pytest.mark.parametrize("spike", [10.0, 1e3])
@pytest.mark.parametrize("shape,channels_last", [((4, 64, 16, 16), False), ((4, 64, 16, 16), True),
                                                 ((8, 256, 28, 28), True), ((3, 5, 130, 131), False)])
def test_bn_stats_outliers_anywhere(shape, channels_last, spike):
    """One large value at the first element of every plane and of every block of rows (where a
    sample-shifted sum would take its shift from), and a few elsewhere: statistics stay within
    float32 rounding of the exact ones (float64 of the same data)."""
    g = gen(15)
    x = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64)) + 3.0
    x[:, :, 0, 0] += spike
    flat = x.movedim(1, -1).reshape(-1, shape[1]) if channels_last else None
    if channels_last:
        flat[::16] += spike  # the first row of every block of 16 rows, every channel
        x = flat.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    x[..., 5, 7] -= spike / 2
    x = to_layout(x.float(), channels_last)
    mean, var = OPS.bn_stats(x)
    true_mean, true_var = reference.bn_stats(x.double())
    assert rel_err(mean, true_mean) <= 1e-6
    assert rel_err(var, true_var) <= 1e-6


def _reductions(x, grad, out, mean):
    return [*OPS.bn_stats(x), *OPS.bn_backward_reduce(grad, x, out, mean, True)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_reductions_are_deterministic(channels_last):
    """Same bits twice, and with 1 thread vs 2 threads."""
    g = gen(10)
    shape = (16, 72, 30, 30)
    x = rand(shape, g, torch.float32, channels_last, mean=3.0)
    grad = rand(shape, g, torch.float32, channels_last)
    out = rand(shape, g, torch.float32, channels_last)
    mean = vec(72, g)
    first = _reductions(x, grad, out, mean)
    second = _reductions(x, grad, out, mean)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _reductions(x, grad, out, mean)
        torch.set_num_threads(2)
        two = _reductions(x, grad, out, mean)
    finally:
        torch.set_num_threads(threads)
    for a, b, c, d in zip(first, second, one, two):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
        assert torch.equal(c, d)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_through_relu_like_torch(dtype, channels_last):
    g = gen(11)
    x = rand((2, 3, 4, 5), g, dtype, channels_last)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    scale, shift = vec(3, g), vec(3, g)
    out = OPS.bn_apply(x, scale, shift, None, None, None, True)
    acc = acc_dtype(dtype)
    expected = torch.relu(x.to(acc) * scale.to(acc).reshape(1, -1, 1, 1) + shift.to(acc).reshape(1, -1, 1, 1))
    expected = expected.to(dtype)
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[0, 1, 2, 3].isnan() and out[1, 2, 0, 0].isnan()
    torch.testing.assert_close(out, expected, equal_nan=True, atol=0, rtol=TOL[dtype])
    # backward: a NaN forward output passes the gradient (threshold_backward semantics)
    grad = rand((2, 3, 4, 5), g, dtype, channels_last)
    dx = OPS.bn_backward_apply(grad, x, out, scale, shift.abs() + 0.5, None, None, None, True)
    ref = reference.bn_backward_apply(grad, x, out, scale, shift.abs() + 0.5, None, None, None, True)
    torch.testing.assert_close(dx, ref, equal_nan=True, atol=0, rtol=0)
    assert dx[0, 1, 2, 3] != 0


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _x(shape=(2, 3, 4, 4), dtype=torch.float32):
    return rand(shape, gen(12), dtype)


def test_rejects_rank_below_two():
    with pytest.raises(RuntimeError, match=r"rank >= 2"):
        OPS.bn_stats(torch.randn(5))
    with pytest.raises(RuntimeError, match=r"rank >= 2"):
        OPS.bn_apply(torch.randn(5), torch.ones(5), torch.ones(5), None, None, None, False)


def test_rejects_non_floating_input():
    with pytest.raises(RuntimeError, match=r"floating-point"):
        OPS.bn_stats(torch.arange(24).reshape(2, 3, 4))


def test_rejects_wrong_channel_vector_length():
    x, v = _x(), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"scale must be a per-channel vector of length C=3"):
        OPS.bn_apply(x, torch.ones(4), v, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"res_shift must be a per-channel vector of length C=3"):
        OPS.bn_apply(x, v, v, x, v, torch.ones(2), False)
    with pytest.raises(RuntimeError, match=r"mean must be a per-channel vector of length C=3"):
        OPS.bn_backward_reduce(x, x, None, torch.ones(2), False)
    with pytest.raises(RuntimeError, match=r"invstd must be a per-channel vector of length C=3"):
        OPS.bn_backward_apply(x, x, None, v, torch.ones(1, 3), None, None, None, False)


def test_rejects_shape_mismatch():
    x, v = _x(), torch.ones(3)
    other = _x((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"residual must have the input's shape"):
        OPS.bn_apply(x, v, v, other, None, None, False)
    with pytest.raises(RuntimeError, match=r"grad_out must have the input's shape"):
        OPS.bn_backward_reduce(other, x, None, v, False)
    with pytest.raises(RuntimeError, match=r"output must have the input's shape"):
        OPS.bn_backward_apply(x, x, other, v, v, None, None, None, True)


def test_rejects_dtype_mismatch():
    x, v = _x(), torch.ones(3)
    x64 = x.double()
    with pytest.raises(RuntimeError, match=r"residual must have the input's dtype"):
        OPS.bn_apply(x, v, v, x64, None, None, False)
    with pytest.raises(RuntimeError, match=r"grad_out must have the input's dtype"):
        OPS.bn_backward_reduce(x64, x, None, v, False)
    with pytest.raises(RuntimeError, match=r"output must have the input's dtype"):
        OPS.bn_backward_apply(x, x, x64, v, v, None, None, None, True)


def test_rejects_inconsistent_optional_arguments():
    x, v = _x(), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"res_scale and res_shift must be given together"):
        OPS.bn_apply(x, v, v, x, v, None, False)
    with pytest.raises(RuntimeError, match=r"need a residual"):
        OPS.bn_apply(x, v, v, None, v, v, False)
    with pytest.raises(RuntimeError, match=r"mean_dy and mean_dy_xmu must be given together"):
        OPS.bn_backward_apply(x, x, None, v, v, None, v, None, False)
    with pytest.raises(RuntimeError, match=r"relu=True requires output"):
        OPS.bn_backward_reduce(x, x, None, v, True)
    with pytest.raises(RuntimeError, match=r"relu=True requires output"):
        OPS.bn_backward_apply(x, x, None, v, v, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"mask_scale and mask_shift must be given together"):
        OPS.bn_backward_reduce(x, x, None, v, True, v, None)
    with pytest.raises(RuntimeError, match=r"need relu=True and no output"):
        OPS.bn_backward_reduce(x, x, x, v, True, v, v)
    with pytest.raises(RuntimeError, match=r"need relu=True and no output"):
        OPS.bn_backward_apply(x, x, None, v, v, None, None, None, False, v, v)
    with pytest.raises(RuntimeError, match=r"mask_shift must be a per-channel vector of length C=3"):
        OPS.bn_backward_apply(x, x, None, v, v, None, None, None, True, v, torch.ones(4))


def _cpu_kernel(name):
    """The CPU kernel itself, bypassing dispatch (a meta tensor would otherwise select the Meta key)."""
    op = getattr(OPS, name).default
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *args: op.redispatch(keyset, *args)


def test_rejects_tensors_on_different_devices():
    x, v = _x(), torch.ones(3)
    meta_v, meta_x = torch.empty(3, device="meta"), torch.empty(x.shape, device="meta")
    with pytest.raises(RuntimeError, match=r"scale is on meta but input is on cpu"):
        _cpu_kernel("bn_apply")(x, meta_v, v, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"residual is on meta but input is on cpu"):
        _cpu_kernel("bn_apply")(x, v, v, meta_x, None, None, False)
    with pytest.raises(RuntimeError, match=r"grad_out is on meta but input is on cpu"):
        _cpu_kernel("bn_backward_reduce")(meta_x, x, None, v, False)
    with pytest.raises(RuntimeError, match=r"weight is on meta but input is on cpu"):
        _cpu_kernel("bn_backward_apply")(x, x, None, v, v, meta_v, None, None, False)

"""The C++ CPU kernels on a tensor of more than 2**31 elements (int64 indexing; DESIGN.md, "Numerics").

One bfloat16 input of 2,148,532,224 elements (4.3 GB) in each memory format, built so that the
exact answers are known: channel c holds ``v_c + 1`` and ``v_c - 1`` in equal numbers (the sign
alternates along H), with ``v_c`` in {-3.5, -2.5, ..., 3.5}. Every value, and every partial sum
the backward reduction forms, is exact in float32, so

* ``bn_stats``: mean = v_c, biased var = 1 (to float32 rounding);
* ``bn_backward_reduce(x, x, x, mean, relu)``: sum(g) and sum(g * (x - mean)) with g = x masked
  where x <= 0 have closed forms;
* ``bn_apply`` / ``bn_backward_apply``: slices at the start and past element 2**31 match the
  reference on the same slices.

At most two such tensors are alive at once (8.6 GB); the tests are skipped when the machine has less
memory available than that. Marked ``slow``: deselect with ``-m "not slow"``.
"""
import pytest
import torch

try:
    import resnet_fused._C  # noqa: F401
except Exception as exc:  # not built, or built against another torch
    pytest.skip(f"resnet_fused._C cannot be imported ({type(exc).__name__}: {exc})", allow_module_level=True)

from resnet_fused import reference

OPS = torch.ops.resnet_fused
N, C, H, W = 8, 64, 2048, 2049  # 2,148,532,224 elements > 2**31
NEEDED_BYTES = 2 * N * C * H * W * 2 + (1 << 30)


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_available_bytes() < NEEDED_BYTES,
                       reason=f"needs {NEEDED_BYTES / 2**30:.1f} GiB of available memory"),
]


def _channel_values() -> torch.Tensor:
    return torch.arange(C, dtype=torch.float64) % 8 - 3.5  # -3.5 ... 3.5, exact in bfloat16


@pytest.fixture(scope="module")
def buffer() -> torch.Tensor:
    """One 4.3 GB buffer for every test (first-touch page faults of such a tensor cost seconds)."""
    return torch.empty(N * C * H * W, dtype=torch.bfloat16)


def _input(buffer: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`buffer` viewed as [N, C, H, W] in the memory format, filled with the known pattern."""
    if channels_last:
        x = buffer.view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        x = buffer.view(N, C, H, W)
    sign = 1.0 - 2.0 * (torch.arange(H) % 2).to(torch.float64)  # +1, -1, +1, ... along H
    pattern = _channel_values().view(1, C, 1, 1) + sign.view(1, 1, H, 1)
    x.copy_(pattern.to(torch.bfloat16))
    assert x.numel() > 2**31
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x


def _slices(t: torch.Tensor):
    """Views at the start and at the end (past element 2**31 in both memory formats)."""
    return [t[:1, :, :2], t[-1:, :, -3:]]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float):
    ours, ref = ours.double(), ref.double()
    err = ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"rel_err {err:.3e} > {tol:.0e}"


def _vectors(n: int):
    g = torch.Generator().manual_seed(n)
    return [torch.rand(C, generator=g) + 0.5 for _ in range(n)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_reductions_beyond_2_31_elements(buffer, channels_last):
    x = _input(buffer, channels_last)
    v = _channel_values()
    half = N * H * W // 2
    hi, lo = v + 1, v - 1  # the two values of each channel, `half` times each

    # bn_stats: mean v_c and variance 1, to float32 rounding (the chunk means the two-pass
    # statistics center on are rounded to float).
    mean, var = OPS.bn_stats(x)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, v.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, torch.ones(C), rtol=1e-6, atol=0)
    mean = v.float()  # exact, for the sums below

    # bn_backward_reduce with grad = input = output: g = x where x > 0, else 0; x - mean = +-1.
    sum_dy, sum_dy_xmu = OPS.bn_backward_reduce(x, x, x, mean, True)
    assert torch.equal(sum_dy, (half * (hi * (hi > 0) + lo * (lo > 0))).float())
    assert torch.equal(sum_dy_xmu, (half * (hi * (hi > 0) - lo * (lo > 0))).float())
    sum_dy, sum_dy_xmu = OPS.bn_backward_reduce(x, x, None, mean, False)
    assert torch.equal(sum_dy, (half * (hi + lo)).float())
    assert torch.equal(sum_dy_xmu, (half * (hi - lo)).float())


# The elementwise ops share one loop skeleton per layout: bn_apply covers its NCHW path and
# bn_backward_apply its channels-last path (each output is another 4.3 GB tensor).
def test_bn_apply_beyond_2_31_elements_nchw(buffer):
    x = _input(buffer, False)
    scale, shift, rs, rsh = _vectors(4)
    out = OPS.bn_apply(x, scale, shift - 1, x, rs, rsh - 1, True)  # x is its own residual
    assert out.stride() == x.stride()
    for o, xs in zip(_slices(out), _slices(x)):
        _assert_close(o, reference.bn_apply(xs, scale, shift - 1, xs, rs, rsh - 1, True), 1e-2)


def test_bn_backward_apply_beyond_2_31_elements_channels_last(buffer):
    x = _input(buffer, True)
    mean, invstd, weight, mdy, mdx = _vectors(5)
    dx = OPS.bn_backward_apply(x, x, x, mean - 1, invstd, weight, mdy - 1, mdx - 1, True)
    assert dx.stride() == x.stride()
    for d, xs in zip(_slices(dx), _slices(x)):
        _assert_close(d, reference.bn_backward_apply(xs, xs, xs, mean - 1, invstd, weight, mdy - 1, mdx - 1,
                                                     True), 1e-2)

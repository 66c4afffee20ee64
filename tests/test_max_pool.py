"""The C++ channels-last max-pool of FoldedResNet's flat plan (``resnet_fused::max_pool2d_nhwc``,
no indices) against ATen's ``F.max_pool2d``: equal values (a max is exact), NaN and -inf included,
at the ResNet stem's configuration and odd ones; its errors; ``ops.max_pool2d_inference``'s choice
between it and the module; and the flat plan calling it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import ops

from conftest import OpLog, cpp_built

pytestmark = pytest.mark.skipif(not cpp_built(), reason="resnet_fused._C (C++ kernels) not built")

CL = torch.channels_last
OP = "resnet_fused.max_pool2d_nhwc.default"


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _special_values(x: torch.Tensor) -> torch.Tensor:
    """NaN and -inf scattered through x (NCHW order), then channels_last."""
    flat = x.reshape(-1)
    flat[::97] = float("nan")
    flat[5::31] = float("-inf")
    return flat.reshape(x.shape).contiguous(memory_format=CL)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,k,s,p", [
    ((2, 64, 56, 56), 3, 2, 1),      # ResNet stem (64 channels: whole vectors)
    ((3, 37, 9, 11), 3, 2, 1),       # channel tail, odd sizes, windows clipped at every border
    ((1, 5, 7, 7), 2, 1, 0),         # fewer channels than a vector
    ((2, 17, 8, 6), 3, 1, 1),
    ((1, 16, 5, 9), (3, 2), (2, 1), (1, 0)),  # non-square kernel, stride and padding
    ((2, 8, 1, 1), 1, 1, 0),
])
def test_matches_aten_max_pool2d(shape, k, s, p, dtype):
    x = _special_values(torch.randn(shape, dtype=dtype))
    out = torch.ops.resnet_fused.max_pool2d_nhwc(x, _pair(k), _pair(s), _pair(p))
    ref = F.max_pool2d(x, k, s, p)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert _same(out, ref)
    assert out.isnan().any()  # the NaN case was exercised


def test_all_minus_inf_window_and_nan_window():
    x = torch.full((1, 16, 4, 4), float("-inf")).contiguous(memory_format=CL)
    x[0, 3, 0, 0] = float("nan")
    out = torch.ops.resnet_fused.max_pool2d_nhwc(x, [2, 2], [2, 2], [0, 0])
    assert _same(out, F.max_pool2d(x, 2, 2, 0))
    assert out[0, 3, 0, 0].isnan() and out[0, 0, 1, 1] == float("-inf")


@pytest.mark.parametrize("bad,match", [
    (lambda: (torch.randn(2, 8, 6, 6), [3, 3], [2, 2], [1, 1]), "channels_last dense"),
    (lambda: (torch.randn(2, 8, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=CL), [3, 3], [2, 2], [1, 1]),
     "supports float32 and float64"),
    (lambda: (torch.randn(8, 6, 6), [3, 3], [2, 2], [1, 1]), "4-d"),
    (lambda: (torch.randn(2, 8, 6, 6).contiguous(memory_format=CL), [3, 3], [2, 2], [2, 2]), "half the kernel"),
    (lambda: (torch.randn(2, 8, 2, 2).contiguous(memory_format=CL), [5, 5], [1, 1], [0, 0]), "too small"),
    (lambda: (torch.randn(2, 8, 6, 6).contiguous(memory_format=CL), [3, 3], [0, 2], [1, 1]), "positive"),
])
def test_errors_name_the_problem(bad, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.resnet_fused.max_pool2d_nhwc(*bad())


def test_opcheck():
    x = torch.randn(2, 24, 9, 9).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.resnet_fused.max_pool2d_nhwc.default, (x, [3, 3], [2, 2], [1, 1]))


@pytest.mark.parametrize("case", ["stem", "nchw", "ceil_mode", "dilation", "bfloat16", "grad"])
def test_max_pool2d_inference_picks_the_kernel_only_where_it_applies(case):
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 16, 12, 12)
    if case == "ceil_mode":
        pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    elif case == "dilation":
        pool = nn.MaxPool2d(3, 2, 1, dilation=2)
    elif case == "bfloat16":
        x = x.to(torch.bfloat16)
    if case != "nchw":
        x = x.contiguous(memory_format=CL)
    if case == "grad":
        x.requires_grad_(True)
    log = OpLog()
    with log.mode:
        out = ops.max_pool2d_inference(x, pool)
    assert log.count(OP) == (1 if case == "stem" else 0)
    assert _same(out.detach(), pool(x).detach())
    if case == "grad":
        out.sum().backward()  # the module path: differentiable
        assert x.grad is not None


def test_the_flat_plan_uses_the_kernel():
    """(torch.profiler, not a dispatch mode: the flat plan's oneDNN path does not run under one.)"""
    model = torchvision.models.resnet18().eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded(x)  # builds the plan (which sizes the max-pool's output on a meta tensor)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = folded(x)
    assert "_flat_plans" in folded.__dict__
    names = [e.key for e in prof.key_averages()]
    assert "resnet_fused::max_pool2d_nhwc" in names and "aten::max_pool2d_with_indices" not in names
    with torch.no_grad():
        assert (out - model(x)).norm() / model(x).norm() <= 1e-5

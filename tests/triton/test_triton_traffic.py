"""The ``triton`` plan of the GPU memory-traffic model (bench/traffic_model.py) against what the
fused blocks really launch on the triton backend, counted at the dispatcher (interpreter: CPU
tensors, the same ops as on a GPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.resnet import conv1x1

import resnet_fused
from bench import traffic_model as tm


@pytest.mark.parametrize("kind", ["basic", "bottleneck_downsample"])
def test_triton_plan_matches_the_units(T, kind):
    if kind == "basic":
        block, x = resnet_fused.FusedBasicBlock(8, 8), torch.randn(2, 8, 5, 5)
    else:
        ds = torch.nn.Sequential(conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
        block, x = resnet_fused.FusedBottleneck(8, 4, stride=2, downsample=ds), torch.randn(2, 8, 7, 7)
    block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with resnet_fused.use_backend("triton"):
        measured = tm.measured_elements(block.train(), x)
    probe, shapes = copy.deepcopy(block), {}
    for c in ("conv1", "conv2", "conv3"):
        if hasattr(probe, c):
            getattr(probe, c).register_forward_hook(lambda m, i, o, c=c: shapes.__setitem__(c, o.numel()))
    if probe.downsample is not None:
        probe.downsample[0].register_forward_hook(lambda m, i, o: shapes.__setitem__("ds", o.numel()))
    probe(x)  # hooks: torchvision's unfused path, only for the shapes
    ys = [shapes[c] for c in ("conv1", "conv2", "conv3") if c in shapes]
    b = tm.BlockShapes("b", x.numel(), ys, shapes.get("ds", 0))
    assert measured == tm.BLOCK_RULES["train"]["triton"](b)
    assert measured < tm.BLOCK_RULES["train"]["fused"](b)


def test_triton_stem_plan_matches_the_unit(T):
    """The stem row of the ``triton`` plan: statistics from the Triton stem conv's epilogue (no
    bn_stats pass), then units.bn_relu, as FusedResNet launches it."""
    import torchvision

    model = resnet_fused.swap_blocks(torchvision.models.resnet18(num_classes=10)).train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with resnet_fused.use_backend("triton"):
        measured = tm.measured_elements(model._fused_stem, x)
    s = tm.StemShapes("stem", 2 * 64 * 4 * 4)
    assert measured == tm.STEM_RULES["train"]["triton"](s)
    assert measured < tm.STEM_RULES["train"]["fused"](s)

"""The GPU memory-traffic model (bench/traffic_model.py): hand counts, shapes, and its ``fused`` plan
against what the autograd units really launch (counted at the dispatcher)."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.resnet import conv1x1

import resnet_fused
from bench import traffic_model as tm


def test_hand_counts_basic_block():
    # a BasicBlock whose tensors all hold S elements: see the pass lists in the module docstring
    b = tm.BlockShapes("b", 1, [1, 1])
    train = {p: rule(b) for p, rule in tm.BLOCK_RULES["train"].items()}
    assert train == {"eager": 32, "fused": 25, "triton": 21, "triton_end_mask": 20,
                     "triton_conv_backward": 16}
    infer = {p: rule(b) for p, rule in tm.BLOCK_RULES["infer"].items()}
    assert infer == {"eager": 11, "folded_triton": 1}


def test_hand_counts_stem():
    # the stem conv's output holds S = 1 element: see the stem paragraph of the module docstring
    s = tm.StemShapes("stem", 1)
    train = {p: rule(s) for p, rule in tm.STEM_RULES["train"].items()}
    assert train == {"eager": 13, "fused": 8, "triton": 7, "triton_end_mask": 7,
                     "triton_conv_backward": 7}
    assert list(tm.STEM_RULES["train"]) == list(tm.BLOCK_RULES["train"])  # every plan has a stem row
    infer = {p: rule(s) for p, rule in tm.STEM_RULES["infer"].items()}
    assert infer == {"eager": 4, "folded_triton": 0}


def test_hand_counts_downsample_bottleneck():
    # x: 4 elements, inner convs 1 each, last conv and downsample 2 each
    b = tm.BlockShapes("b", 4, [1, 1, 2], y_ds=2)
    eager = (5 + 5) + (8 * 2) + 3 * 2 + (8 + 8) + (8 * 2 + 5 * 2) + 3 * 4
    assert tm.BLOCK_RULES["train"]["eager"](b) == eager


def test_shapes_from_resnet18():
    with torch.device("meta"):
        import torchvision
        model = torchvision.models.resnet18()
    stem, blocks = tm.collect_shapes(model, batch=2, size=64)
    assert stem.y == 2 * 64 * 32 * 32
    assert [b.name for b in blocks][:3] == ["layer1.0", "layer1.1", "layer2.0"]
    l1, l2 = blocks[0], blocks[2]
    assert (l1.x, l1.ys, l1.y_ds) == (2 * 64 * 16 * 16, [2 * 64 * 16 * 16] * 2, 0)
    assert (l2.x, l2.ys, l2.y_ds) == (2 * 64 * 16 * 16, [2 * 128 * 8 * 8] * 2, 2 * 128 * 8 * 8)
    assert (l1.x_grid, l2.x_grid) == (0, 2 * 64 * 8 * 8)   # layer2.0's downsample: 1x1, stride 2


def test_fused_cpu_plan_differs_only_for_strided_downsamples():
    plain = tm.BlockShapes("b", 4, [1, 1, 2], y_ds=2)
    assert tm.fused_cpu_train(plain) == tm.BLOCK_RULES["train"]["fused"](plain)
    strided = tm.BlockShapes("b", 4, [1, 1, 2], y_ds=2, x_grid=1)
    # the full-size accumulation (3 x 4) becomes the in-place add on the grid (3 x 1)
    assert tm.fused_cpu_train(strided) == tm.BLOCK_RULES["train"]["fused"](strided) - 12 + 3


@pytest.mark.parametrize("kind", ["basic", "bottleneck_downsample"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("strided_downsample", [False, True], ids=["gpu_plan", "cpu_plan"])
def test_fused_plan_matches_the_units(kind, channels_last, strided_downsample, monkeypatch):
    """``fused`` (the GPU plan) against the blocks with the CPU-only strided-downsample unit off;
    ``fused_cpu_train`` against the blocks as they run here."""
    if not strided_downsample:
        monkeypatch.setattr(resnet_fused.units, "strided_downsample_applies", lambda *a: False)
    if kind == "basic":
        block, x = resnet_fused.FusedBasicBlock(16, 16), torch.randn(3, 16, 9, 9)
    else:
        ds = torch.nn.Sequential(conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32))
        block, x = resnet_fused.FusedBottleneck(16, 8, stride=2, downsample=ds), torch.randn(3, 16, 9, 9)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert block.fused_supported()
    measured = tm.measured_elements(block.train(), x)
    # shapes from a copy: hooks on inner modules send a block down torchvision's unfused path
    probe, shapes = copy.deepcopy(block), {"x_grid": 0}
    for c in ("conv1", "conv2", "conv3"):
        if hasattr(probe, c):
            getattr(probe, c).register_forward_hook(lambda m, i, o, c=c: shapes.__setitem__(c, o.numel()))
    if probe.downsample is not None:
        def ds_hook(m, i, o):
            shapes["ds"] = o.numel()
            shapes["x_grid"] = i[0].shape[0] * i[0].shape[1] * o.shape[2] * o.shape[3]
        probe.downsample[0].register_forward_hook(ds_hook)
    probe(x)
    ys = [shapes[c] for c in ("conv1", "conv2", "conv3") if c in shapes]
    shape = tm.BlockShapes("b", x.numel(), ys, shapes.get("ds", 0), shapes["x_grid"])
    rule = tm.fused_cpu_train if strided_downsample else tm.BLOCK_RULES["train"]["fused"]
    assert measured == rule(shape)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_stem_plan_matches_the_unit(channels_last):
    """The stem row of the ``fused`` plan against what FusedResNet's stem (conv1 + units.bn_relu,
    up to the max-pool) really launches."""
    import torchvision

    model = resnet_fused.swap_blocks(torchvision.models.resnet18(num_classes=10)).train()
    x = torch.randn(2, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert model.fused_supported()
    measured = tm.measured_elements(model._fused_stem, x)
    assert measured == tm.STEM_RULES["train"]["fused"](tm.StemShapes("stem", 2 * 64 * 8 * 8))
    assert measured < tm.STEM_RULES["train"]["eager"](tm.StemShapes("stem", 2 * 64 * 8 * 8))


def test_cli_prints_model_ratios(capsys):
    assert tm.main(["--model", "resnet18", "--batch", "2", "--size", "64", "--mode", "both"]) == 0
    out = capsys.readouterr().out
    assert "triton_conv_backward" in out and "folded_triton" in out and "model" in out


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown torchvision ResNet"):
        tm.traffic("vgg11", 2, 64, "train")

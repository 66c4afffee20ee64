"""A block's first conv and its strided 1x1 downsample conv as one autograd node
(units.conv_and_strided_downsample): the downsample's input gradient is computed on the stride grid
and added into conv1's input gradient there. Checked against ATen's convolutions (float64
gradcheck, float32 parity against the two separate convs), inside the fused blocks (the op log
shows no full-size strided input gradient) and where it must not apply (hooks, autocast, no grad,
unit stride)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnet_fused
from resnet_fused import units

from conftest import OpLog, TOL_GRAD, rel_err, standard_downsample

CL = torch.channels_last
CONV_BWD = "aten.convolution_backward.default"


def _convs(cin, c1, cds, stride, k1=3, groups=1, dtype=torch.float32):
    conv1 = nn.Conv2d(cin, c1, k1, stride=stride, padding=k1 // 2, bias=False, groups=groups).to(dtype)
    ds = nn.Conv2d(cin, cds, 1, stride=stride, bias=False, groups=groups).to(dtype)
    return conv1, ds


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("stride,hw,groups", [(2, (7, 9), 1), ((2, 3), (8, 7), 1), (3, (5, 5), 2)])
def test_gradcheck_float64(stride, hw, groups, memory_format):
    conv1, ds = _convs(4, 6, 8, stride, groups=groups, dtype=torch.float64)
    x = torch.randn(2, 4, *hw, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w1 = conv1.weight.detach().clone().requires_grad_()
    wds = ds.weight.detach().clone().requires_grad_()
    fn = lambda x, w1, wds: units.conv_and_strided_downsample(x, conv1, w1, ds, wds)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, wds))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("needs", ["all", "weights_only", "input_only"])
def test_matches_two_separate_convs(memory_format, needs):
    conv1, ds = _convs(16, 8, 32, 2, k1=1)
    x = torch.randn(3, 16, 11, 13).contiguous(memory_format=memory_format)
    for p in (conv1.weight, ds.weight):
        p.requires_grad_(needs != "input_only")
    g1, gds = torch.randn(3, 8, 6, 7), torch.randn(3, 32, 6, 7)

    xr = x.clone().requires_grad_(needs != "weights_only")
    F.conv2d(xr, conv1.weight, None, 2).backward(g1, retain_graph=False)
    F.conv2d(xr, ds.weight, None, 2).backward(gds)
    ref = {"x": xr.grad, "w1": conv1.weight.grad, "wds": ds.weight.grad}
    conv1.weight.grad = ds.weight.grad = None

    xf = x.clone().requires_grad_(needs != "weights_only")
    y1, y_ds = units.conv_and_strided_downsample(xf, conv1, conv1.weight, ds, ds.weight)
    assert y_ds.is_contiguous(memory_format=memory_format)
    torch.autograd.backward([y1, y_ds], [g1, gds])
    got = {"x": xf.grad, "w1": conv1.weight.grad, "wds": ds.weight.grad}
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, name
            continue
        assert rel_err(got[name], ref[name]) <= 1e-6, name
    if needs != "weights_only":
        assert xf.grad.is_contiguous(memory_format=memory_format)


def _stage_entry_block(kind="bottleneck"):
    if kind == "basic":
        block = BasicBlock(8, 16, stride=2, downsample=standard_downsample(8, 16, 2))
    else:
        block = Bottleneck(16, 8, stride=2, downsample=standard_downsample(16, 32, 2))
    return resnet_fused.swap_blocks(block)


def _strided_input_grads(log: OpLog) -> int:
    """convolution_backward calls that compute an input gradient of a strided 1x1 conv."""
    def strided_1x1_input_grad(args):
        weight, stride, mask = args[2], args[4], args[10]
        return tuple(weight.shape[2:]) == (1, 1) and list(stride) != [1, 1] and mask[0]
    return log.count(CONV_BWD, strided_1x1_input_grad)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_block_takes_the_grid_gradient(kind):
    block = _stage_entry_block(kind).train()
    x = torch.randn(2, block.conv1.in_channels, 9, 11, requires_grad=True)
    log = OpLog()
    with log.mode:
        block(x).sum().backward()
    assert _strided_input_grads(log) == 0
    # the downsample's input gradient on its grid: a 1x1 stride-1 input-gradient call
    grid_input = (block.conv1.in_channels, 5, 6)
    assert log.count(CONV_BWD, lambda a: tuple(a[2].shape[2:]) == (1, 1) and list(a[4]) == [1, 1]
                     and a[10][0] and tuple(a[1].shape[1:]) == grid_input) == 1


def test_not_applied_with_hooks_autocast_or_without_grad():
    block = _stage_entry_block().train()
    x = torch.randn(2, 16, 9, 11, requires_grad=True)
    # a forward hook on the downsample conv: it must run as a module call (and see its output)
    seen = []
    handle = block.downsample[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    log = OpLog()
    with log.mode:
        block(x).sum().backward()
    handle.remove()
    assert seen == [torch.Size([2, 32, 5, 6])]
    assert _strided_input_grads(log) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not block._strided_downsample(x, block.downsample[0])
    with torch.no_grad():
        assert not block._strided_downsample(x, block.downsample[0])
    assert block._strided_downsample(x, block.downsample[0])
    unit_stride = resnet_fused.swap_blocks(
        Bottleneck(16, 8, downsample=standard_downsample(16, 32, 1)))
    assert not unit_stride._strided_downsample(x, unit_stride.downsample[0])

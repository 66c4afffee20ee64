"""The fused ResNet stem on the Triton backend: the stem conv is the Triton conv whose epilogue
gives ``bn1``'s statistics (no ``bn_stats`` pass), then ``units.bn_relu``; parity of a swapped
ResNet against torchvision over 3 SGD steps in training (outputs, input and every parameter
gradient, running statistics), then eval mode. Small shapes: the interpreter is slow.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, ResNet

from conftest import (OpLog, DEVICE, TOL_NET_GRAD, TOL_NET_OUT, compare_buffers, compare_grads, randomize_bn,
                      rel_err)

import resnet_fused
from resnet_fused import FusedResNet, sync_bn, triton_units

CL = torch.channels_last
TRITON_CONV = "resnet_fused_triton.conv2d_bn_stats.default"


def _resnet(num_classes=10):
    """ResNet with one BasicBlock per stage, random BN affine parameters and running statistics;
    residual BN weights zero and frozen (torchvision's zero_init_residual, kept through the SGD
    steps: the well-conditioned network of tests/test_stem.py's parity, which says why)."""
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, BasicBlock):
                block.bn2.weight.zero_()
                block.bn2.weight.requires_grad_(False)
    return model


def test_stem_statistics_come_from_the_conv_epilogue(T):
    model = resnet_fused.swap_blocks(_resnet()).to(DEVICE).train()
    assert type(model) is FusedResNet and model.fused_supported()
    x = torch.randn(2, 3, 16, 16, device=DEVICE, requires_grad=True)
    fwd, bwd = OpLog(), OpLog()
    with resnet_fused.use_backend("triton"):
        assert triton_units.stem_applies(model, x)
        with fwd.mode:
            a = model._fused_stem(x)
        with bwd.mode:
            a.backward(torch.randn_like(a))
    names = fwd.names() + bwd.names()
    # forward: one Triton conv on the image (no prologue) and one apply with the ReLU
    assert fwd.names().count(TRITON_CONV) == 1
    conv_args = next(a for f, a in fwd.calls if f == TRITON_CONV)
    assert conv_args[0] is x and conv_args[2] is None and conv_args[4] is False
    assert fwd.names().count("resnet_fused_triton.bn_apply.default") == 1
    assert not any("bn_stats" in n and n != TRITON_CONV for n in names), names
    assert "aten.convolution.default" not in fwd.names()
    # backward: ATen's conv backward, the BN backward primitives masked with the saved output
    assert bwd.names().count("aten.convolution_backward.default") == 1
    assert bwd.names().count("resnet_fused_triton.bn_backward_reduce.default") == 1
    assert bwd.names().count("resnet_fused_triton.bn_backward_apply.default") == 1
    assert not any("threshold" in n for n in names), names
    assert not any(n.startswith("resnet_fused.") for n in names), names  # no C++ op here
    assert x.grad is not None and model.conv1.weight.grad is not None and model.bn1.weight.grad is not None
    # and the whole model's forward: no bn_stats anywhere (stem and blocks take their epilogues)
    log = OpLog()
    with resnet_fused.use_backend("triton"), log.mode:
        model(x)
    assert not any("bn_stats" in n and n != TRITON_CONV for n in log.names())
    assert log.names().count(TRITON_CONV) == 1 + 4 * 2 + 3  # stem, two convs a block, 3 downsamples


def test_stem_takes_the_units_path_where_the_epilogue_does_not_apply(T, monkeypatch):
    """Other backends, autocast, synchronized statistics, another weight dtype: ATen's conv and
    bn_stats (the units' path)."""
    model = resnet_fused.swap_blocks(_resnet()).to(DEVICE).train()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with resnet_fused.use_backend("triton"):
        assert triton_units.stem_applies(model, x)
        assert not triton_units.stem_applies(model, x.to(torch.bfloat16))  # float32 conv weight
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert not triton_units.stem_applies(model, x)
        with monkeypatch.context() as m:
            m.setattr(sync_bn, "sync_world_size", lambda bn, device=None: 2)
            assert not triton_units.stem_applies(model, x)
    with resnet_fused.use_backend("reference"):
        assert not triton_units.stem_applies(model, x)
        log = OpLog()
        with log.mode:
            model._fused_stem(x)
        assert TRITON_CONV not in log.names() and "aten.convolution.default" in log.names()


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_swapped_resnet_parity_on_triton(T, ieee_fp32, fmt):
    """3 SGD steps in training (each from the same state, as tests/test_blocks.py does), then
    eval mode: outputs, input and every parameter gradient, running statistics."""
    ref = _resnet().to(DEVICE)
    if fmt is CL:
        ref = ref.to(memory_format=CL)
    fused = resnet_fused.swap_blocks(copy.deepcopy(ref))
    assert type(fused) is FusedResNet and fused.fused_supported()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)

    def draw():
        # 48x48: layer4 sees 2x2 pixels, 8 values per BN channel; at 32x32 it sees 2 values per
        # channel, and gradients through such BNs differ by up to 4e-4 between two float32
        # implementations (measured: Triton vs ATen convs, with or without the fused stem)
        x = torch.randn(2, 3, 48, 48, device=DEVICE)
        return x if fmt is None else x.contiguous(memory_format=CL)

    with resnet_fused.use_backend("triton"):
        ref.train()
        fused.train()
        for step in range(3):
            what = f"step {step}: "
            x = draw()
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            log = OpLog()
            out_r = ref(xr)
            with log.mode:
                out_f = fused(xf)
            assert log.names()[0] == TRITON_CONV, f"{what}the stem conv is not the Triton conv"
            err = rel_err(out_f, out_r)
            assert err <= TOL_NET_OUT, f"{what}output rel_err {err:.3g}"
            target = torch.randint(0, 10, (2,), device=DEVICE)
            F.cross_entropy(out_r, target).backward()
            F.cross_entropy(out_f, target).backward()
            err = rel_err(xf.grad, xr.grad)
            assert err <= TOL_NET_GRAD, f"{what}input grad rel_err {err:.3g}"
            compare_grads(ref, fused, TOL_NET_GRAD, what)
            for opt in (opt_r, opt_f):
                opt.step()
                opt.zero_grad()
            compare_buffers(ref, fused, TOL_NET_OUT, what)
            assert fused.bn1.num_batches_tracked.item() == step + 1
            fused.load_state_dict(ref.state_dict())
            opt_f.load_state_dict(opt_r.state_dict())
        ref.eval()
        fused.eval()
        with torch.no_grad():
            x = draw()
            err = rel_err(fused(x), ref(x))
            assert err <= TOL_NET_OUT, f"eval: output rel_err {err:.3g}"

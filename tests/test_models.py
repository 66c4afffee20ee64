"""resnet_fused.models: torchvision's builders with fused blocks, checkpoints both ways."""
import inspect

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import FusedBasicBlock, FusedBottleneck, models


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", models.__all__)
def test_builder_matches_torchvision(name):
    torch.manual_seed(0)
    ours = getattr(models, name)()
    theirs = getattr(torchvision.models, name)()
    assert inspect.signature(getattr(models, name)) == inspect.signature(getattr(torchvision.models, name))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    blocks = [m for m in ours.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                         torchvision.models.resnet.Bottleneck))]
    assert blocks and all(isinstance(b, (FusedBasicBlock, FusedBottleneck)) for b in blocks)
    # checkpoints load both ways with strict=True, and the outputs agree
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if name in ("resnet18", "resnet50", "resnext50_32x4d"):
        ours.eval(), theirs.eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(ours(x), theirs(x)) <= 5e-5


def test_builder_passes_kwargs():
    model = models.resnet18(num_classes=7, zero_init_residual=True)
    assert model.fc.out_features == 7
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0

"""Block level: one torchvision BasicBlock / Bottleneck vs its fused copy vs its limit (no BN,
no ReLU), training step and eval forward. Commands and settings: see bench/conftest.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_fused import benchmarking as bm

KINDS = ("basic", "bottleneck")


def _block(kind: str, shape) -> nn.Module:
    """An identity-shortcut block for an input of ``shape``: BasicBlock(C, C), or the
    Bottleneck(C, C/4) of ResNet-50's layer1 (C = 256), with non-trivial BatchNorm state."""
    channels = shape[1]
    if kind == "basic":
        block = BasicBlock(channels, channels)
    else:
        block = Bottleneck(channels, channels // 4)
    bm.randomize_bn_affine(block)
    return bm.warm_running_stats(block, torch.empty(shape))


def _input(kind: str, settings):
    shape = settings.basic if kind == "basic" else settings.bottleneck
    return _block(kind, shape), torch.randn(shape)


def _grouped(mode: str):
    """One pytest-benchmark group per block kind and mode: ``<kind> block <mode>``."""
    return [pytest.param(kind, id=kind, marks=pytest.mark.benchmark(group=f"{kind} block {mode}"))
            for kind in KINDS]


@pytest.mark.parametrize("kind", _grouped("train step"))
def test_block_train(compare, settings, kind):
    block, x = _input(kind, settings)
    weights = torch.randn(x.shape)  # a fixed random output gradient: no symmetric special case
    results = compare(block, x, "train", loss=lambda out: (out * weights).sum())
    assert all(r.median > 0 for r in results.values())


@pytest.mark.parametrize("kind", _grouped("eval forward"))
def test_block_infer(compare, settings, kind):
    block, x = _input(kind, settings)
    results = compare(block, x, "infer")
    assert all(r.median > 0 for r in results.values())

"""Model level: a torchvision ResNet (random weights) vs its fused copy vs its limit model,
training step (cross-entropy on random labels) and eval forward. Commands and settings: see
bench/conftest.py."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch.nn import functional as F

from resnet_fused import benchmarking as bm

# read at collection, as parametrization needs it (see RESNET_FUSED_BENCH_MODELS in conftest.py)
MODELS = os.environ.get("RESNET_FUSED_BENCH_MODELS", "resnet18").split(",")


def _model_and_input(name: str, settings):
    batch, size = settings.model
    x = torch.randn(batch, 3, size, size)
    model = bm.randomize_bn_affine(getattr(torchvision.models, name)(weights=None))
    return bm.warm_running_stats(model, x), x


def _grouped(mode: str):
    """One pytest-benchmark group per model and mode: ``<model> <mode>``."""
    return [pytest.param(name, id=name, marks=pytest.mark.benchmark(group=f"{name} {mode}"))
            for name in MODELS]


@pytest.mark.parametrize("name", _grouped("train step"))
def test_model_train(compare, settings, name):
    model, x = _model_and_input(name, settings)
    labels = torch.randint(0, 1000, (x.shape[0],))
    results = compare(model, x, "train", loss=lambda out: F.cross_entropy(out, labels))
    assert all(r.median > 0 for r in results.values())


@pytest.mark.parametrize("name", _grouped("eval forward"))
def test_model_infer(compare, settings, name):
    model, x = _model_and_input(name, settings)
    results = compare(model, x, "infer")
    assert all(r.median > 0 for r in results.values())

"""ResNet training step, both memory formats: eager vs fused vs limit (vs torch.compile), the
headroom share and the saved-bytes ratio of issue 3, through bench/train_step_bench.py.

Smoke run (``--benchmark-disable``): resnet18 at batch 2, 32x32, one round, no compile peer (compiling
resnet50 forward+backward takes minutes on a small CPU; resnet50's first calls alone take a minute on
a busy 2-core machine). Measured run: resnet50, batch x size from
RESNET_FUSED_BENCH_TRAIN_STEP (default 8x224), the compile peer unless
RESNET_FUSED_BENCH_COMPILE=0; rounds, warmup and threads as in bench/conftest.py. Every number is
in ``extra_info``; the full report is printed (``-s`` shows it)."""
from __future__ import annotations

import os

import pytest

from bench import train_step_bench as tsb

from .conftest import _shape


@pytest.mark.benchmark(group="train step (both layouts)")
@pytest.mark.parametrize("layout", sorted(tsb.LAYOUTS))
def test_train_step(benchmark, settings, layout):
    if benchmark.disabled:
        model, batch, size, compile_peer = "resnet18", 2, 32, False
    else:
        model = "resnet50"
        batch, size = _shape("RESNET_FUSED_BENCH_TRAIN_STEP", "8x224")
        compile_peer = os.environ.get("RESNET_FUSED_BENCH_COMPILE", "1") != "0"
    rec = benchmark.pedantic(tsb.measure, kwargs=dict(
        model_name=model, batch=batch, size=size, layout=layout, rounds=settings.rounds,
        warmup=settings.warmup, threads=settings.threads, compile_peer=compile_peer),
        rounds=1, iterations=1)
    print(tsb.report(rec))
    benchmark.extra_info.update({k: v for k, v in rec.items() if k != "times_s"})
    assert set(rec["median_s"]) >= {"eager", "fused", "limit"}
    assert all(t > 0 for t in rec["median_s"].values())
    assert rec["saved_bytes"]["fused"] > 0

"""Inference (issue 4): the BatchNorm-folded model against the strongest PyTorch peer, and the two
paths of the folded blocks against each other. Commands and shared settings: bench/conftest.py.

* ``test_folded_vs_peers``: torchvision eager (NCHW and a channels_last copy), ``fold_bn`` (oneDNN
  fused post-ops on pre-packed weights), ``torch.compile`` with inductor freezing on a
  channels_last copy, ONNX Runtime CPU when the extra ``onnx`` is installed (absent otherwise,
  said in ``extra_info["onnxruntime"]``), and the conv-only limit on the folded path (bias and ReLU
  taken out, same pre-packed convolutions). ``extra_info["folded_vs_compile"]`` is the target
  ratio (>= 1.0: the folded model at least as fast as compile-freezing).
* ``test_folded_paths``: the same folded model on its two paths: oneDNN post-ops on pre-packed
  weights vs the public ATen path (``conv2d`` with bias, then add and ReLU in place).
  ``extra_info["prepacked_vs_public"]`` > 1 means the pre-packed path wins.

Default: ResNet-50, float32, 224x224, batch 1 and batch 8 (issue 4). Settings:

    RESNET_FUSED_BENCH_INFER_MODEL    torchvision model (default resnet50)
    RESNET_FUSED_BENCH_INFER_BATCHES  comma-separated batch sizes (default 1,8)
    RESNET_FUSED_BENCH_INFER_SIZE     input height and width (default 224)

e.g. ``python -m pytest bench/test_inference_bench.py --benchmark-save=infer``. The smoke run
(``--benchmark-disable``) uses resnet18 at 32x32, batch 1, and leaves torch.compile out (compiling
takes about a minute on a 2-core CPU); set ``RESNET_FUSED_BENCH_SMOKE_COMPILE=1`` to include it.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused import benchmarking as bm

# read at collection, as parametrization and groups need them
MODEL = os.environ.get("RESNET_FUSED_BENCH_INFER_MODEL", "resnet50")
BATCHES = [int(b) for b in os.environ.get("RESNET_FUSED_BENCH_INFER_BATCHES", "1,8").split(",")]
SIZE = int(os.environ.get("RESNET_FUSED_BENCH_INFER_SIZE", "224"))


def _setup(benchmark, batch):
    """(model name, eval model, folded model, input) at the run's shapes, or the smoke's."""
    smoke = benchmark.disabled
    name, size, batch = ("resnet18", 32, 1) if smoke else (MODEL, SIZE, batch)
    x = torch.randn(batch, 3, size, size)
    model = bm.randomize_bn_affine(getattr(torchvision.models, name)(weights=None))
    bm.warm_running_stats(model, torch.randn(max(batch, 2), 3, size, size))
    model.eval()
    return name, model, resnet_fused.fold_bn(model), x


def _record(info, results, x, parity, settings, name, onednn):
    for variant, r in results.items():
        info[f"{variant}_median_s"] = r.median
        info[f"{variant}_iqr_s"] = r.iqr
        info[f"{variant}_images_per_s"] = x.shape[0] / r.median
    for variant, p in parity.items():
        info[f"{variant}_rel_err"] = p
    info.update(model=name, shape=list(x.shape), dtype="float32", threads=settings.threads,
                rounds=settings.rounds, warmup=settings.warmup,
                folded_path="oneDNN post-ops, pre-packed" if onednn else "aten conv+bias")


def _onednn(folded, x) -> bool:
    with torch.no_grad():
        return resnet_fused.ops._mkldnn_eligible(x, folded.conv1.weight, None)


def _grouped(what: str):
    """One pytest-benchmark group per model, shape and comparison."""
    return [pytest.param(b, id=f"batch{b}", marks=pytest.mark.benchmark(
        group=f"{MODEL} eval forward {SIZE}x{SIZE} batch {b}: {what}")) for b in BATCHES]


@pytest.mark.parametrize("batch", _grouped("folded vs peers"))
def test_folded_vs_peers(benchmark, settings, batch):
    name, model, folded, x = _setup(benchmark, batch)
    variants = {"torchvision": model,
                "torchvision-cl": copy.deepcopy(model).to(
                    memory_format=torch.channels_last),
                "folded": folded}
    with_compile = not benchmark.disabled or os.environ.get("RESNET_FUSED_BENCH_SMOKE_COMPILE")
    if with_compile:
        variants["compile-freeze"], _ = bm.compile_frozen(model)
        with torch.no_grad():
            variants["compile-freeze"](x)  # compiles: outside the timed rounds
    try:
        variants["onnxruntime"] = bm.onnxruntime_model(model, x, settings.threads)
        benchmark.extra_info["onnxruntime"] = variants["onnxruntime"].description
    except ImportError as exc:
        benchmark.extra_info["onnxruntime"] = f"skipped: {exc.name} not installed (extra 'onnx')"
    variants["limit-folded"] = bm.limit_model(folded)
    parity = {n: bm.infer_parity(model, m, x).output for n, m in variants.items()
              if n not in ("torchvision", "limit-folded")}
    calls = {n: bm.infer_forward(m, x) for n, m in variants.items()}
    results = benchmark.pedantic(bm.interleaved, args=(calls, settings.rounds, settings.warmup),
                                 rounds=1, iterations=1)
    info = benchmark.extra_info
    _record(info, results, x, parity, settings, name, _onednn(folded, x))
    t = {n: r.median for n, r in results.items()}
    info["speedup"] = t["torchvision"] / t["folded"]
    info["headroom"] = bm.headroom_share(t["torchvision"], t["folded"], t["limit-folded"])
    if "compile-freeze" in t:
        info["folded_vs_compile"] = t["compile-freeze"] / t["folded"]
    assert parity["folded"] <= 1e-5
    assert all(r.median > 0 for r in results.values())


@pytest.mark.parametrize("batch", _grouped("folded paths"))
def test_folded_paths(benchmark, settings, batch):
    name, model, folded, x = _setup(benchmark, batch)
    onednn = _onednn(folded, x)
    if not onednn:
        pytest.skip("oneDNN is not available here: the folded model has only the public path")
    variants = {"folded": folded, "folded-aten": bm.PublicPath(folded),
                "limit-folded": bm.limit_model(folded)}
    parity = {n: bm.infer_parity(model, variants[n], x).output for n in ("folded", "folded-aten")}
    calls = {n: bm.infer_forward(m, x) for n, m in variants.items()}
    results = benchmark.pedantic(bm.interleaved, args=(calls, settings.rounds, settings.warmup),
                                 rounds=1, iterations=1)
    info = benchmark.extra_info
    _record(info, results, x, parity, settings, name, onednn)
    info["prepacked_vs_public"] = results["folded-aten"].median / results["folded"].median
    assert max(parity.values()) <= 1e-5
    assert all(r.median > 0 for r in results.values())

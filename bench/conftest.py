"""pytest-benchmark suites of resnet_fused: torchvision vs fused blocks vs the limit model.

pytest-benchmark times a test's rounds back to back and cannot interleave variants, so each test
makes ONE ``benchmark.pedantic`` call around :func:`resnet_fused.benchmarking.interleaved`, which
runs torchvision / fused / limit as A B C, B C A, ... per round. The numbers to read are in each
test's ``extra_info``: per-variant medians (``<variant>_images_per_s``, ``<variant>_median_s``),
``speedup`` (torchvision / fused), ``headroom`` (share of the gain to the limit model captured),
``rel_err`` / ``grad_rel_err`` (fused vs torchvision), ``backend`` and the settings. The time
pytest-benchmark itself records is that of the whole interleaved call (all variants together).

Inference against torch.compile with freezing, ONNX Runtime and the folded model's two paths
(issue 4) is in ``test_inference_bench.py``, with its own settings (see there).

Commands (from the repository root; bench/ is not in the default ``testpaths``)::

    python -m pytest bench/ --benchmark-disable -q         # smoke: tiny shapes, one round each
    python -m pytest bench/ --benchmark-save=NAME          # measure; saved under .benchmarks/
    python -m pytest bench/ --benchmark-compare=NAME --benchmark-compare-fail=median:10%
    python -m pytest bench/ --benchmark-json=out.json      # extra_info included per test

``--benchmark-compare`` without NAME compares with the latest saved run; ``compare-fail`` fails
when the interleaved call got slower by more than 10%.

Settings (environment variables, read when a run starts; ignored in the smoke run):

    RESNET_FUSED_BENCH_THREADS     torch.set_num_threads for every test (default 2)
    RESNET_FUSED_BENCH_ROUNDS      timed rounds per comparison (default 10)
    RESNET_FUSED_BENCH_WARMUP      untimed rounds first (default 1)
    RESNET_FUSED_BENCH_BASIC       BasicBlock input NxCxHxW (default 8x64x56x56: resnet18 layer1)
    RESNET_FUSED_BENCH_BOTTLENECK  Bottleneck input NxCxHxW, planes C/4 (default 8x256x28x28,
                                   ResNet-50 layer1 at 112x112 input; 8x256x56x56 is the 224 one)
    RESNET_FUSED_BENCH_MODEL       model input NxS, i.e. batch x size (default 8x112)
    RESNET_FUSED_BENCH_MODELS      comma-separated torchvision models (default resnet18)
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import resnet_fused
from resnet_fused import benchmarking as bm

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Settings:
    threads: int
    rounds: int
    warmup: int
    basic: Shape
    bottleneck: Shape
    model: Shape  # (batch, size)


_SMOKE = Settings(threads=2, rounds=1, warmup=0, basic=(2, 16, 8, 8), bottleneck=(2, 64, 8, 8),
                  model=(2, 64))


def _shape(name: str, default: str) -> Shape:
    text = os.environ.get(name, default)
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise pytest.UsageError(f"{name}={text!r}: expected sizes joined by 'x', "
                                f"e.g. {default}") from None


def _from_env() -> Settings:
    return Settings(
        threads=int(os.environ.get("RESNET_FUSED_BENCH_THREADS", "2")),
        rounds=int(os.environ.get("RESNET_FUSED_BENCH_ROUNDS", "10")),
        warmup=int(os.environ.get("RESNET_FUSED_BENCH_WARMUP", "1")),
        basic=_shape("RESNET_FUSED_BENCH_BASIC", "8x64x56x56"),
        bottleneck=_shape("RESNET_FUSED_BENCH_BOTTLENECK", "8x256x28x28"),
        model=_shape("RESNET_FUSED_BENCH_MODEL", "8x112"),
    )


@pytest.fixture
def settings(benchmark) -> Settings:
    """Tiny shapes and one round when benchmarks are disabled (the smoke run), else the env's."""
    return _SMOKE if benchmark.disabled else _from_env()


@pytest.fixture(autouse=True)
def _fixed_threads_and_seed(settings):
    """One thread count for every comparison (results are per thread count) and fixed inputs."""
    torch.manual_seed(0)
    with bm.fixed_threads(settings.threads):
        yield


@pytest.fixture
def compare(benchmark, settings) -> Callable[..., Dict[str, bm.TimingResult]]:
    """``compare(model, x, mode, loss)``: torchvision ``model`` vs its fused copy vs its limit
    model, interleaved in one ``benchmark.pedantic`` call; fills ``benchmark.extra_info``."""

    def run(model: nn.Module, x: Tensor, mode: str,
            loss: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, bm.TimingResult]:
        variants = {"torchvision": model, "fused": resnet_fused.swap_blocks(copy.deepcopy(model)),
                    "limit": bm.limit_model(model)}
        train = mode == "train"
        for m in variants.values():
            m.train(train)
        parity = (bm.train_parity(model, variants["fused"], x.detach().requires_grad_(True), loss)
                  if train else bm.infer_parity(model, variants["fused"], x))
        calls = {name: bm.train_step(m, x, loss) if train else bm.infer_forward(m, x)
                 for name, m in variants.items()}
        results = benchmark.pedantic(bm.interleaved, args=(calls, settings.rounds, settings.warmup),
                                     rounds=1, iterations=1)
        _record(benchmark.extra_info, results, x, parity, settings, mode)
        return results

    return run


def _record(info: dict, results: Dict[str, bm.TimingResult], x: Tensor, parity: bm.Parity,
            settings: Settings, mode: str) -> None:
    images = x.shape[0]
    for name, r in results.items():
        info[f"{name}_median_s"] = r.median
        info[f"{name}_iqr_s"] = r.iqr
        info[f"{name}_images_per_s"] = images / r.median
    eager, fused, limit = (results[n].median for n in ("torchvision", "fused", "limit"))
    info.update(
        mode=mode, shape=list(x.shape), dtype=str(x.dtype).replace("torch.", ""),
        threads=settings.threads, rounds=settings.rounds, warmup=settings.warmup,
        speedup=eager / fused, headroom=bm.headroom_share(eager, fused, limit),
        rel_err=parity.output, grad_rel_err=parity.max_grad,
        backend=resnet_fused.backend_for(x.device, x.dtype),
    )

"""The ``resnet-fused`` command line (resnet_fused.cli), on tiny inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import resnet_fused
from resnet_fused.cli import main

TINY_BENCH = ["bench", "--batch", "2", "--size", "32", "--rounds", "1", "--warmup", "0",
              "--no-compile"]
REQUIRED = {"model", "mode", "variant", "images_per_s", "speedup", "rel_err", "backend", "machine"}


def test_info_prints_build_info_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in resnet_fused.build_info():
        assert f"{key}: " in out
    assert f"available_backends: {', '.join(resnet_fused.available_backends())}" in out


def test_bench_writes_json_records(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(TINY_BENCH + ["--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [(r["mode"], r["variant"]) for r in records] == (
        [("train", v) for v in ("torchvision", "fused", "limit")]
        + [("infer", v) for v in ("torchvision", "fused", "folded", "limit")])
    folded = next(r for r in records if r["variant"] == "folded")
    assert folded["rel_err"] <= 1e-5
    by = {(r["mode"], r["variant"]): r for r in records}
    for r in records:
        assert REQUIRED <= r.keys()
        assert r["model"] == "resnet18" and r["images_per_s"] > 0 and r["speedup"] > 0
        assert r["machine"]["torch"] == torch.__version__
    assert by["train", "torchvision"]["speedup"] == 1.0
    assert by["train", "fused"]["backend"] == resnet_fused.backend_for("cpu", torch.float32)
    assert by["infer", "fused"]["rel_err"] < 1e-4
    assert by["train", "fused"]["saved_bytes"] < by["train", "torchvision"]["saved_bytes"]
    assert by["infer", "limit"]["rel_err"] is None  # another function: no parity to quote
    out = capsys.readouterr().out
    assert "resnet18 train step: batch 2, 32x32" in out and "machine: " in out


def test_bench_one_mode_channels_last(tmp_path):
    path = tmp_path / "bench.json"
    args = TINY_BENCH + ["--mode", "infer", "--channels-last", "--threads", "1",
                         "--json", str(path)]
    assert main(args) == 0
    records = json.loads(path.read_text())
    assert {r["mode"] for r in records} == {"infer"}
    assert all(r["memory_format"] == "channels_last" for r in records)
    assert all(r["machine"]["threads"] == 1 for r in records)


def test_check_passes_on_resnet18(capsys):
    assert main(["check", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "running statistics" in out and "converted 8 block(s)" in out


BAD_ARGS = [
    (["bench", "--model", "resnet9"], "invalid choice"),
    (["bench", "--batch", "0"], "positive"),
    (["bench", "--batch", "two"], "not an integer"),
    (["bench", "--size", "16"], "--size"),
    (["bench", "--backend", "fastest"], "invalid choice"),
    (["bench", "--rounds", "-1"], "positive"),
    (["check", "--model", "vgg16"], "invalid choice"),
    ([], "required"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS,
                         ids=[" ".join(a) or "none" for a, _ in BAD_ARGS])
def test_bad_arguments_one_line_no_traceback(argv, message, capsys):
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet-fused: error:"), captured.err
    assert message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("argv", [["bench", "--device", "cuda"], ["bench", "--backend", "cuda"],
                                  ["check", "--backend", "triton"]])
def test_impossible_device_or_backend_one_line(argv, capsys):
    assert main(argv + ["--size", "32", "--batch", "2"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet-fused: error:")


def test_train_on_a_single_value_per_channel_is_refused(capsys):
    assert main(["bench", "--batch", "1", "--size", "32", "--mode", "train"]) != 0
    assert "more than one value per channel" in capsys.readouterr().err


def test_help_returns_zero(capsys):
    assert main(["bench", "--help"]) == 0
    assert "--compile" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    root = os.path.dirname(os.path.dirname(os.path.abspath(resnet_fused.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "resnet_fused", "info"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "available_backends:" in done.stdout

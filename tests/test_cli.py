"""The ``resnet-fused`` command line (resnet_fused.cli), on tiny inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import resnet_fused
from resnet_fused import cli
from resnet_fused.cli import main

TINY_BENCH = ["bench", "--batch", "2", "--size", "32", "--rounds", "1", "--warmup", "0",
              "--no-compile", "--no-onnx"]
INFER_VARIANTS = ("torchvision", "torchvision-cl", "fused", "folded", "folded-aten", "limit",
                  "limit-folded")
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
        + [("infer", v) for v in INFER_VARIANTS])
    by = {(r["mode"], r["variant"]): r for r in records}
    for variant in ("folded", "folded-aten", "torchvision-cl"):
        assert by["infer", variant]["rel_err"] <= 1e-5
    assert by["infer", "folded"]["backend"].startswith("oneDNN")
    assert by["infer", "folded"]["limit_variant"] == "limit-folded"
    # a limit's headroom against itself is 1, or None when (noise) it was not faster than eager
    assert by["infer", "limit-folded"]["headroom"] in (None, pytest.approx(1.0))
    for r in records:
        assert REQUIRED <= r.keys()
        assert r["model"] == "resnet18" and r["images_per_s"] > 0 and r["speedup"] > 0
        assert r["machine"]["torch"] == torch.__version__
    assert by["train", "torchvision"]["speedup"] == 1.0
    assert by["train", "fused"]["backend"] == resnet_fused.backend_for("cpu", torch.float32)
    assert by["infer", "fused"]["rel_err"] < 1e-4
    assert by["train", "fused"]["saved_bytes"] < by["train", "torchvision"]["saved_bytes"]
    assert by["infer", "limit"]["rel_err"] is None  # another function: no parity to quote
    assert all(r["malloc"] == "default" and r["median_faults"] >= 0 for r in records)
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


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the optional extra 'plot'")
    path = tmp_path / "bench.png"
    assert main(TINY_BENCH + ["--mode", "infer", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {path}" in capsys.readouterr().out


def test_bench_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(TINY_BENCH + ["--plot", str(tmp_path / "bench.png")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1
    assert "matplotlib" in lines[0] and "resnet-fused[plot]" in lines[0]


def test_bench_without_onnxruntime_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    argv = [a for a in TINY_BENCH if a != "--no-onnx"] + ["--mode", "infer"]
    assert main(argv) == 0
    assert "onnxruntime: skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_compile_peers(tmp_path):
    """torch.compile as a peer: plain in training, freezing on a channels_last copy in inference
    (slow: compiles resnet18 twice, about a minute on a 2-core CPU)."""
    path = tmp_path / "bench.json"
    argv = [a for a in TINY_BENCH if a != "--no-compile"] + ["--compile", "--json", str(path)]
    assert main(argv) == 0
    by = {(r["mode"], r["variant"]): r for r in json.loads(path.read_text())}
    assert by["train", "compile"]["compile_s"] > 0
    frozen = by["infer", "compile-freeze"]
    assert "freezing" in frozen["backend"] and frozen["rel_err"] <= 1e-5


def test_check_passes_on_resnet18(capsys):
    assert main(["check", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "running statistics" in out and "converted 8 block(s)" in out
    assert "folded model" in out


def test_check_fails_with_a_nonzero_status(monkeypatch, capsys):
    """A failing parity line (forced: run_check reports an error over tolerance) exits 1 and names
    the model."""
    from resnet_fused import cli

    real = cli.run_check

    def failing(name, *args, **kwargs):
        swapped, results = real(name, *args, **kwargs)
        bad = cli.CheckResult("train output", cli.TOL_OUT, {"forced": cli.Errors(1.0, 0.0, 1.0, 0.0)})
        return swapped, results + [bad] if name == "resnet34" else results

    monkeypatch.setattr(cli, "run_check", failing)
    monkeypatch.setattr(cli, "MODELS", ("resnet18", "resnet34"))
    assert main(["check", "--model", "all"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1/2 models pass; FAILED: resnet34" in out


def test_check_criterion_where_float32_is_the_limit():
    """Beyond the float32 tolerance a line passes only when torchvision's own float32 misses it too
    (ill-conditioned), the float64 models agree to TOL_F64, and the fused float32 error is within
    F64_RATIO of torchvision's own."""
    tol = cli.TOL_GRAD

    def line(errors):
        return cli.CheckResult("g", tol, {"t": errors}).ok

    assert line(cli.Errors(tol / 2, 0.0, 0.0, 1.0))                       # within tolerance
    assert line(cli.Errors(1e-2, 2e-2, 3e-2, 1e-12))                      # float32 is the limit
    assert not line(cli.Errors(1e-2, tol / 2, 1e-2, 1e-12))               # torchvision meets it: ours must
    assert not line(cli.Errors(1e-2, 2e-2, 3e-2, 1e-6))                   # the float64 math differs
    assert not line(cli.Errors(1.0, 2e-2, 1.0, 1e-12))                    # gross float32-only error


BAD_ARGS = [
    (["bench", "--model", "resnet9"], "invalid choice"),
    (["bench", "--batch", "0"], "positive"),
    (["bench", "--batch", "two"], "not an integer"),
    (["bench", "--size", "16"], "--size"),
    (["bench", "--backend", "fastest"], "invalid choice"),
    (["bench", "--rounds", "-1"], "positive"),
    (["bench", "--json", "/no/such/dir/out.json"], "no such directory"),
    (["bench", "--plot", "/no/such/dir/out.png"], "no such directory"),
    (["bench", "--malloc", "jemalloc"], "invalid choice"),
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


def test_bench_malloc_retain_is_recorded():
    """--malloc retain (process-wide and one-way: in a child process) keeps freed memory for the
    whole run and says so in the caption and in every record."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(resnet_fused.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        done = subprocess.run([sys.executable, "-m", "resnet_fused"] + TINY_BENCH
                              + ["--mode", "infer", "--malloc", "retain", "--json", out],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path),
                              timeout=300)
        assert done.returncode == 0, done.stderr
        records = json.load(open(out))
    assert records and all(r["malloc"] == "retain" for r in records)
    assert "malloc retain" in " ".join(done.stdout.split())


def test_bench_malloc_retain_off_glibc_is_one_line(monkeypatch, capsys):
    from resnet_fused import allocator
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert main(TINY_BENCH + ["--malloc", "retain"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--malloc retain" in lines[0] and "not glibc" in lines[0]


def test_fused_label_says_when_the_model_runs_channels_last_inside():
    """The bench's backend column for `fused`: the backend, plus "channels_last inside" when the
    FusedResNet converts this input (FusedResNet.activation_memory_format)."""
    model = resnet_fused.models.resnet18()
    small = torch.randn(2, 3, 32, 32)
    assert cli._fused_label(model, small, "cpu") == "cpu"  # below channels_last_min_pixels
    model.channels_last_min_pixels = 2 * 32 * 32
    assert cli._fused_label(model, small, "cpu") == "cpu, channels_last inside"
    assert cli._fused_label(model, small.contiguous(memory_format=torch.channels_last), "cpu") == "cpu"
    model.activation_memory_format = "preserve"
    assert cli._fused_label(model, small, "cpu") == "cpu"

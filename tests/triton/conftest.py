"""Tests of the Triton backend: they run under ``TRITON_INTERPRET=1`` (CPU tensors) or on a CUDA GPU.

``TRITON_INTERPRET`` is read when the kernels are decorated, at import, so these tests need their
own invocation::

    TRITON_INTERPRET=1 python -m pytest tests/triton

Without it and without a GPU (e.g. the default ``python -m pytest tests``) every test here is
skipped, with the reason. ``cuda``-marked tests need a GPU and compiled (not interpreted) kernels.
The test modules import the kernels lazily (fixture ``T``), never at collection.

This conftest also re-exports the public helpers of ``tests/conftest.py``: conftest files outside
packages all import as the module ``conftest`` and pytest keeps only the latest loaded in
``sys.modules``, so ``from conftest import rel_err`` must work whichever one that is.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _parent_conftest():
    path = HERE.parent / "conftest.py"
    for mod in list(sys.modules.values()):
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("resnet_fused_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_fixture(v) -> bool:
    return type(v).__name__ == "FixtureFunctionDefinition" or hasattr(v, "_pytestfixturefunction")


_parent = _parent_conftest()
for _name, _value in vars(_parent).items():
    if not _name.startswith("_") and not _is_fixture(_value) and _name not in globals():
        globals()[_name] = _value

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
RUNNABLE = INTERPRET or HAS_CUDA
DEVICE = "cpu" if INTERPRET else "cuda"
"""Where the triton tests run: CPU tensors under the interpreter, else the GPU."""

SKIP_REASON = ("Triton tests need TRITON_INTERPRET=1 (CPU, interpreted kernels) or a CUDA GPU; "
               "run them with `TRITON_INTERPRET=1 python -m pytest tests/triton`")
CUDA_SKIP_REASON = "needs a CUDA GPU with compiled (not interpreted) Triton kernels"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue  # this hook sees the whole session's items
        item.add_marker(pytest.mark.triton)
        if not RUNNABLE:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
        elif item.get_closest_marker("cuda") is not None and (INTERPRET or not HAS_CUDA):
            item.add_marker(pytest.mark.skip(reason=CUDA_SKIP_REASON))


@pytest.fixture(scope="session")
def T():
    """The package ``resnet_fused.triton_kernels``, imported (kernels registered) on first use."""
    import resnet_fused.triton_kernels as T

    assert T.KERNELS_AVAILABLE, T.KERNELS_ERROR
    return T


@pytest.fixture(scope="session")
def K(T):
    """The kernel module (launchers, TUNING, INTERPRETED)."""
    from resnet_fused.triton_kernels import bn_kernels

    assert bn_kernels.INTERPRETED == INTERPRET
    return bn_kernels


@pytest.fixture
def small_tiles(K, monkeypatch):
    """Tiny tiles, few programs and small merge chunks: drives the multi-tile loops of the reduction
    programs and the multi-chunk loops of the merge kernels on small inputs."""
    monkeypatch.setitem(K.TUNING, "target_elems", 16)
    monkeypatch.setitem(K.TUNING, "max_block_hw", 8)
    monkeypatch.setitem(K.TUNING, "max_block_c", 4)
    monkeypatch.setitem(K.TUNING, "max_programs", 6)
    monkeypatch.setitem(K.TUNING, "merge_block_p", 2)
    monkeypatch.setitem(K.TUNING, "merge_block_c", 2)


@pytest.fixture
def ieee_fp32():
    """float32 parity on a GPU: cuDNN convs and matmuls in full float32 (torch 2.14 defaults to tf32)."""
    if not torch.cuda.is_available():
        yield
        return
    conv, mm = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = mm

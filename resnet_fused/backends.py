"""Which kernels run for a tensor: backend names, priorities and the process-wide choice.

Backends (DESIGN.md): ``cpu`` (C++ CPU kernels), ``cuda`` (CUDA C++ kernels), ``triton`` (Triton
kernels; on CPU only under ``TRITON_INTERPRET=1``), ``reference`` (pure PyTorch, any device and
floating dtype). ``auto`` picks, on CUDA, ``triton`` then ``cuda``; on CPU ``cpu``; and falls back to
``reference`` when no candidate has kernels for the device and dtype. A backend asked for explicitly
that cannot run a tensor is an error, never a silent fallback.

Under ``torch.compile`` the backend is resolved when the graph is traced.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Union

import torch

from . import _extension

BACKENDS = ("cpu", "cuda", "triton", "reference")
_AUTO_PRIORITY = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}

_selected = "auto"


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here (device, dtype, or not built)."""


# Evaluated eagerly when torch.compile traces a call (the import inside must not be traced): the
# backend is resolved at trace time, as documented.
@torch._dynamo.assume_constant_result
def _triton_kernels_available() -> bool:
    if _extension.triton_version() is None:
        return False
    try:
        from . import triton_kernels
    except Exception:
        return False
    return bool(getattr(triton_kernels, "KERNELS_AVAILABLE", False))


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(name: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """None when backend ``name`` has kernels for (device_type, dtype), else why not."""
    if name == "reference":
        if dtype is not None and not dtype.is_floating_point:
            return f"the reference backend needs a floating dtype, got {dtype}"
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs CPU tensors only, got a {device_type} tensor"
        if not _extension.cpp_available():
            return "backend 'cpu' needs the C++ extension: " + (_extension._load()[1] or "not built")
    elif name == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs CUDA tensors only, got a {device_type} tensor"
        if not _extension.cuda_kernels_available():
            return ("backend 'cuda' has no CUDA kernels in this build (the extension was built without "
                    "CUDA: no nvcc or a CPU-only torch at build time, or RESNET_FUSED_SKIP_CUDA=1)")
    elif name == "triton":
        if device_type == "cpu" and not _triton_interpreted():
            return "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cuda", "cpu"):
            return f"backend 'triton' runs CUDA tensors, got a {device_type} tensor"
        if not _triton_kernels_available():
            return "backend 'triton' is unavailable: triton is not installed or its kernels are not written yet"
    if dtype is not None and dtype not in _DTYPES[name]:
        supported = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[name])
        return f"backend {name!r} has no kernels for {dtype} (it supports {supported})"
    return None


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Backends with kernels for ``device`` (all devices of this process when None), best first."""
    if device is None:
        types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        types = [torch.device(device).type]
    names: List[str] = []
    for device_type in types:
        for name in _AUTO_PRIORITY.get(device_type, ()) + (("triton",) if device_type == "cpu" else ()):
            if name not in names and _unavailable_reason(name, device_type, None) is None:
                names.append(name)
    names.append("reference")
    return names


def get_backend() -> str:
    """The process-wide choice: ``auto`` or a backend name."""
    return _selected


def set_backend(name: str) -> None:
    """Choose the backend for the whole process (``auto`` restores the default)."""
    global _selected
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "cpu" and not _extension.cpp_available():
        raise BackendError(_unavailable_reason("cpu", "cpu", None))
    _selected = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager over :func:`set_backend`; restores the previous choice on exit."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs tensors of ``device``/``dtype`` under the current choice.

    Raises :class:`BackendError` when a backend was chosen explicitly and cannot run them.
    """
    device_type = torch.device(device).type
    if _selected != "auto":
        reason = _unavailable_reason(_selected, device_type, dtype)
        if reason is not None:
            raise BackendError(f"{reason} (selected with set_backend/use_backend({_selected!r}))")
        return _selected
    for name in _AUTO_PRIORITY.get(device_type, ()):
        if _unavailable_reason(name, device_type, dtype) is None:
            return name
    return "reference"

"""Loads the compiled extension ``resnet_fused._C`` once, and says what was built.

A missing extension, or one built against another torch (ABI mismatch), is not fatal: the ``cpu``
backend is then unavailable and ``auto`` runs the ``reference`` primitives, after one warning that
names the cause.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Dict, Optional

import torch


def _try_load() -> tuple:
    """Returns ``(module or None, reason or None)``; warns when the extension is unusable."""
    try:
        module = importlib.import_module("resnet_fused._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol on ABI mismatch), ...
        reason = f"resnet_fused._C could not be loaded ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"{reason}; the C++ kernels are unavailable and the 'reference' (pure PyTorch) backend "
            "runs instead. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, reason
    built_with = module.build_info().get("built_with_torch")
    if built_with and built_with.split("+")[0] != torch.__version__.split("+")[0]:
        reason = f"resnet_fused._C was built against torch {built_with}, running torch {torch.__version__}"
        warnings.warn(f"{reason}; falling back to the 'reference' backend. Rebuild the extension.",
                      RuntimeWarning, stacklevel=2)
        return None, reason
    return module, None


# Loaded once, at import: plain module globals keep backend resolution cheap and traceable by
# torch.compile (no import machinery or caches inside a traced region).
_EXTENSION, _REASON = _try_load()


def _load() -> tuple:
    return _EXTENSION, _REASON


def extension() -> Optional[Any]:
    """The loaded ``resnet_fused._C`` module, or None."""
    return _EXTENSION


def cpp_available() -> bool:
    return _EXTENSION is not None


def cuda_kernels_available() -> bool:
    """CUDA kernels compiled in and registered for the ops' CUDA dispatch key (a CUDA build)."""
    return _CUDA_OPS


_CUDA_OPS = bool(_EXTENSION is not None and _EXTENSION.build_info().get("cuda_ops", False))


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", "unknown")


def build_info() -> Dict[str, Any]:
    """What this installation has: C++ CPU kernels, CUDA kernels, Triton, and the torch versions."""
    ext, reason = _load()
    compiled = ext.build_info() if ext is not None else {}
    info: Dict[str, Any] = {
        "cpp": ext is not None,
        "cuda": bool(compiled.get("cuda", False)),
        "cuda_ops": bool(compiled.get("cuda_ops", False)),
        "triton": triton_version(),
        "torch": torch.__version__,
        "built_with_torch": compiled.get("built_with_torch"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for key, value in compiled.items():
        info.setdefault(key, value)
    if reason:
        info["extension_error"] = reason
    return info

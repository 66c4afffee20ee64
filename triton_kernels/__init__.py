"""Triton kernels of resnet_fused (installed as ``resnet_fused.triton_kernels``).

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when the kernel modules
are imported: set it before. Importing this package is light; the kernels (and triton) are imported
on first use of :data:`KERNELS_AVAILABLE` or :func:`op`:

* ``KERNELS_AVAILABLE`` — True once the kernels imported and their ops are registered
  (``KERNELS_ERROR`` says why not otherwise);
* ``op(name)`` — the registered op ``torch.ops.resnet_fused_triton.<name>`` for ``name`` in
  ``bn_stats``, ``bn_apply``, ``bn_backward_reduce``, ``bn_backward_apply``, called with the same
  positional arguments as the function of :mod:`resnet_fused.reference`, or ``conv2d_bias_act``
  (conv_kernels.py: the implicit-GEMM conv of folded inference), or ``conv2d_bn_stats`` (the same
  conv with a BN+ReLU prologue and a BN-statistics epilogue, for training).
"""
from __future__ import annotations

OP_NAMES = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply", "conv2d_bias_act",
            "conv2d_bn_stats")


def _load():
    """Imports the kernels and registers their ops once; sets KERNELS_AVAILABLE / KERNELS_ERROR."""
    g = globals()
    if "KERNELS_AVAILABLE" not in g:
        try:
            from . import registration  # noqa: F401  (imports triton, decorates, registers)
        except Exception as exc:  # no triton, an incompatible triton, ...
            g["KERNELS_ERROR"] = f"{type(exc).__name__}: {exc}"
            g["KERNELS_AVAILABLE"] = False
        else:
            g["KERNELS_ERROR"] = None
            g["KERNELS_AVAILABLE"] = True
    return g["KERNELS_AVAILABLE"]


def __getattr__(name):
    # PEP 562: the first access to KERNELS_AVAILABLE / KERNELS_ERROR imports the kernels; later
    # accesses are plain module attributes.
    if name in ("KERNELS_AVAILABLE", "KERNELS_ERROR"):
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def op(name: str):
    """The registered Triton op for primitive ``name``."""
    if not _load():
        raise RuntimeError(f"the Triton kernels are unavailable: {globals()['KERNELS_ERROR']}")
    from .registration import op as _op

    return _op(name)


__all__ = ["OP_NAMES", "op", "KERNELS_AVAILABLE", "KERNELS_ERROR"]

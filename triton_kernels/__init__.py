"""Triton kernels; imported lazily (TRITON_INTERPRET must be set before import). Kernels land in a later issue."""

KERNELS_AVAILABLE = False

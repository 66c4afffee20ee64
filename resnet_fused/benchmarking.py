"""The one interleaved timing harness of resnet_fused, and the measures quoted beside its timings.

Used by ``resnet-fused bench`` and by the pytest-benchmark suites in ``bench/`` (DESIGN.md,
"Benchmarks"). The machines are shared and noisy, so variants are never timed back to back: each
round calls every variant once (A B C, then B C A, then C A B, ... so no variant always runs first,
right after a cooler or warmer neighbour), with a fixed thread count, and the median over rounds is
the number to quote, as a ratio between variants measured in the same process.

Besides timing:

* :func:`rel_err` — the project's one error measure (DESIGN.md, "Numerics").
* :func:`train_parity` / :func:`infer_parity` — that error for outputs and gradients of a variant
  against the reference model, so every speedup is quoted with the parity it was measured at.
* :func:`headroom_share` — how much of the possible gain a variant captured, against
  :func:`limit_model` (the same network with all BatchNorm and ReLU removed: the time left if every
  fused pass were free).
* :func:`saved_bytes` — memory kept for backward, as unique storages (in-place results and views
  share one storage and must count once).
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import allocator

__all__ = [
    "TimingResult", "interleaved", "round_order", "timed_call", "fixed_threads", "train_step",
    "infer_forward", "rel_err", "headroom_share", "saved_bytes", "limit_model",
    "randomize_bn_affine", "warm_running_stats", "Parity",
    "forward_backward", "grad_names", "train_parity", "infer_parity",
    "compile_frozen", "PublicPath", "onnxruntime_model",
]

TensorOrSeq = Union[Tensor, Sequence[Tensor]]

# Modules whose work the fused kernels take over: replaced by Identity in the limit model.
_FUSED_AWAY = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, nn.ReLU)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimingResult:
    """Seconds per timed round of one variant. Quote the median: robust to the outliers a shared
    machine produces; min and IQR say how noisy the rounds were."""

    name: str
    times: Tuple[float, ...]
    # minor page faults of the process during each timed call (resnet_fused.allocator): a step that
    # re-faults memory the allocator gave back pays ~3 us a page on the 2-core VM
    faults: Tuple[int, ...] = ()

    @property
    def median_faults(self) -> Optional[float]:
        return statistics.median(self.faults) if self.faults else None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q3 - q1


def round_order(names: Sequence[str], round_index: int) -> List[str]:
    """The call order of one round: ``names`` rotated by ``round_index``, so each variant starts
    a round equally often and slow drift (thermal, other tenants) falls on all of them alike."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def interleaved(variants: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                threads: Optional[int] = None, progress: Optional[Callable[[str], None]] = None,
                clock: Callable[[], float] = time.perf_counter) -> Dict[str, TimingResult]:
    """Times every variant once per round, interleaved, for ``warmup`` untimed then ``rounds``
    timed rounds; returns one :class:`TimingResult` per variant, in the order given.

    ``threads`` fixes ``torch.set_num_threads`` for the run (restored afterwards);
    ``progress(name)`` is called after each call, warmup included, e.g. to advance a progress bar;
    ``clock`` is injectable so tests can check the bookkeeping with fake times.
    """
    if not variants:
        raise ValueError("interleaved: no variants to time")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"interleaved: need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = list(variants)
    times: Dict[str, List[float]] = {name: [] for name in names}
    faults: Dict[str, List[int]] = {name: [] for name in names}
    with fixed_threads(threads):
        for r in range(warmup + rounds):
            for name in round_order(names, r):
                before = allocator.minor_faults()
                elapsed = timed_call(variants[name], clock)
                if r >= warmup:
                    times[name].append(elapsed)
                    faults[name].append(allocator.minor_faults() - before)
                if progress is not None:
                    progress(name)
    return {name: TimingResult(name, tuple(times[name]), tuple(faults[name])) for name in names}


@contextlib.contextmanager
def fixed_threads(threads: Optional[int]) -> Iterator[None]:
    """A fixed intra-op thread count (``torch.set_num_threads``) for a measurement, restored
    afterwards; None leaves the current count alone."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync() -> None:
    """Waits for queued CUDA work, so a call's time includes its kernels and not the previous
    call's. A no-op in a process that never touched CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of ``fn`` takes, its CUDA work included (e.g. a compiling first call)."""
    _sync()
    start = clock()
    fn()
    _sync()
    return clock() - start


def train_step(model: nn.Module, x: Tensor, loss: Callable[[Tensor], Tensor]) -> Callable[[], None]:
    """A timed training step: forward, ``loss``, backward (no optimizer). Gradients are dropped
    first, so every call does the same work instead of accumulating into the previous ones."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(x)).backward()
    return step


def infer_forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """A timed inference forward under ``torch.no_grad`` (set eval mode on the model yourself)."""
    def forward() -> None:
        with torch.no_grad():
            model(x)
    return forward


# ------------------------------------------------------------------------------------------------
# what is quoted beside the timings
# ------------------------------------------------------------------------------------------------
def _as_list(t: TensorOrSeq) -> List[Tensor]:
    return [t] if isinstance(t, Tensor) else list(t)


def rel_err(a: TensorOrSeq, ref: TensorOrSeq) -> float:
    """``||a - ref|| / ||ref||`` in float64 (DESIGN.md's one error measure). A list of tensors
    counts as one vector, their concatenation. 0 when both are zero, inf when only ``ref`` is."""
    a_list, ref_list = _as_list(a), _as_list(ref)
    if len(a_list) != len(ref_list):
        raise ValueError(f"rel_err: {len(a_list)} tensors vs {len(ref_list)} in the reference")
    num_sq = den_sq = 0.0
    for x, y in zip(a_list, ref_list):
        if x.shape != y.shape:
            raise ValueError(f"rel_err: shape {tuple(x.shape)} vs reference {tuple(y.shape)}")
        y64 = y.detach().to(torch.float64)
        x64 = x.detach().to(device=y64.device, dtype=torch.float64)
        num_sq += torch.linalg.vector_norm(x64 - y64).item() ** 2
        den_sq += torch.linalg.vector_norm(y64).item() ** 2
    if den_sq == 0.0:
        return 0.0 if num_sq == 0.0 else math.inf
    return math.sqrt(num_sq / den_sq)


def headroom_share(t_eager: float, t_variant: float, t_limit: float) -> Optional[float]:
    """``(t_eager - t_variant) / (t_eager - t_limit)``: 1 means the variant is as fast as if all
    BatchNorm/ReLU work were free, 0 no gain. None when the limit is not faster than eager (noise,
    or nothing to gain), where the ratio would mean nothing."""
    headroom = t_eager - t_limit
    if headroom <= 0:
        return None
    return (t_eager - t_variant) / headroom


def _storage_key(t: Tensor) -> Tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes that autograd keeps for backward while ``fn`` runs (usually a forward), counted as
    unique storages: an in-place ReLU result and the next conv's input, or two views of one tensor,
    are one storage and count once. Storages of ``exclude`` (e.g. the model's parameters, alive
    anyway) are not counted."""
    excluded = {_storage_key(t) for t in exclude}
    # holding the storages keeps their addresses from being reused by later allocations in fn
    storages: Dict[Tuple[str, int], torch.UntypedStorage] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in excluded:
            storages.setdefault(key, t.untyped_storage())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in storages.values())


def limit_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm2d/FrozenBatchNorm2d and ReLU replaced by
    ``nn.Identity``: the same convolutions on the same path with all fused work free, the bound
    that :func:`headroom_share` measures against.

    For a model from :func:`resnet_fused.fold_bn` the folded blocks stay on their own path (the
    pre-packed oneDNN convolution of :func:`resnet_fused.ops.conv_bias_act`) with the folded bias
    and the ReLU taken out; the residual add stays, as it does in the limit of an eager model
    (BatchNorm and ReLU removed, the add kept)."""
    limit = copy.deepcopy(model)
    for parent in list(limit.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _FUSED_AWAY):
                setattr(parent, name, nn.Identity())
    for module in limit.modules():
        limit_class = _folded_limit_class(type(module))
        if limit_class is not None:
            module.__class__ = limit_class
    return limit


def _folded_limit_class(cls: type) -> Optional[type]:
    """The conv-only twin of a folded block class (no bias, no ReLU; same oneDNN path)."""
    from .fold import FoldedBasicBlock, FoldedBottleneck

    if cls not in (FoldedBasicBlock, FoldedBottleneck):
        return None
    return _FOLDED_LIMITS.setdefault(cls, type(f"{cls.__name__}Limit", (cls,), {
        "_use_bias": False, "_use_relu": False,
        "__doc__": f"{cls.__name__} without bias or ReLU: the limit on the folded path."}))


_FOLDED_LIMITS: Dict[type, type] = {}


@torch.no_grad()
def randomize_bn_affine(model: nn.Module) -> nn.Module:
    """gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5) in every BatchNorm2d: torchvision initializes 1
    and 0, which would hide scale/shift bugs from a parity check and time a special case."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand_like(m.weight) + 0.5)
            m.bias.copy_(torch.rand_like(m.bias) - 0.5)
    return model


@torch.no_grad()
def warm_running_stats(model: nn.Module, x: Tensor, steps: int = 2) -> nn.Module:
    """A few train-mode forwards on random inputs shaped like ``x``, so running statistics are no
    longer the trivial (0, 1) when an eval-mode forward is compared or timed."""
    model.train()
    for _ in range(steps):
        model(torch.randn_like(x))
    return model


@dataclass
class Parity:
    """rel_err of a variant against the reference: its output, and (training) each gradient by
    name (``input`` for the input's)."""

    output: float
    grads: Dict[str, float]

    @property
    def max_grad(self) -> Optional[float]:
        return max(self.grads.values()) if self.grads else None


def forward_backward(model: nn.Module, x: Tensor, loss: Callable[[Tensor], Tensor]
                     ) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """One training step's output and gradients: the input's first when ``x`` requires grad, then
    the parameters' in ``model.parameters()`` order (None where a parameter got none)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = model(x)
    loss(out).backward()
    grads = [x.grad] if x.requires_grad else []
    return out.detach(), grads + [p.grad for p in model.parameters()]


def grad_names(model: nn.Module, x: Tensor) -> List[str]:
    """Names of the gradients :func:`forward_backward` returns, in its order."""
    return (["input"] if x.requires_grad else []) + [n for n, _ in model.named_parameters()]


def _grad_errors(names: List[str], grads: List[Optional[Tensor]],
                 ref_grads: List[Optional[Tensor]]) -> Dict[str, float]:
    """Per-gradient rel_err; a gradient missing on one side only is an infinite error."""
    errors: Dict[str, float] = {}
    for name, g, g_ref in zip(names, grads, ref_grads):
        if g is None and g_ref is None:
            continue
        errors[name] = math.inf if g is None or g_ref is None else rel_err(g, g_ref)
    return errors


def train_parity(ref: nn.Module, other: nn.Module, x: Tensor,
                 loss: Callable[[Tensor], Tensor]) -> Parity:
    """One training step of each model on the same input: rel_err of the output, of every
    parameter gradient and, when ``x.requires_grad``, of the input gradient. Parameters are paired
    by position (a compiled wrapper renames them); ``other`` may share ``ref``'s parameters."""
    ref_out, ref_grads = forward_backward(ref, x, loss)
    out, grads = forward_backward(other, x, loss)
    return Parity(rel_err(out, ref_out), _grad_errors(grad_names(ref, x), grads, ref_grads))


def infer_parity(ref: nn.Module, other: nn.Module, x: Tensor) -> Parity:
    """rel_err of ``other``'s output against ``ref``'s under ``torch.no_grad``."""
    with torch.no_grad():
        return Parity(rel_err(other(x), ref(x)), {})


# ------------------------------------------------------------------------------------------------
# inference peers
# ------------------------------------------------------------------------------------------------
def compile_frozen(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The strongest PyTorch inference peer: ``torch.compile`` with inductor freezing
    (``torch._inductor.config.freezing = True``: parameters become constants, so inductor folds
    BatchNorm and runs oneDNN convolutions with fused post-ops on pre-packed weights) of a
    channels_last copy of the eval-mode ``model``. Returns (the compiled model, the plain copy it
    wraps). The first call under ``torch.no_grad`` compiles.

    The freezing flag is set around every call of the returned model rather than for the whole
    process (compilation happens lazily, at the first call or a recompile). It must be the config
    itself: ``torch.compile(..., options={"freezing": True})`` compiles without freezing in torch
    2.14 (measured: the graph then calls ``aten::convolution``, not ``mkldnn::_convolution_pointwise``).
    """
    plain = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    return _Freezing(torch.compile(plain)), plain


class _Freezing(nn.Module):
    """Calls a ``torch.compile`` wrapper with ``torch._inductor.config.freezing = True``."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


class PublicPath(nn.Module):
    """A folded model (:func:`resnet_fused.fold_bn`) run on the public-API path of
    ``ops.conv_bias_act`` (ATen ``conv2d`` with bias, then add and ReLU in place) instead of oneDNN
    fused post-ops on pre-packed weights: the two choices for the folded blocks, side by side."""

    def __init__(self, folded: nn.Module):
        super().__init__()
        self.folded = folded

    def forward(self, x: Tensor) -> Tensor:
        from . import ops

        with ops.use_onednn_prepacked(False):
            return self.folded(x)


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session behind a module call (numpy in, torch out)."""

    def __init__(self, session: Any, description: str):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.description = description

    def forward(self, x: Tensor) -> Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})
        return torch.from_numpy(out)


def onnxruntime_model(model: nn.Module, x: Tensor, threads: Optional[int] = None
                      ) -> OnnxRuntimeModel:
    """``model`` (eval mode; ONNX Runtime folds BatchNorm and fuses conv+ReLU itself) exported with
    ``torch.onnx.export`` for inputs shaped like ``x`` and loaded in an ONNX Runtime CPU session with
    ``threads`` intra-op threads (default: torch's count). Raises ImportError without the optional
    extra ``onnx`` (onnxruntime, onnxscript), ValueError for an input not on the CPU."""
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (torch.onnx.export needs it)

    if x.device.type != "cpu":
        raise ValueError("ONNX Runtime runs here on the CPU execution provider only")
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(copy.deepcopy(model).eval(), (x.contiguous(),), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeModel(session, f"onnxruntime {ort.__version__} CPU")

"""Synchronized BatchNorm across processes (torch.distributed), on CPU (gloo) and GPU (NCCL or gloo).

* :class:`SyncBatchNorm` — an ``nn.BatchNorm2d`` whose training-mode statistics are those of the
  global batch (every rank of ``process_group``). Same state_dict keys as ``nn.SyncBatchNorm``; unlike
  it, CPU tensors work (gloo). Without an initialized process group (or with a group of one process)
  it is exactly ``nn.BatchNorm2d``, as torch's SyncBatchNorm is.
* :func:`convert_sync_batchnorm` — every ``nn.BatchNorm2d`` of a model becomes :class:`SyncBatchNorm`.
* :class:`StatsSync` — the "statistics synchronizer" of one BN for one forward/backward: the
  fused units (:mod:`resnet_fused.units`) call it between ``bn_stats`` and the finalize step, and
  between ``bn_backward_reduce`` and ``bn_backward_apply``; so does :class:`SyncBatchNorm`'s own
  forward. The structure of torch's CUDA SyncBatchNorm.

Forward collective: one ``all_gather`` of a packed float64 ``[mean (C), M2 (C), count]`` per rank,
merged with Chan's formula (``M2 = sum M2_i + sum n_i (mean_i - mean)^2``). Why this and not an
all-reduce of sums: each rank's M2 is centered on its own mean and the merge only adds
non-negative terms, so nothing cancels however large the means are (raw sums of squares would
cancel; shifted sums need a pivot every rank knows *before* communicating, i.e. a second
all-reduce of the counts and sums first, twice the latency). Every rank merges the same gathered
tensor in the same order, so all ranks get bit-identical statistics and running statistics.
The cost is W x (2C+1) values instead of 2C+1, as torch's own SyncBatchNorm (which also gathers);
for BN vectors (C <= 2048) a collective is latency-bound and that size does not matter.
float64 packets keep counts exact past 2**24 elements and the merge free of float32 rounding.

Backward collective: one ``all_reduce`` (sum) of a packed ``[sum_dy (C), sum_dy_xmu (C)]``; the
input gradient uses the global sums and count. Parameter gradients stay *local* (DDP averages them).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .reference import opmath_dtype

__all__ = ["SyncBatchNorm", "StatsSync", "convert_sync_batchnorm", "synchronizer_for", "sync_world_size"]


class SyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics synchronized over ``process_group`` (default: WORLD) in
    training mode. Eval mode, and training without an initialized process group, never communicate."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        # torch's nn.SyncBatchNorm signature
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"SyncBatchNorm: expected a Tensor, got {type(input).__name__}")
        world = sync_world_size(self, input.device)  # group and device errors before any kernel
        if world == 1:
            return super().forward(input)  # local statistics: exactly nn.BatchNorm2d
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels, got input of "
                             f"shape {tuple(input.shape)}")
        if self.weight is not None and input.device != self.weight.device:
            raise ValueError(f"SyncBatchNorm: input is on {input.device} but the parameters are on "
                             f"{self.weight.device}")
        sync = StatsSync(_group_of(self), world)
        mean, var = ops.bn_stats(input.detach())
        mean, var, count = sync.stats(mean, var, input.numel() // input.shape[1])
        invstd = torch.rsqrt(var + self.eps)
        out = _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, invstd, sync)
        if self.track_running_stats:
            # after the collective succeeded: a rank whose peers failed keeps its state
            from .units import BNState, update_running_stats  # units imports this module
            update_running_stats([BNState(self, mean, invstd, self.weight, self.bias, True, var, count)])
        return out


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, sync):
        acc = mean.dtype
        scale = invstd if weight is None else weight.to(acc) * invstd
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        ctx.sync = sync
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(input, weight, mean, invstd)
        return ops.bn_apply(input, scale, shift, None, None, None, False)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=_memory_format(input))
        sum_dy, sum_dy_xmu = ops.bn_backward_reduce(grad_out, input, None, mean, False)
        grad_input = None
        if ctx.needs_input_grad[0]:
            tot_dy, tot_dy_xmu, count = ctx.sync.grads(sum_dy, sum_dy_xmu)
            grad_input = ops.bn_backward_apply(grad_out, input, None, mean, invstd, weight,
                                               tot_dy / count, tot_dy_xmu / count, False)
        # parameter gradients of this rank's samples only: DDP averages them over ranks
        grad_weight = (sum_dy_xmu * invstd).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ------------------------------------------------------------------------------------------------
# the synchronizer
# ------------------------------------------------------------------------------------------------
_SYNC_TYPES = (SyncBatchNorm, nn.SyncBatchNorm)


def _group_of(bn: nn.Module):
    return bn.process_group if getattr(bn, "process_group", None) is not None else dist.group.WORLD


def _backend_for_device(group, device: torch.device) -> Optional[str]:
    # "gloo", "nccl", or a per-device list such as "cpu:gloo,cuda:nccl"
    backend = str(dist.get_backend(group))
    if ":" not in backend:
        return backend
    table = dict(part.split(":", 1) for part in backend.split(","))
    return table.get(device.type)


def sync_world_size(bn: nn.Module, device: Optional[torch.device] = None) -> int:
    """How many processes ``bn``'s training statistics span now: 1 when it does not synchronize
    (plain BN, eval mode, no initialized process group, a group of one). With ``device``, raises
    a clear error when the group cannot carry that device's tensors or this rank is not in it."""
    if not (bn.training and isinstance(bn, _SYNC_TYPES)):
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = _group_of(bn)
    name = type(bn).__name__
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of "
                         f"the BatchNorm's process_group")
    world = dist.get_world_size(group)
    if world > 1 and device is not None:
        backend = _backend_for_device(group, torch.device(device))
        if backend is None or (backend == "nccl" and torch.device(device).type != "cuda"):
            raise ValueError(f"{name}: the process group's backend {dist.get_backend(group)!r} cannot "
                             f"synchronize {torch.device(device).type} tensors (gloo: CPU and CUDA; "
                             f"nccl: CUDA only)")
    return world


def synchronizer_for(bn: nn.Module) -> Optional["StatsSync"]:
    """The statistics synchronizer for one forward of ``bn``, or None (no communication)."""
    world = sync_world_size(bn)
    return None if world == 1 else StatsSync(_group_of(bn), world)


class StatsSync:
    """Collectives of one synchronized BN for one forward and its backward."""

    def __init__(self, group, world_size: int) -> None:
        self.group = group
        self.world_size = world_size
        self.count = 0  # global elements per channel, set by stats()

    def stats(self, mean: Tensor, var: Tensor, count: int) -> Tuple[Tensor, Tensor, int]:
        """Local (mean, biased var, count) -> global ones (Chan merge of every rank's partials)."""
        local = pack_stats(mean, var, count)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        g_mean, g_var, n = merge_stats(torch.stack(parts))
        if n == 1:  # same error as nn.BatchNorm2d; every rank sees the same count and raises
            raise ValueError("Expected more than 1 value per channel when training, got 1 value "
                             "per channel over all ranks of the process group")
        self.count = n
        if n == 0:  # every rank's batch is empty: nothing is normalized
            return mean, var, 0
        return g_mean.to(mean.dtype), g_var.to(var.dtype), n

    def grads(self, sum_dy: Tensor, sum_dy_xmu: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Local backward sums -> global sums (all ranks) and the global count."""
        c = sum_dy.shape[0]
        packed = torch.cat([sum_dy, sum_dy_xmu])  # a new tensor: the local sums stay local
        dist.all_reduce(packed, group=self.group)
        return packed[:c], packed[c:], self.count


def pack_stats(mean: Tensor, var: Tensor, count: int) -> Tensor:
    """One rank's partial statistics as one float64 ``[mean (C), M2 (C), count]`` tensor."""
    c = mean.shape[0]
    local = torch.zeros(2 * c + 1, dtype=torch.float64, device=mean.device)
    if count > 0:  # an empty batch's bn_stats are 0/0; its weight in the merge is 0
        local[:c] = mean
        local[c:2 * c] = var.double() * count  # M2, centered on this rank's mean
    local[2 * c] = count
    return local


def merge_stats(parts: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Chan's merge of ``[W, 2C+1]`` packed partials: (global mean, biased var, count), float64.
    Only non-negative terms are added, so large means do not cancel."""
    c = (parts.shape[1] - 1) // 2
    means, m2s, counts = parts[:, :c], parts[:, c:2 * c], parts[:, 2 * c:]
    total = counts.sum()
    n = int(total.item())
    if n == 0:
        return means[0], m2s[0], 0
    mean = (means * (counts / total)).sum(0)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total, n


# ------------------------------------------------------------------------------------------------
# model conversion
# ------------------------------------------------------------------------------------------------
def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``model`` (exactly that class) becomes :class:`SyncBatchNorm`
    over ``process_group`` (None: the default group at call time), in place; returns ``model``.

    The modules keep their identity, parameters, buffers, hooks and mode (only the class changes),
    so optimizers and checkpoints keep working. Existing :class:`SyncBatchNorm` layers get the new
    ``process_group`` (as torch's conversion does); torch's ``nn.SyncBatchNorm``, BatchNorm1d/3d,
    FrozenBatchNorm2d and BatchNorm subclasses are left as they are. Works before or after
    :func:`resnet_fused.swap_blocks`.
    """
    for module in model.modules():
        if type(module) is nn.BatchNorm2d or type(module) is SyncBatchNorm:
            module.__class__ = SyncBatchNorm
            module.process_group = process_group
    return model

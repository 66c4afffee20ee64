"""Interleaved benchmark of the C++ CPU primitives against eager PyTorch, with the bandwidth floor.

    python bench/primitives_bench.py [--shape 8,256,56,56] [--dtype float32] [--rounds 25]
                                     [--threads 2] [--layouts nchw,cl] [--json out.json]

For each memory format, every variant of a comparison runs once per round, in turn (A B A B ...),
on the same inputs; the table shows per-variant medians, the speedup (eager / fused) and the
memory-bandwidth floor of the fused variant: the bytes it must move (each operand read once, each
output written once) divided by the copy bandwidth measured in the same rounds (``dst.copy_(src)``
of one tensor of this size: 2 x size bytes per copy). Times are medians over rounds; speedup and
fused/floor are medians of the per-round ratios (pairs measured back to back, so the machine's
drifts cancel).

Comparisons (BN in training mode, "block end" = ``relu(bn(y) + identity)``):

* ``bn_stats``: ``torch.ops.resnet_fused.bn_stats`` vs ``torch.var_mean`` over (N, H, W).
* ``bn_apply``: ``bn_apply(y, scale, shift, identity, relu=True)`` vs eager with the statistics
  given: ``F.batch_norm(eval form) ; out += identity ; out.relu_()``.
* ``forward``: ``bn_stats`` + per-channel scale/shift + ``bn_apply`` vs
  ``F.batch_norm(training) ; out += identity ; out.relu_()``.
* ``backward (block end)``: what ``units.bn_add_relu``'s backward runs: ``threshold_backward``
  (the masked gradient, which is also the identity's gradient) + ``bn_backward_reduce`` +
  ``bn_backward_apply`` (unmasked) + the tiny parameter gradients, vs eager autograd of the forward
  above (``torch.autograd.grad`` on a retained graph: grads of y, weight, bias, identity).
* ``backward (bn+relu)``: ``bn_backward_reduce`` + ``bn_backward_apply`` with the ReLU mask inside
  (``units.bn_relu_conv``'s BN part) vs eager autograd of ``relu(F.batch_norm(training))``.

The machine may be shared: compare ratios from one run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

EPS = 1e-5


def _load_ops():
    try:
        import resnet_fused._C as C  # noqa: F401  (registers torch.ops.resnet_fused)
    except Exception as exc:  # not built
        sys.exit(f"resnet_fused._C cannot be imported ({exc}); build it with "
                 "`pip install --no-build-isolation -e .`")
    return C, torch.ops.resnet_fused


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each variant, per round; each round runs every variant once, in turn
    (the order alternates between rounds, so no variant always runs first)."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of num/den measured in the same round: the machine's slow drifts (other
    tenants, memory bandwidth) cancel in each pair."""
    return statistics.median(a / b for a, b in zip(num, den))


def run_layout(shape: Tuple[int, ...], dtype: torch.dtype, channels_last: bool, rounds: int) -> List[dict]:
    C_mod, OPS = _load_ops()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    c = shape[1]

    def rand(mean=0.0):
        return (torch.randn(shape, generator=g) + mean).to(dtype).contiguous(memory_format=fmt)

    y = rand(0.3)
    identity = rand()
    grad = rand()
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.rand(c, generator=g) - 0.5
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    copy_dst = torch.empty_like(y)
    count = y.numel() // c
    elem = y.element_size()
    size = y.numel() * elem

    # --- forward pieces --------------------------------------------------------------------
    def fused_stats():
        return OPS.bn_stats(y)

    def eager_stats():
        return torch.var_mean(y, dim=[0] + list(range(2, y.dim())), correction=0)

    mean, var = OPS.bn_stats(y)
    invstd = torch.rsqrt(var + EPS)
    scale = weight * invstd
    shift = bias - mean * scale

    def fused_apply():
        return OPS.bn_apply(y, scale, shift, identity, None, None, True)

    def eager_apply():
        out = F.batch_norm(y, mean, var, weight, bias, False, 0.0, EPS)
        out += identity
        return out.relu_()

    def fused_forward():
        m, v = OPS.bn_stats(y)
        s = weight * torch.rsqrt(v + EPS)
        return OPS.bn_apply(y, s, bias - m * s, identity, None, None, True)

    def eager_forward():
        out = F.batch_norm(y, running_mean, running_var, weight, bias, True, 0.1, EPS)
        out += identity
        return out.relu_()

    # --- backward ----------------------------------------------------------------------------
    out = fused_apply()  # the forward output (ReLU applied)

    def fused_backward_block():
        gm = torch.ops.aten.threshold_backward(grad, out, 0)
        sdy, sdx = OPS.bn_backward_reduce(gm, y, None, mean, False)
        gy = OPS.bn_backward_apply(gm, y, None, mean, invstd, weight, sdy / count, sdx / count, False)
        return gy, gm, sdx * invstd, sdy

    def fused_backward_bnrelu():
        sdy, sdx = OPS.bn_backward_reduce(grad, y, out, mean, True)
        gy = OPS.bn_backward_apply(grad, y, out, mean, invstd, weight, sdy / count, sdx / count, True)
        return gy, sdx * invstd, sdy

    leaf_y = y.detach().clone().requires_grad_(True)
    leaf_id = identity.detach().clone().requires_grad_(True)
    leaf_w = weight.detach().clone().requires_grad_(True)
    leaf_b = bias.detach().clone().requires_grad_(True)
    eager_out_block = F.batch_norm(leaf_y, running_mean.clone(), running_var.clone(), leaf_w, leaf_b, True, 0.1, EPS)
    eager_out_block = torch.relu(eager_out_block + leaf_id)
    eager_out_bnrelu = torch.relu(F.batch_norm(leaf_y, running_mean.clone(), running_var.clone(), leaf_w, leaf_b,
                                               True, 0.1, EPS))

    def eager_backward_block():
        return torch.autograd.grad(eager_out_block, (leaf_y, leaf_w, leaf_b, leaf_id), grad, retain_graph=True)

    def eager_backward_bnrelu():
        return torch.autograd.grad(eager_out_bnrelu, (leaf_y, leaf_w, leaf_b), grad, retain_graph=True)

    def copy():
        return copy_dst.copy_(y)

    variants = {
        "copy": copy,
        "stats/fused": fused_stats, "stats/eager": eager_stats,
        "apply/fused": fused_apply, "apply/eager": eager_apply,
        "forward/fused": fused_forward, "forward/eager": eager_forward,
        "bwd_block/fused": fused_backward_block, "bwd_block/eager": eager_backward_block,
        "bwd_bnrelu/fused": fused_backward_bnrelu, "bwd_bnrelu/eager": eager_backward_bnrelu,
    }
    times = interleaved(variants, rounds)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    bandwidth = 2 * size / med["copy"]  # bytes/s
    # Bytes the fused variant must move, in tensor sizes (reads + writes).
    traffic = {"stats": 1, "apply": 3, "forward": 4, "bwd_block": 3 + 2 + 3, "bwd_bnrelu": 3 + 4}
    labels = {"stats": "bn_stats", "apply": "bn_apply(+res, relu)", "forward": "forward: stats+apply",
              "bwd_block": "backward (block end)", "bwd_bnrelu": "backward (bn+relu)"}
    rows = []
    for key, label in labels.items():
        fused, eager = times[f"{key}/fused"], times[f"{key}/eager"]
        rows.append({
            "layout": "channels_last" if channels_last else "nchw", "op": label,
            "fused_ms": statistics.median(fused) * 1e3, "eager_ms": statistics.median(eager) * 1e3,
            "speedup": paired_ratio(eager, fused),
            # floor = traffic[key] / 2 copies of one tensor, per round
            "floor_ms": traffic[key] / 2 * med["copy"] * 1e3,
            "fused_over_floor": paired_ratio(fused, [c * traffic[key] / 2 for c in times["copy"]]),
            "copy_ms": med["copy"] * 1e3, "bandwidth_GBs": bandwidth / 1e9,
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,256,56,56")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    C_mod, _ = _load_ops()
    info = C_mod.build_info()
    print(f"shape {shape} {args.dtype}, threads {torch.get_num_threads()}, rounds {args.rounds}, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"kernels {info.get('cpu_capability_used', '?')} (compiled {info.get('cpu_capabilities_compiled', '?')})")
    rows = []
    for layout in args.layouts.split(","):
        rows += run_layout(shape, dtype, layout.strip() in ("cl", "channels_last"), args.rounds)
    print()
    print("| layout | op | fused ms | eager ms | speedup | floor ms | fused/floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['op']} | {r['fused_ms']:.2f} | {r['eager_ms']:.2f} | {r['speedup']:.2f}x "
              f"| {r['floor_ms']:.2f} | {r['fused_over_floor']:.2f} |")
    for layout in dict.fromkeys(r["layout"] for r in rows):
        r = next(r for r in rows if r["layout"] == layout)
        print(f"{layout}: copy_ of one tensor {r['copy_ms']:.2f} ms -> {r['bandwidth_GBs']:.1f} GB/s (read+write)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

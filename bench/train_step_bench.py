"""ResNet training step: torchvision eager vs fused blocks vs torch.compile vs the limit model,
both memory formats, with the share of the headroom captured and the bytes saved for backward.

    python bench/train_step_bench.py                 # issue 3's targets: resnet50, batch 8, 224x224,
                                                     # NCHW and channels_last, 2 threads, compile peer
    python bench/train_step_bench.py --no-compile --rounds 5 --json out.json
    python bench/train_step_bench.py --batch 2 --size 64 --rounds 1 --warmup 0 --no-compile  # smoke
    python bench/train_step_bench.py --malloc retain     # the same with freed memory kept in the
                                                     # process (no page-fault churn; see below)

For each memory format, in one process: the torchvision model (random weights, random BN affine,
warmed running statistics, model and input in that format), its fused copy
(``resnet_fused.swap_blocks``, same weights), ``torch.compile`` of a copy of the torchvision model
(first call, i.e. compilation, timed on its own and excluded) and the limit model (every BatchNorm and
ReLU replaced by Identity: all fused work free). A step is forward + cross-entropy + backward, no
optimizer (:func:`resnet_fused.benchmarking.train_step`). The variants run interleaved
(:func:`resnet_fused.benchmarking.interleaved`: each round calls every variant once, rotating the
order), ``torch.set_num_threads(--threads)``.

Quoted per variant: median step time; ``speedup`` = eager / variant and ``headroom`` =
(eager - variant) / (eager - limit), both as medians of the per-round values (the variants of one
round ran back to back, so slow drifts of a shared machine cancel) and, in brackets, from the
medians. Targets of issue 3: fused headroom >= 0.5 and fused at least as fast as compile, in both
formats; saved bytes (activations kept for backward, unique storages, parameters excluded)
fused / eager <= 0.90. Parity (fused vs eager rel_err of the output and worst gradient) is quoted
beside the timings. Absolute times on a shared machine mean little: read the ratios.

Page faults: each variant's minor page faults per step are quoted beside its time. With glibc's
defaults a ResNet-50 step at batch 8 can return memory to the OS and fault it back (measured 0 to
100,000 faults a step, ~3 us each on the 2-core VM, varying with heap layout and so with which
variants share the process). ``--malloc retain`` keeps freed memory in the process for every variant
alike (:mod:`resnet_fused.allocator`), so the times compare kernels rather than heap layouts; runs
with and without it are both worth quoting.

``--clock cpu`` times each call in process CPU seconds (``time.process_time``: the work of all the
process's threads) instead of wall seconds: a proxy for a machine shared with other jobs, where wall
time mostly measures the neighbours. Run it with ``OMP_WAIT_POLICY=PASSIVE`` so that OpenMP threads
waiting at a barrier sleep instead of spinning (spinning would count as work). It overweights
parallel work against serial work (Python, single-threaded ops) by up to the thread count; the
numbers to quote are wall-clock ratios from a quiet machine (the default clock).

What bounds the fused step (memory passes over each BN-sized tensor S, reads + writes, beyond
what the limit model does; resnet50, batch 8, 224x224, float32):

    per tensor                     eager   fused                                              limit
    BN+ReLU feeding a conv          13      10 (fwd 3; bwd recompute 2 + reduce 2 + apply 3)   0
    block end (bn3 + add + relu)    16      12 (fwd 4; bwd mask 3 + reduce 2 + apply 3)        3 (add)
    downsample BN                    8       6                                                  0
    stem BN+ReLU (FusedResNet)      13       8 (fwd 3; bwd reduce 2 + apply 3)                  0

(the backward reduce and apply recompute the ReLU mask from the saved input and the forward's
scale/shift, so neither reads a BN+ReLU output). Summed over the network (sum of S: BN+ReLU units
105 MB, block ends 177 MB, downsample 48 MB, stem 26 MB) that is about 4.4 GB (eager) vs 3.1 GB
(fused) of traffic the limit model does not have: by bytes alone the fused model captures about 28%
of the headroom (21% before the mask from the input and the fused stem); the rest of any gain has
to come from per-pass efficiency (ATen's NCHW BatchNorm kernels are well below bandwidth, its
channels-last ones are not). The identity gradient's accumulation (read 2S, write S per block) is
done by autograd in all three variants.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torchvision
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: import the tree this file lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resnet_fused  # noqa: E402
from resnet_fused import allocator  # noqa: E402
from resnet_fused import benchmarking as bm  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _paired(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _paired_headroom(eager: Sequence[float], var: Sequence[float], limit: Sequence[float]) -> Optional[float]:
    shares = [bm.headroom_share(e, v, l) for e, v, l in zip(eager, var, limit)]
    shares = [s for s in shares if s is not None]
    return statistics.median(shares) if shares else None


def measure(model_name: str = "resnet50", batch: int = 8, size: int = 224, layout: str = "nchw",
            rounds: int = 7, warmup: int = 1, threads: int = 2, compile_peer: bool = True,
            clock: str = "wall", log=print) -> Dict[str, Any]:
    """One memory format: timings, ratios, saved bytes and parity as one record."""
    fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    with bm.fixed_threads(threads):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        labels = torch.randint(0, 1000, (batch,))
        loss = lambda out: F.cross_entropy(out, labels)  # noqa: E731
        ref = bm.randomize_bn_affine(getattr(torchvision.models, model_name)(weights=None))
        ref = bm.warm_running_stats(ref.to(memory_format=fmt), x)
        fused = resnet_fused.swap_blocks(copy.deepcopy(ref))
        limit = bm.limit_model(ref)
        models = {"eager": ref, "fused": fused, "limit": limit}
        if compile_peer:
            models["compile"] = torch.compile(copy.deepcopy(ref))
        for m in models.values():
            m.train()

        parity = bm.train_parity(ref, fused, x.detach().requires_grad_(True), loss)
        saved = {name: bm.saved_bytes(lambda m=models[name]: m(x), exclude=list(models[name].parameters()))
                 for name in ("eager", "fused")}
        calls = {name: bm.train_step(m, x, loss) for name, m in models.items()}
        compile_s = None
        if compile_peer:
            compile_s = bm.timed_call(calls["compile"])  # compilation: first call, on its own
            log(f"[{layout}] torch.compile first call {compile_s:.1f} s")
        results = bm.interleaved(calls, rounds, warmup, threads, clock=CLOCKS[clock])

    t = {name: list(r.times) for name, r in results.items()}
    med = {name: r.median for name, r in results.items()}
    faults = {name: r.median_faults for name, r in results.items()}
    rec: Dict[str, Any] = dict(
        model=model_name, batch=batch, size=size, layout=layout, threads=threads, rounds=rounds, clock=clock,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        warmup=warmup, backend=resnet_fused.backend_for(x.device, x.dtype),
        load_avg_1m=os.getloadavg()[0], median_s=med, times_s=t,
        malloc=allocator.malloc_policy(), median_faults=faults,
        faults={name: list(r.faults) for name, r in results.items()},
        saved_bytes=saved, saved_ratio=saved["fused"] / saved["eager"],
        rel_err_out=parity.output, rel_err_grad_max=parity.max_grad,
        rel_err_grad_worst=max(parity.grads, key=parity.grads.get) if parity.grads else None,
        rel_err_grad_median=statistics.median(parity.grads.values()) if parity.grads else None,
        compile_s=compile_s,
        # FusedResNet.activation_memory_format: does the fused model run channels_last inside?
        fused_activations=("channels_last" if fused.activation_input(x).is_contiguous(memory_format=torch.channels_last)
                           else "as the input"))
    for name in models:
        if name in ("eager", "limit"):
            continue
        rec[f"{name}_speedup"] = _paired(t["eager"], t[name])
        rec[f"{name}_speedup_of_medians"] = med["eager"] / med[name]
        rec[f"{name}_headroom"] = _paired_headroom(t["eager"], t[name], t["limit"])
        rec[f"{name}_headroom_of_medians"] = bm.headroom_share(med["eager"], med[name], med["limit"])
    if compile_peer:
        rec["fused_vs_compile"] = _paired(t["compile"], t["fused"])  # > 1: fused is faster
    return rec


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(rec: Dict[str, Any]) -> str:
    lines = [f"{rec['model']} train step, batch {rec['batch']}, {rec['size']}x{rec['size']}, "
             f"{rec['layout']}, {rec['threads']} threads, {rec['clock']} clock, {rec['rounds']} rounds (+{rec['warmup']} "
             f"warmup), backend {rec['backend']} (fused activations {rec['fused_activations']}), malloc {rec['malloc']}, "
             f"load {rec['load_avg_1m']:.1f}"]
    lines.append(f"  {'variant':8s} {'median ms':>10s} {'speedup':>16s} {'headroom':>16s} {'faults/step':>12s}")
    for name, m in rec["median_s"].items():
        sp = rec.get(f"{name}_speedup")
        hr = rec.get(f"{name}_headroom")
        sp_m = rec.get(f"{name}_speedup_of_medians")
        hr_m = rec.get(f"{name}_headroom_of_medians")
        lines.append(f"  {name:8s} {m * 1e3:10.1f} {_fmt(sp, '.3f'):>7s} ({_fmt(sp_m, '.3f'):>6s}) "
                     f"{_fmt(hr, '.3f'):>7s} ({_fmt(hr_m, '.3f'):>6s}) "
                     f"{_fmt(rec['median_faults'].get(name), '.0f'):>12s}")
    if "fused_vs_compile" in rec:
        lines.append(f"  fused vs compile: {rec['fused_vs_compile']:.3f}x (compile / fused, per-round "
                     f"median; compile's first call {rec['compile_s']:.1f} s excluded)")
    sb = rec["saved_bytes"]
    lines.append(f"  saved for backward: eager {sb['eager'] / 2**20:.1f} MiB, fused "
                 f"{sb['fused'] / 2**20:.1f} MiB, ratio {rec['saved_ratio']:.3f}")
    lines.append(f"  parity fused vs eager: output {rec['rel_err_out']:.1e}, worst gradient "
                 f"{_fmt(rec['rel_err_grad_max'], '.1e')} ({rec['rel_err_grad_worst']}), median "
                 f"gradient {_fmt(rec['rel_err_grad_median'], '.1e')}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--layouts", default="nchw,cl", help="comma-separated: nchw, cl")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile peer (default on; compiling resnet50 fwd+bwd takes minutes "
                        "on a small CPU)")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall (default: the numbers to quote) or cpu (process CPU time, a proxy on "
                        "a machine shared with other jobs; use OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--malloc", default="default", choices=("default", "retain"),
                   help="retain: keep freed memory in the process (resnet_fused.allocator."
                        "retain_freed_memory, glibc) so steps do not re-fault pages the allocator "
                        "gave back; applies to every variant alike (default: glibc as it is)")
    p.add_argument("--json", default=None, help="also write the records to this file")
    args = p.parse_args(argv)
    if args.malloc == "retain":
        allocator.retain_freed_memory()
    records = []
    for layout in args.layouts.split(","):
        t0 = time.perf_counter()
        rec = measure(args.model, args.batch, args.size, layout, args.rounds, args.warmup,
                      args.threads, args.compile, args.clock)
        print(report(rec), f"\n  ({time.perf_counter() - t0:.0f} s)", flush=True)
        records.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()

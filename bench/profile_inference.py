"""Where the inference time goes, per op (torch.profiler), in the folded model and its peers.

    python bench/profile_inference.py [--model resnet50] [--batch 1] [--size 224] [--threads 2]
                                      [--calls 5] [--rows 12] [--no-compile]

First an interleaved timing of the variants (median of 15 rounds, as ``resnet-fused bench``), then
one per-op table per variant, sorted by self CPU time over ``--calls`` calls: the folded model
(oneDNN post-ops on pre-packed weights), its public ATen path, its conv-only limit, and
``torch.compile`` with freezing on a channels_last copy (compiled first, outside the timings).
Run from the repository root so the checkout's package is imported.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import resnet_fused  # noqa: E402
from resnet_fused import benchmarking as bm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = bm.randomize_bn_affine(getattr(torchvision.models, args.model)(weights=None))
    bm.warm_running_stats(model, torch.randn(2, 3, args.size, args.size)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    folded = resnet_fused.fold_bn(model)
    variants = {"folded": folded, "folded-aten": bm.PublicPath(folded),
                "limit-folded": bm.limit_model(folded)}
    if args.compile:
        variants["compile-freeze"], _ = bm.compile_frozen(model)
    with torch.no_grad():
        for m in variants.values():  # compiles, packs weights
            m(x)
        results = bm.interleaved({n: bm.infer_forward(m, x) for n, m in variants.items()},
                                 rounds=15, warmup=1)
    print(f"{args.model} eval forward, batch {args.batch}, {args.size}x{args.size}, float32, "
          f"{args.threads} threads: median of 15 interleaved rounds")
    for name, r in results.items():
        print(f"  {name:16s} {r.median * 1e3:8.1f} ms  (IQR {r.iqr * 1e3:.1f})")
    for name, m in variants.items():
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                m(x)
        print(f"\n{name}: {args.calls} calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=48))


if __name__ == "__main__":
    main()

"""A long two-variant A/B of issue 4's target: the folded ResNet against torch.compile with freezing
(channels_last copy), nothing else in the process, interleaved, on a fixed thread count.

    python bench/inference_ab.py --batch 1 --rounds 61
    python bench/inference_ab.py --batch 8 --rounds 31

`resnet-fused bench` times eight variants per round, so each call runs with the caches left by the
others; this times only the two compared, over more rounds, and prints the per-round median of
compile-freeze / folded (> 1: the folded model is faster) beside the ratio of the medians.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torchvision

if __package__ in (None, ""):  # run as a script: import the tree this file lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resnet_fused  # noqa: E402
from resnet_fused import benchmarking as bm  # noqa: E402

from bench._script_args import run_parser  # noqa: E402


def main(argv=None) -> dict:
    a = run_parser(__doc__.splitlines()[0], batch=1, rounds=31, warmup=3).parse_args(argv)
    torch.manual_seed(0)
    with bm.fixed_threads(a.threads):
        x = torch.randn(a.batch, 3, a.size, a.size)
        ref = getattr(torchvision.models, a.model)(weights=None)
        ref = bm.warm_running_stats(bm.randomize_bn_affine(ref), x).eval()
        folded = resnet_fused.fold_bn(ref)
        compiled, _ = bm.compile_frozen(ref)
        with torch.no_grad():
            compiled(x)  # compiles
        parity = bm.infer_parity(ref, folded, x).output
        res = bm.interleaved({"folded": bm.infer_forward(folded, x),
                              "compile-freeze": bm.infer_forward(compiled, x)}, a.rounds, a.warmup, a.threads)
    f, c = res["folded"].times, res["compile-freeze"].times
    rec = dict(model=a.model, batch=a.batch, size=a.size, rounds=a.rounds, threads=a.threads,
               folded_ms=1e3 * statistics.median(f), compile_freeze_ms=1e3 * statistics.median(c),
               per_round=statistics.median([ci / fi for ci, fi in zip(c, f)]),
               of_medians=statistics.median(c) / statistics.median(f), rel_err=parity)
    print(f"{a.model} eval forward, batch {a.batch}, {a.size}x{a.size}, {a.threads} threads, {a.rounds} rounds: "
          f"folded {rec['folded_ms']:.1f} ms, compile-freeze {rec['compile_freeze_ms']:.1f} ms; "
          f"compile-freeze / folded: per-round median {rec['per_round']:.3f}, of medians {rec['of_medians']:.3f} "
          f"(folded rel_err {parity:.1e})")
    return rec


if __name__ == "__main__":
    main()

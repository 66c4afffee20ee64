"""Does a channels_last input pay on this CPU? The measurements behind FusedResNet's
``channels_last_min_pixels``: an NCHW model (NCHW parameters) fed NCHW or channels_last input,
torchvision and fused, interleaved in one process, on a fixed thread count.

    python bench/layout_ab.py --model resnet50 --batch 8 --size 224 --mode train --rounds 5
    python bench/layout_ab.py --model resnet50 --batch 1 --size 224 --mode eval --rounds 15

Variants: ``torchvision`` (NCHW throughout), ``torchvision-cl-input`` (the same model, the input
made channels_last first), ``fused-auto`` (``swap_blocks``, ``activation_memory_format="auto"``),
``fused-preserve`` (NCHW throughout) and ``fused-channels_last`` (converted whatever the size).
Prints the median per variant and its speedup over ``torchvision``.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Dict

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: import the tree this file lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resnet_fused  # noqa: E402
from resnet_fused import benchmarking as bm  # noqa: E402

from bench._script_args import run_parser  # noqa: E402


class ChannelsLastInput(nn.Module):
    """``model(x.contiguous(memory_format=torch.channels_last))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def main(argv=None) -> Dict[str, float]:
    p = run_parser(__doc__.splitlines()[0], batch=8, rounds=5, warmup=1)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with bm.fixed_threads(a.threads):
        x = torch.randn(a.batch, 3, a.size, a.size)
        labels = torch.randint(0, 1000, (a.batch,))
        ref = getattr(torchvision.models, a.model)(weights=None)
        ref = bm.warm_running_stats(bm.randomize_bn_affine(ref), x)
        models = {"torchvision": ref, "torchvision-cl-input": ChannelsLastInput(copy.deepcopy(ref))}
        for setting in ("auto", "preserve", "channels_last"):
            fused = resnet_fused.swap_blocks(copy.deepcopy(ref))
            fused.activation_memory_format = setting
            models[f"fused-{setting}"] = fused
        calls = {}
        for name, m in models.items():
            m.train(a.mode == "train")
            calls[name] = (bm.train_step(m, x, lambda out: F.cross_entropy(out, labels)) if a.mode == "train"
                           else bm.infer_forward(m, x))
        res = bm.interleaved(calls, a.rounds, a.warmup, a.threads)
    base = res["torchvision"].median
    print(f"{a.model} {a.mode}, batch {a.batch}, {a.size}x{a.size} ({a.batch * a.size * a.size} pixels; "
          f"channels_last_min_pixels {resnet_fused.FusedResNet.channels_last_min_pixels}), {a.threads} threads, "
          f"median of {a.rounds} interleaved rounds:")
    for name, r in res.items():
        print(f"  {name:22s} {1e3 * r.median:9.1f} ms  {base / r.median:.3f}x")
    return {name: r.median for name, r in res.items()}


if __name__ == "__main__":
    main()

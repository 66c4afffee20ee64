"""The arguments the bench/ A/B scripts share (model, input size, rounds, threads)."""
from __future__ import annotations

import argparse


def run_parser(description: str, batch: int, rounds: int, warmup: int) -> argparse.ArgumentParser:
    """--model, --batch, --size, --rounds, --warmup, --threads with these defaults (2 threads,
    resnet50 at 224x224); add script-specific options to the returned parser."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--threads", type=int, default=2)
    return p

"""GPU memory-traffic model: bytes moved outside the convolutions' own operands, eager vs fused plans.

Counting rules (DESIGN.md, "Benchmarks"): every kernel reads each of its inputs once and writes each
output once; a convolution's own operand reads and writes (input, weight, output, and in backward
grad_output, grad_input, grad_weight) are not counted; everything else is. Sizes are taken from the
real model (a forward pass on the ``meta`` device), so every layer of any torchvision ResNet is
covered. Per-channel vectors (statistics, per-tile partials) are ignored: they are
O(channels x tiles), under 0.1% of the activations at any batch size worth running.

Plans (what each block's BatchNorm/ReLU/add work costs, written as passes over named tensors):

* ``eager``      torchvision: BN = statistics (read) + normalize (read, write); in-place ReLU, in-place
                 add; backward: ReLU backward, BN backward = reduce (2 reads) + elementwise (2 reads, 1
                 write), gradient accumulation where the block input has two users.
* ``fused``      today's autograd units (resnet_fused/units.py) on any backend of Triton part 1 or the
                 C++ kernels: bn_stats + bn_apply(+ReLU) before each inner conv; one block-end apply
                 with the residual (and the downsample BN) in the same pass; backward masks the
                 block-end gradient once, recomputes each inner BN+ReLU output for ATen's conv backward
                 (its only reader) and takes the inner BN+ReLU backward's ReLU mask from the saved
                 input: ``y*scale + shift > 0``, recomputed inside the reduce and apply kernels.
                 On the CPU a strided 1x1 downsample's input gradient stays on its stride grid and
                 is added in place into conv1's (``fused_cpu_train``; the unit is CPU-only).
* ``triton``     Triton part 3 as built (resnet_fused/triton_units.py), ATen's conv backward: every
                 block conv (conv1, the inner convs, the last conv, the downsample conv) is the Triton
                 conv ``conv2d_bn_stats`` whose epilogue gives its BN's statistics, BN+ReLU in the next
                 conv's prologue (the BN+ReLU output never exists in forward); backward as ``fused``
                 (ATen's conv backward needs the recomputed BN+ReLU output in memory). Checked against
                 the ops the blocks launch by tests/triton/test_triton_traffic.py.
* ``triton_end_mask``  as ``triton``, with the block-end reduce writing the masked gradient it
                 computes (instead of a threshold_backward pass before it), so the apply reads it back
                 instead of ``grad`` and ``out``. Needs a second output of the reduce primitive (not
                 built).
* ``triton_conv_backward``  as ``triton_end_mask``, with a Triton conv backward: the BN+ReLU
                 recompute in its prologue (no recomputed tensor in memory) and the identity's gradient
                 accumulated in the grad-input epilogue of the block's first conv.

The stem (``conv1 -> bn1 -> relu``, then the max-pool; :class:`resnet_fused.FusedResNet`), per
element of the stem conv's output: ``eager`` 13 (BN statistics 1, normalize 2, ReLU 2; backward ReLU
3, BN 5); ``fused`` 8 (``units.bn_relu``: bn_stats 1, one apply with the ReLU 2; backward reduce 2
and apply 3, both recomputing the ReLU mask from the saved input: no separate ReLU pass, the output
is not read); ``triton`` and the plans after it 7 (statistics from the Triton stem conv's epilogue:
0; apply 2; backward 5 as ``fused``: the output feeds the max-pool, not a conv, so there is no
prologue to take the BN+ReLU; a Triton conv backward changes nothing here, the stem conv's input is
the image).

Inference: ``eager`` (BN normalize, in-place ReLU/add) vs ``folded_triton`` (fold_bn + the Triton conv
with bias/residual/ReLU epilogue: only the residual read remains); folded, the stem's BN+ReLU is the
stem conv's epilogue.

Run ``python -m bench.traffic_model --model resnet50 --batch 32 --dtype bfloat16 --mode train``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

TRAIN_PLANS = ("eager", "fused", "triton", "triton_end_mask", "triton_conv_backward")
INFER_PLANS = ("eager", "folded_triton")


@dataclass
class BlockShapes:
    """Element counts of the tensors a block's BN/ReLU/add work touches."""

    name: str
    x: int                  # block input (the identity when there is no downsample)
    ys: List[int]           # conv outputs along the main branch, in order; the last one is added
    y_ds: int = 0           # downsample conv output (0: no downsample)
    x_grid: int = 0         # block input on a strided 1x1 downsample's stride grid (0: none such)

    @property
    def out(self) -> int:
        return self.ys[-1]


@dataclass
class StemShapes:
    name: str
    y: int                  # stem conv output, normalized and ReLU'd before the max-pool


@dataclass
class Layer:
    name: str
    elements: Dict[str, float] = field(default_factory=dict)   # plan -> elements moved

    def bytes(self, plan: str, itemsize: int) -> float:
        return self.elements[plan] * itemsize


# --- per-plan element counts (multiply by the dtype's size) -----------------------------------------

def _eager_train(b: BlockShapes) -> float:
    inner = sum(5 * y for y in b.ys[:-1])            # BN stats 1 + normalize 2, ReLU 2
    end = 3 * b.out + 3 * b.out + 2 * b.out          # BN, add (2 reads, 1 write), ReLU
    ds = 3 * b.y_ds                                   # downsample BN
    fwd = inner + end + ds
    bwd_inner = sum(3 * y + 5 * y for y in b.ys[:-1])  # ReLU backward 3, BN backward 5
    bwd_end = 3 * b.out + 5 * b.out + 5 * b.y_ds       # ReLU backward, BN backward (x2 with ds)
    accumulate = 3 * b.x                               # two users of the block input
    return fwd + bwd_inner + bwd_end + accumulate


def _fused_forward(b: BlockShapes) -> float:
    inner = sum(3 * y for y in b.ys[:-1])            # bn_stats 1 + bn_apply(ReLU) 2
    end = b.out + b.y_ds + 3 * b.out                 # bn_stats (both BNs), apply: y, residual, out
    return inner + end


def _block_end_backward(b: BlockShapes, reduce_writes_mask: bool) -> float:
    if reduce_writes_mask:
        # reduce: read grad, out, y; write the masked gradient g; apply: read g, y; write dy
        main = 4 * b.out + 3 * b.out
        ds = (b.y_ds + 3 * b.y_ds) if b.y_ds else 0   # y_ds read by the reduce; apply g, y_ds -> dy_ds
    else:
        # threshold_backward (grad, out -> g), reduce (g, y), apply (g, y -> dy)
        main = 3 * b.out + 2 * b.out + 3 * b.out
        ds = (2 * b.y_ds + 3 * b.y_ds) if b.y_ds else 0
    return main + ds


def _inner_backward(b: BlockShapes, recompute_in_memory: bool, mask_from_input: bool) -> float:
    total = 0.0
    for y in b.ys[:-1]:
        recompute = 2 * y if recompute_in_memory else 0    # read y, write a for ATen's conv backward
        if mask_from_input:
            reduce_, apply_ = 2 * y, 3 * y                  # (grad_a, y), (grad_a, y -> dy)
        else:
            reduce_, apply_ = 3 * y, 4 * y                  # (grad_a, y, a), (grad_a, y, a -> dy)
        total += recompute + reduce_ + apply_
    return total


def _fused_train(b: BlockShapes) -> float:
    return (_fused_forward(b) + _block_end_backward(b, False)
            + _inner_backward(b, recompute_in_memory=True, mask_from_input=True) + 3 * b.x)


def fused_cpu_train(b: BlockShapes) -> float:
    """``fused`` as it runs on the CPU: with a strided 1x1 downsample conv, the downsample's input
    gradient is computed on its stride grid and added in place into conv1's input gradient
    (units.conv_and_strided_downsample: read both, write one, on the grid) instead of autograd
    accumulating two full-size gradients. Not a GPU plan (the unit is CPU-only), hence not in
    BLOCK_RULES; tests/test_traffic_model.py checks it against the ops the CPU blocks launch."""
    if not b.x_grid:
        return _fused_train(b)
    return _fused_train(b) - 3 * b.x + 3 * b.x_grid


def _triton_forward(b: BlockShapes) -> float:
    return 3 * b.out            # block-end apply only: statistics in epilogues, BN+ReLU in prologues


def _triton_train(b: BlockShapes) -> float:
    return (_triton_forward(b) + _block_end_backward(b, False)
            + _inner_backward(b, recompute_in_memory=True, mask_from_input=True) + 3 * b.x)


def _triton_end_mask_train(b: BlockShapes) -> float:
    return (_triton_forward(b) + _block_end_backward(b, True)
            + _inner_backward(b, recompute_in_memory=True, mask_from_input=True) + 3 * b.x)


def _triton_conv_backward_train(b: BlockShapes) -> float:
    # the identity's gradient is read once by the first conv's grad-input epilogue (no extra pass);
    # with a downsample conv, both convs' grad-inputs meet: the second adds in its epilogue likewise
    return (_triton_forward(b) + _block_end_backward(b, True)
            + _inner_backward(b, recompute_in_memory=False, mask_from_input=True) + b.x)


def _eager_infer(b: BlockShapes) -> float:
    inner = sum(2 * y + 2 * y for y in b.ys[:-1])     # BN normalize 2, ReLU 2
    return inner + 2 * b.out + 3 * b.out + 2 * b.out + 2 * b.y_ds


def _folded_triton_infer(b: BlockShapes) -> float:
    return b.out                # the residual read by the last conv's epilogue


BLOCK_RULES: Dict[str, Dict[str, Callable[[BlockShapes], float]]] = {
    "train": {"eager": _eager_train, "fused": _fused_train, "triton": _triton_train,
              "triton_end_mask": _triton_end_mask_train,
              "triton_conv_backward": _triton_conv_backward_train},
    "infer": {"eager": _eager_infer, "folded_triton": _folded_triton_infer},
}


def _stem_train(stats: int, reduce_: int, apply_: int) -> Callable[[StemShapes], float]:
    # forward: statistics pass + apply (read y, write a); backward: reduce + apply
    return lambda s: (stats + 2 + reduce_ + apply_) * s.y


STEM_RULES: Dict[str, Dict[str, Callable[[StemShapes], float]]] = {
    "train": {"eager": lambda s: 5 * s.y + 8 * s.y,   # BN 3 + ReLU 2; ReLU backward 3 + BN backward 5
              "fused": _stem_train(stats=1, reduce_=2, apply_=3),   # reduce (g, y), apply (g, y -> dy)
              "triton": _stem_train(stats=0, reduce_=2, apply_=3),  # statistics in the conv epilogue
              "triton_end_mask": _stem_train(stats=0, reduce_=2, apply_=3),
              "triton_conv_backward": _stem_train(stats=0, reduce_=2, apply_=3)},
    "infer": {"eager": lambda s: 4 * s.y,             # BN normalize 2, ReLU 2
              "folded_triton": lambda s: 0.0},
}


def _stem_elements(s: StemShapes, mode: str, plan: str) -> float:
    return STEM_RULES[mode][plan](s)


# --- shapes from the model --------------------------------------------------------------------------

def collect_shapes(model: nn.Module, batch: int, size: int) -> Tuple[StemShapes, List[BlockShapes]]:
    """Run the model on the meta device and record the element counts each block touches."""
    model = model.to("meta").eval()
    records: Dict[str, Dict[str, int]] = {}
    handles = []

    def recorder(name: str, key: str):
        def hook(module, inputs, output):
            rec = records.setdefault(name, {})
            if key == "x":
                rec[key] = inputs[0].numel()
            elif key == "ds":
                rec[key] = output.numel()
                if module.kernel_size == (1, 1) and module.stride != (1, 1):
                    n, c = inputs[0].shape[:2]
                    rec["x_grid"] = n * c * output.shape[2] * output.shape[3]
            else:
                rec[key] = output.numel()
        return hook

    block_names = []
    for name, module in model.named_modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            block_names.append(name)
            handles.append(module.register_forward_hook(recorder(name, "x")))
            convs = ["conv1", "conv2"] + (["conv3"] if isinstance(module, Bottleneck) else [])
            for c in convs:
                handles.append(getattr(module, c).register_forward_hook(recorder(name, c)))
            if module.downsample is not None:
                handles.append(module.downsample[0].register_forward_hook(recorder(name, "ds")))
    handles.append(model.conv1.register_forward_hook(recorder("stem", "y")))
    try:
        with torch.no_grad():
            model(torch.empty(batch, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()

    blocks = []
    for name in block_names:
        rec = records[name]
        ys = [rec[c] for c in ("conv1", "conv2", "conv3") if c in rec]
        blocks.append(BlockShapes(name, rec["x"], ys, rec.get("ds", 0), rec.get("x_grid", 0)))
    return StemShapes("stem", records["stem"]["y"]), blocks


def traffic(model_name: str, batch: int, size: int, mode: str) -> List[Layer]:
    """Per-layer element counts for every plan of ``mode`` ('train' or 'infer')."""
    if mode not in BLOCK_RULES:
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    builder = getattr(torchvision.models, model_name, None)
    if builder is None or not model_name.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"unknown torchvision ResNet {model_name!r}")
    with torch.device("meta"):
        model = builder()
    stem, blocks = collect_shapes(model, batch, size)
    plans = BLOCK_RULES[mode]
    layers = [Layer(stem.name, {p: _stem_elements(stem, mode, p) for p in plans})]
    for b in blocks:
        layers.append(Layer(b.name, {p: rule(b) for p, rule in plans.items()}))
    return layers


def totals(layers: Sequence[Layer]) -> Dict[str, float]:
    plans = layers[0].elements.keys()
    return {p: sum(layer.elements[p] for layer in layers) for p in plans}


_NO_TRAFFIC = ("detach", "view", "alias", "expand", "as_strided", "permute", "squeeze", "unsqueeze",
               "slice", "select", "aten.t.", "aten.empty")   # empty: allocates, touches no memory
_CONV_OPERANDS = ("convolution", "conv2d_bn_stats")   # ATen conv fwd/bwd, the Triton training conv: own operands


def measured_elements(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Activation elements one training step of ``block`` (forward + backward) reads and writes
    outside its convolutions, counted at the dispatcher: every op's 4-D tensors whose first
    dimension is the batch (activations, not weights or per-channel vectors), inputs read once and
    outputs written once. Checks the ``fused`` plan against what the units really launch. ``block``
    is a module or any callable (e.g. ``FusedResNet._fused_stem``, the stem up to the max-pool)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    batch = x.shape[0]

    def activations(tree) -> int:
        return sum(t.numel() for t in tree_leaves(tree)
                   if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == batch)

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if not any(k in name for k in _NO_TRAFFIC + _CONV_OPERANDS):
                Counter.total += activations((args, kwargs)) + activations(out)
            return out

    x = x.detach().requires_grad_()
    with torch.no_grad():
        grad = torch.randn_like(block(x))
    with Counter():
        block(x).backward(grad)
    return float(Counter.total)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic_model", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    parser.add_argument("--per-layer", action="store_true", help="one row per block, not only totals")
    args = parser.parse_args(argv)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for mode in (("train", "infer") if args.mode == "both" else (args.mode,)):
        layers = traffic(args.model, args.batch, args.size, mode)
        plans = list(layers[0].elements)
        table = Table(title=f"{args.model} {mode}, batch {args.batch}, {args.size}x{args.size}, "
                            f"{args.dtype}: GB outside the convolutions' operands (ratio vs eager)")
        table.add_column("layer")
        for p in plans:
            table.add_column(p, justify="right")
        rows = layers if args.per_layer else []
        for layer in rows:
            eager = layer.elements["eager"] or 1.0
            table.add_row(layer.name, *[f"{layer.bytes(p, itemsize) / 1e9:.3f} ({layer.elements[p] / eager:.2f})"
                                        for p in plans])
        tot = totals(layers)
        table.add_row("model", *[f"{tot[p] * itemsize / 1e9:.3f} ({tot[p] / tot['eager']:.3f})" for p in plans],
                      style="bold")
        console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

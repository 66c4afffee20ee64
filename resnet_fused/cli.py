"""``resnet-fused``: what was built (``info``), how fast it runs (``bench``), whether it is right
(``check``).

    resnet-fused info
    resnet-fused bench --model resnet50 --batch 16 --size 160 --mode train --json out.json
    resnet-fused bench --model resnet50 --mode infer --size 224 --batch 1 --compile --plot out.png
    resnet-fused check                      # all ten torchvision ResNets; or --model resnet18

``bench`` times, interleaved in one process (:mod:`resnet_fused.benchmarking`): torchvision's
eager model; the same model with fused blocks (same weights); in inference also torchvision on a
channels_last copy, the BatchNorm-folded model (``fold_bn``) on its oneDNN pre-packed path and on
the public ATen path, ONNX Runtime when installed; with ``--compile`` ``torch.compile`` of the
torchvision model (inference: inductor freezing on a channels_last copy); and the limit models
(every BatchNorm and ReLU removed: the bound where all fused work is free, on the eager path and on
the folded path). Each speedup is quoted with its parity against torchvision. Bad arguments end
with a one-line message on stderr and a non-zero exit status, not a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F

import resnet_fused
from resnet_fused import allocator
from resnet_fused import benchmarking as bm
from resnet_fused._extension import triton_version
from resnet_fused.backends import BACKENDS, BackendError

MODELS = tuple(resnet_fused.models.__all__)
# DESIGN.md, "Numerics": float32 parity of fused vs torchvision
TOL_OUT, TOL_GRAD, TOL_STATS = 1e-5, 1e-4, 1e-5
# A kind of tensor also passes when float32 itself is the limit, i.e. when torchvision's own float32
# result misses the tolerance against a float64 torchvision. Deep models on small random inputs are
# that ill-conditioned: torchvision's own float32 gradients of resnet50 at 64x64 are 1-8% off
# float64, through ReLU masks that flip on rounding early in the network and move every gradient
# downstream of them (one event, correlated across tensors, so neither the worst nor the median
# ratio of two float32 implementations is stable). There the math is checked in float64 instead:
# the fused model in float64 must match torchvision in float64 within TOL_F64 (measured ~1e-11 on
# resnet152), which a formula error cannot pass; and the fused float32 error vs float64 must stay
# within F64_RATIO of torchvision's own, a bound on gross float32-only errors (cancellation, wrong
# accumulation dtype: orders of magnitude). F64_RATIO comes from measurement: the ratio reached 3.3
# over 24 draws of resnet50, resnet152 and wide_resnet101_2 at batch 2, 64x64, and was below 1 as
# often as above.
TOL_F64 = 1e-10
F64_RATIO = 10.0
# --compile default, measured (README, "Benchmarks"): see COMPILE_DEFAULT_WHY
COMPILE_DEFAULT = True
COMPILE_DEFAULT_WHY = (
    "--compile is on by default (--no-compile leaves the compile peers out): measured on the "
    "2-core CPU at load ~2, the default run takes 13 s without them and 57 s with them from a "
    "cold inductor cache (compiling resnet18's training step took 33 s, the freezing inference "
    "compile 6 s), within the two-minute budget; with other load on the machine it takes "
    "several times longer. The first (compiling) call of each compiled peer is timed apart and "
    "excluded from the rounds.")
CHECK_ALL_TIME = "1 to 3 minutes at load ~3 (about 30 minutes with heavy other load)"
# ResNets downsample by 32: the last stage sees ceil(size / 32) squared positions per image
_STRIDE = 32


class UsageError(Exception):
    """A bad argument or an impossible request: reported in one line, never as a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, so
    ``main`` can return a status (and tests can call it) with a one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resnet-fused", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,check}")
    commands.add_parser("info", help="what was built, and the available backends")
    _add_bench_parser(commands)
    _add_check_parser(commands)
    return parser


def _add_common(p: argparse.ArgumentParser, batch: int, size: int, every_model: bool = False
                ) -> None:
    if every_model:
        p.add_argument("--model", default="all", choices=MODELS + ("all",), metavar="NAME",
                       help=f"torchvision model, random weights (default all: each of "
                            f"{', '.join(MODELS)} in turn)")
    else:
        p.add_argument("--model", default="resnet18", choices=MODELS, metavar="NAME",
                       help=f"torchvision model, random weights (default resnet18; one of "
                            f"{', '.join(MODELS)})")
    p.add_argument("--batch", type=_positive_int, default=batch,
                   help=f"batch size (default {batch})")
    p.add_argument("--size", type=_positive_int, default=size,
                   help=f"input height and width (default {size}; at least {_STRIDE})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when a GPU is available, else cpu")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                   help="fused-kernel backend (default auto: the best one for the device)")


def _add_bench_parser(commands) -> None:
    p = commands.add_parser(
        "bench", help="throughput of torchvision vs fused/folded models vs their peers and limit",
        description="Times, interleaved in one process after warm-up (median over rounds, fixed "
                    "thread count): torchvision eager; fused blocks (swap_blocks, same weights) "
                    "in training and inference; in inference also torchvision on a "
                    "channels_last copy, the BatchNorm-folded model (fold_bn) on its oneDNN "
                    "pre-packed path and on the public ATen path, and ONNX Runtime CPU when the "
                    "extra 'onnx' is installed; with --compile torch.compile of the torchvision "
                    "model (inference: freezing on a channels_last copy); and the limit models "
                    "(BatchNorm and ReLU replaced by Identity, on the eager and the folded path). "
                    "Compilation is timed on its own, never inside the rounds. "
                    + COMPILE_DEFAULT_WHY)
    _add_common(p, batch=8, size=112)
    p.add_argument("--mode", default="both", choices=("train", "infer", "both"),
                   help="train: forward+backward of a cross-entropy loss; infer: eval forward "
                        "under no_grad (default both)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads for the run (default: the current count)")
    p.add_argument("--rounds", type=_positive_int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=_non_negative_int, default=1,
                   help="untimed rounds first (default 1)")
    p.add_argument("--channels-last", action="store_true",
                   help="models and input in channels_last")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE_DEFAULT,
                   help="add torch.compile of the torchvision model as a peer (training: "
                        "default options; inference: freezing on a channels_last copy). "
                        f"Default {'on' if COMPILE_DEFAULT else 'off'}, see above")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="inference: add ONNX Runtime CPU when installed (extra 'onnx'; "
                        "default on, skipped with a note when absent)")
    p.add_argument("--malloc", default="default", choices=("default", "retain"),
                   help="retain: keep freed memory in the process for the whole run "
                        "(resnet_fused.allocator.retain_freed_memory; glibc), so no variant "
                        "re-faults pages the allocator gave back (the 'faults' column); "
                        "default: the allocator as it is")
    p.add_argument("--json", metavar="PATH", help="also write the results as a list of records")
    p.add_argument("--plot", metavar="PATH",
                   help="also write a PNG bar chart of images/s per variant, limit marked "
                        "(needs matplotlib: the extra 'plot')")


def _add_check_parser(commands) -> None:
    p = commands.add_parser(
        "check", help="parity of fused vs torchvision (outputs, gradients, running statistics)",
        description=f"float32 parity of the fused model vs torchvision on random inputs: "
                    f"outputs <= {TOL_OUT:g}, gradients <= {TOL_GRAD:g}, running statistics "
                    f"<= {TOL_STATS:g}, or, where float32 itself is that far off (deep models), "
                    f"the fused model in float64 within {TOL_F64:g} of torchvision in float64 and "
                    f"its float32 error vs float64 within {F64_RATIO:g}x torchvision's own. Exit "
                    f"status 1 on "
                    f"any failure. The folded model (fold_bn of the eval-mode model after the "
                    f"training steps) is checked against the eval torchvision output "
                    f"(<= {TOL_OUT:g}). The default, all ten torchvision ResNets at batch 2, "
                    f"64x64, takes {CHECK_ALL_TIME} on a 2-core CPU.")
    _add_common(p, batch=2, size=64, every_model=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``resnet-fused`` console script and ``python -m resnet_fused``."""
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except (UsageError, BackendError) as exc:
        print(f"resnet-fused: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    for key, value in resnet_fused.build_info().items():
        print(f"{key}: {value}")
    print(f"available_backends: {', '.join(resnet_fused.available_backends())}")
    return 0


# ------------------------------------------------------------------------------------------------
# shared by bench and check
# ------------------------------------------------------------------------------------------------
def _resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _validate_shape(batch: int, size: int, train: bool) -> None:
    """Shapes a ResNet cannot take, refused up front instead of failing deep inside a model."""
    if size < _STRIDE:
        raise UsageError(f"--size {size}: ResNets downsample by {_STRIDE}, use --size >= {_STRIDE}")
    if train and batch * math.ceil(size / _STRIDE) ** 2 < 2:
        raise UsageError("training BatchNorm needs more than one value per channel in the last "
                         f"stage: use --batch >= 2 or --size > {_STRIDE}")


def _reference_model(name: str, x: Tensor) -> nn.Module:
    """torchvision's model with random weights (no download), random BN affine parameters and
    non-trivial running statistics, on ``x``'s device and memory format."""
    model = getattr(torchvision.models, name)(weights=None)
    bm.randomize_bn_affine(model)
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    model = model.to(device=x.device, memory_format=memory_format)
    bm.warm_running_stats(model, x)
    return model


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _fused_copy(model: nn.Module) -> nn.Module:
    return resnet_fused.swap_blocks(copy.deepcopy(model))


def _ce_loss(labels: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda out: F.cross_entropy(out, labels)


def _random_batch(batch: int, size: int, device: torch.device, channels_last: bool = False):
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (batch,), device=device)


def _console() -> Console:
    """stdout console; wide enough for the tables when stdout is a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
@dataclass
class _Variant:
    name: str
    model: nn.Module  # what is called (for torch.compile, the compiled wrapper)
    module: nn.Module  # the plain module that holds its parameters and buffers
    backend: str  # what runs its BatchNorm/ReLU work
    limit: str = "limit"  # the limit model on the same path, for the headroom column


@dataclass
class _Row:
    variant: _Variant
    timing: bm.TimingResult
    parity: Optional[bm.Parity]
    saved: Optional[int]
    compile_s: Optional[float]


def machine_info(device: torch.device, threads: int) -> Dict[str, Any]:
    """Where (and how busy: the load average) the numbers were taken: quoted with every result,
    as timings mean nothing without it."""
    info: Dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "triton": triton_version(), "resnet_fused": resnet_fused.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_line(m: Dict[str, Any]) -> str:
    gpu = f"{m['gpu']}, " if "gpu" in m else ""
    load = "" if m["load_avg_1m"] is None else f", load {m['load_avg_1m']:.1f}"
    return (f"machine: {gpu}{m['cpu']} ({m['cores']} cores, {m['cpu_capability']}{load}), "
            f"{m['threads']} threads, torch {m['torch']}, torchvision {m['torchvision']}, "
            f"triton {m['triton'] or 'not installed'}, {m['date']}")


def _bench(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    _validate_shape(args.batch, args.size, "train" in modes)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _validate_out_path(flag, path)
    if args.plot:
        _require_matplotlib()
    if args.malloc == "retain":
        try:
            allocator.retain_freed_memory()
        except RuntimeError as exc:
            raise UsageError(f"--malloc retain: {exc}") from None
    threads = args.threads or torch.get_num_threads()
    console = _console()
    with resnet_fused.use_backend(args.backend), bm.fixed_threads(threads):
        backend = resnet_fused.backend_for(device, torch.float32)
        machine = machine_info(device, threads)
        console.print(_machine_line(machine))
        x, labels = _random_batch(args.batch, args.size, device, args.channels_last)
        models = _Models.build(args.model, x, args.compile)
        records: List[Dict[str, Any]] = []
        notes: List[str] = []
        with _progress() as progress:
            for mode in modes:
                variants = (_train_variants(models, x, backend) if mode == "train"
                            else _infer_variants(models, x, backend, args, notes))
                rows = _measure_mode(mode, variants, x, labels, args, threads, progress)
                console.print(_table(rows, mode, args, device, threads))
                records += _records(rows, mode, args, device, machine)
        for note in notes:
            console.print(note, markup=False)
    if args.json:
        _write_json(args.json, records)
    if args.plot:
        _write_plot(args.plot, records, _machine_line(machine))
        console.print(f"plot: {args.plot}")
    return 0


# The limit a variant's headroom is measured against: the limit model on the same path.
LIMIT, FOLDED_LIMIT = "limit", "limit-folded"


@dataclass
class _Models:
    """The models shared by the modes, all with the same weights: torchvision (the reference),
    its fused copy and (with --compile) the torch.compile peer of the training step."""

    ref: nn.Module
    fused: nn.Module
    compiled_train: Optional[Tuple[nn.Module, nn.Module]]  # (compiled wrapper, its module)
    compile_peer: bool

    @classmethod
    def build(cls, name: str, x: Tensor, compile_peer: bool) -> "_Models":
        ref = _reference_model(name, x)
        compiled = None
        if compile_peer:
            plain = copy.deepcopy(ref)
            compiled = (torch.compile(plain), plain)
        return cls(ref, _fused_copy(ref), compiled, compile_peer)


def _fused_label(fused: nn.Module, x: Tensor, backend: str) -> str:
    """The backend, and whether the FusedResNet runs channels_last inside for this input."""
    if isinstance(fused, resnet_fused.FusedResNet) and not x.is_contiguous(memory_format=torch.channels_last):
        if fused.activation_input(x).is_contiguous(memory_format=torch.channels_last):
            return f"{backend}, channels_last inside"
    return backend


def _train_variants(models: _Models, x: Tensor, backend: str) -> List[_Variant]:
    ref, fused = models.ref, models.fused
    variants = [_Variant("torchvision", ref, ref, "aten"),
                _Variant("fused", fused, fused, _fused_label(fused, x, backend))]
    if models.compiled_train is not None:
        variants.append(_Variant("compile", *models.compiled_train, "inductor"))
    limit = bm.limit_model(ref)
    variants.append(_Variant(LIMIT, limit, limit, "aten (no BN/ReLU)"))
    return variants


def _infer_variants(models: _Models, x: Tensor, backend: str, args: argparse.Namespace,
                    notes: List[str]) -> List[_Variant]:
    """Eval-mode variants, built from the reference's state when inference starts (the fold
    and the compiled copy capture the running statistics of that moment)."""
    ref, fused = models.ref, models.fused
    fused.load_state_dict(ref.state_dict())  # the train rounds called them different numbers of times
    ref.eval()
    fused.eval()
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    folded = resnet_fused.fold_bn(ref)
    with torch.no_grad():
        one_dnn = resnet_fused.ops._mkldnn_eligible(x, folded.conv1.weight, None)
    variants = [
        _Variant("torchvision", ref, ref, "aten"),
        _Variant("torchvision-cl", ref_cl, ref_cl, "aten, channels_last copy"),
        _Variant("fused", fused, fused, _fused_label(fused, x, backend)),
        _Variant("folded", folded, folded,
                 "oneDNN post-ops, pre-packed" if one_dnn else "aten conv+bias",
                 limit=FOLDED_LIMIT if one_dnn else LIMIT),
    ]
    if one_dnn:  # the public-API path of the same folded model, for the choice between them
        public = bm.PublicPath(folded)
        variants.append(_Variant("folded-aten", public, folded, "aten conv+bias, add/ReLU in place"))
    if models.compile_peer:
        compiled, plain = bm.compile_frozen(ref)
        variants.append(_Variant("compile-freeze", compiled, plain,
                                 "inductor, freezing, channels_last copy"))
    if args.onnx:
        variants += _onnx_variant(ref, x, notes)
    limit = bm.limit_model(ref)
    variants.append(_Variant(LIMIT, limit, limit, "aten (no BN/ReLU)"))
    if one_dnn:
        folded_limit = bm.limit_model(folded)
        variants.append(_Variant(FOLDED_LIMIT, folded_limit, folded_limit,
                                 "oneDNN, pre-packed (no bias/ReLU)", limit=FOLDED_LIMIT))
    return variants


def _onnx_variant(ref: nn.Module, x: Tensor, notes: List[str]) -> List[_Variant]:
    """ONNX Runtime CPU on the eval torchvision model (ORT folds BatchNorm itself); skipped with
    a note when the optional extra ``onnx`` is not installed or the input is not on the CPU."""
    try:
        runner = bm.onnxruntime_model(ref, x)
    except ImportError as exc:
        notes.append(f"onnxruntime: skipped ({exc.name} is not installed: "
                     f"pip install 'resnet-fused[onnx]')")
        return []
    except ValueError as exc:
        notes.append(f"onnxruntime: skipped ({exc})")
        return []
    return [_Variant("onnxruntime", runner, runner, runner.description)]


def _progress() -> Progress:
    """A progress bar on stderr (stdout keeps only the results), gone when done."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


def _measure_mode(mode: str, variants: List[_Variant], x: Tensor, labels: Tensor,
                  args: argparse.Namespace, threads: int, progress: Progress) -> List[_Row]:
    """Compile (timed once, outside the rounds), parity, saved bytes, then interleaved rounds."""
    train = mode == "train"
    loss = _ce_loss(labels)
    for v in variants:
        v.module.train(train)
    calls = {v.name: bm.train_step(v.model, x, loss) if train else bm.infer_forward(v.model, x)
             for v in variants}
    total = (args.warmup + args.rounds) * len(variants)
    task = progress.add_task(f"{args.model} {mode}", total=total)
    compile_s = _compile_times(calls, progress, task, f"{args.model} {mode}")
    progress.update(task, description=f"{args.model} {mode}: parity")
    parity = {v.name: _parity(train, variants[0].model, v, x, loss) for v in variants}
    saved = {v.name: _saved(v, x) if train else None for v in variants}
    progress.update(task, description=f"{args.model} {mode}: timing")
    timings = bm.interleaved(calls, args.rounds, args.warmup, threads,
                             progress=lambda _: progress.advance(task))
    progress.remove_task(task)
    return [_Row(v, timings[v.name], parity[v.name], saved[v.name], compile_s.get(v.name))
            for v in variants]


def _compile_times(calls: Dict[str, Callable[[], None]], progress: Progress, task: Any,
                   label: str) -> Dict[str, float]:
    """torch.compile compiles on the first call of each mode: time that call on its own."""
    times = {}
    for name in ("compile", "compile-freeze"):
        if name in calls:
            progress.update(task, description=f"{label}: {name} (first call compiles)")
            times[name] = bm.timed_call(calls[name])
    return times


def _parity(train: bool, ref: nn.Module, v: _Variant, x: Tensor, loss) -> Optional[bm.Parity]:
    """rel_err vs torchvision; none for torchvision itself and for the limit models (other
    functions). The compiled peer is checked without the input gradient: asking for it would make
    torch.compile compile the model a second time."""
    if v.name in ("torchvision", LIMIT, FOLDED_LIMIT):
        return None
    if not train:
        return bm.infer_parity(ref, v.model, x)
    x_in = x if v.name == "compile" else x.detach().requires_grad_(True)
    return bm.train_parity(ref, v.model, x_in, loss)


def _saved(v: _Variant, x: Tensor) -> Optional[int]:
    """Activation bytes saved for backward (parameters excluded: alive anyway). Not measured for
    the compiled model, whose saved tensors are chosen inside the compiled graph."""
    if v.name == "compile":
        return None
    return bm.saved_bytes(lambda: v.model(x), exclude=list(v.module.parameters()))


def _speedup_and_headroom(row: _Row, rows: List[_Row]):
    """Speedup over torchvision eager (NCHW or the input's layout), and the share of the headroom
    to the variant's own limit (the limit model on the same path) that it captured."""
    by_name = {r.variant.name: r.timing.median for r in rows}
    eager = by_name["torchvision"]
    limit = by_name.get(row.variant.limit, by_name[LIMIT])
    t = row.timing.median
    return eager / t, bm.headroom_share(eager, t, limit)


def _table(rows: List[_Row], mode: str, args: argparse.Namespace, device: torch.device,
           threads: int) -> Table:
    train = mode == "train"
    layout = "channels_last" if args.channels_last else "NCHW"
    title = (f"{args.model} {'train step' if train else 'eval forward'}: batch {args.batch}, "
             f"{args.size}x{args.size}, float32, {device.type}, {layout} input, {threads} threads, "
             f"median of {args.rounds} rounds (+{args.warmup} warmup), interleaved")
    table = Table(title=title, title_justify="left")
    for header in ("variant", "images/s", "ms (IQR)", "speedup", "headroom", "faults", "rel_err out"):
        table.add_column(header, justify="left" if header == "variant" else "right")
    if train:
        table.add_column("rel_err grad (max)", justify="right")
        table.add_column("saved for bwd", justify="right")
    table.add_column("backend (what ran)")
    for row in rows:
        speedup, headroom = _speedup_and_headroom(row, rows)
        cells = [row.variant.name, f"{args.batch / row.timing.median:,.1f}",
                 f"{row.timing.median * 1e3:,.1f} ±{row.timing.iqr * 1e3:,.1f}",
                 f"{speedup:.2f}x", _fmt(headroom, ".0%"), _fmt(row.timing.median_faults, ",.0f"),
                 _fmt(row.parity.output if row.parity else None, ".1e")]
        if train:
            cells.append(_fmt(row.parity.max_grad if row.parity else None, ".1e"))
            cells.append("—" if row.saved is None else f"{row.saved / 2**20:,.1f} MiB")
        cells.append(row.variant.backend)
        table.add_row(*cells)
    caption = [f"speedup: vs torchvision eager; headroom: (t_eager - t) / (t_eager - t_limit), "
               f"t_limit from '{LIMIT}' (BN and ReLU replaced by Identity)"]
    caption.append(f"faults: minor page faults per call, median (malloc {allocator.malloc_policy()}; "
                   f"--malloc retain keeps freed memory in the process)")
    if any(r.variant.name == FOLDED_LIMIT for r in rows):
        caption[0] += f", or from '{FOLDED_LIMIT}' for the folded rows (same oneDNN path)"
    compiled = [r for r in rows if r.compile_s is not None]
    if compiled:
        caption.append(f"{compiled[0].variant.name}: first call (compilation) took "
                       f"{compiled[0].compile_s:.1f} s, excluded")
    table.caption = "; ".join(caption)
    return table


def _records(rows: List[_Row], mode: str, args: argparse.Namespace, device: torch.device,
             machine: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One JSON record per variant: enough to compare runs across machines and commits."""
    records = []
    for row in rows:
        speedup, headroom = _speedup_and_headroom(row, rows)
        reference = row.variant.name == "torchvision"
        records.append({
            "model": args.model, "mode": mode, "variant": row.variant.name,
            "batch": args.batch, "size": args.size, "dtype": "float32", "device": device.type,
            "memory_format": "channels_last" if args.channels_last else "contiguous",
            "threads": machine["threads"],
            "rounds": args.rounds, "warmup": args.warmup,
            "median_s": row.timing.median, "min_s": row.timing.min, "iqr_s": row.timing.iqr,
            "median_faults": row.timing.median_faults, "malloc": allocator.malloc_policy(),
            "images_per_s": args.batch / row.timing.median, "speedup": speedup,
            "headroom": headroom, "limit_variant": row.variant.limit,
            "rel_err": 0.0 if reference else (row.parity.output if row.parity else None),
            "grad_rel_err": 0.0 if reference and mode == "train" else (
                row.parity.max_grad if row.parity else None),
            "saved_bytes": row.saved, "compile_s": row.compile_s,
            "backend": row.variant.backend, "machine": machine,
        })
    return records


def _validate_out_path(flag: str, path: str) -> None:
    """Refuses an impossible output path before the run, not after minutes of measuring."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: no such directory {folder}")


def _write_json(path: str, records: List[Dict[str, Any]]) -> None:
    try:
        with open(path, "w") as f:
            json.dump(records, f, indent=2)
            f.write("\n")
    except OSError as exc:
        raise UsageError(f"--json {path}: {exc.strerror}") from None


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: "
                         "pip install 'resnet-fused[plot]'") from None


def _write_plot(path: str, records: List[Dict[str, Any]], machine_line: str) -> None:
    """One horizontal bar chart per mode: images/s per variant (median), the speedup written on
    each bar, the limit models hatched and their throughput marked by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in records))
    per_mode = {m: [r for r in records if r["mode"] == m] for m in modes}
    heights = [0.45 * len(rs) + 1.2 for rs in per_mode.values()]
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = {"torchvision": "#7f7f7f", "torchvision-cl": "#a5a5a5", "fused": "#1f77b4",
              "folded": "#1f77b4", "folded-aten": "#6baed6", "compile": "#ff7f0e",
              "compile-freeze": "#ff7f0e", "onnxruntime": "#2ca02c"}
    for ax, mode in zip(axes[:, 0], modes):
        rs = per_mode[mode][::-1]  # first variant on top
        names = [r["variant"] for r in rs]
        values = [r["images_per_s"] for r in rs]
        limits = [r["variant"] in (LIMIT, FOLDED_LIMIT) for r in rs]
        bars = ax.barh(names, values, color=[colors.get(n, "#bbbbbb") if not lim else "white"
                                             for n, lim in zip(names, limits)],
                       edgecolor=["#444444" if lim else "none" for lim in limits],
                       hatch=None)
        for bar, lim in zip(bars, limits):
            if lim:
                bar.set_hatch("//")
        for r in rs:
            if r["variant"] in (LIMIT, FOLDED_LIMIT):
                ax.axvline(r["images_per_s"], color="#d62728", linestyle="--", linewidth=1)
                ax.text(r["images_per_s"], 0.98, f"{r['variant']} ", color="#d62728", fontsize=7,
                        transform=ax.get_xaxis_transform(), va="top", ha="right", rotation=90)
        for bar, r in zip(bars, rs):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['images_per_s']:,.1f} ({r['speedup']:.2f}x)", va="center", fontsize=8)
        first = rs[0]
        what = "train step (forward + backward)" if mode == "train" else "eval forward"
        ax.set_title(f"{first['model']} {what}, batch {first['batch']}, "
                     f"{first['size']}x{first['size']}, float32, {first['device']}, "
                     f"{first['threads']} thread(s)",
                     fontsize=10, loc="left")
        ax.set_xlabel("images/s (median of interleaved rounds; higher is better)")
        ax.set_xlim(0, max(values) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    fig.text(0.01, 0.005, "hatched, red dashed line: limit (BatchNorm and ReLU removed, same "
             "path).  " + machine_line.replace("machine: ", ""), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(f"--plot {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Errors:
    """rel_err of one tensor: fused vs torchvision (both float32), and each of them vs a float64
    torchvision, which tells numerical noise from a bug."""

    vs_torchvision: float
    torchvision_f64: float
    fused_f64: float
    f64_vs_f64: float = 0.0   # the fused model in float64 vs torchvision in float64


@dataclass
class CheckResult:
    """One line of the parity report: a kind of tensor, all of its instances by name."""

    what: str
    tol: float
    errors: Dict[str, Errors]

    @property
    def ok(self) -> bool:
        if self.max("vs_torchvision") <= self.tol:
            return True
        float32_is_the_limit = self.max("torchvision_f64") > self.tol
        return (float32_is_the_limit and self.max("f64_vs_f64") <= TOL_F64
                and self.max("fused_f64") <= F64_RATIO * self.max("torchvision_f64"))

    @property
    def worst(self) -> str:
        return max(self.errors, key=lambda k: self.errors[k].vs_torchvision)

    def max(self, field: str) -> float:
        return max(getattr(e, field) for e in self.errors.values())


def _errors(fused: Optional[Tensor], tv: Optional[Tensor], tv64: Optional[Tensor],
            fused64: Optional[Tensor]) -> Errors:
    """The rel_errs of one tensor; a missing tensor (gradient) is an infinite error."""
    if fused is None or tv is None or tv64 is None or fused64 is None:
        return Errors(math.inf, 0.0, math.inf, math.inf)
    return Errors(bm.rel_err(fused, tv), bm.rel_err(tv, tv64), bm.rel_err(fused, tv64),
                  bm.rel_err(fused64, tv64))


@contextlib.contextmanager
def _float64_backend(device: torch.device) -> Iterator[None]:
    """The chosen backend for the float64 model, or the reference primitives where it has no
    float64 kernels (triton): the float64 run checks the math, not a kernel's dtype coverage."""
    try:
        resnet_fused.backend_for(device, torch.float64)
    except BackendError:
        with resnet_fused.use_backend("reference"):
            yield
        return
    yield


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision float32 convolutions and matmuls on a GPU for the duration (torch 2.14
    defaults cuDNN convs to TF32, which cannot meet float32 tolerances); restored afterwards."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def run_check(name: str, batch: int, size: int, device: torch.device, steps: int = 2) -> tuple:
    """Parity of ``swap_blocks`` against torchvision on one model: ``steps`` training steps
    (outputs, input and every parameter gradient), the running statistics they leave, then the
    eval-mode output that uses those statistics. A float64 torchvision runs alongside (see
    :class:`Errors`). Returns the swap report (a model where no block was converted would pass
    trivially) and the results."""
    x, _ = _random_batch(batch, size, device)
    tv = _reference_model(name, x)
    tv64 = copy.deepcopy(tv).double()
    models = (_fused_copy(tv), tv, tv64, _fused_copy(tv64))  # the order of _errors' arguments

    def run(m: nn.Module, fn: Callable[[], Any]) -> Any:
        if m is models[3]:
            with _float64_backend(device):
                return fn()
        return fn()

    found: Dict[str, Dict[str, Errors]] = {"out": {}, "input": {}, "params": {}}
    for step in range(1, steps + 1):
        x, labels = _random_batch(batch, size, device)
        x.requires_grad_(True)
        runs = [run(m, lambda m=m: bm.forward_backward(m, x.to(_dtype_of(m)), _ce_loss(labels)))
                for m in models]
        found["out"][f"step {step}"] = _errors(*(out for out, _ in runs))
        for i, grad_name in enumerate(bm.grad_names(tv, x)):
            kind = "input" if grad_name == "input" else "params"
            found[kind][f"step {step}: {grad_name}"] = _errors(*(grads[i] for _, grads in runs))
    buffers = zip(*(m.named_buffers() for m in models))
    stats = {named[0][0]: _errors(*(b for _, b in named)) for named in buffers}
    x, _ = _random_batch(batch, size, device)
    with torch.no_grad():
        evals = [run(m, lambda m=m: m.eval()(x.to(_dtype_of(m)))) for m in models]
        folded_out = resnet_fused.fold_bn(tv)(x)
        folded64_out = run(models[3], lambda: resnet_fused.fold_bn(tv64)(x.double()))
    return models[0].resnet_fused_report, [
        CheckResult("train output", TOL_OUT, found["out"]),
        CheckResult("input gradient", TOL_GRAD, found["input"]),
        CheckResult("parameter gradients", TOL_GRAD, found["params"]),
        CheckResult("running statistics", TOL_STATS, stats),
        CheckResult("eval output", TOL_OUT, {"after the train steps": _errors(*evals)}),
        CheckResult("folded model (fold_bn) output", TOL_OUT,
                    {"fold_bn(torchvision).eval()": _errors(folded_out, evals[1], evals[2], folded64_out)}),
    ]


def _check(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    _validate_shape(args.batch, args.size, train=True)
    names = MODELS if args.model == "all" else (args.model,)
    console = _console()
    failed = []
    with resnet_fused.use_backend(args.backend), _ieee_fp32(device):
        backend = resnet_fused.backend_for(device, torch.float32)
        with _progress() as progress:
            task = progress.add_task("check", total=len(names))
            for name in names:
                progress.update(task, description=f"check {name}")
                swapped, results = run_check(name, args.batch, args.size, device)
                console.print(_check_table(name, swapped, results, args, device, backend))
                if not all(r.ok for r in results):
                    failed.append(name)
                progress.advance(task)
    if len(names) > 1:
        console.print(f"check: {len(names) - len(failed)}/{len(names)} models pass"
                      + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _check_table(name: str, swapped: Any, results: List[CheckResult], args: argparse.Namespace,
                 device: torch.device, backend: str) -> Table:
    title = (f"{name} fused vs torchvision: batch {args.batch}, {args.size}x{args.size}, "
             f"float32, {device.type}, backend {backend}")
    caption = (f"swap_blocks: {swapped}. A line passes within tolerance, or, where float32 itself is "
               f"the limit (torchvision's float32 misses the tolerance against float64), when the "
               f"fused model in float64 matches torchvision in float64 within {TOL_F64:g} and the "
               f"fused float32 error vs float64 is within {F64_RATIO:g}x torchvision's own.")
    table = Table(title=title, title_justify="left", caption=caption)
    for header in ("check", "fused vs torchvision", "tolerance", "torchvision f32 vs f64",
                   "fused f32 vs f64", "fused f64 vs torchvision f64", "worst", "result"):
        left = header in ("check", "worst", "result")
        table.add_column(header, justify="left" if left else "right")
    for r in results:
        table.add_row(f"{r.what} ({len(r.errors)})", f"{r.max('vs_torchvision'):.2e}",
                      f"{r.tol:.0e}", f"{r.max('torchvision_f64'):.2e}", f"{r.max('fused_f64'):.2e}",
                      f"{r.max('f64_vs_f64'):.2e}",
                      r.worst, "[green]ok[/green]" if r.ok else "[red]FAIL[/red]")
    return table


_COMMANDS = {"info": _info, "bench": _bench, "check": _check}

"""Shared helpers of the parity tests (DESIGN.md, "Numerics and tolerances").

* :func:`rel_err` — the one error measure, ``||a - ref|| / ||ref||`` in float64.
* ``seed`` (autouse) — seeds torch per test from the test's id: every test draws its own fresh
  random inputs, reproducibly; set ``RESNET_FUSED_TEST_SEED`` to draw other inputs.
* :func:`randomize_bn` — non-trivial BN affine parameters and running statistics.
* :func:`make_pair` / :func:`block_factory` — a (torchvision block, fused block) pair with the same
  state_dict.
* ``backend`` — parametrizes a test over ``auto`` and the explicit backends that differ from it.
"""
from __future__ import annotations

import copy
import os
import zlib
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

FUSED_FOR = {BasicBlock: resnet_fused.FusedBasicBlock, Bottleneck: resnet_fused.FusedBottleneck}

# Tolerances of DESIGN.md (float32 unless named otherwise). Never loosen one to make a test pass.
TOL_OUT = 1e-5
TOL_GRAD = 1e-4
TOL_STATS = 1e-5
TOL_F64 = 1e-10
TOL_BF16_OUT = 1e-2
BF16_GRAD_RATIO = 1.25
TOL_NET_OUT = 5e-5
TOL_NET_GRAD = 2e-4


def rel_err(a: Tensor, ref: Tensor) -> float:
    """``||a - ref|| / ||ref||``, norm-wise, computed in float64 (0 when both are zero)."""
    a = a.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} vs reference {tuple(ref.shape)}"
    num = (a - ref).norm().item()
    den = ref.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def cpp_built() -> bool:
    return "cpu" in resnet_fused.available_backends("cpu")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch per test: a different seed for each test id (fresh inputs per test)."""
    base = int(os.environ.get("RESNET_FUSED_TEST_SEED", "0"))
    value = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test that fails inside set_backend must not leak its choice into the next test."""
    before = resnet_fused.get_backend()
    yield
    resnet_fused.set_backend(before)


def _auto_choice() -> str:
    with resnet_fused.use_backend("auto"):
        return resnet_fused.backend_for("cpu", torch.float32)


@pytest.fixture(params=["auto", "reference", "cpu"])
def backend(request) -> str:
    """Runs the test under ``auto`` and under each explicit backend that differs from auto's choice
    for CPU float32 (running the same backend twice would only double the suite's time)."""
    name = request.param
    if name == "cpu" and not cpp_built():
        pytest.skip("backend 'cpu' unavailable: resnet_fused._C (C++ kernels) not built")
    if name != "auto" and name == _auto_choice():
        pytest.skip(f"'auto' resolves to {name!r} here: covered by the auto case")
    with resnet_fused.use_backend(name):
        yield name


# ------------------------------------------------------------------------------------------------
# module helpers
# ------------------------------------------------------------------------------------------------
def _bn_modules(module: nn.Module):
    norms = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm)
    return [m for m in module.modules() if isinstance(m, norms)]


@torch.no_grad()
def randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every norm layer in ``module``:
    weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5), running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2)."""
    for m in _bn_modules(module):
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if weight is not None:
            weight.copy_(torch.rand_like(weight) + 0.5)
        if bias is not None:
            bias.copy_(torch.rand_like(bias) - 0.5)
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
            m.running_var.copy_(torch.rand_like(m.running_var) * 1.5 + 0.5)
    return module


def standard_downsample(inplanes: int, outplanes: int, stride: int,
                        norm_layer: Optional[Callable[[int], nn.Module]] = None) -> nn.Sequential:
    """torchvision's downsample branch: ``Sequential(conv1x1(stride), norm)``."""
    norm_layer = norm_layer or nn.BatchNorm2d
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))


def block_factory(kind: str, inplanes: int, planes: int, stride: int = 1, downsample: bool = False,
                  groups: int = 1, base_width: int = 64, dilation: int = 1,
                  norm_layer: Optional[Callable[[int], nn.Module]] = None) -> Callable[[type], nn.Module]:
    """``make(cls)`` builds a block of class ``cls`` (torchvision's or the fused one) with this
    configuration; the downsample branch is torchvision's standard one when asked for."""
    base = {"basic": BasicBlock, "bottleneck": Bottleneck}[kind]

    def make(cls: Optional[type] = None) -> nn.Module:
        cls = cls or base
        ds = standard_downsample(inplanes, planes * base.expansion, stride, norm_layer) if downsample else None
        return cls(inplanes, planes, stride=stride, downsample=ds, groups=groups, base_width=base_width,
                   dilation=dilation, norm_layer=norm_layer)

    make.base = base
    make.inplanes = inplanes
    return make


def make_pair(make: Callable[[type], nn.Module], how: str = "swap",
              prepare: Optional[Callable[[nn.Module], None]] = None) -> Tuple[nn.Module, nn.Module]:
    """(torchvision block, fused block) with identical state_dicts and randomized BN state.

    ``how="swap"``: deepcopy the torchvision block and convert it with ``resnet_fused.swap_blocks``;
    ``how="construct"``: build the fused class and ``load_state_dict(strict=True)``.
    ``prepare(block)`` runs on the torchvision block before it is copied (momentum, hooks, ...).
    """
    ref = make(make.base)
    randomize_bn(ref)
    if prepare is not None:
        prepare(ref)
    if how == "swap":
        fused = copy.deepcopy(ref)
        resnet_fused.swap_blocks(fused)
        report = fused.resnet_fused_report
        assert report.converted == [""], report
    elif how == "construct":
        fused = make(FUSED_FOR[make.base])
        if prepare is not None:
            prepare(fused)
        fused.load_state_dict(ref.state_dict(), strict=True)
    else:
        raise ValueError(how)
    assert type(fused) is FUSED_FOR[make.base]
    return ref, fused


def state_snapshot(module: nn.Module) -> Dict[str, Tensor]:
    """Clones of every parameter and buffer (running statistics, num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module: nn.Module, snapshot: Dict[str, Tensor]) -> None:
    now = module.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} changed"


def compare_grads(ref: nn.Module, fused: nn.Module, tol: float, what: str = "") -> None:
    """EVERY parameter gradient of ``fused`` against ``ref``'s (by name)."""
    ref_params = dict(ref.named_parameters())
    fused_params = dict(fused.named_parameters())
    assert ref_params.keys() == fused_params.keys()
    for name, p_ref in ref_params.items():
        p = fused_params[name]
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), f"{what}{name}: torchvision has no grad"
            continue
        assert p.grad is not None, f"{what}{name}: no gradient"
        err = rel_err(p.grad, p_ref.grad)
        assert err <= tol, f"{what}grad of {name}: rel_err {err:.3g} > {tol}"


def compare_buffers(ref: nn.Module, fused: nn.Module, tol: float, what: str = "") -> None:
    """running_mean / running_var within ``tol``, num_batches_tracked exactly."""
    ref_bufs = dict(ref.named_buffers())
    fused_bufs = dict(fused.named_buffers())
    assert ref_bufs.keys() == fused_bufs.keys()
    for name, b_ref in ref_bufs.items():
        b = fused_bufs[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, b_ref), f"{what}{name}: {b.item()} vs {b_ref.item()}"
        else:
            err = rel_err(b, b_ref)
            assert err <= tol, f"{what}{name}: rel_err {err:.3g} > {tol}"


class OpLog:
    """The ops that reach the dispatcher (below autograd) while ``with log.mode:`` is active, as
    (name, args) in ``calls``."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                log.append((str(func), args))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def names(self):
        return [f for f, _ in self.calls]

    def count(self, name, pred=lambda args: True):
        return sum(1 for f, a in self.calls if f == name and pred(a))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped, with the reason, where none is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

"""The fused ResNet stem: ``units.bn_relu`` against ``F.relu(F.batch_norm(...))`` (float64), and
``FusedResNet`` (from ``swap_blocks``) against torchvision's ResNet-18: outputs, input gradient, every
parameter gradient and the running statistics, in training and eval mode, NCHW and channels_last,
float32 and float64 (DESIGN.md tolerances; whole networks: 5e-5 / 2e-4). Stems the unit does not
reproduce run torchvision's ``_forward_impl`` exactly; bad inputs raise before any state changes.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import FusedResNet, sync_bn, units
from resnet_fused.fold import FoldedConv2d

from conftest import (OpLog, TOL_BF16_OUT, TOL_F64, TOL_NET_GRAD, TOL_NET_OUT, assert_state_unchanged,
                      compare_buffers, compare_grads, cpp_built, randomize_bn, rel_err, state_snapshot)

CL = torch.channels_last


def _graph_nodes(out: torch.Tensor):
    """Names of every autograd node behind ``out``."""
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def _stem_fused(out: torch.Tensor) -> bool:
    """The fused stem unit is in ``out``'s graph (torchvision's stem has a ReLU node instead)."""
    return "_BNReLUBackward" in _graph_nodes(out)


# ------------------------------------------------------------------------------------------------
# the unit alone
# ------------------------------------------------------------------------------------------------
def _bn(channels, dtype, training):
    bn = randomize_bn(nn.BatchNorm2d(channels)).to(dtype)
    return bn.train(training)


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_bn_relu_unit_matches_batch_norm_relu_float64(training, memory_format, backend):
    bn = _bn(6, torch.float64, training)
    ref_bn = copy.deepcopy(bn)
    y = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    if memory_format is CL:
        y = y.contiguous(memory_format=CL)
    yu, yr = y.clone().requires_grad_(), y.clone().requires_grad_()
    state = units.prepare_bn(bn, yu)
    out = units.bn_relu(yu, state)
    units.update_running_stats([state])
    ref = F.relu(F.batch_norm(yr, ref_bn.running_mean, ref_bn.running_var, ref_bn.weight, ref_bn.bias,
                              training, ref_bn.momentum, ref_bn.eps))
    if training:
        ref_bn.num_batches_tracked.add_(1)
    assert (out == 0).any() and (out > 0).any()  # the ReLU decides somewhere
    if memory_format is CL:
        assert out.is_contiguous(memory_format=CL)
    assert rel_err(out, ref) <= TOL_F64
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert rel_err(yu.grad, yr.grad) <= TOL_F64
    assert rel_err(bn.weight.grad, ref_bn.weight.grad) <= TOL_F64
    assert rel_err(bn.bias.grad, ref_bn.bias.grad) <= TOL_F64
    compare_buffers(ref_bn, bn, TOL_F64)


def test_bn_relu_unit_gradcheck():
    """The Function's backward is the complete gradient (statistics terms included), although the
    statistics are computed outside it from a detached input."""
    bn = _bn(3, torch.float64, True)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def f(y, weight, bias):
        state = units.prepare_bn(bn, y)
        state.weight, state.bias = weight, bias
        return units.bn_relu(y, state)

    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (y, weight, bias))


@pytest.mark.skipif(not cpp_built(), reason="needs the C++ kernels (resnet_fused._C)")
def test_the_stem_launches_one_apply_forward_and_no_relu_backward():
    """Forward: bn_stats + one bn_apply (BN and ReLU in one pass); backward: the two BN backward
    primitives masking with the saved output, no threshold_backward (ReLU) pass."""
    model = randomize_bn(resnet_fused.swap_blocks(ResNet(BasicBlock, [1, 1, 1, 1]))).train()
    x = torch.randn(2, 3, 16, 16)
    fwd, bwd = OpLog(), OpLog()
    with resnet_fused.use_backend("cpu"):
        with fwd.mode:
            a = model._fused_stem(x)
        with bwd.mode:
            a.backward(torch.randn_like(a))
    assert [c for c in fwd.names() if c.startswith("resnet_fused.")] == [
        "resnet_fused.bn_stats.default", "resnet_fused.bn_apply.default"]
    assert [c for c in bwd.names() if c.startswith("resnet_fused.")] == [
        "resnet_fused.bn_backward_reduce.default", "resnet_fused.bn_backward_apply.default"]
    assert not any("threshold" in c or "relu" in c for c in fwd.names() + bwd.names())
    assert model.conv1.weight.grad is not None and model.bn1.weight.grad is not None


def test_the_stem_saves_only_its_input_and_output():
    """y (the BN input) and a (the output, which the max-pool saves anyway): eager torchvision
    saves the same two storages, so fusing costs no memory."""
    bn = _bn(4, torch.float32, True)
    y = torch.randn(2, 4, 8, 8, requires_grad=True)
    storages = set()

    def pack(t):
        if t.dim() == 4 and t.is_floating_point():  # not the max-pool's indices
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a = units.bn_relu(y, units.prepare_bn(bn, y))
        F.max_pool2d(a, 3, 2, 1)
    assert storages == {y.untyped_storage().data_ptr(), a.untyped_storage().data_ptr()}


# ------------------------------------------------------------------------------------------------
# the network: swap_blocks(resnet18) against torchvision's
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    """A torchvision ResNet-18 with random BN affine parameters, except the residual BNs' weights:
    zero as torchvision's ``zero_init_residual`` makes them, and frozen (no gradient, so SGD
    keeps them zero); running statistics of a random batch.

    Why (see tests/test_blocks.py's whole-network notes): with non-zero residual BN weights, one
    ReLU output within float32 rounding of 0 somewhere in the blocks lands on the other side in
    about one draw in ten (measured over 30 draws: input-gradient differences up to 1.6e-2 from
    one flip, with or without the fused stem: the stem's rounding, 7e-8, is enough to move one).
    With the residual branches at zero, gradients reach the stem through the identity and
    downsample paths only, and two float32 implementations agree to <= 3e-6 (30 draws). The
    blocks' own gradients are compared in tests/test_blocks.py. Running statistics of a batch,
    not randomize_bn's random ones: with those, eval-mode activations grow through the blocks."""
    gen = torch.random.get_rng_state()
    torch.manual_seed(18)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, BasicBlock):
                block.bn2.weight.zero_()
                block.bn2.weight.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one forward sets the batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()
    torch.random.set_rng_state(gen)
    return model


def _pair(resnet18, dtype=torch.float32, memory_format=None):
    ref = copy.deepcopy(resnet18).to(dtype)
    if memory_format is not None:
        ref = ref.to(memory_format=memory_format)
    fused = resnet_fused.swap_blocks(copy.deepcopy(ref))
    assert type(fused) is FusedResNet and fused.fused_supported()
    return ref, fused


def _draw(dtype, memory_format, shape=(2, 3, 64, 64)):
    x = torch.randn(shape, dtype=dtype)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swapped_resnet18_parity(resnet18, mode, memory_format, dtype, backend):
    """2 SGD steps (each from the same state, as tests/test_blocks.py's network tests) comparing
    outputs, input and every parameter gradient and the running statistics after each step; in
    eval mode the BN layers use (and must not change) the running statistics."""
    tol_out, tol_grad = (TOL_NET_OUT, TOL_NET_GRAD) if dtype == torch.float32 else (TOL_F64, TOL_F64)
    ref, fused = _pair(resnet18, dtype, memory_format)
    ref.train(mode == "train")
    fused.train(mode == "train")
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    before = state_snapshot(fused)
    for step in range(2):
        what = f"step {step}: "
        x = _draw(dtype, memory_format)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_f = ref(xr), fused(xf)
        assert _stem_fused(out_f) and not _stem_fused(out_r)
        assert out_f.dtype == dtype
        err = rel_err(out_f, out_r)
        assert err <= tol_out, f"{what}output rel_err {err:.3g}"
        target = torch.randint(0, out_r.shape[1], (x.shape[0],))
        F.cross_entropy(out_r, target).backward()
        F.cross_entropy(out_f, target).backward()
        err = rel_err(xf.grad, xr.grad)
        assert err <= tol_grad, f"{what}input grad rel_err {err:.3g}"
        compare_grads(ref, fused, tol_grad, what)
        assert fused.conv1.weight.grad is not None and fused.bn1.weight.grad is not None
        for opt in (opt_r, opt_f):
            opt.step()
            opt.zero_grad()
        if mode == "train":
            compare_buffers(ref, fused, tol_out, what)
            assert fused.bn1.num_batches_tracked.item() == step + 1
        else:
            for name, buf in fused.named_buffers():
                assert torch.equal(buf, before[name]), f"{what}{name} changed in eval mode"
        # the next step from the same state (see tests/test_blocks.py::_sync)
        fused.load_state_dict(ref.state_dict())
        opt_f.load_state_dict(opt_r.state_dict())
        before = state_snapshot(fused)
    if mode == "eval":
        return  # the steps were eval-mode forwards (and 2 SGD steps on frozen BN overflow next)
    fused.eval()  # the running statistics the training steps left, in use
    ref.eval()
    with torch.no_grad():
        x = _draw(dtype, memory_format)
        assert rel_err(fused(x), ref(x)) <= tol_out


def test_stem_statistics_of_the_running_update_are_the_batchs(resnet18):
    """After one training forward the stem's running statistics are torchvision's to float32
    rounding (the whole-network comparison above allows network tolerances)."""
    ref, fused = _pair(resnet18)
    x = torch.randn(2, 3, 64, 64)
    ref.train()(x)
    fused.train()(x)
    assert rel_err(fused.bn1.running_mean, ref.bn1.running_mean) <= 1e-5
    assert rel_err(fused.bn1.running_var, ref.bn1.running_var) <= 1e-5


def test_momentum_none_and_frozen_bn_stems(resnet18):
    """momentum=None (cumulative average) and a FrozenBatchNorm2d stem: both fused, both exact."""
    for make_bn in ("momentum_none", "frozen"):
        ref = copy.deepcopy(resnet18)
        if make_bn == "momentum_none":
            ref.bn1.momentum = None
        else:
            frozen = FrozenBatchNorm2d(64)
            frozen.weight.copy_(ref.bn1.weight.detach())
            frozen.bias.copy_(ref.bn1.bias.detach())
            frozen.running_mean.copy_(ref.bn1.running_mean)
            frozen.running_var.copy_(ref.bn1.running_var)
            ref.bn1 = frozen
        fused = resnet_fused.swap_blocks(copy.deepcopy(ref))
        assert fused.fused_supported(), make_bn
        for step in range(2):
            x = torch.randn(2, 3, 64, 64)
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_r, out_f = ref.train()(xr), fused.train()(xf)
            assert _stem_fused(out_f)
            assert rel_err(out_f, out_r) <= TOL_NET_OUT, make_bn
            grad = torch.randn_like(out_r)
            out_r.backward(grad)
            out_f.backward(grad)
            assert rel_err(xf.grad, xr.grad) <= TOL_NET_GRAD, make_bn
            compare_grads(ref, fused, TOL_NET_GRAD, f"{make_bn}, step {step}: ")
            compare_buffers(ref, fused, TOL_NET_OUT, f"{make_bn}, step {step}: ")
            fused.load_state_dict(ref.state_dict())
            for m in (ref, fused):
                m.zero_grad()


def test_bfloat16_autocast(resnet18):
    """Under CPU autocast the stem conv runs in bfloat16 and the unit takes that input with the
    float32 BN parameters, as the blocks' units do: outputs <= 1e-2 against torchvision's."""
    ref, fused = _pair(resnet18)
    for mode in (True, False):
        ref.train(mode)
        fused.train(mode)
        x = torch.randn(2, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_r, out_f = ref(x), fused(x)
        assert _stem_fused(out_f) and out_f.dtype == out_r.dtype
        assert rel_err(out_f, out_r) <= TOL_BF16_OUT
        if mode:
            compare_buffers(ref, fused, TOL_BF16_OUT)
    assert all(b.dtype in (torch.float32, torch.int64) for b in fused.buffers())


def test_empty_batch_in_training_like_torchvision(resnet18):
    ref, fused = _pair(resnet18)
    x = torch.randn(0, 3, 64, 64)
    try:
        out_r = ref.train()(x)
    except RuntimeError as exc:  # pragma: no cover - depends on torch's empty-batch support
        pytest.skip(f"torchvision's ResNet does not run an empty batch here: {exc}")
    out_f = fused.train()(x)
    assert out_f.shape == out_r.shape
    compare_buffers(ref, fused, 0.0)
    assert all(torch.isfinite(b).all() for b in fused.buffers())


# ------------------------------------------------------------------------------------------------
# stems the unit does not reproduce: torchvision's _forward_impl, exactly
# ------------------------------------------------------------------------------------------------
def _hook_bn1(m, calls):
    m.bn1.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))


UNSUPPORTED = {
    "hook-on-bn1": _hook_bn1,
    "hook-on-conv1": lambda m, calls: m.conv1.register_forward_pre_hook(lambda mod, inp: calls.append(1)),
    "hook-on-relu": lambda m, calls: m.relu.register_forward_hook(lambda mod, i, o: calls.append(1)),
    "bn-affine=False": lambda m, calls: setattr(m, "bn1", nn.BatchNorm2d(64, affine=False)),
    "bn-track_running_stats=False": lambda m, calls: setattr(
        m, "bn1", nn.BatchNorm2d(64, track_running_stats=False)),
    "bn-bias=False": lambda m, calls: setattr(m, "bn1", nn.BatchNorm2d(64, bias=False)),
    "groupnorm": lambda m, calls: setattr(m, "bn1", nn.GroupNorm(4, 64)),
    "relu6": lambda m, calls: setattr(m, "relu", nn.ReLU6(inplace=True)),
    "conv-bias": lambda m, calls: setattr(m, "conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=True)),
    "conv-reflect": lambda m, calls: setattr(m, "conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=False,
                                                                   padding_mode="reflect")),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_stems_run_torchvision_exactly(resnet18, case):
    """Against the same model whose root is torchvision's ResNet class (blocks fused in both):
    outputs, gradients and buffers bit-identical, the fused stem not in the graph."""
    calls = []
    model = copy.deepcopy(resnet18)
    UNSUPPORTED[case](model, calls)
    fused = resnet_fused.swap_blocks(model)
    assert type(fused) is FusedResNet and not fused.fused_supported()
    plain_root = copy.deepcopy(fused)
    plain_root.__class__ = ResNet
    for mode in (True, False):
        fused.train(mode)
        plain_root.train(mode)
        x = torch.randn(2, 3, 32, 32)
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_f, out_p = fused(xf), plain_root(xp)
        assert not _stem_fused(out_f)
        assert torch.equal(out_f, out_p)
        out_f.sum().backward()
        out_p.sum().backward()
        assert torch.equal(xf.grad, xp.grad)
        compare_grads(plain_root, fused, 0.0)
        compare_buffers(plain_root, fused, 0.0)
    if case.startswith("hook"):
        assert len(calls) == 2 * 2  # the hook ran in both models, in both modes


# ------------------------------------------------------------------------------------------------
# bad inputs: a clear error before any state changes
# ------------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "not-a-tensor": (lambda: [[1.0]], TypeError, r"expected a Tensor"),
    "3-D": (lambda: torch.randn(3, 16, 16), ValueError, r"4-D"),
    "channels": (lambda: torch.randn(2, 4, 16, 16), ValueError, r"expected 3 input channels"),
    "integer": (lambda: torch.randint(0, 5, (2, 3, 16, 16)), TypeError, r"floating"),
    "device": (lambda: torch.randn(2, 3, 16, 16, device="meta"), ValueError, r"meta"),
    "dtype": (lambda: torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError,
              r"dtype.*float64|float64.*dtype"),
    "empty-spatial": (lambda: torch.randn(2, 3, 0, 16), ValueError, r"too small"),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_inputs_raise_before_state_changes(resnet18, bad, mode):
    ref, fused = _pair(resnet18)
    fused.train(mode == "train")
    make, exc_type, pattern = BAD_INPUTS[bad]
    before = state_snapshot(fused)
    with pytest.raises(exc_type, match=pattern) as info:
        fused(make())
    assert "FusedResNet" in str(info.value)
    assert_state_unchanged(fused, before)
    assert all(p.grad is None for p in fused.parameters())
    ref.train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(fused(x), ref(x)) <= TOL_NET_OUT  # still works


def test_one_value_per_channel_in_training(resnet18):
    _, fused = _pair(resnet18)
    with pytest.raises(ValueError) as info:
        F.batch_norm(torch.randn(1, 64, 1, 1), None, None, training=True)
    message = str(info.value)  # torch's own message
    before = state_snapshot(fused)
    with pytest.raises(ValueError, match=re.escape(message)):
        fused.train()(torch.randn(1, 3, 2, 2))   # conv1 (stride 2) output: 1x64x1x1
    assert_state_unchanged(fused, before)


# ------------------------------------------------------------------------------------------------
# synchronized BN, compile, fold
# ------------------------------------------------------------------------------------------------
class _RecordingSync:
    """A stand-in synchronizer for one rank: records the collectives, changes nothing."""

    def __init__(self):
        self.calls = []
        self.count = 0

    def stats(self, mean, var, count):
        self.calls.append("stats")
        self.count = count
        return mean, var, count

    def grads(self, sum_dy, sum_dy_xmu):
        self.calls.append("grads")
        return sum_dy, sum_dy_xmu, self.count


def test_the_stem_uses_the_synchronizer_of_its_bn(resnet18, monkeypatch):
    """A synchronized stem BN exchanges statistics between bn_stats and the apply, and the
    backward sums between the two backward primitives, as the blocks' units do."""
    ref, fused = _pair(resnet18)
    sync = _RecordingSync()
    real = sync_bn.synchronizer_for
    monkeypatch.setattr(sync_bn, "synchronizer_for", lambda bn: sync if bn is fused.bn1 else real(bn))
    x = torch.randn(2, 3, 64, 64)
    out_r, out_f = ref.train()(x), fused.train()(x)
    assert sync.calls == ["stats"]
    grad = torch.randn_like(out_r)
    out_r.backward(grad)
    out_f.backward(grad)
    assert sync.calls == ["stats", "grads"]
    assert rel_err(out_f, out_r) <= TOL_NET_OUT
    compare_grads(ref, fused, TOL_NET_GRAD)


def test_swapped_resnet_compiles_without_graph_breaks():
    """Training forward and backward through torch.compile (aot_eager: the autograd Functions and
    custom ops traced; inductor's code generation is the blocks' compile test) match eager."""
    model = randomize_bn(resnet_fused.swap_blocks(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)))
    eager = copy.deepcopy(model).train()
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, out_e = compiled(xc), eager(xe)
        assert rel_err(out_c, out_e) <= TOL_NET_OUT
        grad = torch.randn_like(out_e)
        out_c.backward(grad)
        out_e.backward(grad)
        assert rel_err(xc.grad, xe.grad) <= TOL_NET_GRAD
        compare_grads(eager, model, TOL_NET_GRAD, "compiled vs eager: ")
        compare_buffers(eager, model, TOL_NET_OUT, "compiled vs eager: ")
    finally:
        torch._dynamo.reset()


def test_fold_bn_folds_the_fused_stem(resnet18):
    _, fused = _pair(resnet18)
    fused.eval()
    folded = resnet_fused.fold_bn(fused)
    from resnet_fused.folded_resnet import FoldedResNet

    assert type(folded) is FoldedResNet and type(folded.conv1) is FoldedConv2d
    assert type(folded.bn1) is nn.Identity and folded.conv1.fused_relu
    assert type(fused.bn1) is nn.BatchNorm2d  # the input model is untouched
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert rel_err(folded(x), fused(x)) <= 1e-5


def test_too_small_input_fails_before_any_running_statistics_change():
    """An input whose layer4 BatchNorm would see one value per channel in training is refused by
    FusedResNet before the stem runs: no running statistics (stem's or blocks') change."""
    model = resnet_fused.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[1, 512, 1, 1\]"):
        model(torch.randn(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(torch.randn(2, 3, 32, 32))  # two values per channel at layer4: fine


# ------------------------------------------------------------------------------------------------
# activation layout: channels_last inside FusedResNet on the CPU
# ------------------------------------------------------------------------------------------------
def _layouts_seen(model):
    """Records whether each stage's output is channels_last; returns (record, handles)."""
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.is_contiguous(memory_format=CL) and not output.is_contiguous()
        return record

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in ("layer1", "layer4")]
    return seen, handles


# (setting, channels_last_min_pixels or None, expected channels_last); the input has 2*64*64 pixels
_LAYOUT_CASES = {
    "auto-at-threshold": ("auto", 2 * 64 * 64, True),
    "auto-below-threshold": ("auto", 2 * 64 * 64 + 1, False),
    "auto-default-threshold": ("auto", None, False),  # 8192 pixels: far below 2**17
    "channels_last": ("channels_last", None, True),
    "preserve": ("preserve", 1, False),
}


@pytest.mark.parametrize("case", list(_LAYOUT_CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_activation_memory_format_on_cpu(resnet18, case, mode, backend):
    """An NCHW float32 input runs channels_last from the stem on (hooks see it) when the setting
    and the size threshold say so, else NCHW throughout; either way the outputs, the input gradient
    (in the input's NCHW layout), every parameter gradient (in its parameter's layout) and the
    running statistics match torchvision in NCHW."""
    setting, min_pixels, expect_cl = _LAYOUT_CASES[case]
    ref, fused = _pair(resnet18)
    fused.activation_memory_format = setting
    if min_pixels is not None:
        fused.channels_last_min_pixels = min_pixels
    ref.train(mode == "train")
    fused.train(mode == "train")
    seen, _ = _layouts_seen(fused)
    x = torch.randn(2, 3, 64, 64)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert seen == {"layer1": expect_cl, "layer4": expect_cl}
    assert rel_err(out_f, out_r) <= TOL_NET_OUT
    target = torch.randint(0, out_r.shape[1], (x.shape[0],))
    F.cross_entropy(out_r, target).backward()
    F.cross_entropy(out_f, target).backward()
    assert xf.grad.is_contiguous() and rel_err(xf.grad, xr.grad) <= TOL_NET_GRAD
    compare_grads(ref, fused, TOL_NET_GRAD)

    def layout(t):  # strides of size-1 dims carry no layout
        return [s for s, n in zip(t.stride(), t.shape) if n > 1]

    for name, p in fused.named_parameters():
        assert p.grad is None or layout(p.grad) == layout(p), f"{name}: grad strides {p.grad.stride()} vs {p.stride()}"
    compare_buffers(ref, fused, TOL_NET_OUT)


def test_activation_memory_format_keeps_float64_and_channels_last_inputs(resnet18):
    """float64 (no oneDNN convolutions) keeps the input's NCHW even when channels_last is asked for;
    a channels_last input stays channels_last under every setting."""
    _, fused = _pair(resnet18, torch.float64)
    fused.activation_memory_format = "channels_last"
    seen, _ = _layouts_seen(fused)
    fused(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert seen == {"layer1": False, "layer4": False}
    for setting in _ACTIVATION_SETTINGS:
        _, fused = _pair(resnet18)
        fused.activation_memory_format = setting
        seen, _ = _layouts_seen(fused)
        fused(torch.randn(2, 3, 64, 64).contiguous(memory_format=CL))
        assert seen == {"layer1": True, "layer4": True}, setting


_ACTIVATION_SETTINGS = ("auto", "channels_last", "preserve")


def test_activation_memory_format_refuses_unknown_values_before_state_changes(resnet18):
    _, fused = _pair(resnet18)
    fused.activation_memory_format = "channels-last"
    before = state_snapshot(fused)
    with pytest.raises(ValueError, match=r"activation_memory_format must be one of \('auto', 'channels_last', 'preserve'\), "
                                         r"got 'channels-last'"):
        fused.train()(torch.randn(2, 3, 64, 64))
    assert_state_unchanged(fused, before)


# ------------------------------------------------------------------------------------------------
# the stem's max-pool: through channels_last on the CPU (ATen's NCHW max-pool is ~14x slower)
# ------------------------------------------------------------------------------------------------
def test_max_pool_runs_channels_last_and_hooks_still_see_the_module_call(resnet18):
    """NCHW activations: the max-pool runs on a channels_last copy (the C++ kernel without indices
    under no_grad, torch.profiler shows it), its output converted back to NCHW; with a hook on
    the max-pool the module is called as torchvision calls it (the hook sees the NCHW input)."""
    ref, fused = _pair(resnet18)
    fused.activation_memory_format = "preserve"
    ref.eval()
    fused.eval()
    x = torch.randn(2, 3, 64, 64)
    seen, _ = _layouts_seen(fused)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fused(x)
    names = {e.key for e in prof.key_averages()}
    assert "resnet_fused::max_pool2d_nhwc" in names and "aten::max_pool2d_with_indices" not in names
    assert seen == {"layer1": False, "layer4": False}  # back to NCHW after the pool
    with torch.no_grad():
        assert rel_err(out, ref(x)) <= TOL_NET_OUT
    inputs = []
    fused.maxpool.register_forward_hook(lambda m, i, o: inputs.append(i[0].is_contiguous()))
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) <= TOL_NET_OUT
    assert inputs == [True]

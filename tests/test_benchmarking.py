"""resnet_fused.benchmarking: the interleaved harness and the measures quoted beside it."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import benchmarking as bm


class FakeClock:
    """A clock that only moves when a fake variant 'runs' for its programmed duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def variant(self, durations):
        durations = iter(durations)

        def run():
            self.now += next(durations)
        return run


# ------------------------------------------------------------------------------------------------
# interleaving and bookkeeping
# ------------------------------------------------------------------------------------------------
def test_round_order_rotates_the_start():
    names = ["a", "b", "c"]
    assert [bm.round_order(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_interleaved_calls_variants_in_rotating_rounds():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    results = bm.interleaved(variants, rounds=3, warmup=1)
    # warmup round A B, then timed rounds B A, A B, B A: never two rounds of one variant in a row
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert list(results) == ["A", "B"]
    assert all(len(r.times) == 3 for r in results.values())


def test_interleaved_median_min_iqr_on_fake_timings():
    clock = FakeClock()
    # first duration of each is the warmup round, which must not be recorded
    variants = {"A": clock.variant([100.0, 5.0, 1.0, 3.0, 2.0, 4.0]),
                "B": clock.variant([100.0, 2.0, 2.0, 9.0, 2.0, 2.0])}
    results = bm.interleaved(variants, rounds=5, warmup=1, clock=clock)
    a, b = results["A"], results["B"]
    assert a.times == (5.0, 1.0, 3.0, 2.0, 4.0)
    assert (a.median, a.min, a.iqr) == (3.0, 1.0, 2.0)
    assert (b.median, b.min, b.iqr) == (2.0, 2.0, 0.0)


def test_interleaved_reports_progress_for_every_call():
    seen = []
    bm.interleaved({"A": lambda: None, "B": lambda: None}, rounds=2, warmup=1, progress=seen.append)
    assert len(seen) == 6


def test_interleaved_fixes_threads_and_restores_them():
    before = torch.get_num_threads()
    inside = []
    bm.interleaved({"A": lambda: inside.append(torch.get_num_threads())}, rounds=1, warmup=0,
                   threads=1)
    assert inside == [1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("variants, rounds, warmup", [({}, 1, 0), ({"A": lambda: None}, 0, 0),
                                                      ({"A": lambda: None}, 1, -1)])
def test_interleaved_rejects_empty_or_negative(variants, rounds, warmup):
    with pytest.raises(ValueError):
        bm.interleaved(variants, rounds=rounds, warmup=warmup)


def test_timed_call_uses_the_clock():
    clock = FakeClock()
    assert bm.timed_call(clock.variant([0.25]), clock) == 0.25


# ------------------------------------------------------------------------------------------------
# rel_err, headroom
# ------------------------------------------------------------------------------------------------
def test_rel_err_is_normwise_in_float64():
    ref = torch.randn(100)
    assert bm.rel_err(ref * (1 + 1e-3), ref) == pytest.approx(1e-3, rel=1e-3)
    assert bm.rel_err(ref.half(), ref) < 1e-3  # dtypes may differ: computed in float64
    assert bm.rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert bm.rel_err(torch.ones(3), torch.zeros(3)) == math.inf


def test_rel_err_over_a_list_is_over_the_concatenation():
    a, b = torch.randn(5), torch.randn(7)
    ra, rb = a + 0.1 * torch.randn(5), b + 0.1 * torch.randn(7)
    whole = bm.rel_err(torch.cat([a, b]), torch.cat([ra, rb]))
    assert bm.rel_err([a, b], [ra, rb]) == pytest.approx(whole)


def test_rel_err_rejects_mismatches():
    with pytest.raises(ValueError, match="shape"):
        bm.rel_err(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="tensors"):
        bm.rel_err([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])


def test_headroom_share():
    assert bm.headroom_share(10.0, 8.0, 6.0) == pytest.approx(0.5)
    assert bm.headroom_share(10.0, 6.0, 6.0) == pytest.approx(1.0)
    assert bm.headroom_share(10.0, 12.0, 6.0) == pytest.approx(-0.5)
    assert bm.headroom_share(10.0, 9.0, 10.0) is None  # no headroom: the ratio means nothing


# ------------------------------------------------------------------------------------------------
# saved_bytes, limit_model
# ------------------------------------------------------------------------------------------------
def test_saved_bytes_counts_a_shared_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    one_storage = x.untyped_storage().nbytes()
    # mul saves both operands: two views of x, one storage
    assert bm.saved_bytes(lambda: x[:2] * x[2:]) == one_storage
    assert bm.saved_bytes(lambda: x[:2] * x[2:], exclude=[x]) == 0


def test_saved_bytes_adds_distinct_storages():
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.randn(4, 8, requires_grad=True)
    assert bm.saved_bytes(lambda: x * y) == 2 * x.untyped_storage().nbytes()


def test_saved_bytes_of_fused_blocks_is_smaller():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    fused = resnet_fused.swap_blocks(copy.deepcopy(block))
    x = torch.randn(2, 8, 8, 8)
    eager = bm.saved_bytes(lambda: block(x), exclude=block.parameters())
    assert 0 < bm.saved_bytes(lambda: fused(x), exclude=fused.parameters()) < eager


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_limit_model_has_no_bn_or_relu_left(norm_layer):
    model = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    limit = bm.limit_model(model)
    fused_away = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.ReLU)
    assert not any(isinstance(m, fused_away) for m in limit.modules())
    assert any(isinstance(m, norm_layer) for m in model.modules())  # the original is untouched
    assert limit.conv1.weight is not model.conv1.weight
    assert torch.equal(limit.conv1.weight, model.conv1.weight)
    assert limit.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ------------------------------------------------------------------------------------------------
# parity helpers, steps
# ------------------------------------------------------------------------------------------------
def _small_block():
    return bm.randomize_bn_affine(torchvision.models.resnet.BasicBlock(8, 8))


def test_train_parity_of_identical_models_is_zero():
    block = _small_block()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 8, 6, 6).requires_grad_(True)
    parity = bm.train_parity(block, twin, x, lambda out: out.square().sum())
    assert parity.output == 0.0 and parity.max_grad == 0.0
    assert set(parity.grads) == {"input"} | {n for n, _ in block.named_parameters()}


def test_train_parity_without_input_grad_compares_parameters_only():
    block = _small_block()
    x = torch.randn(2, 8, 6, 6)  # no requires_grad
    parity = bm.train_parity(block, copy.deepcopy(block), x, lambda out: out.sum())
    assert "input" not in parity.grads


def test_infer_parity_sees_a_difference():
    block = _small_block().eval()
    other = copy.deepcopy(block)
    with torch.no_grad():
        other.bn2.bias.add_(1e-3)
    x = torch.randn(2, 8, 6, 6)
    assert 0 < bm.infer_parity(block, other, x).output < 1e-2
    assert bm.infer_parity(block, copy.deepcopy(block), x).output == 0.0


def test_train_step_drops_gradients_between_calls():
    block = _small_block()
    step = bm.train_step(block, torch.randn(2, 8, 6, 6), lambda out: out.sum())
    step()
    first = block.conv1.weight.grad.clone()
    step()
    assert torch.allclose(block.conv1.weight.grad, first)  # not accumulated to 2x


def test_warm_running_stats_moves_them_off_the_defaults():
    block = bm.warm_running_stats(_small_block(), torch.empty(2, 8, 6, 6))
    assert block.bn1.num_batches_tracked.item() == 2
    assert not torch.equal(block.bn1.running_var, torch.ones(8))


# ------------------------------------------------------------------------------------------------
# inference peers and the limit on the folded path
# ------------------------------------------------------------------------------------------------
def _eval_resnet18():
    model = bm.randomize_bn_affine(torchvision.models.resnet18(weights=None))
    return bm.warm_running_stats(model, torch.empty(2, 3, 32, 32)).eval()


def test_limit_of_a_folded_model_stays_on_the_folded_path():
    from resnet_fused.fold import FoldedBasicBlock

    folded = resnet_fused.fold_bn(_eval_resnet18())
    limit = bm.limit_model(folded)
    block = limit.layer1[0]
    assert isinstance(block, FoldedBasicBlock) and type(block) is not FoldedBasicBlock
    assert type(folded.layer1[0]) is FoldedBasicBlock  # the folded model is untouched
    assert not any(isinstance(m, nn.ReLU) for m in limit.modules())
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        # conv2(conv1(x)) + x with no bias and no ReLU, on the same conv_bias_act path
        c1, c2 = block.conv1, block.conv2
        expected = nn.functional.conv2d(nn.functional.conv2d(x, c1.weight, None, 1, 1),
                                        c2.weight, None, 1, 1) + x
        assert bm.rel_err(block(x), expected) <= 1e-5
    assert limit(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_public_path_runs_the_folded_model_without_prepacked_weights(monkeypatch):
    model = _eval_resnet18()
    folded = resnet_fused.fold_bn(model)
    seen = []   # packing a weight for the oneDNN ops: only the pre-packed path does
    real = resnet_fused.ops.prepared_conv
    monkeypatch.setattr(resnet_fused.ops, "prepared_conv", lambda *a, **k: seen.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        public = bm.PublicPath(folded)(x)
        assert seen == []
        assert bm.rel_err(public, model(x)) <= 1e-5
        folded(x)
    assert seen and resnet_fused.ops._ONEDNN_PREPACKED  # restored after the call


def test_compile_frozen_sets_freezing_around_each_call():
    import torch._inductor.config as inductor_config

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(inductor_config.freezing)
            return x

    wrapped = bm._Freezing(Probe())
    wrapped(torch.zeros(1))
    assert seen == [True] and inductor_config.freezing is False
    compiled, plain = bm.compile_frozen(_eval_resnet18())
    assert plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.training


def test_onnxruntime_model_needs_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ImportError):
        bm.onnxruntime_model(_eval_resnet18(), torch.randn(1, 3, 32, 32))


def test_inference_ab_script_runs_and_reports_parity():
    """bench/inference_ab.py (the README's long A/B of issue 4): a tiny run end to end."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "inference_ab.py"
    spec = importlib.util.spec_from_file_location("inference_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        rec = mod.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "2", "--warmup", "0",
                        "--threads", "1"])
    finally:
        torch._dynamo.reset()
    assert rec["folded_ms"] > 0 and rec["compile_freeze_ms"] > 0 and rec["per_round"] > 0
    assert rec["rel_err"] <= 1e-5


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layout_ab_script_runs(mode):
    """bench/layout_ab.py (the measurements behind channels_last_min_pixels): a tiny run."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "layout_ab.py"
    spec = importlib.util.spec_from_file_location("layout_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    medians = mod.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--mode", mode, "--rounds", "1",
                        "--warmup", "0", "--threads", "1"])
    assert set(medians) == {"torchvision", "torchvision-cl-input", "fused-auto", "fused-preserve",
                            "fused-channels_last"}
    assert all(t > 0 for t in medians.values())

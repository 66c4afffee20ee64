"""Synchronized BatchNorm (resnet_fused.SyncBatchNorm, fused blocks holding synchronized BN layers).

Distributed tests spawn 2 gloo ranks on the loopback (torch.multiprocessing.spawn); each spawn runs
several checks because starting a process that imports torch takes seconds. The reference is one
process running the whole global batch through torchvision's own (unfused, plain BatchNorm2d)
modules: with each rank's loss summed over its samples, DDP's averaged parameter gradients equal the
single-process gradient divided by the world size, and each rank's input gradient equals its slice
of the single-process input gradient.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnet_fused
from resnet_fused import FusedBasicBlock, FusedBottleneck, SyncBatchNorm
from resnet_fused.sync_bn import merge_stats, pack_stats

from conftest import (TOL_GRAD, TOL_NET_GRAD, TOL_NET_OUT, TOL_OUT, TOL_STATS, block_factory,
                      compare_buffers, randomize_bn, rel_err, standard_downsample)

WORLD = 2
# (per-rank batch sizes, spatial size) of each SGD step: uneven batches; in the last step rank 1
# holds one value per channel in the last blocks (1 sample at 1x1), which is fine globally.
STEPS = [((3, 2), 10), ((2, 3), 9), ((4, 1), 4)]
NUM_OUT = 10
VARIANTS = ("resnet_fused", "torch_sync_in_blocks")


# ------------------------------------------------------------------------------------------------
# the network and the inputs (built identically in the test process and in every rank)
# ------------------------------------------------------------------------------------------------
def _net() -> nn.Module:
    """A small ResNet with plain BatchNorm2d: a stem BN outside any block, BasicBlocks and
    Bottlenecks with and without a downsample branch."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 16, stride=2, downsample=standard_downsample(8, 16, 2)),
        BasicBlock(16, 16),
        Bottleneck(16, 8, stride=2, downsample=standard_downsample(16, 32, 2)),
        Bottleneck(32, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_OUT))


def _initial_state() -> dict:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    net = randomize_bn(_net())
    torch.random.set_rng_state(gen_state)
    return net.state_dict()


def _draw(step: int):
    """The global batch of a step and the per-sample loss weights (loss = sum(out * weights))."""
    batches, hw = STEPS[step]
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(sum(batches), 3, hw, hw, generator=g)
    weights = torch.randn(sum(batches), NUM_OUT, generator=g)
    return x, weights


def _rank_slice(step: int, rank: int) -> slice:
    batches, _ = STEPS[step]
    lo = sum(batches[:rank])
    return slice(lo, lo + batches[rank])


def _build(variant: str) -> nn.Module:
    net = _net()
    net.load_state_dict(_initial_state())
    if variant == "resnet_fused":  # ours everywhere; swap then convert (the other order: below)
        return resnet_fused.convert_sync_batchnorm(resnet_fused.swap_blocks(net))
    if variant == "torch_sync_in_blocks":  # torch's nn.SyncBatchNorm inside the fused blocks
        resnet_fused.swap_blocks(net)
        for i in range(3, 7):
            net[i] = nn.SyncBatchNorm.convert_sync_batchnorm(net[i])
        resnet_fused.convert_sync_batchnorm(net[:3])  # torch's own refuses CPU tensors: the stem is ours
        return net
    raise ValueError(variant)


def _blocks(net: nn.Module):
    return [m for m in net.modules() if isinstance(m, (FusedBasicBlock, FusedBottleneck))]


# ------------------------------------------------------------------------------------------------
# spawning
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # 2 ranks on a small shared machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(),) + args, nprocs=WORLD, join=True)


# standalone SyncBatchNorm configurations (kwargs, per-rank batch sizes); (5, 0): rank 1 is empty
STANDALONE = [(dict(), (5, 0)), (dict(affine=False), (3, 2)), (dict(bias=False), (1, 4)),
              (dict(momentum=None), (2, 3)), (dict(track_running_stats=False), (4, 1))]


def _standalone_input(case: int):
    batches = STANDALONE[case][1]
    g = torch.Generator().manual_seed(50 + case)
    x = torch.randn(sum(batches), 4, 3, 5, generator=g) * 3 + 7
    return x, torch.randn(x.shape, generator=g), batches


def _standalone_module(case: int, cls) -> nn.Module:
    torch.manual_seed(case)
    return randomize_bn(cls(4, **STANDALONE[case][0]))


def _standalone_checks(rank: int, device: str):
    """Each configuration, two training steps (second: running statistics in use by the update)."""
    records = []
    for case in range(len(STANDALONE)):
        bn = _standalone_module(case, SyncBatchNorm).to(device)
        x_all, g_all, batches = _standalone_input(case)
        lo = sum(batches[:rank])
        steps = []
        for _ in range(2):
            x = x_all[lo:lo + batches[rank]].to(device).requires_grad_()
            out = bn(x)
            out.backward(g_all[lo:lo + batches[rank]].to(device))
            steps.append(dict(out=out.detach().cpu(), x_grad=x.grad.cpu(),
                              grads={n: p.grad.cpu().clone() for n, p in bn.named_parameters()},
                              buffers={n: b.cpu().clone() for n, b in bn.named_buffers()}))
            bn.zero_grad()
        records.append(steps)
    return records


def _train_worker(rank: int, port: int, out_dir: str, device: str) -> None:
    """Per variant: DDP training over STEPS, recording what the test process compares; then an
    eval-mode forward on rank 0 alone (it would time out if eval communicated); then error checks
    and a failing rank."""
    # a generous timeout: a communication bug fails the test instead of hanging it
    _init(rank, port, timeout_s=60)
    if device == "cuda":
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    result = {}
    for variant in VARIANTS:
        net = _build(variant).to(device)
        assert all(b.fused_supported() for b in _blocks(net)), variant
        block_outputs = []
        for b in _blocks(net):
            b.register_forward_hook(lambda m, i, o: block_outputs.append(type(o.grad_fn).__name__))
        # torch's DDP refuses CPU modules holding torch's nn.SyncBatchNorm: average the gradients
        # as DDP does (all-reduce, divide by the world size) to test the fused blocks' path anyway
        ddp = not (variant == "torch_sync_in_blocks" and device == "cpu")
        model = DDP(net) if ddp else net
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        steps = []
        for step in range(len(STEPS)):
            x_all, weights = _draw(step)
            sl = _rank_slice(step, rank)
            start = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            x = x_all[sl].to(device).requires_grad_()
            block_outputs.clear()
            out = model(x)
            (out * weights[sl].to(device)).sum().backward()
            if not ddp:
                for p in net.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(WORLD)
            steps.append(dict(
                start=start, out=out.detach().cpu(), x_grad=x.grad.cpu(),
                grads={n: p.grad.detach().cpu().clone() for n, p in net.named_parameters()},
                buffers={k: v.detach().cpu().clone() for k, v in net.named_buffers()},
                fused=list(block_outputs)))
            opt.step()
            opt.zero_grad()
        record = dict(steps=steps, final={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        if rank == 0:
            net.eval()
            x_all, _ = _draw(0)
            with torch.no_grad():
                record["eval_out"] = net(x_all.to(device)).cpu()
            net.train()
        result[variant] = record
        del model
        dist.barrier()
    result["standalone"] = _standalone_checks(rank, device)
    # a rank outside the BN's process group gets a clear error before any kernel runs;
    # a group of one process is plain BatchNorm2d
    group = dist.new_group([1])
    bn = SyncBatchNorm(4, process_group=group).to(device)
    x = torch.randn(3, 4, 5, 5, device=device)
    if rank == 0:
        try:
            bn(x)
            result["not_member_error"] = None
        except ValueError as e:
            result["not_member_error"] = str(e)
    else:
        ref = nn.BatchNorm2d(4).to(device)
        result["group_of_one_equal"] = torch.equal(bn(x), ref(x)) and torch.equal(bn.running_var, ref.running_var)
    result["timeout"] = _timeout_check(rank, device)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def ddp_run(request, tmp_path_factory):
    device = request.param
    out = tmp_path_factory.mktemp(f"ddp_{device}")
    t0 = time.perf_counter()
    _spawn(_train_worker, str(out), device)
    print(f"2-rank spawn ({device}): {time.perf_counter() - t0:.1f} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# distributed tests
# ------------------------------------------------------------------------------------------------
def _reference_step(start: dict, step: int):
    """One process, whole global batch, torchvision's unfused modules with plain BatchNorm2d."""
    ref = _net()
    ref.load_state_dict(start, strict=True)
    ref.train()
    x_all, weights = _draw(step)
    x = x_all.clone().requires_grad_()
    out = ref(x)
    (out * weights).sum().backward()
    return ref, out.detach(), x.grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_matches_one_process_on_the_global_batch(ddp_run, variant):
    ranks = [r[variant] for r in ddp_run]
    for step in range(len(STEPS)):
        what = f"{variant}, step {step} (batches {STEPS[step][0]}): "
        recs = [r["steps"][step] for r in ranks]
        for rank, rec in enumerate(recs):  # the fused units made every block's output
            assert len(rec["fused"]) == 4 and all("BNAddReLU" in f for f in rec["fused"]), (rank, rec["fused"])
        # the ranks start every step from the same state (DDP keeps them in sync)
        for k, v in recs[0]["start"].items():
            assert torch.equal(recs[1]["start"][k], v), f"{what}ranks differ in {k} at the start"
        ref, out, x_grad = _reference_step(recs[0]["start"], step)
        err = rel_err(torch.cat([rec["out"] for rec in recs]), out)
        assert err <= TOL_NET_OUT, f"{what}output rel_err {err:.3g} > {TOL_NET_OUT}"
        for rank, rec in enumerate(recs):
            # not divided: the rank's slice of the single-process input gradient
            err = rel_err(rec["x_grad"], x_grad[_rank_slice(step, rank)])
            assert err <= TOL_NET_GRAD, f"{what}rank {rank} input grad rel_err {err:.3g} > {TOL_NET_GRAD}"
            for name, p in ref.named_parameters():
                err = rel_err(rec["grads"][name], p.grad / WORLD)
                assert err <= TOL_NET_GRAD, f"{what}rank {rank} grad of {name}: rel_err {err:.3g}"
            for name, b in ref.named_buffers():
                mine = rec["buffers"][name]
                if name.endswith("num_batches_tracked"):
                    assert torch.equal(mine, b), f"{what}rank {rank} {name}"
                else:
                    err = rel_err(mine, b)
                    assert err <= TOL_STATS, f"{what}rank {rank} {name}: rel_err {err:.3g} > {TOL_STATS}"
        # every rank merges the same gathered statistics in the same order: identical buffers
        for k, v in recs[0]["buffers"].items():
            assert torch.equal(recs[1]["buffers"][k], v), f"{what}ranks' {k} differ"
    for k, v in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][k], v), f"{variant}: ranks differ in {k} after training"


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_mode_does_not_communicate(ddp_run, variant):
    """Rank 0 ran an eval forward alone (its peer never joined): it finished, with the running
    statistics, and matches torchvision in eval mode."""
    ref = _net()
    ref.load_state_dict(ddp_run[0][variant]["final"])
    ref.eval()
    x_all, _ = _draw(0)
    with torch.no_grad():
        expected = ref(x_all)
    err = rel_err(ddp_run[0][variant]["eval_out"], expected)
    assert err <= TOL_NET_OUT, f"eval output rel_err {err:.3g} > {TOL_NET_OUT}"


@pytest.mark.parametrize("case", range(len(STANDALONE)),
                         ids=["-".join([f"{k}={v}" for k, v in kw.items()] or ["default"]) + f"-batches{b[0]}+{b[1]}"
                              for kw, b in STANDALONE])
def test_standalone_sync_batchnorm_matches_batchnorm2d_on_the_global_batch(ddp_run, case):
    """Without DDP: the sum of the ranks' parameter gradients is the global one."""
    ref = _standalone_module(case, nn.BatchNorm2d)
    x_all, g_all, batches = _standalone_input(case)
    for step in range(2):
        recs = [r["standalone"][case][step] for r in ddp_run]
        x = x_all.clone().requires_grad_()
        out = ref(x)
        out.backward(g_all)
        err = rel_err(torch.cat([r["out"] for r in recs]), out)
        assert err <= TOL_OUT, f"step {step}: output rel_err {err:.3g}"
        err = rel_err(torch.cat([r["x_grad"] for r in recs]), x.grad)
        assert err <= TOL_GRAD, f"step {step}: input grad rel_err {err:.3g}"
        for name, p in ref.named_parameters():
            err = rel_err(recs[0]["grads"][name] + recs[1]["grads"][name], p.grad)
            assert err <= TOL_GRAD, f"step {step}: grad of {name} rel_err {err:.3g}"
        for name, b in ref.named_buffers():
            for rank, rec in enumerate(recs):
                if name == "num_batches_tracked":
                    assert torch.equal(rec["buffers"][name], b)
                else:
                    err = rel_err(rec["buffers"][name], b)
                    assert err <= TOL_STATS, f"step {step}: rank {rank} {name} rel_err {err:.3g}"
        ref.zero_grad()


def test_a_rank_outside_the_process_group_gets_a_clear_error(ddp_run):
    message = ddp_run[0]["not_member_error"]
    assert message is not None and "not a member" in message, message
    assert ddp_run[1]["group_of_one_equal"] is True


TIMEOUT_S = 2.0


def _timeout_check(rank: int, device: str) -> dict:
    """Rank 1 fails before communicating (a bad input raises before any kernel); rank 0 enters the
    statistics all_gather of a fused block whose BN group has a short timeout, and must get the
    timeout error instead of hanging, with its running statistics untouched."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    torch.manual_seed(0)
    block = block_factory("basic", 8, 8)()
    resnet_fused.convert_sync_batchnorm(resnet_fused.swap_blocks(randomize_bn(block)), group).to(device)
    before = copy.deepcopy(block.state_dict())
    channels = 8 if rank == 0 else 5
    t0 = time.perf_counter()
    try:
        block(torch.randn(2, channels, 6, 6, device=device))
        error = None
    except Exception as e:  # noqa: BLE001 - recorded, checked by the test
        error = (type(e).__name__, str(e))
    elapsed = time.perf_counter() - t0
    unchanged = all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())
    # rank 1 stays alive, as a rank stuck in user code would, until rank 0 is done (the default
    # group is a different one and still works)
    dist.barrier()
    return dict(error=error, elapsed=elapsed, unchanged=unchanged)


def test_a_failing_rank_does_not_hang_the_others(ddp_run):
    r0, r1 = (r["timeout"] for r in ddp_run)
    assert r1["error"] is not None and r1["error"][0] == "ValueError" and "channels" in r1["error"][1]
    assert r1["unchanged"]
    assert r0["error"] is not None, "rank 0 finished a synchronized forward without its peer"
    assert r0["error"][0] == "RuntimeError" and "timed out" in r0["error"][1].lower(), r0["error"]
    assert TIMEOUT_S * 0.9 <= r0["elapsed"] <= TIMEOUT_S + 20, r0["elapsed"]
    assert r0["unchanged"], "running statistics changed although the collective failed"


# ------------------------------------------------------------------------------------------------
# single process: no process group
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_process_group():
    assert not dist.is_initialized(), "these tests need a process without a process group"


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors on a shared 2-core machine: one thread is 10-100x faster than two contending
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None), dict(affine=False), dict(bias=False),
                                    dict(track_running_stats=False)],
                         ids=["default", "momentum-none", "affine-false", "bias-false", "no-running-stats"])
def test_sync_batchnorm_without_process_group_is_batchnorm2d(kwargs):
    ref = randomize_bn(nn.BatchNorm2d(6, **kwargs))
    ours = SyncBatchNorm(6, **kwargs)
    ours.load_state_dict(ref.state_dict())
    for mode in ("train", "train", "eval"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        x = torch.randn(3, 6, 5, 4)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_o = ref(xr), ours(xo)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_o.backward(g)
        assert torch.equal(out_o, out_r) and torch.equal(xo.grad, xr.grad)
        for (name, p_r), p_o in zip(ref.named_parameters(), ours.parameters()):
            assert torch.equal(p_o.grad, p_r.grad), name
        for (name, b_r), b_o in zip(ref.named_buffers(), ours.buffers()):
            assert torch.equal(b_o, b_r), name


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_block_with_sync_bn_without_process_group_is_the_fused_block(kind):
    """No process group: no synchronizer, the very same fused kernels (bitwise)."""
    make = block_factory(kind, 16, 8 if kind == "bottleneck" else 16, stride=2, downsample=True)
    plain = resnet_fused.swap_blocks(randomize_bn(make()))
    synced = resnet_fused.convert_sync_batchnorm(copy.deepcopy(plain))
    assert all(type(m) is SyncBatchNorm for m in synced.modules() if isinstance(m, nn.BatchNorm2d))
    assert synced.fused_supported()
    for _ in range(2):
        x = torch.randn(2, 16, 7, 9)
        xp, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_p, out_s = plain(xp), synced(xs)
        assert "BNAddReLU" in type(out_s.grad_fn).__name__
        g = torch.randn_like(out_p)
        out_p.backward(g)
        out_s.backward(g)
        assert torch.equal(out_s, out_p) and torch.equal(xs.grad, xp.grad)
        for (name, p_p), p_s in zip(plain.named_parameters(), synced.parameters()):
            assert torch.equal(p_s.grad, p_p.grad), name
        for (name, b_p), b_s in zip(plain.named_buffers(), synced.buffers()):
            assert torch.equal(b_s, b_p), name


def _torchvision_resnet():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def test_convert_sync_batchnorm_structure_and_state_dict():
    model = _torchvision_resnet()
    bns = {n: m for n, m in model.named_modules() if type(m) is nn.BatchNorm2d}
    params = {n: p for n, p in model.named_parameters()}
    group = object()  # any value is kept as the attribute (a real group needs a process group)
    assert resnet_fused.convert_sync_batchnorm(model, process_group=group) is model
    converted = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert converted.keys() == bns.keys()
    for name, m in converted.items():
        assert type(m) is SyncBatchNorm and m is bns[name] and m.process_group is group
    # the same parameter tensors: optimizers built before the conversion keep working
    assert all(p is params[n] for n, p in model.named_parameters())
    # state_dict keys identical to torch's SyncBatchNorm conversion, loadable both ways
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(_torchvision_resnet())
    assert list(model.state_dict().keys()) == list(torch_sync.state_dict().keys())
    torch_sync.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(torch_sync.state_dict(), strict=True)
    # idempotent
    keys = list(model.state_dict().keys())
    resnet_fused.convert_sync_batchnorm(model, process_group=group)
    assert list(model.state_dict().keys()) == keys
    assert all(type(m) is SyncBatchNorm for m in converted.values())
    # a bare BatchNorm2d converts too (in place, returned)
    bn = nn.BatchNorm2d(3)
    assert resnet_fused.convert_sync_batchnorm(bn) is bn and type(bn) is SyncBatchNorm
    assert bn.process_group is None


def test_convert_leaves_other_norm_layers():
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = nn.Sequential(nn.BatchNorm1d(3), FrozenBatchNorm2d(3), nn.SyncBatchNorm(3), nn.BatchNorm3d(3))
    before = [type(m) for m in model]
    resnet_fused.convert_sync_batchnorm(model)
    assert [type(m) for m in model] == before


@pytest.mark.parametrize("order", ["convert-then-swap", "swap-then-convert", "torch-convert-then-swap",
                                   "swap-then-torch-convert"])
def test_swap_blocks_and_sync_conversion_in_either_order(order):
    model = _torchvision_resnet()
    if order == "convert-then-swap":
        resnet_fused.swap_blocks(resnet_fused.convert_sync_batchnorm(model))
    elif order == "swap-then-convert":
        resnet_fused.convert_sync_batchnorm(resnet_fused.swap_blocks(model))
    elif order == "torch-convert-then-swap":
        model = resnet_fused.swap_blocks(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(resnet_fused.swap_blocks(model))
    blocks = _blocks(model)
    assert len(blocks) == 8 and all(b.fused_supported() for b in blocks)
    norm_type = nn.SyncBatchNorm if order.startswith("torch") or order.endswith("torch-convert") \
        else SyncBatchNorm
    assert all(type(b.bn1) is norm_type for b in blocks)
    # still converts / swaps back
    resnet_fused.unswap_blocks(model)
    assert not _blocks(model)


def test_torch_sync_bn_in_a_fused_block_without_process_group_is_the_fused_block():
    make = block_factory("basic", 8, 16, stride=2, downsample=True)
    plain = resnet_fused.swap_blocks(randomize_bn(make()))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert type(synced.bn1) is nn.SyncBatchNorm and synced.fused_supported()
    x = torch.randn(3, 8, 6, 6)
    xp, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_s = plain(xp), synced(xs)
    out_p.sum().backward()
    out_s.sum().backward()
    assert torch.equal(out_s, out_p) and torch.equal(xs.grad, xp.grad)
    compare_buffers(plain, synced, 0.0)


def test_fused_one_value_per_channel_without_process_group_still_raises():
    block = resnet_fused.convert_sync_batchnorm(
        resnet_fused.swap_blocks(block_factory("basic", 8, 8, stride=2, downsample=True)()))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 8, 2, 2))


def test_chan_merge_of_uneven_partials_with_a_large_mean():
    """Per-rank partials of data whose mean is 1e3 times its spread, uneven (and one empty) ranks:
    the merged statistics keep the DESIGN.md accuracy (variance rel_err <= 1e-4)."""
    c = 5
    data = torch.randn(40, c, 3, 3, dtype=torch.float64) + 1e3 * (1 + torch.arange(c, dtype=torch.float64)).reshape(1, c, 1, 1)
    pieces = [data[:23], data[23:23], data[23:31], data[31:]]
    parts = []
    for piece in pieces:
        x = piece.float()
        if piece.shape[0]:
            mean, var = resnet_fused.ops.bn_stats(x)
        else:
            mean = var = torch.full((c,), float("nan"))  # what 0/0 gives: weight 0 must ignore it
        parts.append(pack_stats(mean, var, piece.numel() // c))
    mean, var, n = merge_stats(torch.stack(parts))
    dims = [0, 2, 3]
    assert n == data.numel() // c
    assert rel_err(mean, data.mean(dims)) <= TOL_OUT
    assert rel_err(var, data.var(dims, unbiased=False)) <= 1e-4


def test_merge_of_no_values_reports_zero():
    _, _, n = merge_stats(torch.stack([pack_stats(torch.zeros(3), torch.zeros(3), 0)] * 2))
    assert n == 0


@pytest.mark.parametrize("backend, device, ok", [
    ("nccl", "cpu", False), ("nccl", "cuda", True), ("gloo", "cpu", True), ("gloo", "cuda", True),
    ("cpu:gloo,cuda:nccl", "cpu", True), ("cuda:nccl", "cpu", False)])
def test_a_backend_that_cannot_carry_the_device_is_a_clear_error(monkeypatch, backend, device, ok):
    """(No NCCL here: the process group is faked; the check only reads its backend name.)"""
    bn = SyncBatchNorm(4, process_group=object())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    if ok:
        assert resnet_fused.sync_bn.sync_world_size(bn, torch.device(device)) == 2
    else:
        with pytest.raises(ValueError, match="cannot synchronize cpu tensors"):
            resnet_fused.sync_bn.sync_world_size(bn, torch.device(device))
    bn.eval()  # eval mode never synchronizes, so never checks
    assert resnet_fused.sync_bn.sync_world_size(bn, torch.device(device)) == 1

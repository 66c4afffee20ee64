"""swap_blocks / unswap_blocks on torchvision models: every block (and the ResNet itself, for its
fused stem) converted in place, the very same parameter and buffer tensors kept (optimizers and
checkpoints keep working), training mode, dtype and memory format kept, idempotent, reversible, and
numerically torchvision's model."""
from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableBottleneck
from torchvision.models.quantization.resnet import QuantizableResNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import resnet_fused
from resnet_fused import FusedBasicBlock, FusedBottleneck, FusedResNet

from conftest import TOL_NET_OUT, TOL_OUT, randomize_bn, rel_err

ARCHS = {
    "resnet18": (torchvision.models.resnet18, BasicBlock, FusedBasicBlock, [2, 2, 2, 2]),
    "resnet50": (torchvision.models.resnet50, Bottleneck, FusedBottleneck, [3, 4, 6, 3]),
}


def _block_names(layers):
    return [f"layer{i + 1}.{j}" for i, n in enumerate(layers) for j in range(n)]


def _converted_names(layers):
    """What swap_blocks converts in a torchvision ResNet: the model itself ("", its stem), then
    every block (named_modules order)."""
    return [""] + _block_names(layers)


def _tensors(model):
    """(name, tensor object, data_ptr) of every parameter and buffer."""
    return [(n, t, t.data_ptr()) for n, t in list(model.named_parameters()) + list(model.named_buffers())]


@pytest.fixture(scope="module")
def models():
    """One randomly initialized model per architecture (construction of resnet50 is the slow part);
    tests deepcopy what they convert."""
    built = {}
    for arch, (builder, *_rest) in ARCHS.items():
        torch.manual_seed(0)
        built[arch] = randomize_bn(builder(weights=None))
    return built


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_converts_every_block_in_place(arch, models, caplog):
    _, plain, fused_cls, layers = ARCHS[arch]
    model = copy.deepcopy(models[arch])
    with caplog.at_level(logging.INFO, logger="resnet_fused"):
        result = resnet_fused.swap_blocks(model)
    assert result is model
    report = model.resnet_fused_report
    assert isinstance(report, resnet_fused.SwapReport)
    assert report.converted == _converted_names(layers)
    assert report.already == [] and report.left == [] and report.stems == [""]
    assert type(model) is FusedResNet and isinstance(model, ResNet) and model.fused_supported()
    for name in _block_names(layers):
        block = model.get_submodule(name)
        assert type(block) is fused_cls and isinstance(block, plain)
        assert block.fused_supported()
    assert not any(type(m) in (BasicBlock, Bottleneck, ResNet) for m in model.modules())
    assert any("swap_blocks" in r.getMessage() for r in caplog.records)
    assert str(report).startswith(f"converted {len(_block_names(layers))} block(s) + 1 ResNet stem(s), ")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_keeps_the_very_same_tensors(arch, models):
    model = copy.deepcopy(models[arch])
    before = _tensors(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resnet_fused.swap_blocks(model)
    after = _tensors(model)
    assert [n for n, _, _ in before] == [n for n, _, _ in after]
    for (name, t0, p0), (_, t1, p1) in zip(before, after):
        assert t1 is t0, f"{name} is another tensor object"
        assert id(t1) == id(t0) and p1 == p0, f"{name} moved"
    # the optimizer built before the swap still holds the model's parameters
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_keeps_training_mode(arch, training, models):
    model = copy.deepcopy(models[arch]).train(training)
    model.layer1[0].bn1.train(not training)  # a mixed state must survive too
    modes = {n: m.training for n, m in model.named_modules()}
    resnet_fused.swap_blocks(model)
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_keeps_dtype_and_memory_format(arch, models):
    model = copy.deepcopy(models[arch]).double().to(memory_format=torch.channels_last)
    formats = {n: (p.dtype, p.stride()) for n, p in model.named_parameters()}
    resnet_fused.swap_blocks(model)
    assert {n: (p.dtype, p.stride()) for n, p in model.named_parameters()} == formats
    w = model.layer1[0].conv2.weight
    assert w.dtype == torch.float64  # a 3x3 conv: the format is unambiguous
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_is_idempotent(arch, models):
    _, _, _, layers = ARCHS[arch]
    model = copy.deepcopy(models[arch])
    resnet_fused.swap_blocks(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    resnet_fused.swap_blocks(model)
    report = model.resnet_fused_report
    assert report.converted == []
    assert report.already == _converted_names(layers)
    assert {n: type(m) for n, m in model.named_modules()} == classes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unswap_round_trip_restores_torchvision_classes(arch, models):
    _, plain, _, layers = ARCHS[arch]
    model = copy.deepcopy(models[arch])
    original = {n: type(m) for n, m in model.named_modules()}
    before = _tensors(model)
    resnet_fused.swap_blocks(model)
    result = resnet_fused.unswap_blocks(model)
    assert result is model
    assert model.resnet_fused_report.converted == _converted_names(layers)
    assert {n: type(m) for n, m in model.named_modules()} == original
    assert type(model) is ResNet
    assert all(type(model.get_submodule(n)) is plain for n in _block_names(layers))
    for (name, t0, p0), (_, t1, p1) in zip(before, _tensors(model)):
        assert t1 is t0 and p1 == p0, name
    # unswapping a model without fused blocks converts nothing
    resnet_fused.unswap_blocks(model)
    assert model.resnet_fused_report.converted == []


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swapped_resnet18_matches_the_original(mode, models):
    original = copy.deepcopy(models["resnet18"]).train(mode == "train")
    swapped = resnet_fused.swap_blocks(copy.deepcopy(original))
    x = torch.randn(2, 3, 64, 64)
    xo, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_s = original(xo), swapped(xs)
    assert rel_err(out_s, out_o) <= TOL_NET_OUT
    if mode == "train":
        for (n, b_o), (_, b_s) in zip(original.named_buffers(), swapped.named_buffers()):
            if n.endswith("num_batches_tracked"):
                assert torch.equal(b_s, b_o), n
            else:
                assert rel_err(b_s, b_o) <= TOL_NET_OUT, n
    # and back: the unswapped model is torchvision's forward again, exactly (same state first: the
    # training forward above updated both models' running statistics, within tolerance)
    resnet_fused.unswap_blocks(swapped)
    swapped.load_state_dict(original.state_dict())
    original.eval()
    swapped.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(swapped(x), original(x))


def test_swapped_resnet50_matches_the_original_in_eval(models):
    original = copy.deepcopy(models["resnet50"]).eval()
    swapped = resnet_fused.swap_blocks(copy.deepcopy(original))
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert rel_err(swapped(x), original(x)) <= TOL_NET_OUT


# ------------------------------------------------------------------------------------------------
# subclasses of torchvision's blocks
# ------------------------------------------------------------------------------------------------
def test_subclass_overriding_forward_is_left_and_reported():
    model = torchvision.models.quantization.resnet18(weights=None, quantize=False)
    names = _block_names([2, 2, 2, 2])
    assert all(type(model.get_submodule(n)) is QuantizableBasicBlock for n in names)
    resnet_fused.swap_blocks(model)
    report = model.resnet_fused_report
    assert report.left == [""] + names  # QuantizableResNet overrides forward too
    assert report.converted == [] and report.already == []
    assert type(model) is QuantizableResNet
    assert all(type(model.get_submodule(n)) is QuantizableBasicBlock for n in names)
    assert "left 9 ((model), layer1.0, " in str(report)


def test_quantizable_bottleneck_is_left_too():
    model = torchvision.models.quantization.resnet50(weights=None, quantize=False)
    resnet_fused.swap_blocks(model)
    assert len(model.resnet_fused_report.left) == 1 + 16
    assert all(type(m) not in (FusedBottleneck, FusedResNet) for m in model.modules())
    assert any(type(m) is QuantizableBottleneck for m in model.modules())


class TaggedBasicBlock(BasicBlock):
    """A subclass that keeps torchvision's forward (adds an attribute only)."""

    tag = "mine"


def _tagged_model():
    return nn.Sequential(TaggedBasicBlock(8, 8), BasicBlock(8, 8))


def test_subclass_without_its_own_forward_is_converted_and_keeps_its_behaviour():
    model = randomize_bn(_tagged_model())
    original = copy.deepcopy(model)
    resnet_fused.swap_blocks(model)
    assert model.resnet_fused_report.converted == ["0", "1"]
    block = model[0]
    assert isinstance(block, TaggedBasicBlock) and isinstance(block, FusedBasicBlock)
    assert block.tag == "mine" and block.fused_supported()
    x = torch.randn(2, 8, 7, 9)
    assert rel_err(model(x), original(x)) <= TOL_OUT


def test_unswap_restores_a_converted_subclass():
    model = _tagged_model()
    resnet_fused.swap_blocks(model)
    resnet_fused.unswap_blocks(model)
    assert type(model[0]) is TaggedBasicBlock
    assert type(model[1]) is BasicBlock


def test_a_converted_subclass_pickles():
    """torch.save(model) pickles the model: a converted subclass must survive it."""
    model = _tagged_model()
    resnet_fused.swap_blocks(model)
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone[0], TaggedBasicBlock) and isinstance(clone[0], FusedBasicBlock)


def test_swapped_model_pickles_and_deepcopies(models):
    model = resnet_fused.swap_blocks(copy.deepcopy(models["resnet18"])).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone) is FusedResNet and clone.fused_supported()
            assert all(type(clone.get_submodule(n)) is FusedBasicBlock for n in _block_names([2, 2, 2, 2]))
            assert torch.equal(clone(x), expected)


def test_swap_on_a_single_block_and_on_a_model_without_blocks():
    block = BasicBlock(8, 8)
    resnet_fused.swap_blocks(block)
    assert type(block) is FusedBasicBlock and block.resnet_fused_report.converted == [""]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    resnet_fused.swap_blocks(plain)
    assert plain.resnet_fused_report.converted == [] and type(plain[1]) is nn.BatchNorm2d


# ------------------------------------------------------------------------------------------------
# the ResNet itself (its stem)
# ------------------------------------------------------------------------------------------------
class TaggedResNet(ResNet):
    """A ResNet subclass that keeps torchvision's forward (adds an attribute only)."""

    tag = "mine"


class OwnForwardImplResNet(ResNet):
    def _forward_impl(self, x):
        return super()._forward_impl(x) * 2


class OwnForwardResNet(ResNet):
    def forward(self, x):
        return super().forward(x) + 1


def test_resnet_subclass_without_its_own_forward_is_converted_and_back():
    model = randomize_bn(TaggedResNet(BasicBlock, [1, 1, 1, 1], num_classes=5))
    original = copy.deepcopy(model)
    resnet_fused.swap_blocks(model)
    assert model.resnet_fused_report.converted == [""] + [f"layer{i}.0" for i in range(1, 5)]
    assert isinstance(model, TaggedResNet) and isinstance(model, FusedResNet) and model.tag == "mine"
    assert model.fused_supported()
    model.eval(), original.eval()  # (training at 32x32 leaves 2 values per channel in layer4)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert rel_err(model(x), original(x)) <= TOL_NET_OUT
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone, TaggedResNet) and isinstance(clone, FusedResNet)
    resnet_fused.unswap_blocks(model)
    assert type(model) is TaggedResNet


@pytest.mark.parametrize("cls", [OwnForwardImplResNet, OwnForwardResNet])
def test_resnet_subclass_with_its_own_forward_is_left(cls):
    model = cls(BasicBlock, [1, 1, 1, 1])
    resnet_fused.swap_blocks(model)
    report = model.resnet_fused_report
    assert type(model) is cls
    assert report.left == [""] and report.stems == [""]
    assert report.converted == [f"layer{i}.0" for i in range(1, 5)]  # its blocks are still converted
    assert str(report) == "converted 4 block(s), 0 already converted, left 1 ((model))"


def test_a_resnet_inside_another_module_is_converted_under_its_name(models):
    wrapper = nn.Sequential(nn.Identity(), copy.deepcopy(models["resnet18"]))
    resnet_fused.swap_blocks(wrapper)
    report = wrapper.resnet_fused_report
    assert report.converted[0] == "1" and report.stems == ["1"]
    assert type(wrapper[1]) is FusedResNet
    resnet_fused.unswap_blocks(wrapper)
    assert type(wrapper[1]) is ResNet and wrapper.resnet_fused_report.stems == ["1"]


def test_swapped_resnet_state_dict_and_parameters_are_torchvisions(models):
    original = models["resnet50"]
    swapped = resnet_fused.swap_blocks(copy.deepcopy(original))
    assert list(swapped.state_dict()) == list(original.state_dict())
    assert sum(p.numel() for p in swapped.parameters()) == sum(p.numel() for p in original.parameters())
    original.load_state_dict(swapped.state_dict(), strict=True)

"""fold_bn: parity with the eval-mode original across model families, state, refusal in training."""
import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import ops
from resnet_fused.fold import FoldedBasicBlock, FoldedBottleneck, FoldedConv2d


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm()).item()


def _randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _frozen_backbone():
    body = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    return IntermediateLayerGetter(body, {"layer3": "c4", "layer4": "c5"})


FAMILIES = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "resnet50_swapped": lambda: resnet_fused.models.resnet50(),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True),
    "frozen_bn_backbone": _frozen_backbone,
}


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fold_parity_per_family(family):
    model = _randomize_norms(FAMILIES[family]()).eval()
    x = torch.randn(2, 3, 64, 64)
    folded = resnet_fused.fold_bn(model)
    norms_left = [m for m in folded.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms_left == []
    for ours, ref in zip(_outputs(folded, x), _outputs(model, x)):
        assert rel_err(ours, ref) <= 1e-5


def test_fold_resnet_uses_folded_blocks_and_documented_keys():
    model = _randomize_norms(torchvision.models.resnet50()).eval()
    folded = resnet_fused.fold_bn(model)
    assert isinstance(folded.layer1[0], FoldedBottleneck)
    keys = set(folded.state_dict())
    assert "layer1.0.conv1.bias" in keys and "layer1.0.downsample.0.bias" in keys and "conv1.bias" in keys
    assert not any(".bn" in k or k.startswith("bn1.") or "downsample.1" in k for k in keys)
    kept = {k for k in model.state_dict() if "bn" not in k and "downsample.1" not in k}
    assert kept <= keys


def test_fold_channels_last_and_batch_one():
    model = _randomize_norms(torchvision.models.resnet18()).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 48, 40).to(memory_format=torch.channels_last)
    folded = resnet_fused.fold_bn(model)
    (ours,), (ref,) = _outputs(folded, x), _outputs(model, x)
    assert rel_err(ours, ref) <= 1e-5


def test_fold_leaves_input_model_untouched():
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    before = copy.deepcopy(model.state_dict())
    resnet_fused.fold_bn(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_fold_refuses_training_mode():
    model = torchvision.models.resnet18()
    with pytest.raises(RuntimeError, match="eval mode"):
        resnet_fused.fold_bn(model)
    model.eval()
    model.layer2[0].bn1.train()
    with pytest.raises(RuntimeError, match="layer2.0.bn1"):
        resnet_fused.fold_bn(model)


def test_fold_keeps_bn_without_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    model.eval()
    folded = resnet_fused.fold_bn(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(folded(x), model(x)) <= 1e-6


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_conv_bias_and_affine_variants(conv_bias, affine):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=conv_bias), nn.BatchNorm2d(6, affine=affine), nn.ReLU6())
    _randomize_norms(model).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(2, 3, 9, 7)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.ReLU6) for m in folded.modules())  # other activations stay
    assert rel_err(folded(x), model(x)) <= 1e-5


def test_conv_with_two_users_is_not_folded():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomize_norms(TwoUsers()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(2, 3, 8, 8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel_err(folded(x), model(x)) <= 1e-6


def test_folded_model_pickles_deepcopies_and_saves_after_running():
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(1, 3, 32, 32)
    (ref,) = _outputs(folded, x)
    for clone in (pickle.loads(pickle.dumps(folded)), copy.deepcopy(folded)):
        assert torch.equal(_outputs(clone, x)[0], ref)
    buffer = io.BytesIO()
    torch.save(folded.state_dict(), buffer)
    buffer.seek(0)
    again = resnet_fused.fold_bn(_randomize_norms(torchvision.models.resnet18()).eval())
    again.load_state_dict(torch.load(buffer), strict=True)
    assert torch.equal(_outputs(again, x)[0], ref)


def test_folded_basic_block_matches_block():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    _randomize_norms(block).eval()
    folded = FoldedBasicBlock(block)
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        assert rel_err(folded(x), block(x)) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 4)])
def test_private_mkldnn_path_matches_public_path(channels_last, with_residual, stride, groups):
    """Pins the private oneDNN ops (fused post-ops, pre-packed weights) against the public path."""
    from resnet_fused import ops

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 11, 9).to(memory_format=fmt)
    w = torch.randn(16, 8 // groups, 3, 3).to(memory_format=fmt)
    b = torch.randn(16)
    residual = torch.randn(2, 16, (11 - 1) // stride + 1, (9 - 1) // stride + 1).to(memory_format=fmt) \
        if with_residual else None
    args = (x, w, b, (stride, stride), (1, 1), (1, 1), groups)
    with torch.no_grad():
        assert ops._mkldnn_eligible(x, w, residual)
        fast = ops.conv_bias_act(*args, residual=residual)
        fast_again = ops.conv_bias_act(*args, residual=residual)  # the cached packed weight
        with torch.backends.mkldnn.flags(enabled=False):
            public = ops.conv_bias_act(*args, residual=residual)
    assert fast.shape == public.shape
    assert rel_err(fast, public) <= 1e-6 and torch.equal(fast, fast_again)
    with torch.no_grad():
        w.mul_(2)  # an in-place update must repack
        assert rel_err(ops.conv_bias_act(*args, residual=residual),
                       ops.conv_bias_act(x, w.clone(), b, (stride, stride), (1, 1), (1, 1), groups,
                                         residual=residual)) <= 1e-6


def test_mkldnn_path_not_taken_under_autograd():
    from resnet_fused import ops

    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3)
    assert not ops._mkldnn_eligible(x, w, None)
    out = ops.conv_bias_act(x, w, None, (1, 1), (1, 1), (1, 1), 1)
    out.sum().backward()
    assert x.grad is not None


def test_folded_model_exports_with_torch_export():
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(1, 3, 48, 48)
    program = torch.export.export(folded, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), folded(x)) <= 1e-5


def test_folded_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra: pip install '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported model")
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(1, 3, 48, 48)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (x,), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out), folded(x)) <= 1e-5


def test_folded_block_compiles():
    block = _randomize_norms(torchvision.models.resnet.BasicBlock(8, 8)).eval()
    folded = resnet_fused.fold_bn(block)
    x = torch.randn(2, 8, 9, 9)
    compiled = torch.compile(folded, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), block(x)) <= 1e-5


def test_fold_stem_and_downsample_take_the_prepacked_path():
    """Every folded plain conv (the stem, the downsample branches) runs conv_bias_act like the
    blocks' convs: oneDNN on a cached pre-packed weight in CPU inference, F.conv2d under autograd."""
    model = _randomize_norms(torchvision.models.resnet50()).eval()
    folded = resnet_fused.fold_bn(model)
    stem, ds = folded.conv1, folded.layer1[0].downsample[0]
    assert type(stem) is FoldedConv2d and type(ds) is FoldedConv2d
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert ops._mkldnn_eligible(x, stem.weight, None)
        out = stem(x)
        assert id(stem.weight) in ops._PACKED_WEIGHTS
        assert stem.fused_relu  # the stem's ReLU is the conv's post-op
        assert rel_err(out, torch.relu(torch.nn.functional.conv2d(x, stem.weight, stem.bias, 2, 3))) <= 1e-5
        assert rel_err(folded(x), model(x)) <= 1e-5
    x.requires_grad_(True)
    stem(x).sum().backward()  # the public path under autograd
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------
# the block-end conv accumulating into its residual (oneDNN's in-place sum post-op), where safe
# ------------------------------------------------------------------------------------------------
class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


INPLACE, BINARY = "mkldnn._convolution_pointwise_.binary", "mkldnn._convolution_pointwise.binary"


@pytest.mark.parametrize("name,in_place,out_of_place", [("resnet50", 16, 0), ("resnet18", 7, 1)])
def test_block_ends_accumulate_into_dead_residuals(name, in_place, out_of_place):
    """On the module path (here forced by a hook on ``fc``) every block end accumulates in place
    except where its residual may be read by someone else: resnet18's first block takes the
    max-pool's output (a stage's input) as its identity. The flat plan of FoldedResNet, which no
    hook can look into, accumulates every block end in place."""
    model = _randomize_norms(getattr(torchvision.models, name)()).eval()
    folded = resnet_fused.fold_bn(model)
    assert type(folded.layer1) is resnet_fused.fold.FoldedSequential
    x = torch.randn(2, 3, 64, 64)
    x_before = x.clone()
    with torch.no_grad(), _OpCount() as count:
        flat = folded(x)
    assert count.counts.get(INPLACE, 0) == in_place + out_of_place and count.counts.get(BINARY, 0) == 0
    handle = folded.fc.register_forward_hook(lambda *a: None)
    with torch.no_grad(), _OpCount() as count:
        out = folded(x)
    handle.remove()
    assert count.counts.get(INPLACE, 0) == in_place and count.counts.get(BINARY, 0) == out_of_place
    assert torch.equal(x, x_before) and torch.equal(flat, out)
    with torch.no_grad():
        assert rel_err(out, model(x)) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_block_called_directly_never_writes_its_input(channels_last):
    """Its input stays intact; in channels_last (the layout of the convs' outputs) no in-place
    accumulation runs at all, in NCHW the residual is first copied to that layout (the copy is the
    block's own and may be accumulated into)."""
    folded = resnet_fused.fold_bn(_randomize_norms(torchvision.models.resnet50()).eval())
    t = torch.randn(2, 256, 16, 16)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    t_before = t.clone()
    with torch.no_grad(), _OpCount() as count:
        folded.layer1[1](t)
    assert torch.equal(t, t_before)
    if channels_last:
        assert count.counts.get(INPLACE, 0) == 0


def test_hooks_and_feature_extraction_see_intact_tensors():
    """A hook may keep a block's output, and IntermediateLayerGetter returns stage outputs that the
    next stage reads: neither may be overwritten by a later block end."""
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(2, 3, 64, 64)
    kept = {}
    for net, key in ((model, "ref"), (folded, "folded")):
        net.layer1[0].register_forward_hook(lambda m, i, o, key=key: kept.__setitem__(key, o))
        with torch.no_grad():
            net(x)
    assert rel_err(kept["folded"], kept["ref"]) <= 1e-5
    layers = {"layer1": "a", "layer2": "b", "layer3": "c", "layer4": "d"}
    ref = IntermediateLayerGetter(model, layers)
    got = IntermediateLayerGetter(resnet_fused.fold_bn(model), layers)
    with torch.no_grad():
        r, g = ref(x), got(x)
    for k in r:
        assert rel_err(g[k], r[k]) <= 1e-5, k


def test_block_level_onednn_path_matches_per_conv_dispatch(monkeypatch):
    """A folded block checks the oneDNN path once (ops.onednn_inference_path) and then calls the
    oneDNN ops directly; the per-conv dispatch of ops.conv_bias_act and FoldedResNet's flat plan
    give the very same result."""
    model = _randomize_norms(torchvision.models.resnet50()).eval()
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        flat = folded(x)
    assert "_flat_plans" in folded.__dict__
    calls = []
    real = ops.onednn_inference_path
    handle = folded.fc.register_forward_hook(lambda *a: None)   # the module path
    monkeypatch.setattr(ops, "onednn_inference_path", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        blocks = folded(x)
        assert len(calls) == 1 + 16 and real(x, folded.layer1[0].conv1.weight)  # the model, then each block
        monkeypatch.setattr(ops, "onednn_inference_path", lambda *a: False)
        dispatched = folded(x)
    handle.remove()
    assert torch.equal(blocks, dispatched) and torch.equal(flat, blocks)
    with torch.no_grad():
        assert rel_err(flat, model(x)) <= 1e-5


def test_flat_plan_only_in_inference_without_hooks_and_not_as_state():
    """FoldedResNet's flat plan: not under autograd, not with hooks, rebuilt after load_state_dict,
    never pickled or deep-copied (opaque oneDNN tensors), same results as the module path."""
    import pickle

    from resnet_fused.folded_resnet import FoldedResNet

    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    assert type(folded) is FoldedResNet
    x = torch.randn(2, 3, 48, 48)
    out_grad = folded(x)                       # autograd on: the module path, no plan
    assert "_flat_plans" not in folded.__dict__
    with torch.no_grad():
        out = folded(x)
        assert len(folded.__dict__["_flat_plans"]) == 1 and torch.equal(out, out_grad.detach())
        copied, unpickled = copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))
        assert "_flat_plans" not in copied.__dict__ and "_flat_plans" not in unpickled.__dict__
        assert torch.equal(copied(x), out) and torch.equal(unpickled(x), out)
        other = resnet_fused.fold_bn(_randomize_norms(torchvision.models.resnet18()).eval())
        folded.load_state_dict(other.state_dict())
        assert torch.equal(folded(x), other(x))
        folded.layer4[1] = copy.deepcopy(model_b := resnet_fused.fold_bn(
            _randomize_norms(torchvision.models.resnet18()).eval())).layer4[1]   # a new module tree
        expected = torchvision.models.resnet.ResNet._forward_impl(folded, x)   # the module path
        assert torch.equal(folded(x), expected) and not torch.equal(expected, other(x))
        seen = []
        folded.layer2[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(folded(x), expected) and seen   # the hook ran: module path
    assert rel_err(out, model(x)) <= 1e-5


def test_block_with_a_users_downsample_module():
    """A downsample branch that is not (conv, BN) stays the user's module; the block-end conv then
    takes conv_bias_act's checked path with its output as the residual."""
    ds = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
    block = torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=ds)
    _randomize_norms(block).eval()
    folded = FoldedBottleneck(block)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert rel_err(folded(x), block(x)) <= 1e-5
    assert isinstance(folded.downsample[0], nn.AvgPool2d)


def test_block_plans_follow_weight_updates_and_input_shapes():
    """The oneDNN plans of a folded block (packed weights per input shape and weight version) are
    rebuilt when the weights change in place (load_state_dict) or the input shape changes."""
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    other = resnet_fused.fold_bn(_randomize_norms(torchvision.models.resnet18()).eval())
    x, x_big = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        folded(x)
        folded(x_big)
        folded.load_state_dict(other.state_dict())
        assert torch.equal(folded(x), other(x)) and torch.equal(folded(x_big), other(x_big))


def test_stem_relu_becomes_the_folded_convs_post_op():
    """A ReLU module fed only by a folded BN and called once (the ResNet stem's) runs as the folded
    conv's post-op; a ReLU module called twice, or ReLU6, stays a separate op."""
    model = _randomize_norms(torchvision.models.resnet18()).eval()
    folded = resnet_fused.fold_bn(model)
    assert folded.conv1.fused_relu and type(folded.relu) is nn.Identity and type(folded.bn1) is nn.Identity
    assert "fused_relu=True" in repr(folded.conv1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5
        with resnet_fused.ops.use_onednn_prepacked(False):   # the public path applies it too
            assert rel_err(folded(x), model(x)) <= 1e-5

    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn_b(self.conv_b(self.relu(self.bn_a(self.conv_a(x))))))

    shared = _randomize_norms(SharedReLU()).eval()
    folded_shared = resnet_fused.fold_bn(shared)
    assert type(folded_shared.relu) is nn.ReLU and not folded_shared.conv_a.fused_relu
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(folded_shared(x), shared(x)) <= 1e-5
    mobilenet = resnet_fused.fold_bn(_randomize_norms(torchvision.models.mobilenet_v2()).eval())
    assert not any(getattr(m, "fused_relu", False) for m in mobilenet.modules())

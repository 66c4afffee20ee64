"""Folded models (``resnet_fused.fold_bn``) on the Triton backend: every block conv runs as the
Triton conv with its bias/residual/ReLU epilogue, in parity with the eval-mode original.

Small models keep the interpreter fast: torchvision's ResNet with one BasicBlock per stage
(ResNet-18's widths) and a ResNeXt-style Bottleneck ResNet (groups 4, width 4 per group), on
1x3x32x32 inputs. Every conv runs the Triton conv: the blocks' convs, their folded downsample
convs, and the stem conv (a ``FoldedConv2d`` running ``ops.conv_bias_act``); no ATen conv is left.
The tests count both kinds of calls.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from conftest import DEVICE, TOL_GRAD, TOL_OUT, rel_err

import resnet_fused

CL = torch.channels_last
TRITON_CONV = "resnet_fused_triton.conv2d_bias_act.default"

# name -> (model factory, number of block + downsample + stem convs, number of ATen convs)
MODELS = {
    "resnet-basic-1111": (lambda: ResNet(BasicBlock, [1, 1, 1, 1]), 8 + 3 + 1, 0),
    "resnext-bottleneck-1111-g4": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4),
                                   12 + 4 + 1, 0),
}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _randomized(model):
    """Non-trivial BatchNorm state, so that folding changes every conv."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, T):
    factory, n_triton_convs, n_aten_convs = MODELS[request.param]
    torch.manual_seed(0)
    model = _randomized(factory()).to(DEVICE)
    return model, resnet_fused.fold_bn(model), n_triton_convs, n_aten_convs


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_folded_model_parity_on_triton(pair, ieee_fp32, fmt):
    model, folded, n_triton_convs, n_aten_convs = pair
    x = torch.randn(1, 3, 32, 32, device=DEVICE).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref = model(x)
        with resnet_fused.use_backend("triton"), _OpCounter() as counter:
            out = folded(x)
    assert counter.counts.get(TRITON_CONV, 0) == n_triton_convs, counter.counts
    assert counter.counts.get("aten.convolution.default", 0) == n_aten_convs, counter.counts
    err = rel_err(out, ref)
    assert err <= TOL_OUT, f"rel_err {err:.3g}"


def test_folded_model_not_on_triton_elsewhere(pair):
    """The reference backend (and auto on CPU) keep the ATen/oneDNN conv path."""
    model, folded, _, _ = pair
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    backends = ["reference"] + (["auto"] if DEVICE == "cpu" else [])
    for name in backends:
        with torch.no_grad(), resnet_fused.use_backend(name), _OpCounter() as counter:
            folded(x)
        assert TRITON_CONV not in counter.counts, (name, counter.counts)


def test_folded_model_gradient_on_triton(pair, ieee_fp32):
    """The Triton conv's autograd (ReLU mask + aten.convolution_backward): input gradient of the
    folded model against the eval-mode original's."""
    model, folded, _, _ = pair
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = model(xr)
    with resnet_fused.use_backend("triton"):
        out = folded(xf)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert rel_err(out, ref) <= TOL_OUT
    err = rel_err(xf.grad, xr.grad)
    assert err <= TOL_GRAD, f"input grad rel_err {err:.3g}"


def test_folded_block_compiles_without_graph_breaks_on_triton(T):
    """The backend is resolved at trace time; the Triton conv op traces without graph breaks."""
    torch.manual_seed(0)
    block = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                                nn.BatchNorm2d(16)))
    folded = resnet_fused.fold_bn(_randomized(block)).to(DEVICE)
    x = torch.randn(2, 8, 9, 7, device=DEVICE)
    with torch.no_grad(), resnet_fused.use_backend("triton"):
        explained = torch._dynamo.explain(folded)(x)
        compiled = torch.compile(folded, backend="aot_eager", fullgraph=True)
        out_c = compiled(x)
        out_e = folded(x)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("resnet_fused_triton.conv2d_bias_act" in t for t in targets) == 3, targets
    assert rel_err(out_c, out_e) <= TOL_OUT


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_folded_resnet50_on_gpu(T, ieee_fp32, dtype):
    """A full folded ResNet-50 on the GPU, auto backend (triton first on CUDA)."""
    import torchvision
    from conftest import TOL_BF16_OUT

    torch.manual_seed(0)
    model = _randomized(torchvision.models.resnet50()).to("cuda", dtype)
    folded = resnet_fused.fold_bn(model)
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        assert resnet_fused.backend_for("cuda", dtype) == "triton"
        err = rel_err(folded(x), model(x))
    assert err <= (TOL_OUT if dtype == torch.float32 else TOL_BF16_OUT), f"rel_err {err:.3g}"

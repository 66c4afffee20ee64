"""``fold_bn``: an inference model with every foldable BatchNorm folded into the conv before it.

``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, computed in
float64 and cast back to the conv's dtype. Three passes over a deep copy (the input model is never
touched):

1. ResNet blocks (torchvision's, fused or not; subclasses with their own ``forward`` excepted) become
   :class:`FoldedBasicBlock` / :class:`FoldedBottleneck`, which run conv + bias (+ residual) + ReLU
   through :func:`resnet_fused.ops.conv_bias_act`.
2. Everything else is traced with ``torch.fx`` (blocks are leaf modules: their input checks are not
   traceable, and they are already folded by structure; a :class:`resnet_fused.FusedResNet` traces
   as torchvision's ResNet, so its stem folds too) to find each ``Conv2d -> BatchNorm2d`` /
   ``FrozenBatchNorm2d`` edge where the conv output has no other user; the fold then happens in the
   model's own module tree (folded conv in place of the conv, ``nn.Identity`` in place of the BN), so
   the folded model keeps its class and structure.
3. When the model cannot be traced, a structural pass folds adjacent ``Conv2d, BN`` pairs inside
   ``nn.Sequential`` containers (vgg*_bn, mobilenet_v2, the downsample branches) instead.

State dict of the folded model: every folded BN's keys are gone and its conv gains a ``bias`` key;
all other keys are unchanged (blocks keep ``conv1``/``conv2``/``conv3``/``downsample.0`` names).
BN without running statistics is left in place. A ``nn.ReLU`` module fed only by a folded BN (and
called nowhere else: a ResNet's stem ReLU) becomes the folded conv's post-op (``fused_relu``) and an
``nn.Identity`` in the tree; other activations (ReLU6, functional calls) stay separate ops.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from . import ops
from .blocks import has_global_module_hooks

__all__ = ["fold_bn", "fold_conv_bn", "FoldedConv2d", "FoldedBasicBlock", "FoldedBottleneck",
           "FoldedSequential"]


def _is_foldable_norm(bn: nn.Module) -> bool:
    if type(bn) is FrozenBatchNorm2d:
        return True
    return isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None


class FoldedConv2d(nn.Conv2d):
    """A Conv2d with BatchNorm folded in (same parameters and state_dict keys as ``nn.Conv2d``),
    whose forward runs :func:`resnet_fused.ops.conv_bias_act` without an activation: on CPU in
    inference a oneDNN convolution on a cached pre-packed weight (the stem and the downsample
    convs of a ResNet take the same path as the blocks' convs; measured on ResNet-50 at batch 1:
    ATen's convolution reorders the weight on every call and returns the input's layout, so an
    NCHW input kept the stem's max-pool and the first blocks in NCHW); elsewhere ``F.conv2d``.

    ``fused_relu``: the ReLU module that followed the BatchNorm (the only user of its output, called
    nowhere else) runs as the convolution's post-op; fold_bn then replaces that module with
    ``nn.Identity`` (a ResNet's stem ReLU: one pass over the stem's output fewer)."""

    fused_relu = False

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv_bias_act(input, self.weight, self.bias, self.stride, self.padding,
                                 self.dilation, self.groups, relu=self.fused_relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` (BN with running statistics), folded in float64: a
    :class:`FoldedConv2d` for a plain zero-padded ``nn.Conv2d``, else the conv's own class."""
    if conv.out_channels != bn.running_mean.shape[0]:
        raise ValueError(f"cannot fold {bn} into {conv}: channel counts differ")
    dtype = conv.weight.dtype
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((w * k.reshape(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    folded.bias = nn.Parameter(((b - mean) * k + beta).to(dtype), requires_grad=False)
    if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
        folded.__class__ = FoldedConv2d
    return folded


class _FoldedBlock(nn.Module):
    """Shared forward pieces of the folded blocks.

    The block-end conv may accumulate into its residual in place (``ops.conv_bias_act``'s
    ``residual_is_scratch``) when nobody else can read that tensor: the downsample branch's fresh
    conv output always; the block input only when :class:`FoldedSequential` passes it from the
    previous folded block (``input_is_scratch``). A block called directly never writes its input.
    """

    # bias and ReLU of the convs (benchmarking's limit twin turns both off)
    _use_bias = True
    _use_relu = True
    _MAX_PLANS = 4

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, input_is_scratch=False)

    def _forward(self, x: Tensor, input_is_scratch: bool) -> Tensor:
        ds = None if self.downsample is None else _lone_conv(self.downsample)
        if (self.downsample is None or ds is not None) and ops.onednn_inference_path(x, self.conv1.weight):
            return self._onednn_forward(x, input_is_scratch, ds)
        out = x
        for conv in self._inner_convs():
            out = self._conv(conv, out)
        residual, scratch = self._residual(x, input_is_scratch)
        return self._conv(self._last_conv(), out, residual, residual_is_scratch=scratch)

    def _residual(self, x: Tensor, input_is_scratch: bool) -> Tuple[Tensor, bool]:
        """The identity branch and whether it is scratch (a buffer nobody else reads)."""
        if self.downsample is None:
            return x, input_is_scratch
        conv = _lone_conv(self.downsample)
        if conv is not None:  # the folded (conv, BN) branch: conv + bias through ops (Triton there)
            return self._conv(conv, x, relu=False), True
        return self.downsample(x), False   # a module of the user's: its output may be aliased

    def _conv(self, conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
              residual_is_scratch: bool = False) -> Tensor:
        return ops.conv_bias_act(x, conv.weight, conv.bias if self._use_bias else None, conv.stride,
                                 conv.padding, conv.dilation, conv.groups, residual=residual,
                                 relu=relu and self._use_relu, residual_is_scratch=residual_is_scratch)

    # --- the oneDNN path: one check per block, then the oneDNN calls themselves ------------------
    # ops.conv_bias_act's per-call dispatch (backend, eligibility, the packed-weight cache) was 5% of
    # a folded ResNet-50 forward at batch 1 (53 convs of about 0.6 ms). Here the block checks once
    # (ops.onednn_inference_path) and keeps, per input shape and weight version, its convs' packed
    # weights and arguments: a plan. Plans hold opaque oneDNN tensors, which cannot be pickled or
    # deep-copied: they are not module state (__getstate__ drops them) and are rebuilt on first use.
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_onednn_plans", None)
        return state

    def _onednn_forward(self, x: Tensor, input_is_scratch: bool, ds: Optional[nn.Conv2d]) -> Tensor:
        inner, last = self._inner_convs(), self._last_conv()
        convs = inner + (last,) + ((ds,) if ds is not None else ())
        key = (x.shape, *[(c.weight._version, c.weight.data_ptr()) for c in convs])
        plans = self.__dict__.setdefault("_onednn_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= self._MAX_PLANS:
                plans.clear()
            plan = plans[key] = _onednn_plan(x.shape, inner, last, ds)
        return run_onednn_block(x, inner, last, ds, plan, input_is_scratch, self._use_bias, self._use_relu)


def run_onednn_block(x: Tensor, inner, last: nn.Conv2d, ds: Optional[nn.Conv2d], plan: list,
                     input_is_scratch: bool, use_bias: bool = True, use_relu: bool = True) -> Tensor:
    """One folded block on the oneDNN ops, from its plan (:func:`_onednn_plan`): the inner convs
    (+ReLU), the downsample conv, then the last conv with the residual add and ReLU as post-ops,
    accumulating into the residual in place when it is scratch (the downsample's fresh output,
    a copy made here, or ``x`` when ``input_is_scratch``)."""
    act = "relu" if use_relu else None
    out = x
    for conv, (packed, pad, strd, dil) in zip(inner, plan):
        out = ops.ONEDNN_POINTWISE(out, packed, conv.bias if use_bias else None, pad, strd, dil, conv.groups,
                                   act or "none", [], None)
    if ds is not None:
        packed, pad, strd, dil = plan[-1]
        residual = ops.ONEDNN_POINTWISE(x, packed, ds.bias if use_bias else None, pad, strd, dil, ds.groups,
                                        "none", [], None)
        scratch = True
    else:
        residual, scratch = x, input_is_scratch
    # the residual in the layout of the block-end conv's output, i.e. of its input
    fmt = torch.channels_last if out.is_contiguous(memory_format=torch.channels_last) \
        and not out.is_contiguous() else torch.contiguous_format
    if not residual.is_contiguous(memory_format=fmt):
        residual, scratch = residual.contiguous(memory_format=fmt), True
    packed, pad, strd, dil = plan[len(inner)]
    bias = last.bias if use_bias else None
    if scratch:  # accumulate into the dead residual (ops.conv_bias_act's residual_is_scratch)
        return ops.ONEDNN_POINTWISE_INPLACE(residual, out, packed, bias, pad, strd, dil, last.groups,
                                            "add", None, act, [], None)
    return ops.ONEDNN_POINTWISE_BINARY(out, residual, packed, bias, pad, strd, dil, last.groups,
                                       "add", None, act, [], None)


def _conv_out_shape(conv: nn.Conv2d, shape) -> Tuple[int, ...]:
    hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
          zip(shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
    return (shape[0], conv.out_channels, *hw)


def _onednn_plan(x_shape, inner, last: nn.Conv2d, ds: Optional[nn.Conv2d]) -> list:
    """A folded block's oneDNN arguments per conv (inner convs, the last conv, then the downsample
    conv): (packed weight, padding, stride, dilation) for the input shape each conv sees."""
    return _onednn_plan_and_shape(x_shape, inner, last, ds)[0]


def _onednn_plan_and_shape(x_shape, inner, last: nn.Conv2d, ds: Optional[nn.Conv2d]) -> Tuple[list, tuple]:
    """:func:`_onednn_plan` and the block's output shape."""
    plan, shape = [], tuple(x_shape)
    for conv in inner + (last,):
        plan.append(ops.prepared_conv(conv.weight, shape, conv.stride, conv.padding, conv.dilation, conv.groups))
        shape = _conv_out_shape(conv, shape)
    if ds is not None:
        plan.append(ops.prepared_conv(ds.weight, tuple(x_shape), ds.stride, ds.padding, ds.dilation, ds.groups))
    return plan, shape


class FoldedBasicBlock(_FoldedBlock):
    """Inference BasicBlock: ``relu(conv2'(relu(conv1'(x))) + identity)`` with BN folded."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        self.downsample = _fold_downsample(block.downsample)
        self.stride = block.stride

    def _inner_convs(self) -> Tuple[nn.Conv2d, ...]:
        return (self.conv1,)

    def _last_conv(self) -> nn.Conv2d:
        return self.conv2


class FoldedBottleneck(_FoldedBlock):
    """Inference Bottleneck with BN folded into its three convs."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        self.conv3 = fold_conv_bn(block.conv3, block.bn3)
        self.downsample = _fold_downsample(block.downsample)
        self.stride = block.stride

    def _inner_convs(self) -> Tuple[nn.Conv2d, ...]:
        return (self.conv1, self.conv2)

    def _last_conv(self) -> nn.Conv2d:
        return self.conv3


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


class FoldedSequential(nn.Sequential):
    """A ``Sequential`` of a folded model (a ResNet stage): same modules and state_dict keys. Where
    a folded block feeds the next one, the tensor between them is read by nobody else, so the next
    block may accumulate its block-end conv into it (see :class:`_FoldedBlock`). Not with hooks on
    either block (a hook may keep the tensor) or global module hooks, whose calls are kept."""

    def forward(self, x: Tensor) -> Tensor:
        # fx tracing (fold_bn's own, the user's) must see each block as one call_module
        global_hooks = has_global_module_hooks() or isinstance(x, torch.fx.Proxy)
        previous = None
        for block in self:
            if (isinstance(block, _FoldedBlock) and isinstance(previous, _FoldedBlock)
                    and not global_hooks and not _hooked(block) and not _hooked(previous)):
                x = block._forward(x, input_is_scratch=True)
            else:
                x = block(x)
            previous = block
        return x


def _scratch_stages(model: nn.Module) -> None:
    """Sequentials holding consecutive folded blocks become :class:`FoldedSequential`."""
    for m in model.modules():
        if type(m) is nn.Sequential and any(isinstance(a, _FoldedBlock) and isinstance(b, _FoldedBlock)
                                            for a, b in zip(m, list(m)[1:])):
            m.__class__ = FoldedSequential


def _lone_conv(ds: nn.Module) -> Optional[nn.Conv2d]:
    """The conv of a folded downsample ``Sequential(Conv2d, Identity...)`` with numeric zero padding."""
    if not isinstance(ds, nn.Sequential) or len(ds) == 0:
        return None
    conv, rest = ds[0], list(ds)[1:]
    if type(conv) not in (nn.Conv2d, FoldedConv2d) or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        return None
    return conv if all(type(m) is nn.Identity for m in rest) else None


def _fold_downsample(ds: Optional[nn.Module]) -> Optional[nn.Module]:
    if ds is None:
        return None
    ds = copy.deepcopy(ds)
    _fold_sequentials(ds)
    return ds


def _foldable_block(module: nn.Module) -> Optional[type]:
    """The folded class for a torchvision block (fused or not) whose convs and norms fold exactly."""
    for base, folded in ((BasicBlock, FoldedBasicBlock), (Bottleneck, FoldedBottleneck)):
        if not isinstance(module, base):
            continue
        from .blocks import FusedBasicBlock, FusedBottleneck

        own_forward = type(module).forward
        if own_forward not in (base.forward, FusedBasicBlock.forward, FusedBottleneck.forward):
            return None  # a subclass with its own forward (e.g. quantizable): fold it generically
        norms = [module.bn1, module.bn2] + ([module.bn3] if base is Bottleneck else [])
        convs = [module.conv1, module.conv2] + ([module.conv3] if base is Bottleneck else [])
        if all(_is_foldable_norm(n) for n in norms) and all(type(c) is nn.Conv2d for c in convs) \
                and type(module.relu) is nn.ReLU:
            return folded
    return None


def _fold_blocks(model: nn.Module) -> nn.Module:
    if _foldable_block(model) is not None:
        return _foldable_block(model)(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _fold_blocks(child))
    return model


def _fold_sequentials(model: nn.Module) -> None:
    """Fold adjacent (Conv2d, BN) pairs inside nn.Sequential containers, in place."""
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules.keys())
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) is nn.Conv2d and _is_foldable_norm(bn):
                module._modules[first] = fold_conv_bn(conv, bn)
                module._modules[second] = nn.Identity()


class _LeafBlockTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (FoldedBasicBlock, FoldedBottleneck, BasicBlock, Bottleneck, FrozenBatchNorm2d,
                          FoldedConv2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _traced_conv_bn_pairs(model: nn.Module) -> Optional[List[Tuple[str, str, Optional[str]]]]:
    """(conv, bn, relu) module names where the BN's only input is the conv's output and that output
    has no other user, each module called once; ``relu``: an ``nn.ReLU`` module that is the only user
    of the BN's output and is called nowhere else (else None). None when the model cannot be traced."""
    try:
        graph = _LeafBlockTracer().trace(model)
    except Exception:
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_norm(modules.get(node.target)):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and type(modules.get(src.target)) is nn.Conv2d and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            users = list(node.users)
            relu = users[0] if len(users) == 1 else None
            if not (relu is not None and relu.op == "call_module" and type(modules.get(relu.target)) is nn.ReLU
                    and calls[relu.target] == 1 and relu.args == (node,) and not relu.kwargs):
                relu = None
            pairs.append((src.target, node.target, relu.target if relu is not None else None))
    return pairs


def _replace_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)


def fold_bn(model: nn.Module) -> nn.Module:
    """A new inference model with BatchNorm folded into the preceding convs; ``model`` is untouched.

    Raises RuntimeError for a model in training mode (batch statistics cannot be folded).
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"fold_bn needs a model in eval mode (BatchNorm in training mode normalizes with batch "
            f"statistics, which cannot be folded); call model.eval() first. In training mode: "
            f"{', '.join(training[:3])}{' ...' if len(training) > 3 else ''}")
    folded = _fold_blocks(copy.deepcopy(model))
    _scratch_stages(folded)
    pairs = _traced_conv_bn_pairs(folded)
    if pairs is None:
        _fold_sequentials(folded)
        return _flat_resnet(folded)
    # Fold in the module tree itself (not in an fx GraphModule), so the model keeps its class and
    # structure: the conv is replaced by its folded copy, the BN by an Identity (and a ReLU that
    # only the BN feeds, by an Identity too, when the folded conv runs it as its post-op).
    for conv_name, bn_name, relu_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        new_conv = fold_conv_bn(conv, bn)
        _replace_submodule(folded, conv_name, new_conv)
        _replace_submodule(folded, bn_name, nn.Identity())
        if relu_name is not None and type(new_conv) is FoldedConv2d:
            new_conv.fused_relu = True
            _replace_submodule(folded, relu_name, nn.Identity())
    return _flat_resnet(folded)


def _flat_resnet(folded: nn.Module) -> nn.Module:
    """A folded torchvision ResNet (or FusedResNet) becomes a FoldedResNet: same modules and state,
    plus the flat-plan forward in CPU inference (resnet_fused/folded_resnet.py)."""
    from .folded_resnet import FoldedResNet
    from .resnet import FusedResNet

    if type(folded) in (ResNet, FusedResNet):
        folded.__class__ = FoldedResNet
    return folded

"""``FoldedResNet``: the class :func:`resnet_fused.fold_bn` gives a folded torchvision ResNet.

Same modules, state_dict and forward as the ``ResNet`` it came from; only ``_forward_impl`` adds a
fast path. In CPU float32 inference without autograd (``torch.no_grad()`` or inference mode), with
no hooks anywhere in the model and torchvision's structure (folded stem conv with its ReLU as
post-op, max-pool, stages of folded blocks, average pool, ``fc``), the forward runs a *flat plan*:
one Python loop over the 53 (ResNet-50) oneDNN convolution calls with their packed weights and
arguments prepared, instead of module calls, per-block checks and per-conv dispatch. Measured at
ResNet-50 batch 1 on two threads, that Python between the convolutions was about 1.5 ms of a 35 ms
forward, where ``torch.compile``'s generated code calls the same oneDNN ops back to back.

The max-pool is the C++ channels-last kernel without indices (:func:`resnet_fused.ops.max_pool2d_inference`:
ATen's CPU max-pool computes its indices even without autograd, 2.5-3x slower at the stem's output).

Because no hook can observe a tensor inside the plan, every block-end convolution accumulates into
its residual in place (oneDNN's sum post-op), including the first block of each stage, whose input
the module path must leave intact (a feature extractor may return it).

Anything else (autograd, another dtype or device, the triton backend, hooks, a changed module tree)
runs torchvision's ``_forward_impl`` over the folded modules, as before. Plans hold opaque oneDNN
tensors: they are not module state (dropped when pickled or copied) and are rebuilt per input shape
and weight version.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import ResNet

from . import ops
from .blocks import has_global_module_hooks

__all__ = ["FoldedResNet"]

_MAX_PLANS = 4


class FoldedResNet(ResNet):
    """A folded torchvision ResNet (see the module docstring): the flat plan in CPU inference."""

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_flat_plans", None)
        state.pop("_flat_cache", None)
        return state

    def _forward_impl(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and not torch.is_grad_enabled():
            program = self._flat_program(x)
            if program is not None:
                return self._run_flat(x, *program)
        return super()._forward_impl(x)

    # --- when -------------------------------------------------------------------------------
    # Checked on every call, cheaply (tens of microseconds for ResNet-50): the structure is cached
    # with the ids of the module tree it was read from, and with the hook dicts of every module.
    def _flat_program(self, x: Tensor):
        from .fold import FoldedConv2d

        if torch.compiler.is_compiling() or x.dim() != 4:
            return None
        if has_global_module_hooks():
            return None
        conv1 = self._modules["conv1"]
        if type(conv1) is not FoldedConv2d or not conv1.fused_relu:
            return None
        if not ops.onednn_inference_path(x, conv1.weight):
            return None
        tree = self._tree_ids()
        cached = self.__dict__.get("_flat_cache")
        if cached is None or cached[0] != tree:
            structure = self._flat_structure()
            modules = tuple(self.modules()) if structure is not None else ()
            hook_dicts = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks,
                                                           m._backward_hooks, m._backward_pre_hooks))
            cached = self.__dict__["_flat_cache"] = (tree, structure, hook_dicts)
        _, structure, hook_dicts = cached
        if structure is None or any(hook_dicts):
            return None
        return structure, self._plan_for(x, structure)

    def _tree_ids(self) -> Tuple[int, ...]:
        """Ids of the modules the flat structure is read from (top level, stages, blocks, their
        children, downsample branches): a change anywhere there rebuilds the structure."""
        ids = [id(m) for m in self._modules.values()]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in self._modules[name]._modules.values():
                ids.append(id(block))
                children = block._modules
                ids.extend(map(id, children.values()))
                ds = children.get("downsample")
                if ds is not None:
                    ids.extend(map(id, ds._modules.values()))
        return tuple(ids)

    def _flat_structure(self) -> Optional[Tuple]:
        """(stem, maxpool, [(inner convs, last conv, downsample conv or None)], avgpool, fc) when
        the module tree is torchvision's folded structure, else None."""
        from .fold import FoldedBasicBlock, FoldedBottleneck, FoldedConv2d, _lone_conv

        if not (type(self.bn1) is nn.Identity and type(self.relu) is nn.Identity
                and type(self.maxpool) is nn.MaxPool2d and type(self.avgpool) is nn.AdaptiveAvgPool2d
                and type(self.fc) is nn.Linear):
            return None
        blocks = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if not isinstance(layer, nn.Sequential):
                return None
            for block in layer:
                if type(block) not in (FoldedBasicBlock, FoldedBottleneck):
                    return None
                ds = None
                if block.downsample is not None:
                    ds = _lone_conv(block.downsample)
                    if ds is None:
                        return None
                inner, last = block._inner_convs(), block._last_conv()
                if not all(type(c) is FoldedConv2d for c in inner + (last,) + ((ds,) if ds else ())):
                    return None
                blocks.append((inner, last, ds))
        return self.conv1, self.maxpool, blocks, self.avgpool, self.fc

    # --- the plan ---------------------------------------------------------------------------
    def _plan_for(self, x: Tensor, structure) -> Tuple[tuple, list]:
        stem, maxpool, blocks, _, _ = structure
        convs = [stem] + [c for inner, last, ds in blocks for c in inner + (last,) + ((ds,) if ds else ())]
        weights = [c._parameters["weight"] for c in convs]
        key = (x.shape, *[(id(w), w._version, w.data_ptr()) for w in weights])
        plans = self.__dict__.setdefault("_flat_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plan = plans[key] = self._build_plan(tuple(x.shape), structure)
        return plan

    @staticmethod
    def _build_plan(shape, structure) -> Tuple[tuple, list]:
        from .fold import _conv_out_shape, _onednn_plan_and_shape

        stem, maxpool, blocks, _, _ = structure
        stem_args = ops.prepared_conv(stem.weight, shape, stem.stride, stem.padding, stem.dilation, stem.groups)
        shape = _conv_out_shape(stem, shape)
        with torch.no_grad():  # the max-pool's output size, from a meta tensor
            shape = tuple(maxpool(torch.empty(shape, device="meta")).shape)
        block_plans = []
        for inner, last, ds in blocks:
            plan, shape = _onednn_plan_and_shape(shape, inner, last, ds)
            block_plans.append(plan)
        return stem_args, block_plans

    def _run_flat(self, x: Tensor, structure, plan) -> Tensor:
        from .fold import run_onednn_block

        stem, maxpool, blocks, avgpool, fc = structure
        (packed, pad, strd, dil), block_plans = plan
        out = ops.ONEDNN_POINTWISE(x, packed, stem.bias, pad, strd, dil, stem.groups, "relu", [], None)
        out = ops.max_pool2d_inference(out, maxpool)  # channels-last, no indices
        for (inner, last, ds), block_plan in zip(blocks, block_plans):
            # every block input is scratch: read by nobody else, no hook can see it inside the plan
            out = run_onednn_block(out, inner, last, ds, block_plan, True)
        out = avgpool(out)
        out = torch.flatten(out, 1)
        return F.linear(out, fc.weight, fc.bias)

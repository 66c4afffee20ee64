"""torchvision's ResNet builders with fused blocks.

Each builder has torchvision's signature (``weights``, ``progress``, ``**kwargs``) and delegates to it,
then swaps the blocks: parameter counts and state_dict keys are torchvision's, so checkpoints load with
``strict=True`` both ways.
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn
from torchvision import models as tv_models

from .convert import swap_blocks

__all__ = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


def _fused_builder(name: str) -> Callable[..., nn.Module]:
    tv_builder = getattr(tv_models, name)

    @functools.wraps(tv_builder)
    def builder(*args, **kwargs) -> nn.Module:
        return swap_blocks(tv_builder(*args, **kwargs))

    builder.__doc__ = (f"``torchvision.models.{name}`` with fused blocks (same arguments, same "
                       f"state_dict).\n\n" + (tv_builder.__doc__ or ""))
    return builder


resnet18 = _fused_builder("resnet18")
resnet34 = _fused_builder("resnet34")
resnet50 = _fused_builder("resnet50")
resnet101 = _fused_builder("resnet101")
resnet152 = _fused_builder("resnet152")
resnext50_32x4d = _fused_builder("resnext50_32x4d")
resnext101_32x8d = _fused_builder("resnext101_32x8d")
resnext101_64x4d = _fused_builder("resnext101_64x4d")
wide_resnet50_2 = _fused_builder("wide_resnet50_2")
wide_resnet101_2 = _fused_builder("wide_resnet101_2")

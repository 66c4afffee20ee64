"""Model surgery: put fused blocks (and the fused ResNet stem) into existing models, and take them
out again.

Conversion changes only each module's class: torchvision's ``BasicBlock`` / ``Bottleneck`` become
``FusedBasicBlock`` / ``FusedBottleneck``, and a torchvision ``ResNet`` becomes
:class:`resnet_fused.FusedResNet` (its stem BN+ReLU fused). The very same parameter and buffer
tensors, training mode, device, dtype and memory format are kept, so optimizers and checkpoints
keep working.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .blocks import FusedBasicBlock, FusedBottleneck
from .resnet import FusedResNet

logger = logging.getLogger(__name__)

_FUSED_FOR = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck, ResNet: FusedResNet}
_PLAIN_FOR = {FusedBasicBlock: BasicBlock, FusedBottleneck: Bottleneck, FusedResNet: ResNet}
_FUSED = tuple(_PLAIN_FOR)
_PLAIN = tuple(_FUSED_FOR)
# what a subclass must not override to be converted (a ResNet's forward calls _forward_impl)
_OWN_FORWARD = {BasicBlock: ("forward",), Bottleneck: ("forward",), ResNet: ("forward", "_forward_impl")}


def _display(name: str) -> str:
    return name or "(model)"   # the root module's qualified name is ""


@dataclass
class SwapReport:
    """What :func:`swap_blocks` / :func:`unswap_blocks` did, by qualified module name ("" for the
    model itself, e.g. a ResNet whose stem was converted; shown as "(model)")."""

    converted: List[str] = field(default_factory=list)
    already: List[str] = field(default_factory=list)
    left: List[str] = field(default_factory=list)  # subclasses with their own forward
    stems: List[str] = field(default_factory=list)  # which of the names above are ResNets, not blocks

    def __str__(self) -> str:
        def count(names: List[str]) -> str:
            stems = sum(1 for n in names if n in self.stems)
            blocks = f"{len(names) - stems} block(s)"
            return blocks + (f" + {stems} ResNet stem(s)" if stems else "")

        return (f"converted {count(self.converted)}, {len(self.already)} already converted, "
                f"left {len(self.left)}"
                + (f" ({', '.join(_display(n) for n in self.left)})" if self.left else ""))


# One generated fused class per converted subclass (so isinstance and pickling stay stable).
_GENERATED: dict = {}


def _new_generated(plain_cls: type) -> nn.Module:
    """Unpickling helper: an empty instance of the generated fused class of ``plain_cls``."""
    return nn.Module.__new__(_generated_fused_class(plain_cls))


def _reduce_generated(self, protocol):
    # The generated class cannot be found by name at unpickling time; rebuild it from the
    # user's own (importable) subclass instead. nn.Module.__setstate__ restores the state.
    return (_new_generated, (type(self)._resnet_fused_plain,), self.__dict__.copy())


def _generated_fused_class(plain_cls: type) -> type:
    """``Fused<Sub>``: the fused forward on top of a subclass of a torchvision block or ResNet."""
    cls = _GENERATED.get(plain_cls)
    if cls is None:
        fused_base = next(fused for base, fused in _FUSED_FOR.items() if issubclass(plain_cls, base))
        cls = type(f"Fused{plain_cls.__name__}", (fused_base, plain_cls),
                   {"_resnet_fused_plain": plain_cls, "__reduce_ex__": _reduce_generated,
                    "__module__": __name__})
        _GENERATED[plain_cls] = cls
    return cls


def _target_class(module: nn.Module, table) -> type:
    """The class to convert ``module`` to, or None. A subclass of a torchvision block (or ResNet)
    is converted only when it does not override ``forward`` (nor a ResNet's ``_forward_impl``):
    e.g. QuantizableBasicBlock and QuantizableResNet do, and are left."""
    for base, target in table.items():
        if isinstance(module, base) and not isinstance(module, target):
            if all(getattr(type(module), m) is getattr(base, m) for m in _OWN_FORWARD[base]):
                if type(module) is base:
                    return target
                # a subclass without its own forward: keep its extra behaviour, add the fused forward
                return _generated_fused_class(type(module))
            return None
    return None


def swap_blocks(model: nn.Module) -> nn.Module:
    """Turn torchvision BasicBlock/Bottleneck instances in ``model`` into fused blocks, and a
    torchvision ResNet (``model`` itself or any submodule) into :class:`FusedResNet` (fused stem
    BN+ReLU), in place.

    Idempotent. Returns ``model``; the :class:`SwapReport` is attached as
    ``model.resnet_fused_report`` (when the model accepts attributes) and logged at INFO level.
    """
    report = SwapReport()
    for name, module in model.named_modules():
        if isinstance(module, ResNet):
            report.stems.append(name)
        if isinstance(module, _FUSED):
            report.already.append(name)
            continue
        if isinstance(module, _PLAIN):
            target = _target_class(module, _FUSED_FOR)
            if target is None:
                report.left.append(name)
            else:
                module.__class__ = target
                report.converted.append(name)
    _attach(model, report, "swap_blocks")
    return model


def unswap_blocks(model: nn.Module) -> nn.Module:
    """The reverse of :func:`swap_blocks` (for export or debugging), in place; returns ``model``."""
    report = SwapReport()
    for name, module in model.named_modules():
        # a generated Fused<Subclass> goes back to the user's subclass, a fused block to torchvision's
        plain = getattr(type(module), "_resnet_fused_plain", None) or _PLAIN_FOR.get(type(module))
        if plain is not None:
            module.__class__ = plain
            report.converted.append(name)
            if isinstance(module, ResNet):
                report.stems.append(name)
    _attach(model, report, "unswap_blocks")
    return model


def _attach(model: nn.Module, report: SwapReport, what: str) -> None:
    logger.info("%s: %s", what, report)
    try:
        object.__setattr__(model, "resnet_fused_report", report)
    except (AttributeError, TypeError):
        pass

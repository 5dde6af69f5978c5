"""Module edits: put a new BN after a layer, put a stand-in where a BN was, swap a module everywhere it is registered.

Every module that exists before an edit keeps its name, unless its parent runs it from its own
``forward``: then it is wrapped, and the plan says so.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import SurgeryError
from ..layers import layer_kind
from .dataflow import _Flow
from .kinds import _BN_FOR, _channel_rank, _channels, _Feeder
from .noisy import NOISY_BN, _Seeds


def _replace(root: nn.Module, new_for: dict[nn.Module, nn.Module]) -> nn.Module:
    """Put each new module wherever its old one is registered (every alias), in one pass over the
    model (one pass per module would make strip quadratic in a model with hundreds of BNs); returns
    the root, which may be new."""
    if root in new_for:
        return new_for[root]
    for parent in list(root.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and child in new_for:
                setattr(parent, key, new_for[child])
    return root


def _norm_tail(bn: nn.Module, flow: _Flow, name: str) -> list[tuple[str, nn.Module]]:
    """A BN subclass's own children (activation, dropout), in the order the forward called them."""
    return sorted(bn.named_children(), key=lambda kv: flow.index.get(f"{name}.{kv[0]}", math.inf))


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _slots(model: nn.Module) -> dict[nn.Module, list[tuple[str, nn.Module, str]]]:
    """Where each module is registered: ``(parent name, parent, key)``, every alias, in ``named_modules`` order."""
    slots: dict[nn.Module, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for parent_name, parent in model.named_modules():
        for key, child in parent._modules.items():
            if child is not None:
                slots[child].append((parent_name, parent, key))
    return slots


def _runs_children_in_order(parent: nn.Module) -> bool:
    """An ``nn.Sequential`` (subclasses too) whose forward is Sequential's: a child added between two runs there."""
    return isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward


class WithBatchNorm(nn.Sequential):
    """``Sequential(conv|linear, bn)`` put where the layer was. Code that reads the layer's attributes
    through its old name (timm's ``self.token_projection.weight.dtype``) still finds them."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or not self.__dict__.get("_modules"):
                raise
            return getattr(next(iter(self._modules.values())), name)


def _place_after(layer: nn.Module, bn: nn.Module, slots: list[tuple[str, nn.Module, str]]) -> tuple[str, str, str]:
    """Run ``bn`` right after ``layer`` wherever it is registered; returns the BN's and layer's names, and a note.

    In an ``nn.Sequential`` parent the BN becomes the sibling ``KEY_bn`` right after ``KEY`` (the parent
    is edited in place: same object, class and other keys). Elsewhere ``layer`` is wrapped, at its slot,
    in ``WithBatchNorm(conv|linear=layer, bn=bn)``. A layer registered twice shares its BN.
    """
    part = layer_kind(layer)
    wrapper: nn.Module | None = None
    names: list[tuple[str, str]] = []
    wrapped_in: list[str] = []
    for parent_name, parent, key in slots:
        name = _join(parent_name, key)
        if _runs_children_in_order(parent):
            bn_key = f"{key}_bn"
            n = 2
            while bn_key in parent._modules:
                bn_key, n = f"{key}_bn{n}", n + 1
            items = list(parent._modules.items())
            at = next(i for i, (k, _) in enumerate(items) if k == key)
            items.insert(at + 1, (bn_key, bn))
            parent._modules.clear()
            parent._modules.update(items)
            names.append((_join(parent_name, bn_key), name))
        else:
            if wrapper is None:
                wrapper = WithBatchNorm(OrderedDict([(part, layer), ("bn", bn)])).train(layer.training)
            setattr(parent, key, wrapper)
            names.append((f"{name}.bn", f"{name}.{part}"))
            why = "has its own forward" if isinstance(parent, nn.Sequential) else "is not an nn.Sequential"
            wrapped_in.append(f"{name} renamed {name}.{part} ({type(parent).__name__} {why})")
    bn_name, layer_name = names[0]
    return bn_name, layer_name, "; ".join(wrapped_in)


def _new_bn(layer: _Feeder, name: str, flow: _Flow, seeds: _Seeds | None) -> nn.Module:
    bn_type = next(bn for kind, bn in _BN_FOR.items() if isinstance(layer, kind))
    rank = flow.rank.get(name)
    if rank != _channel_rank(layer):
        raise SurgeryError(
            f"cannot insert {bn_type.__name__} after {name}: its output has rank {rank}, not {_channel_rank(layer)} with channels in dim 1"
        )
    device, dtype = layer.weight.device, layer.weight.dtype
    if seeds is None:
        return bn_type(_channels(layer), device=device, dtype=dtype)
    return NOISY_BN[bn_type](_channels(layer), seed=seeds.next(), noise=seeds.config, device=device, dtype=dtype)


@runtime_checkable
class _InPlace(Protocol):
    """An activation that can write its output into its input (``nn.ReLU(inplace=True)``, timm's acts)."""

    inplace: bool


class FreshCopy(nn.Module):
    """Stands in for a stripped BN whose output is changed in place later (an in-place ReLU). The BN
    returned a new tensor, so that op never touched the BN's input, which may be a tensor autograd
    keeps (a tanh or ReLU output) or one used elsewhere; the copy keeps it that way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _stand_in(flow: _Flow, name: str, bn: nn.Module, feeder: str | None) -> tuple[nn.Module, str]:
    """What replaces a stripped BN, and the plan's " -> ..." note: nothing (``nn.Identity``), or the
    children its forward ran (activation, dropout), which keep their names.

    Unless the BN's input is a conv/linear output read by nothing else (those keep no output for
    backward), nothing may change that input in place: an in-place activation among the children
    runs out of place, and a BN whose output is changed in place later becomes a :class:`FreshCopy`.
    """
    tail = _norm_tail(bn, flow, name)
    private = feeder is not None and not flow.users.get(feeder, set()) - {name}
    if not private:
        for _, child in tail:
            if isinstance(child, _InPlace) and child.inplace:
                child.inplace = False
    copy = not private and name in flow.mutated and all(isinstance(child, nn.Identity) for _, child in tail)
    if not tail:
        return (FreshCopy(), " -> FreshCopy") if copy else (nn.Identity(), "")
    children = [("copy", FreshCopy())] * copy + tail
    return nn.Sequential(OrderedDict(children)), f" -> Sequential({', '.join(n for n, _ in children)})"

"""Which layers bnprobe probes, in the order the forward pass runs them.

Registration order (``named_modules()``) is not execution order in real models, so the order
comes from forward hooks on one real batch. A module called twice appears once, at its first call.
:func:`first_calls` is the one place that order is taken: :func:`execution_order` runs a forward for
it, ICS and the Hessian probes record it during a forward they run anyway.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LAYER_KINDS as KINDS
from .errors import ConfigError
from .passes import leave_no_trace, materialise, refuse_scripted

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm by what it is, not by its class: torch's (``_BatchNorm`` and its subclasses), or
    any other module that holds ``running_mean`` and ``running_var`` buffers of one length and an
    ``eps`` to normalise with them (torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``, a hand-written one). InstanceNorm holds the same buffers when it
    tracks running statistics but normalises each sample alone: not a BatchNorm."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return isinstance(module, nn.modules.batchnorm._BatchNorm)
    buffers = dict(module.named_buffers(recurse=False))
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    return (
        mean is not None
        and var is not None
        and mean.dim() == 1
        and mean.shape == var.shape
        and isinstance(getattr(module, "eps", None), float)
    )


def layer_kind(module: nn.Module) -> str:
    """Classify a module as conv, linear, norm or other (by type, subclasses included)."""
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORM) or is_batchnorm(module):
        return "norm"
    return "other"


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A module's parameters, not its children's, with those its parametrized tensors are computed
    from (``weight_norm``'s ``original0`` and ``original1`` live in a child ``parametrizations``,
    but they are the module's weight: an ICS that counted them as a layer run before it would
    update the module's own weight in its G')."""
    found = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        found += list(module.get_submodule("parametrizations").parameters())
    return found


def has_own_parameters(module: nn.Module) -> bool:
    """A probed layer holds parameters itself, not only through its children; a parametrization's
    are its module's, so the parametrization is no layer."""
    return not isinstance(module, parametrize.ParametrizationList) and bool(own_parameters(module))


@dataclass(frozen=True)
class LayerInfo:
    """One probed layer: its name in ``named_modules()``, kind, size, and place in the forward pass."""

    name: str
    kind: str
    param_count: int
    output_shape: tuple[int, ...]
    order: int


def parameter_holders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module with parameters of its own, by name, in registration order: the candidate layers."""
    return [(n, m) for n, m in model.named_modules() if has_own_parameters(m)]


FirstCall = tuple[str, nn.Module, tuple[int, ...]]  # name, module, output shape (() when not a tensor)


@contextmanager
def first_calls(model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> Iterator[list[FirstCall]]:
    """Records ``modules`` (default: :func:`parameter_holders`) in the order their first call ends,
    during whatever forward passes run inside the block; each appears once."""
    refuse_scripted(model)
    candidates = list(modules if modules is not None else parameter_holders(model))
    order: list[FirstCall] = []
    seen: set[int] = set()

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in candidates]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, example_input: Any, modules: Iterable[tuple[str, nn.Module]] | None = None) -> list[FirstCall]:
    """Names, modules and output shapes in the order of their first call on ``example_input``
    (default: every module), from one forward that leaves no trace."""
    materialise(model, example_input)
    with first_calls(model, modules if modules is not None else model.named_modules()) as order, leave_no_trace(model), torch.no_grad():
        model(example_input)
    return order


def select(names_kinds: Sequence[tuple[str, str]], patterns: Sequence[str] = ("*",), kinds: Sequence[str] | None = None) -> list[int]:
    """Indices of the layers whose name matches any glob in ``patterns`` and whose kind is in ``kinds``."""
    bad = [k for k in (kinds or ()) if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown layer kind {bad[0]!r}; choose from {', '.join(KINDS)}")
    return [
        i
        for i, (name, kind) in enumerate(names_kinds)
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) and (not kinds or kind in kinds)
    ]


def probed_layers(
    model: nn.Module,
    example_input: Any,
    patterns: Sequence[str] = ("*",),
    kinds: Sequence[str] | None = None,
    require: bool = True,
) -> list[tuple[LayerInfo, nn.Module]]:
    """The probed layers (modules with their own parameters), in forward-execution order.

    Modules with parameters that never run in the forward pass are left out: they have no
    activations and no gradient. No match is an error unless ``require`` is false.
    """
    ordered = execution_order(model, example_input, parameter_holders(model))
    keep = set(select([(n, layer_kind(m)) for n, m, _ in ordered], patterns, kinds))
    result: list[tuple[LayerInfo, nn.Module]] = []
    for i, (name, module, shape) in enumerate(ordered):
        if i in keep:
            info = LayerInfo(
                name=name,
                kind=layer_kind(module),
                param_count=sum(p.numel() for p in own_parameters(module)),
                output_shape=shape,
                order=len(result),
            )
            result.append((info, module))
    if not result and require:
        raise no_layer_matches(patterns, kinds)
    return result


def no_layer_matches(patterns: Sequence[str], kinds: Sequence[str] | None, where: str = "") -> ConfigError:
    """The error for a layer selection that picks nothing, worded alike wherever layers are picked."""
    return ConfigError(f"no layer matches --layers {list(patterns)!r}" + (f" and kinds {list(kinds)!r}" if kinds else "") + where)


_RELUS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


def relu_fed_layers(model: nn.Module, example_input: Any, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose output goes straight into a ReLU module (the same tensor object):
    for them, an output that is never positive means every unit downstream is off (a dead layer).
    A ReLU called as a function is not seen, so such a layer is never called dead on this ground."""
    refuse_scripted(model)
    wanted = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor held, so that its id is not reused
    fed: list[str] = []

    def remember(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_: nn.Module, __: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)

        return hook

    def check(_: nn.Module, args: tuple[Any, ...]) -> None:
        found = outputs.get(id(args[0])) if args else None
        if found is not None and found[0] not in fed:
            fed.append(found[0])

    handles = [wanted[n].register_forward_hook(remember(n)) for n in names if n in wanted]
    handles += [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, _RELUS)]
    try:
        with torch.no_grad(), leave_no_trace(model):
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return fed

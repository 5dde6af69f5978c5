"""Which layers bnprobe probes, in the order the forward pass runs them.

Registration order (``named_modules()``) is not execution order in real models, so the order
comes from forward hooks on one real batch. A module called twice appears once, at its first call.
:func:`first_calls` is the one place that order is taken: :func:`execution_order` runs a forward for
it, ICS and the Hessian probes record it during a forward they run anyway.

Where parameter holders nest, the end of a call is not the data flow: a QAT-fused conv uses its own
weight and then runs its child BN inside its forward, so the BN's call ends first. There a holder is
placed where its own code first uses one of its own parameters (:class:`_FirstUses`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

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


class _FirstUses(TorchFunctionMode):
    """Places each module at the first op (one with a tensor result: reading ``.shape`` is no use)
    that consumes a parameter of its own while it is the innermost running parameter holder, else at
    the end of its first call. A parent's code reading a child's parameter is not the child running
    (a QAT conv-BN scales its weight by its BN's before the BN runs); a parametrization's parameters
    count for the module they parametrize, whose code their computation runs in."""

    def __init__(self, holders: Sequence[nn.Module]) -> None:
        super().__init__()
        self.own = {id(m): {id(p) for p in own_parameters(m)} for m in holders}
        self.running: list[int] = []
        self.tick = 0
        self.at: dict[int, int] = {}  # id(module) -> its place
        self.handles = [m.register_forward_pre_hook(self._enter) for m in holders]
        self.handles += [m.register_forward_hook(self._leave, always_call=True) for m in holders]

    def _enter(self, module: nn.Module, _args: Any) -> None:
        self.running.append(id(module))

    def _leave(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if self.running and self.running[-1] == id(module):  # not a call already running when watching began
            self.running.pop()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.tick += 1
        if self.running and (top := self.running[-1]) not in self.at and _has_tensor(out) and self._uses(top, (args, kwargs)):
            self.at[top] = self.tick
        return out

    def _uses(self, module: int, args: Any) -> bool:
        return any(id(t) in self.own[module] for t in tree_leaves(args) if isinstance(t, torch.Tensor))

    def ended(self, module: nn.Module) -> None:
        """The end of ``module``'s first call: its place if no use of its own came before."""
        self.tick += 1
        self.at.setdefault(id(module), self.tick)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _has_tensor(out: Any) -> bool:
    return isinstance(out, torch.Tensor) or any(isinstance(t, torch.Tensor) for t in tree_leaves(out))


def _nested_holders(model: nn.Module) -> list[nn.Module]:
    """The parameter holders when one holds another (their calls nest), else none: for holders that
    are leaves, the end of a call already is the data flow, and no op need be watched."""
    holders = [m for _, m in parameter_holders(model)]
    ids = {id(m) for m in holders}
    nested = any(id(c) in ids for m in holders for c in m.modules() if c is not m)
    return holders if nested else []


@contextmanager
def first_calls(model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> Iterator[list[FirstCall]]:
    """Records ``modules`` (default: :func:`parameter_holders`) in the order their first call ends,
    during whatever forward passes run inside the block; each appears once. Where parameter holders
    nest, the list is put in data-flow order (:class:`_FirstUses`) when the block ends."""
    refuse_scripted(model)
    candidates = list(modules if modules is not None else parameter_holders(model))
    order: list[FirstCall] = []
    seen: set[int] = set()
    nested = _nested_holders(model)
    flow = _FirstUses(nested) if nested else None

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
                if flow is not None:
                    flow.ended(module)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in candidates]
    try:
        with flow if flow is not None else nullcontext():
            yield order
        if flow is not None:
            order.sort(key=lambda call: flow.at[id(call[1])])
    finally:
        for h in handles:
            h.remove()
        if flow is not None:
            flow.remove()


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

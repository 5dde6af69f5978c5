"""BatchNorm surgery (DESIGN 1.2): insert, strip (or fold) and noisy BN on any model.

``apply_bn(model, mode, example_input)`` works on a deep copy and returns it with a :class:`BnPlan`.

Pairing (which layer feeds which BN, what a layer's output goes to) comes from the dataflow, never
from names or registration order: the ``torch.fx`` graph where the model traces (BN and conv/linear
kept as leaves), otherwise forward hooks that match each module's input tensor object to the module
that returned it. One side-effect-free forward on ``example_input`` (running statistics and RNG
untouched) always runs too: it gives the forward order, the output ranks and which modules run.

Names. Every layer that exists before surgery keeps its name, so the rows of the keep, insert, strip
and noisy variants of one experiment line up:

- insert: the BN for target ``P.K`` is its sibling ``P.K_bn``, placed right after it in its parent
  ``nn.Sequential`` (``features.0`` stays the conv, ``features.0_bn`` is new, ``features.1`` is still
  the ReLU). Only a target whose parent is not a plain ``nn.Sequential`` (a module with its own
  ``forward``, e.g. ``self.conv1``) is wrapped instead: ``N`` becomes ``WithBatchNorm(N.conv, N.bn)`` (or
  ``N.linear``); that rename is said in the plan's detail.
- noisy: the noise is part of the BN module, so the recorded BN output is the noisy one. Each BN
  the forward runs becomes, at its own name and with its own tensors, the noisy subclass of its class
  (``NoisyBatchNorm2d`` for ``BatchNorm2d``, ...); a model without BN gets insert with noisy BNs.
- strip: BN ``B`` becomes ``nn.Identity`` (or ``Sequential(drop, act)`` for a BN that holds an
  activation, as timm's ``BatchNormAct2d``), so ``B`` keeps existing and nothing else is renamed.

The leaf modules in forward order are exactly those of the reference layout (torchvision ``vgg11`` +
insert runs the same module types, in the same order, as ``vgg11_bn``).

A target whose output already goes straight into a BN is left alone by insert ("kept"). DenseNet
(BN before conv): insert adds a BN right after every conv whose output does not already feed a BN
(each dense layer's second conv, before ``torch.cat``, and each transition conv, before pooling), on
top of DenseNet's own pre-activation BNs. Strip removes every BN; one whose input is not the direct
output of a conv/linear (DenseNet's ``norm1``, ``transition.norm``, ``norm5``, fed by ``torch.cat``)
is removed without re-biasing anything and is reported as such. ``fold=True`` folds each BN that
can be folded exactly: fed directly by a conv/linear that runs once, feeds nothing else, shares no
parameter, and whose output scales with its weight (not timm's weight-standardising ``StdConv2d``).
Any other BN is stripped as without ``fold`` and its plan row says why it was not folded (folding
forward through the following conv is exact only without padding and never through a
non-linearity, so it is not attempted). Folds are checked on ``example_input`` in eval mode.
"""

from __future__ import annotations

import copy
import enum
import math
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeAlias, TypeGuard, TypeVar, cast, runtime_checkable

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torchvision.ops import FrozenBatchNorm2d

from .config import BnMode, BnTargets, NoiseConfig
from .errors import SurgeryError
from .layers import layer_kind
from .passes import leave_no_trace

_Feeder: TypeAlias = "nn.modules.conv._ConvNd | nn.Linear"  # a layer a BN can be paired with, folded into or inserted after
BatchNorm: TypeAlias = "nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d"  # what is_batchnorm accepts

_BN = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
_TARGETS: dict[str, tuple[type[_Feeder], ...]] = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}
_FEEDERS = (nn.modules.conv._ConvNd, nn.Linear)
_BN_FOR: dict[type[_Feeder], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}
_FOLD_RTOL = 1e-4

E = TypeVar("E", bound=enum.Enum)


def is_batchnorm(module: nn.Module) -> TypeGuard[BatchNorm]:
    """Any BatchNorm, subclasses and SyncBatchNorm/FrozenBatchNorm2d included (not Group/LayerNorm)."""
    return isinstance(module, _BN)


# ----------------------------------------------------------------------------- noise


def _noisy(x: torch.Tensor, generator: torch.Generator, config: NoiseConfig) -> torch.Tensor:
    """``s * x + m`` along dim 1 with one fresh draw of the recipe (see :class:`NoisyNorm`)."""
    c = config
    lo_hi = torch.rand(2, generator=generator, dtype=torch.float64)
    mu = c.mu_range[0] + (c.mu_range[1] - c.mu_range[0]) * lo_hi[0]
    sigma = c.sigma_range[0] + (c.sigma_range[1] - c.sigma_range[0]) * lo_hi[1]
    channels = x.shape[1]
    shift = mu + c.mean_spread * (2 * torch.rand(channels, generator=generator, dtype=torch.float64) - 1)
    scale = sigma + c.scale_std * torch.randn(channels, generator=generator, dtype=torch.float64)
    draws = torch.stack((scale, shift)).to(x.dtype)
    if x.device.type == "cuda":  # pinned memory: the copy does not wait for the device
        draws = draws.pin_memory()
    scale, shift = draws.to(x.device, non_blocking=True).view(2, 1, channels, *[1] * (x.dim() - 2)).unbind()
    return x * scale + shift


def _set_noise(module: NoisyNorm, seed: int, config: NoiseConfig | None, after: tuple[str, ...] = ()) -> None:
    """The noise state of a fresh or converted noisy BN: its seed, recipe, own generator, and the children run after the noise."""
    module.noise_seed = int(seed)
    module.noise_config = config or NoiseConfig()
    module.generator = torch.Generator().manual_seed(module.noise_seed)
    module.after_noise = after


class NoisyNorm(nn.Module):
    """Santurkar et al.'s noisy BN, as a mix-in before a BatchNorm class: ``NoisyBatchNorm2d(NoisyNorm, nn.BatchNorm2d)``.

    In training, the BN's output gets a fresh random per-channel scale and shift at every forward:
    mu ~ U(mu_range), sigma ~ U(sigma_range); per channel m ~ U(mu - mean_spread, mu + mean_spread),
    s ~ N(sigma, scale_std); output ``s * bn(x) + m`` along dim 1. In eval mode it is the plain BN.
    The noise is inside the module, so a forward hook on it sees the noisy output.

    The draws come from ``self.generator`` (a CPU generator seeded with ``noise_seed``, found by
    ``bnprobe.rng`` by this attribute name, so a measurement pass can replay a draw); the small noise
    tensors are moved to the input's device. ``state_dict`` is the BN's plus ``_extra_state``, the
    generator state, so a resumed checkpoint continues the stream. ``after_noise`` names children
    run after the noise, in order: the activation (and dropout) of a BN that holds one, as timm's
    ``BatchNormAct2d``.
    """

    noise_seed: int
    noise_config: NoiseConfig
    generator: torch.Generator
    after_noise: tuple[str, ...]

    def __init__(self, *args: Any, seed: int = 0, noise: NoiseConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_noise(self, seed, noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = super().forward(x)
        if self.training:
            y = _noisy(y, self.generator, self.noise_config)
        for name in self.after_noise:
            y = self.get_submodule(name)(y)
        return y

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        config = "" if self.noise_config == NoiseConfig() else f", {self.noise_config}"
        return f"{super().extra_repr()}, noise_seed={self.noise_seed}{config}"


class NoisyBatchNorm1d(NoisyNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with noise in training (:class:`NoisyNorm`)."""


class NoisyBatchNorm2d(NoisyNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with noise in training (:class:`NoisyNorm`)."""


class NoisyBatchNorm3d(NoisyNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with noise in training (:class:`NoisyNorm`)."""


class NoisySyncBatchNorm(NoisyNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with noise in training (:class:`NoisyNorm`)."""


class NoisyFrozenBatchNorm2d(NoisyNorm, FrozenBatchNorm2d):  # type: ignore[misc]  # torchvision ships no types: its classes are Any
    """torchvision's ``FrozenBatchNorm2d`` with noise in training (:class:`NoisyNorm`)."""

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, noise_seed={self.noise_seed})"


NOISY_BN: dict[type[nn.Module], type[NoisyNorm]] = {
    nn.BatchNorm1d: NoisyBatchNorm1d,
    nn.BatchNorm2d: NoisyBatchNorm2d,
    nn.BatchNorm3d: NoisyBatchNorm3d,
    nn.SyncBatchNorm: NoisySyncBatchNorm,
    FrozenBatchNorm2d: NoisyFrozenBatchNorm2d,
}
_NOISY_MADE: dict[type[nn.Module], type[NoisyNorm]] = {}
_SYNC_BN: dict[type[nn.Module], type[nn.SyncBatchNorm]] = {
    nn.BatchNorm1d: nn.SyncBatchNorm,
    nn.BatchNorm2d: nn.SyncBatchNorm,
    nn.BatchNorm3d: nn.SyncBatchNorm,
    NoisyBatchNorm1d: NoisySyncBatchNorm,
    NoisyBatchNorm2d: NoisySyncBatchNorm,
    NoisyBatchNorm3d: NoisySyncBatchNorm,
}


def synchronise_bn(model: nn.Module) -> list[str]:
    """Turn each BatchNorm of ``model`` in place into ``SyncBatchNorm`` (noisy BN into its noisy
    sync class, noise and generator kept), so that under torchrun it normalises with the global
    batch's statistics; returns the names converted. Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``
    it refuses a BN subclass with its own forward (timm's ``BatchNormAct2d``) rather than drop it."""
    converted = []
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm) or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        sync = _SYNC_BN.get(type(m))
        if sync is None:
            raise SurgeryError(f"sync_bn: {name} is a {type(m).__name__}, whose own forward SyncBatchNorm would drop; use sync_bn: false")
        m.__class__ = sync
        cast(nn.SyncBatchNorm, m).process_group = None  # the default group: every process
        converted.append(name)
    return converted


def noisy_class(cls: type[nn.Module]) -> type[NoisyNorm]:
    """The noisy subclass of a BN class: one of ``NOISY_BN``, else one made (once) for ``cls``.

    A made class keeps ``cls``'s own forward (noise after it); it is not importable by name, so save
    such a model with ``state_dict()``, not by pickling the module.
    """
    if issubclass(cls, NoisyNorm):
        return cls
    if cls in NOISY_BN:
        return NOISY_BN[cls]
    if cls not in _NOISY_MADE:
        doc = f"{cls.__name__} with noise in training (:class:`NoisyNorm`)."
        _NOISY_MADE[cls] = type(f"Noisy{cls.__name__}", (NoisyNorm, cls), {"__module__": __name__, "__doc__": doc})
    return _NOISY_MADE[cls]


@dataclass
class _Seeds:
    """Noise seeds drawn from the run seed, one per noisy BN in creation (forward) order; no global RNG."""

    seed: int
    config: NoiseConfig

    def __post_init__(self) -> None:
        self._master = torch.Generator().manual_seed(self.seed)

    def next(self) -> int:
        return int(torch.randint(0, 2**31, (1,), generator=self._master))


# ----------------------------------------------------------------------------- plan


class Action(str, enum.Enum):
    """What a plan row did to its module. A ``str``, shown and stored as the plain word, so the
    ``inspect`` table, the stored surgery summary and comparisons with ``"inserted"`` are unchanged."""

    INSERTED = "inserted"  # a new BN after a conv/linear
    REMOVED = "removed"  # a BN stripped (replaced by its stand-in)
    REBIASED = "rebiased"  # a stripped BN's feeder got a zero bias
    FOLDED = "folded"  # a BN's eval-mode affine folded into its feeder
    NOISE = "noise"  # a BN made noisy
    KEPT = "kept"  # nothing to do: already followed by a BN, or already noisy

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Change:
    """One edit: ``action`` on ``module`` (its name after surgery), ``related`` the layer it sits after or is fed by."""

    action: Action
    module: str
    related: str
    detail: str


@dataclass(frozen=True)
class BnPlan:
    """What ``apply_bn`` changed, in forward order; ``bnprobe inspect`` prints ``rows()`` as a table."""

    mode: str
    pairing: str
    changes: tuple[Change, ...] = ()
    params_before: int = 0
    params_after: int = 0
    columns: ClassVar[tuple[str, str, str, str]] = ("action", "module", "after / fed by", "detail")

    def rows(self) -> list[tuple[str, str, str, str]]:
        return [(c.action.value, c.module, c.related, c.detail) for c in self.changes]

    def summary(self) -> str:
        counts = Counter(c.action for c in self.changes)
        edits = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no change"
        return f"bn {self.mode}: {edits}; parameters {self.params_before:,} -> {self.params_after:,} (pairing: {self.pairing})"


# ----------------------------------------------------------------------------- dataflow


@dataclass
class _Flow:
    """The dataflow between modules, by module name (``"input"``, ``"output"`` and ``"op:NAME"`` for the rest)."""

    pairing: str = "forward hooks"  # where ``sources``, ``users`` and ``outputs`` come from
    index: dict[str, int] = field(default_factory=dict)  # first-call order of the atomic modules (and of a BN's own children)
    calls: Counter[str] = field(default_factory=Counter)
    rank: dict[str, int] = field(default_factory=dict)  # ndim of each atomic module's output
    in_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shape of each atomic module's first input, at its first call
    sources: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # what produced each module's (first) input
    users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # what each module's output goes to
    outputs: set[str] = field(default_factory=set)  # modules whose output is a model output
    mutated: set[str] = field(default_factory=set)  # modules whose output is changed in place afterwards (an in-place ReLU after a BN)

    def ordered(self, names: list[str]) -> list[str]:
        """Called modules first, in forward order, then the others as given."""
        return sorted(names, key=lambda n: self.index.get(n, math.inf))


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _atomic(model: nn.Module) -> tuple[dict[nn.Module, str], dict[nn.Module, str]]:
    """Modules treated as units (leaves, and every BN whole), and the children inside BNs."""
    atomic: dict[nn.Module, str] = {}
    inside: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if m in inside:
            continue
        if is_batchnorm(m):
            inside.update({c: f"{name}.{n}" for n, c in m.named_modules() if c is not m})
        if is_batchnorm(m) or not any(True for _ in m.children()):
            atomic[m] = name
    return atomic, inside


class _Tracer(fx.Tracer):
    """Keeps BNs (FrozenBatchNorm2d and subclasses included) and conv/linear subclasses as graph leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or isinstance(m, _FEEDERS) or super().is_leaf_module(m, module_qualified_name)


def _node_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    target = node.target
    return "op:" + (target if isinstance(target, str) else getattr(target, "__name__", str(target)))


def _reads_shape_only(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: a use of a tensor that does not depend on its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",), ("dtype",), ("device",))


def _fx_edges(model: nn.Module) -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    graph = _Tracer().trace(model)
    sources: dict[str, set[str]] = defaultdict(set)
    users: dict[str, set[str]] = defaultdict(set)
    outputs: set[str] = set()
    for node in graph.nodes:
        name = _node_name(node)
        if _reads_shape_only(node):
            continue
        for arg in node.all_input_nodes:
            users[_node_name(arg)].add(name)
        if node.op == "call_module":
            first = node.args[0] if node.args else None
            sources[name].add(_node_name(first) if isinstance(first, fx.Node) else "op:constant")
        elif node.op == "output":
            outputs |= {_node_name(a) for a in node.all_input_nodes}
    return sources, users, outputs


class _OpTape(TorchFunctionMode):
    """Records the torch operations run outside the atomic modules as dataflow nodes ``op:NAME``.

    Hooks alone see module-to-module edges only: a conv output also added to a residual, or
    changed in place (``relu_``) before its BN, would look like it fed the BN alone.
    """

    def __init__(self, producer: dict[int, str], users: dict[str, set[str]], alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.producer, self.users, self.alive = producer, users, alive
        self.mutated: set[str] = set()  # modules/ops whose output something changed in place later
        self.depth = 0  # > 0 inside an atomic module, whose own ops are the module's

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = "op:" + getattr(func, "__name__", str(func))
        outs = list(_tensors(args[:1] if name == "op:__setitem__" else out))  # setitem writes into its first argument
        if self.depth == 0 and outs:  # an op that returns no tensor (x.shape, x.size()) reads no values
            inputs = {id(t) for t in _tensors((args, kwargs))}
            for i in inputs & self.producer.keys():
                self.users[self.producer[i]].add(name)
            self.mutated |= {self.producer[id(t)] for t in outs if id(t) in inputs and id(t) in self.producer}
            for t in outs:
                self.producer[id(t)] = name
            self.alive.extend(outs)
        return out


def _dataflow(model: nn.Module, example_input: object) -> _Flow:
    """One hooked, side-effect-free forward; edges from torch.fx where the model traces."""
    flow = _hooked_forward(model, example_input)
    try:
        flow.sources, flow.users, flow.outputs = _fx_edges(model)
        flow.pairing = "torch.fx"
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the hooks' edges
        flow.pairing = f"forward hooks (torch.fx: {type(e).__name__})"
    return flow


def _hooked_forward(model: nn.Module, example_input: object) -> _Flow:
    """The dataflow as forward hooks and the op tape see it, from one side-effect-free forward."""
    atomic, inside = _atomic(model)
    flow = _Flow()
    producer = {id(t): "input" for t in _tensors(example_input)}
    alive: list[torch.Tensor] = []  # keeps every tensor seen alive, so no id is reused during the pass
    tape = _OpTape(producer, flow.users, alive)

    def enter(_m: nn.Module, _args: tuple[object, ...]) -> None:
        tape.depth += 1

    handles = [m.register_forward_pre_hook(enter) for m in atomic]
    handles += [m.register_forward_hook(_recorder(flow, tape, n, True)) for m, n in atomic.items()]
    handles += [m.register_forward_hook(_recorder(flow, tape, n, False)) for m, n in inside.items()]
    try:
        with leave_no_trace(model), torch.no_grad(), tape:
            result = model(example_input)
    except Exception as e:  # any failure of the user's forward is reported in one line
        raise SurgeryError(f"cannot plan BN surgery: {type(model).__name__} fails on the example input: {str(e).splitlines()[0]}") from e
    finally:
        for h in handles:
            h.remove()
    flow.outputs = {producer.get(id(t), "op:?") for t in _tensors(result)}
    for name in flow.outputs:
        flow.users[name].add("output")
    flow.mutated = tape.mutated
    return flow


def _recorder(flow: _Flow, tape: _OpTape, name: str, is_atomic: bool) -> Callable[[nn.Module, tuple[object, ...], object], None]:
    """The forward hook of module ``name``: its call order, and for an atomic module (whose own ops
    the tape skipped) its call count, input source and shape, output rank, and outputs as producers."""

    def record(_m: nn.Module, args: tuple[object, ...], out: object) -> None:
        flow.index.setdefault(name, len(flow.index))
        if not is_atomic:
            return
        tape.depth -= 1
        flow.calls[name] += 1
        first = next(_tensors(args), None)
        source = tape.producer.get(id(first), "op:?") if first is not None else "op:constant"
        if first is not None:
            flow.in_shape.setdefault(name, tuple(first.shape))
        flow.sources[name].add(source)
        flow.users[source].add(name)
        outs = list(_tensors(out))
        tape.alive.extend(outs)
        if first is not None and any(t is first for t in outs):  # an in-place module (ReLU(inplace=True))
            tape.mutated.add(source)
        for t in outs:
            tape.producer[id(t)] = name
        if outs:
            flow.rank.setdefault(name, outs[0].dim())

    return record


def _describe(source: str) -> str:
    if source == "input":
        return "the model input"
    if source == "op:?":
        return "an operation outside any module"
    return source.removeprefix("op:")


def _feeder(model: nn.Module, flow: _Flow, name: str, bn: nn.Module) -> tuple[str | None, str]:
    """The conv/linear whose output is this BN's input, or None and why not."""
    if name not in flow.index:
        return None, "not called in the forward pass"
    sources = flow.sources.get(name, set())
    if len(sources) != 1:
        return None, f"fed by several inputs ({', '.join(sorted(_describe(s) for s in sources))})"
    (source,) = sources
    layer = model.get_submodule(source) if not source.startswith("op:") and source != "input" else None
    if not isinstance(layer, _FEEDERS):
        return None, f"its input comes from {_describe(source)}, not a conv/linear"
    channels = _channels(layer)
    if flow.rank.get(source) != _channel_rank(layer):
        return None, f"its input comes from {source}, whose rank-{flow.rank.get(source)} output has no channel dim 1"
    if channels != _num_features(bn):
        return None, f"its input comes from {source} with {channels} channels, but it normalises {_num_features(bn)}"
    return source, ""


# ----------------------------------------------------------------------------- module edits


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is registered (every alias); returns the root, which may be ``new``."""
    if root is old:
        return new
    slots = [(parent, key) for parent in root.modules() for key, child in parent._modules.items() if child is old]
    for parent, key in slots:
        setattr(parent, key, new)
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


def _make_noisy(bn: nn.Module, name: str, after: list[str], seed: int, config: NoiseConfig) -> None:
    """Turn ``bn`` in place (same object, tensors, hooks and attributes) into its noisy subclass.

    A BN subclass whose forward also runs children (``after``, e.g. dropout and activation) becomes
    the noisy class of its plain BatchNorm base, running those children after the noise.
    """
    cls = type(bn)
    if after and cls not in NOISY_BN:
        base = next((c for c in cls.__mro__ if c in NOISY_BN), None)
        if base is None:
            raise SurgeryError(
                f"cannot add noise to {name}: {cls.__name__} runs children ({', '.join(after)}) and derives from no plain BatchNorm class"
            )
        cls = base
    try:
        bn.__class__ = noisy_class(cls)
    except TypeError as e:
        raise SurgeryError(f"cannot add noise to {name}: {type(bn).__name__} cannot be made noisy ({e})") from None
    assert isinstance(bn, NoisyNorm)  # its class is now one; tells the type checker so
    _set_noise(bn, seed, config, tuple(after))


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` when it is a tensor (a parameter or buffer), else None: a BN's ``weight`` and
    ``bias`` are None without ``affine``, its running statistics without ``track_running_stats``."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _running_stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A BN's running mean and variance, or None when it keeps none (eval mode then uses the batch's)."""
    mean, var = _tensor(bn, "running_mean"), _tensor(bn, "running_var")
    return None if mean is None or var is None else (mean, var)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as ``scale * x + shift`` per channel, in float64."""
    stats = _running_stats(bn)
    assert is_batchnorm(bn), f"{type(bn).__name__} is not a BatchNorm"
    assert stats is not None, "only a BN with running statistics is folded (_fold_blocker)"
    mean, var = stats[0].double(), stats[1].double()
    weight, bias = _tensor(bn, "weight"), _tensor(bn, "bias")
    gamma = weight.double() if weight is not None else torch.ones_like(mean)
    beta = bias.double() if bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _scale_into(layer: _Feeder, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``layer`` compute ``scale * layer(x) + shift`` per output channel (float64 arithmetic, then its dtype)."""
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
            g = layer.groups
            grouped = w.double().view(g, w.shape[0] // g, *w.shape[1:])
            folded = grouped * scale.view(g, 1, -1, *[1] * (w.dim() - 2))
        else:  # weight: (out, ...)
            folded = w.double() * scale.view(-1, *[1] * (w.dim() - 1))
        w.copy_(folded.view_as(w))
        bias = layer.bias.double() * scale + shift if layer.bias is not None else shift
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(w.dtype))
        else:
            layer.bias.copy_(bias)


_STOCK_FORWARDS = frozenset(
    cls.forward for cls in (*_TARGETS["conv"], nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
)


def _scales_with_its_weight(layer: _Feeder, shape: tuple[int, ...] | None) -> bool:
    """Whether scaling ``layer``'s weight per output channel scales its output: true for torch's own
    conv/linear forward; a subclass with its own (timm's weight-standardising ``StdConv2d`` undoes
    any scale) is tried on a float64 copy with a random input of the shape it was called with."""
    if type(layer).forward in _STOCK_FORWARDS:
        return True
    if shape is None:
        return False
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(layer).double()
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(layer.weight.device)
    channels = _channels(layer)
    scale = (0.5 + torch.rand(channels, generator=g, dtype=torch.float64)).to(x.device)
    shift = torch.randn(channels, generator=g, dtype=torch.float64).to(x.device)
    with torch.no_grad():
        expected = probe(x)
        expected = expected * scale.view(-1, *[1] * (expected.dim() - 2)) + shift.view(-1, *[1] * (expected.dim() - 2))
        _scale_into(probe, scale, shift)
        return torch.allclose(probe(x), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def _fold_blocker(model: nn.Module, flow: _Flow, name: str, bn: nn.Module, feeder: str | None, why: str) -> str:
    """Why folding ``name`` into ``feeder`` would not give the same eval-mode function ("" if it would)."""
    if feeder is None:
        return why
    if _running_stats(bn) is None:
        return "it keeps no running statistics (track_running_stats=False), so eval mode normalises by the batch"
    others = flow.users.get(feeder, set()) - {name}
    if others:
        return f"{feeder}'s output is also used by {', '.join(sorted(map(_describe, others)))}"
    if flow.calls[feeder] != 1 or flow.calls[name] != 1:
        twice = feeder if flow.calls[feeder] != 1 else name
        return f"{twice} runs {flow.calls[twice]} times per forward"
    layer = _feeder_layer(model, feeder)
    own = {id(p) for p in layer.parameters(recurse=False)}
    sharer = next((n for n, m in model.named_modules() if m is not layer and any(id(p) in own for p in m.parameters(recurse=False))), None)
    if sharer is not None:
        return f"{feeder}'s parameters are shared with {sharer}"
    if not _scales_with_its_weight(layer, flow.in_shape.get(feeder)):
        return f"{feeder} ({type(layer).__name__}) does not scale its output with its weight"
    return ""


def _eval_output(model: nn.Module, example_input: object) -> list[torch.Tensor]:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [t.double() for t in _tensors(model(example_input))]
    finally:
        model.train(training)


def _num_features(bn: nn.Module) -> int:
    """FrozenBatchNorm2d has no ``num_features``; its buffers tell."""
    features = getattr(bn, "num_features", None)
    if features is not None:
        return int(features)
    mean = _tensor(bn, "running_mean")
    if mean is None:
        raise SurgeryError(f"{type(bn).__name__} has neither num_features nor a running_mean buffer to count its channels")
    return mean.numel()


def _feeder_layer(model: nn.Module, name: str) -> _Feeder:
    """The conv/linear ``name``, which :func:`_feeder` found to feed a BN."""
    layer = model.get_submodule(name)
    assert isinstance(layer, _FEEDERS), f"{name} is a {type(layer).__name__}, not a conv/linear"
    return layer


def _channels(layer: _Feeder) -> int:
    return layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features


def _channel_rank(layer: _Feeder) -> int:
    """The output rank at which dim 1 is the channel dim: (N, C) for linear, (N, C, *spatial) for conv."""
    return len(layer.kernel_size) + 2 if isinstance(layer, nn.modules.conv._ConvNd) else 2


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


# ----------------------------------------------------------------------------- modes


def _insert(model: nn.Module, flow: _Flow, targets: BnTargets, keep_bias: bool, seeds: _Seeds | None) -> list[Change]:
    """A BN (noisy when ``seeds`` is given) right after each target layer, before whatever follows it (its non-linearity)."""
    modules = dict(model.named_modules())
    slots = _slots(model)
    if targets is BnTargets.AUTO:
        has_conv = any(isinstance(m, _TARGETS["conv"]) for m in modules.values())
        types = _TARGETS["conv" if has_conv else "linear"]
    else:
        types = _TARGETS["conv"] + _TARGETS["linear"] if targets is BnTargets.ALL else _TARGETS[targets.value]
    layers = {n: m for n, m in modules.items() if isinstance(m, types)}
    changes = []
    for name in [n for n in flow.ordered(list(flow.index)) if n in layers]:
        layer = layers[name]
        if name in flow.outputs:
            continue
        followers = sorted(u for u in flow.users.get(name, ()) if u in modules and is_batchnorm(modules[u]))
        if followers:
            changes.append(Change(Action.KEPT, followers[0], name, "already followed by a BatchNorm"))
            continue
        bn = _new_bn(layer, name, flow, seeds).train(layer.training)
        detail = f"{type(bn).__name__}({_num_features(bn)})"
        if seeds is not None:
            detail += f", noise seed {bn.noise_seed}"
        if not keep_bias and layer.bias is not None:
            layer.register_parameter("bias", None)
            detail += f"; {name}'s bias removed"
        bn_name, layer_name, renamed = _place_after(layer, bn, slots[layer])
        changes.append(Change(Action.INSERTED, bn_name, layer_name, f"{detail}; {renamed}" if renamed else detail))
    return changes


def _add_noise(model: nn.Module, flow: _Flow, seeds: _Seeds) -> list[Change]:
    """Each BN the forward runs becomes its noisy subclass at its own name; a BN holding an activation gets the noise before it."""
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    changes = []
    for name in flow.ordered([n for n in bns if n in flow.index]):
        bn = bns[name]
        feeder, _ = _feeder(model, flow, name, bn)
        if isinstance(bn, NoisyNorm):
            changes.append(Change(Action.KEPT, name, feeder or "", f"already a {type(bn).__name__}"))
            continue
        after = [n for n, _ in _norm_tail(bn, flow, name) if f"{name}.{n}" in flow.index]
        before = type(bn).__name__
        seed = seeds.next()
        _make_noisy(bn, name, after, seed, seeds.config)
        where = f", before its {', '.join(after)}" if after else ""
        changes.append(Change(Action.NOISE, name, feeder or "", f"{before} -> {type(bn).__name__}, noise seed {seed}{where}"))
    return changes


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


def _strip(model: nn.Module, flow: _Flow, fold: bool, example_input: object) -> tuple[nn.Module, list[Change]]:
    """Every BN out; the layer that fed it gets a zero bias (strip) or the BN folded in (fold).

    With ``fold``, a BN that cannot be folded exactly (:func:`_fold_blocker`) is stripped as without
    it, and its row says why. The folds are then checked on ``example_input`` in eval mode against
    the model with only those BNs stripped: a difference means a use of a folded layer's output
    that the dataflow did not see (e.g. a data-dependent branch), and is an error.
    """
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    changes = []
    folds: list[tuple[str, nn.Module, str, str, nn.Module]] = []
    for name in flow.ordered(list(bns)):
        bn = bns[name]
        feeder, why = _feeder(model, flow, name, bn)
        replacement, becomes = _stand_in(flow, name, bn, feeder)
        blocker = _fold_blocker(model, flow, name, bn, feeder, why) if fold else ""
        if fold and not blocker:
            assert feeder is not None
            folds.append((name, bn, feeder, becomes, replacement))
            continue
        not_folded = f"not folded: {blocker}; " if fold else ""
        if feeder is None:
            changes.append(Change(Action.REMOVED, name, "", f"{not_folded or why + '; '}nothing re-biased{becomes}"))
        else:
            changes.append(Change(Action.REMOVED, name, feeder, f"{not_folded}{type(bn).__name__}({_num_features(bn)}){becomes}"))
            layer = _feeder_layer(model, feeder)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(_channels(layer), device=layer.weight.device, dtype=layer.weight.dtype))
                changes.append(Change(Action.REBIASED, feeder, name, f"zero-initialised bias ({_channels(layer)})"))
        model = _replace(model, bn, replacement.train(bn.training))
    if folds:
        _check_folds(model, [(name, feeder, replacement) for name, _, feeder, _, replacement in folds], example_input)
        for name, bn, feeder, becomes, replacement in folds:
            _scale_into(_feeder_layer(model, feeder), *_bn_affine(bn))
            model = _replace(model, bn, replacement.train(bn.training))
            changes.append(Change(Action.FOLDED, name, feeder, f"running statistics and affine folded into {feeder}{becomes}"))
        changes.sort(key=lambda c: flow.index.get(c.module if c.action is not Action.REBIASED else c.related, math.inf))
    return model, changes


def _as_double(obj: object) -> object:
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, obj)


def _check_folds(model: nn.Module, folds: list[tuple[str, str, nn.Module]], example_input: object) -> None:
    """The safety net behind :func:`_fold_blocker`: the folds, done on a float64 copy, must leave its
    eval output on ``example_input`` unchanged (to 1e-4, relative); a difference is a use of a folded
    layer's output the dataflow pass did not see (a data-dependent branch). float64, because an
    untrained deep model amplifies float32 rounding of the folded weights (6e-8) beyond that
    tolerance (EfficientNetV2 with random statistics: 3e-3), and float64 rounding up to 1e-7
    (EfficientNet with statistics from a few small batches); a model that does not run in float64
    is checked in its own dtype. A model whose own rounding noise is larger still passes when the
    difference is within 10x that noise (:func:`_rounding_noise`)."""
    x = _as_double(example_input)
    dtype: torch.dtype | None = torch.float64
    try:
        twin = copy.deepcopy(model).double()
        reference = _eval_output(twin, x)
    except Exception:  # noqa: BLE001 - a forward that cannot run in float64: check in the model's dtype
        x, dtype = example_input, None
        twin = copy.deepcopy(model)
        reference = _eval_output(twin, x)
    for name, feeder, replacement in folds:
        bn = twin.get_submodule(name)
        _scale_into(_feeder_layer(twin, feeder), *_bn_affine(bn))
        stand_in = copy.deepcopy(replacement)
        twin = _replace(twin, bn, stand_in.to(dtype) if dtype is not None else stand_in)
    worst = _relative_change(_eval_output(twin, x), reference)
    if worst > _FOLD_RTOL and worst > 10 * _rounding_noise(model, x, dtype, reference):
        raise SurgeryError(
            f"folding BN changed {type(model).__name__}'s eval output by {worst:.1e} (relative): a folded layer's output is used in a way the dataflow pass did not see; strip without --fold"
        )


def _relative_change(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(outputs, reference))


def _rounding_noise(model: nn.Module, x: object, dtype: torch.dtype | None, reference: list[torch.Tensor]) -> float:
    """How far the eval output moves when every weight moves by one rounding step (relative): no
    check can tell a fold from rounding below that. A chaotic model (an untrained EfficientNetV2 at
    28 px moves by 100% in float64) would otherwise be refused for an exact fold."""
    twin = copy.deepcopy(model)
    twin = twin.to(dtype) if dtype is not None else twin
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                jitter = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
                p.mul_(1 + torch.finfo(p.dtype).eps / 2 * jitter)  # unit roundoff
    return _relative_change(_eval_output(twin, x), reference)


def _as_enum(cls: type[E], value: object, what: str) -> E:
    try:
        return cls(value.value if isinstance(value, enum.Enum) else str(value).lower())
    except ValueError:
        raise SurgeryError(f"unknown {what} {value!r}; choose from {', '.join(str(m.value) for m in cls)}") from None


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_bn(
    model: nn.Module,
    mode: str | BnMode,
    example_input: object,
    *,
    targets: str | BnTargets = "auto",
    keep_bias: bool = False,
    fold: bool = False,
    noise: NoiseConfig | None = None,
    seed: int = 0,
) -> tuple[nn.Module, BnPlan]:
    """Apply a BN mode (keep | insert | strip | noisy) to a deep copy of ``model``; returns it and the plan.

    ``example_input`` (a batch of at least two) is run once without side effects to find the
    dataflow. ``fold`` applies to strip only, ``targets`` and ``keep_bias`` to insert (and to noisy
    on a model without BN). Noise generators are seeded from ``seed``, one per noisy BN in forward
    order. No global RNG is consumed, so identically seeded builds keep identical weights.
    """
    bn_mode = _as_enum(BnMode, mode, "BN mode")
    bn_targets = _as_enum(BnTargets, targets, "BN targets")
    model = copy.deepcopy(model)
    before = _param_count(model)
    if bn_mode is BnMode.KEEP:
        return model, BnPlan(bn_mode.value, "none", (), before, before)
    flow = _dataflow(model, example_input)
    seeds = _Seeds(seed, noise or NoiseConfig()) if bn_mode is BnMode.NOISY else None
    if bn_mode is BnMode.STRIP:
        model, changes = _strip(model, flow, fold, example_input)
    elif seeds is not None and any(is_batchnorm(m) for n, m in model.named_modules() if n in flow.index):
        changes = _add_noise(model, flow, seeds)
    else:
        changes = _insert(model, flow, bn_targets, keep_bias, seeds)
    return model, BnPlan(bn_mode.value, flow.pairing, tuple(changes), before, _param_count(model))

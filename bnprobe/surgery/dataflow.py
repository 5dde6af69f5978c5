"""The dataflow between a model's modules: which module feeds which, from one side-effect-free forward.

Edges come from the ``torch.fx`` graph where the model traces (BN and conv/linear kept as leaves),
otherwise from forward hooks that match each module's input tensor object to the module or torch
operation that returned it. The forward always runs: it gives the call order, call counts, output
ranks and input shapes.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..errors import SurgeryError
from ..layers import is_batchnorm
from ..passes import leave_no_trace, refuse_scripted
from .kinds import _FEEDERS, _channel_rank, _channels, _Feeder, _num_features


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
    read_outside: dict[str, str] = field(default_factory=dict)  # BN -> what else reads its tensors (F.batch_norm, a fused conv's forward)

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
    """Modules treated as units (leaves, and every BN and conv/linear whole), and the children inside
    those: a BN's activation, a conv's weight parametrization (``weight_norm``)."""
    atomic: dict[nn.Module, str] = {}
    inside: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if m in inside:
            continue
        whole = is_batchnorm(m) or isinstance(m, _FEEDERS)
        if whole:
            inside.update({c: f"{name}.{n}" for n, c in m.named_modules() if c is not m})
        if whole or not any(True for _ in m.children()):
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

    def __init__(self, producer: dict[int, str], users: dict[str, set[str]], alive: list[torch.Tensor], held: dict[int, str]) -> None:
        super().__init__()
        self.producer, self.users, self.alive, self.held = producer, users, alive, held
        self.mutated: set[str] = set()  # modules/ops whose output something changed in place later
        self.read_outside: dict[str, str] = {}  # BN -> the first reader of its tensors other than its own forward
        self.running: list[str] = []  # the atomic modules whose forward is running, innermost last: their ops are theirs
        self.in_bn: Counter[str] = Counter()  # the BNs whose own forward is running

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = "op:" + getattr(func, "__name__", str(func))
        outs = list(_tensors(args[:1] if name == "op:__setitem__" else out))  # setitem writes into its first argument
        if not outs:  # an op that returns no tensor (x.shape, x.size()) reads no values
            return out
        inputs = {id(t) for t in _tensors((args, kwargs))}
        for i in inputs & self.held.keys():
            if not self.in_bn[self.held[i]]:  # a fused module's forward reads them (a QAT ConvBn2d), or a functional call
                self.read_outside.setdefault(self.held[i], self._reader(name))
        if not self.running:
            for i in inputs & self.producer.keys():
                self.users[self.producer[i]].add(name)
            self.mutated |= {self.producer[id(t)] for t in outs if id(t) in inputs and id(t) in self.producer}
            for t in outs:
                self.producer[id(t)] = name
            self.alive.extend(outs)
        return out

    def watch(self, atomic: dict[nn.Module, str], bns: dict[nn.Module, str]) -> list[RemovableHandle]:
        """Hooks that keep ``running`` (the atomic modules' entries; the recorders pop them) and ``in_bn``."""

        def enter(m: nn.Module, _args: object) -> None:
            self.running.append(f"{atomic[m]}'s forward ({type(m).__name__})")

        def bn_in(m: nn.Module, _args: object) -> None:
            self.in_bn[bns[m]] += 1

        def bn_out(m: nn.Module, _args: object, _out: object) -> None:
            self.in_bn[bns[m]] -= 1

        handles = [m.register_forward_pre_hook(enter) for m in atomic]
        return handles + [h for m in bns for h in (m.register_forward_pre_hook(bn_in), m.register_forward_hook(bn_out))]

    def _reader(self, op: str) -> str:
        """Who runs ``op``: the innermost atomic module whose forward is running, else the op itself."""
        if not self.running:
            return op.removeprefix("op:")
        return self.running[-1]


def _dataflow(model: nn.Module, example_input: object) -> _Flow:
    """One hooked, side-effect-free forward; edges from torch.fx where the model traces."""
    with _attributes_kept(model):
        flow = _hooked_forward(model, example_input)
        try:
            flow.sources, flow.users, flow.outputs = _fx_edges(model)
            flow.pairing = "torch.fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use the hooks' edges
            flow.pairing = f"forward hooks (torch.fx: {type(e).__name__})"
    return flow


_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})


def _containers(attrs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """A module's own lists, dicts and sets (``vars(module)``'s, less its registries; torch's hook
    registries are OrderedDicts): what a forward may change in place."""
    return ((k, v) for k, v in attrs.items() if k not in _REGISTRIES and type(v) in (list, dict, set))


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were after the block: a forward that caches its output in
    an attribute or appends to a list, run by the planning passes, left a tensor (or, under torch.fx,
    a Proxy that no deep copy survives) in the model surgery returns. Containers are restored in
    place, so whatever else refers to them sees them restored too."""
    saved = [(vars(m), dict(vars(m))) for m in model.modules()]
    contents = {id(v): (v, copy.copy(v)) for _, attrs in saved for _, v in _containers(attrs)}
    try:
        yield
    finally:
        for attrs, before in saved:
            kept = {k: v for k, v in attrs.items() if k in _REGISTRIES}
            attrs.clear()
            attrs.update(before | kept)
        for value, before in contents.values():
            value.clear()
            if isinstance(value, list):
                value.extend(before)
            else:
                value.update(before)


def _hooked_forward(model: nn.Module, example_input: object) -> _Flow:
    """The dataflow as forward hooks and the op tape see it, from one side-effect-free forward.

    Its call order (``flow.index``) is not :func:`bnprobe.layers.execution_order`'s on purpose: it
    orders the atomic modules (leaves and whole BNs, with parameters or not, and a BN's children),
    taken by the same hooks, in the same pass, that pair each module with its input's producer."""
    refuse_scripted(model)
    atomic, inside = _atomic(model)
    flow = _Flow()
    producer = {id(t): "input" for t in _tensors(example_input)}
    alive: list[torch.Tensor] = []  # keeps every tensor seen alive, so no id is reused during the pass
    bns = {m: n for n, m in model.named_modules() if is_batchnorm(m)}
    held = {id(t): n for m, n in bns.items() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    tape = _OpTape(producer, flow.users, alive, held)
    handles = tape.watch(atomic, bns)
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
    flow.mutated, flow.read_outside = tape.mutated, tape.read_outside
    return flow


def _recorder(flow: _Flow, tape: _OpTape, name: str, is_atomic: bool) -> Callable[[nn.Module, tuple[object, ...], object], None]:
    """The forward hook of module ``name``: its call order, and for an atomic module (whose own ops
    the tape skipped) its call count, input source and shape, output rank, and outputs as producers."""

    def record(_m: nn.Module, args: tuple[object, ...], out: object) -> None:
        flow.index.setdefault(name, len(flow.index))
        if not is_atomic:
            return
        tape.running.pop()
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
    if not sources:  # run by the forward of a module the dataflow keeps whole
        owner = next((p for p in _prefixes(name) if p in flow.calls), "its parent")
        return None, f"it runs inside {owner}'s forward, whose dataflow is not traced"
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


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b", "a"]``: the names of the modules that hold module ``name``, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _feeder_layer(model: nn.Module, name: str) -> _Feeder:
    """The conv/linear ``name``, which :func:`_feeder` found to feed a BN."""
    layer = model.get_submodule(name)
    assert isinstance(layer, _FEEDERS), f"{name} is a {type(layer).__name__}, not a conv/linear"
    return layer

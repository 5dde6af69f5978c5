"""Gradient-shift internal covariate shift (Santurkar et al. 2018, Definition 2.1).

At a measured step with batch (x, y), for each probed layer i with weights W_i (all of the layer's
own trainable parameters, weight and bias, flattened and concatenated):

- ``G_i``  = grad of L wrt W_i at (W_1^t, ..., W_k^t), taken from the real training backward;
- ``G'_i`` = grad of L wrt W_i at (W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t), where
  W^{t+1} is what the real ``optimizer.step()`` produced (momentum, weight decay, Adam... included).

Layers are ordered as :func:`bnprobe.layers.probed_layers` orders them: by the data flow of their
own parameters (for leaf modules, the usual case, that is simply the order they run in; a QAT conv
that calls its BN child comes before it). "Before i" means earlier in that order. A module called twice is placed at its first call, and its
weights are "updated" in both calls for every later layer. With tied parameters (one tensor held by
two modules) a parameter counts as updated when its first holder is before i, except that layer i's
own parameters are always at W^t (they are the variable being differentiated).

:func:`gradient_shift` performs the one real training step, exactly as
``optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()`` would, and measures
``G'`` in extra passes that leave no trace: BatchNorm's ``track_running_stats`` is switched off
during them (train mode then normalises with batch statistics and updates nothing), every random
stream (global CPU/CUDA generators and module ``generator`` attributes, e.g. noisy BN) is replayed
from its state before the real forward, so dropout masks and noise draws equal the real pass's, and
put back afterwards. Other buffers a forward updates in place (spectral norm's vectors, InstanceNorm
statistics) are likewise set to their pre-step values for each pass and restored after.
Parameters, buffers, ``.grad``, optimizer state and RNG states end up bit-identical to a plain step.
Only trainable parameters count as a layer's weights; a layer whose parameters are all frozen gets
an all-NaN row (so results line up with ``probed_layers``). A parameter whose module never runs but
is read by an ancestor (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly) counts among
the weights of its nearest called ancestor that holds parameters; one with no such ancestor (read
functionally by a parameter-free parent) stays at W^t.

Two methods compute ``G'``; they agree to float tolerance (the tests check it):

``naive``
    The reference: per layer, one extra forward and a full backward through a
    ``torch.func.functional_call`` whose parameters mix W^{t+1} (before i) and W^t (from i on).

``fast``
    Three savings, no approximation:

    1. the backward differentiates only wrt W_i (``torch.autograd.grad(inputs=W_i)``, every other
       parameter is a constant), so it skips every other layer's weight gradient and everything
       before layer i;
    2. prefix sharing: one no-grad forward with the updated weights records the output of every
       module call (a cheap clone, deduplicated); in the pass for layer i, a module call whose
       result only depends on updated weights (no parameter of layer i or later has been touched by
       the time it ends) returns its recorded output instead of running, so each pass costs only
       the suffix from layer i on. This works on any ``nn.Module`` graph (branches, shortcuts,
       shared modules, nested blocks), because it follows module calls, not a chain of layers.
       Random draws made inside a skipped call are fast-forwarded, so later draws stay aligned;
       a recorded output that a later in-place op mutates is dropped from the cache (recomputed);
    3. the first layer in forward order has nothing before it, so ``G'_1 = G_1`` exactly.

    Assumption (true for ordinary module code): a module's forward reads only the parameters of
    itself and its submodules. When the replayed calls do not line up with the recorded ones
    (data-dependent control flow), the rest of that pass simply runs uncached.

Cosine and relative difference are NaN when a gradient is exactly zero.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .. import distributed
from ..config import Config, IcsMethod, layer_patterns
from ..errors import ConfigError
from ..layers import first_calls, layer_kind, no_layer_matches, own_parameters, select
from ..passes import Buffers, Trace, gradients, leave_no_trace, refusing_recomputation
from ..rng import Streams
from ..store import ICS_FIELDS as FIELDS
from .base import Record, StepBatch, every
from .ics_cache import CallCache
from .params import ParamSlots


class ICS(NamedTuple):
    """Gradient shift of one layer: ||G - G'||_2, cos(G, G'), ||G||_2, ||G'||_2, ||G - G'|| / ||G||."""

    l2: float
    cosine: float
    grad_norm: float
    grad_norm_shifted: float
    rel_diff: float


class ICSResult(Mapping[str, ICS]):
    """``{layer name: ICS}`` in forward-execution order, plus the real pass's ``loss`` and ``output``."""

    def __init__(self, values: dict[str, ICS], loss: torch.Tensor, output: Any, method: str) -> None:
        self._values = values
        self.loss = loss
        self.output = output
        self.method = method

    def __getitem__(self, name: str) -> ICS:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def column(self, field: str) -> list[float]:
        """One field (``l2``, ``cosine``, ...) for every layer, in forward order."""
        if field not in FIELDS:
            raise KeyError(f"unknown ICS field {field!r}; choose from {', '.join(FIELDS)}")
        return [getattr(v, field) for v in self._values.values()]

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: cos={v.cosine:.4f} l2={v.l2:.3g}" for n, v in self._values.items())
        return f"ICSResult(loss={float(self.loss):.4g}, {{{rows}}})"


# ----------------------------------------------------------------------------- layers and parameters


class _Layers:
    """Every module with trainable own parameters, in the order :func:`first_calls` gives them."""

    def __init__(self, model: nn.Module, called: list[nn.Module]) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        canonical = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(m)] for m in called]
        self.kinds = [layer_kind(m) for m in called]
        # parameter (canonical name) -> layer index of its first holder in forward order
        self.param_layer: dict[str, int] = {}
        self.own: list[list[str]] = []
        for i, m in enumerate(called):
            own = [canonical[id(p)] for p in own_parameters(m) if p.requires_grad and id(p) in canonical]
            own = list(dict.fromkeys(own))
            self.own.append(own)
            for n in own:
                self.param_layer.setdefault(n, i)
        # A parameter whose module never runs is read by an ancestor (MultiheadAttention reads
        # out_proj.weight itself): it belongs to the nearest called ancestor's layer.
        index = {name: i for i, name in enumerate(self.names)}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for pname in trainable:
            if pname in self.param_layer:
                continue
            path = pname.split(".")[:-1]
            while path and ".".join(path) not in index:
                path.pop()
            owner = index.get(".".join(path)) if path else index.get("")
            if owner is not None:
                self.own[owner].append(pname)
                self.param_layer[pname] = owner
        # a module's "reach": the latest layer whose parameters it holds (tied weights), its
        # submodules' included: a QAT conv-BN reads its BN child's weight before the BN runs
        holders: dict[str, list[int]] = {}
        for i, own in enumerate(self.own):
            for n in own:
                holders.setdefault(n, []).append(i)
        self.reach = {
            id(m): max((j for p in m.parameters() for j in holders.get(canonical.get(id(p), ""), ())), default=-1) for m in called
        }


def _measured(layers: _Layers, patterns: Sequence[str] | str | None, kinds: Sequence[str] | None) -> list[int]:
    globs = layer_patterns(patterns)
    chosen = sorted(select(list(zip(layers.names, layers.kinds)), globs, kinds))
    if not chosen:
        raise no_layer_matches(globs, kinds)
    return chosen


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


def _shift_stats(g: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """[l2, cosine, |G|, |G'|, rel_diff] as a float64 tensor (no host synchronisation)."""
    g, gs = g.double(), gs.double()
    n, ns = torch.linalg.vector_norm(g), torch.linalg.vector_norm(gs)
    l2 = torch.linalg.vector_norm(g - gs)
    nan = torch.full_like(n, float("nan"))
    cos = torch.where((n > 0) & (ns > 0), torch.dot(g, gs) / (n * ns), nan)
    rel = torch.where(n > 0, l2 / n, nan)
    return torch.stack([l2, cos, n, ns, rel])


# ----------------------------------------------------------------------------- public entry point


def gradient_shift(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    optimizer: torch.optim.Optimizer,
    layers: Sequence[str] | str | None = None,
    method: IcsMethod | str = IcsMethod.FAST,
    kinds: Sequence[str] | None = None,
    before_step: Callable[[], Any] | None = None,
) -> ICSResult:
    """Do one real training step on (x, y) and measure the gradient shift of the probed layers.

    ``layers``: glob patterns or module names (default: every probed layer); ``kinds`` narrows by
    kind (``conv``, ``linear``, ``norm``, ``other``). Only the measured layers cost extra passes;
    "before i" always counts every probed layer. ``before_step`` runs after ``G`` is taken and
    before ``optimizer.step()`` (gradient clipping goes there: G is the gradient before clipping).
    Returns ``{name: ICS}`` in forward order with ``.loss`` (detached) and ``.output`` (detached).
    """
    how = _method(method)
    state0 = Streams(model).capture()
    buffers0 = Buffers(model).snap()

    # ---- the real step, exactly as a plain one (plus a hook recording the forward order)
    optimizer.zero_grad()
    with first_calls(model) as calls:
        output = model(x)
    loss = loss_fn(output, y)
    with refusing_recomputation(model):  # the extra passes could not rerun checkpointed blocks as measured
        loss.backward()
    distributed.average_gradients_(model.parameters())  # under torchrun: the global batch's G

    plan = _Layers(model, [m for _, m, _ in calls])
    distributed.check_same_everywhere(plan.names, "the layers an ICS step called")  # each layer's passes are collectives
    selected = _measured(plan, layers, kinds)
    measured = [i for i in selected if plan.own[i]]  # frozen layers: NaN rows, no passes
    params = dict(model.named_parameters())
    g_real = {i: [_grad_or_zero(params[n]).clone() for n in plan.own[i]] for i in measured}
    old = _weights_kept_at_t(plan, measured, params)
    if before_step is not None:
        before_step()
    optimizer.step()
    # ---- the extra passes
    new = {n: p.detach() for n, p in params.items()}
    shifted: dict[int, list[torch.Tensor]] = {}
    with leave_no_trace(model) as trace:

        def reset() -> None:  # every pass starts from the buffers and random streams the real pass started from
            trace.reset(buffers0, state0)

        if how is IcsMethod.NAIVE and measured:
            shifted = _naive(model, loss_fn, x, y, plan, measured, old, new, reset)
        elif measured:
            shifted = _fast(model, loss_fn, x, y, plan, measured, old, new, trace, reset, g_real)

    rows = torch.stack([_shift_stats(_flat(g_real[i]), _flat(shifted[i])) for i in measured]).tolist() if measured else []
    by_layer = dict(zip(measured, rows))
    nan = [float("nan")] * len(FIELDS)
    values = {plan.names[i]: ICS(*by_layer.get(i, nan)) for i in selected}
    return ICSResult(values, loss.detach(), tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output), how.value)


def _method(method: IcsMethod | str) -> IcsMethod:
    try:
        return IcsMethod(method)
    except ValueError:
        raise ConfigError(f"unknown ICS method {method!r}; choose from {', '.join(m.value for m in IcsMethod)}") from None


def _weights_kept_at_t(plan: _Layers, measured: list[int], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Copies of W^t for what some pass holds at W^t: the layers from the first measured one on,
    and trainable parameters outside every layer."""
    first = min(measured, default=len(plan.own))
    needed = {n for i, own in enumerate(plan.own) if i >= first for n in own}
    needed |= {n for n, p in params.items() if p.requires_grad and n not in plan.param_layer}
    return {n: params[n].detach().clone() for n in needed}


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)


def _global_grads(model: nn.Module, loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d ``leaves``, zero where the loss does not depend on one (or on none: a replayed pass
    whose layer's parameters this batch leaves unused), and under torchrun the global batch's
    (each process's averaged: every process sends every leaf's, so the sizes agree)."""
    grads = gradients(model, loss, leaves) if loss.requires_grad else [None] * len(leaves)
    full = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, leaves)]
    distributed.average_(full)
    return full


def _mixed(plan: _Layers, i: int, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W^{t+1} for parameters of layers before i, W^t for the rest (never-called modules: W^t)."""
    out = {}
    for n, w in new.items():
        j = plan.param_layer.get(n)
        out[n] = w if j is not None and j < i else old.get(n, w)
    return out


# ----------------------------------------------------------------------------- naive reference


def _naive(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    plan: _Layers,
    measured: list[int],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    reset: Callable[[], None],
) -> dict[int, list[torch.Tensor]]:
    """One extra forward and full backward per layer, on the mixed parameters."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    shifted = {}
    for i in measured:
        mixed = _mixed(plan, i, old, new)
        mixed.update((n, old[n]) for n in plan.own[i])
        leaves = {n: (w.detach().requires_grad_(True) if n in trainable else w) for n, w in mixed.items()}
        reset()
        loss = loss_fn(torch.func.functional_call(model, leaves, (x,)), y)
        names = [n for n in leaves if n in trainable]
        wrt = [leaves[n] for n in names]
        grads = dict(zip(names, _global_grads(model, loss, wrt)))
        shifted[i] = [grads[n] for n in plan.own[i]]
    return shifted


# ----------------------------------------------------------------------------- fast path


def _fast(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    plan: _Layers,
    measured: list[int],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    trace: Trace,
    reset: Callable[[], None],
    g_real: dict[int, list[torch.Tensor]],
) -> dict[int, list[torch.Tensor]]:
    shifted: dict[int, list[torch.Tensor]] = {}
    todo = []
    for i in measured:
        if i == 0:
            shifted[i] = g_real[i]  # nothing runs before the first layer: G' is G
        else:
            todo.append(i)
    if not todo:
        return shifted
    cache = CallCache(model, plan.reach, max(todo), trace.streams)
    slots = ParamSlots(model)
    with cache.installed():
        reset()
        with slots.swapped({n: w for n, w in old.items() if n not in plan.param_layer}):
            cache.record(x)  # updated layers; parameters outside every layer stay at W^t
        for i in todo:
            params = _mixed(plan, i, old, new)
            leaves = [old[n].detach().requires_grad_(True) for n in plan.own[i]]
            params.update(zip(plan.own[i], leaves))
            reset()
            with cache.replay(i), slots.swapped(params):
                loss = loss_fn(model(x), y)
            shifted[i] = _global_grads(model, loss, leaves)
            cache.drop_mutated()
    return shifted


# ----------------------------------------------------------------------------- the trainer's probe


@dataclass
class ICSProbe:
    """Gradient-shift ICS of ``layers`` every ``interval`` steps; computing it is the real step."""

    layers: list[str]
    interval: int
    method: IcsMethod = IcsMethod.FAST
    name: str = "ics"
    performs_step: bool = True
    dataset_attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def constants(self) -> Mapping[str, Any]:
        return {"layer": self.layers}

    def due(self, step: int) -> bool:
        return every(self.interval)(step)

    def compute(self, batch: StepBatch) -> Record:
        exact = [glob.escape(n) for n in self.layers]  # names, not patterns: ModuleDict keys may hold [ ] * ?
        result = gradient_shift(batch.model, batch.loss_fn, batch.x, batch.y, batch.optimizer, layers=exact, method=self.method)
        batch.loss, batch.output = result.loss, result.output
        values = [result[n] for n in self.layers]
        return {key: np.array([getattr(v, key) for v in values]) for key in FIELDS}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: each measurement stands alone."""


def probe_from_config(cfg: Config, layers: list[str]) -> ICSProbe | None:
    ics = cfg.probes.ics
    return ICSProbe(list(layers), ics.every, ics.method) if ics.every > 0 and layers else None

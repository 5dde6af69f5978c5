"""Top Hessian eigenvalue by power iteration on Hessian-vector products.

PyHessian's method, with three differences:

- **BN mode is explicit** (``bn_mode="train"`` by default: batch statistics, the function training
  sees; PyHessian silently switches to eval mode). Running statistics never move (BN's
  ``track_running_stats`` is off during the pass) and other modules keep their mode. With dropout in
  train mode, the one forward fixes one mask (replayed from the current RNG state, which is put back).
- **One forward, one first-order backward** (``create_graph=True``) per call; each iteration is one
  double-backward through that retained graph (BN's made cheap: :mod:`.double_backward`). Per-layer
  blocks share the same first-order graph.
- **Warm start and stated stopping rule**: ``init`` (the previous call's ``vector``) starts the
  iteration near the answer; it stops when the Rayleigh quotient's relative change between two
  iterations is below ``tol`` (or after ``max_iter`` Hessian-vector products). That change is not
  the error: on the benchmark's vgg, runs often end farther than ``tol`` from the top eigenvalue,
  warm or cold, as PyHessian's own runs do. The ``residual`` says how far off it may be;
  :func:`bnprobe.probes.spectrum.top_eigenvalues` stops on an error bound instead.

Power iteration converges to the eigenvalue of **largest magnitude**. Near a minimum that is the top
(most positive) eigenvalue; when the most negative eigenvalue is larger in magnitude, that negative
value is what is returned (the sign tells). ``residual`` = ||Hv - lambda v|| for the returned unit
vector v measures how converged it is (0 for an exact eigenpair); the top eigenvalue varies a lot
from batch to batch, so record ``samples`` with it. Nothing is changed: parameters, buffers,
``.grad`` and RNG states are as before.
"""

from __future__ import annotations

import fnmatch
import glob
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..config import Config, layer_patterns
from ..errors import ConfigError
from ..layers import layer_kind, no_layer_matches, select
from ..passes import BN_MODES, leave_no_trace
from .base import Record, StepBatch, every
from .double_backward import TwiceDifferentiable, refusing_what_has_no_double_backward
from .ics import record_first_calls


class HessianResult(NamedTuple):
    """The eigenvalue of largest magnitude, how it was found, and its unit eigenvector (flat)."""

    eigenvalue: float
    iterations: int  # Hessian-vector products used
    residual: float  # ||H v - eigenvalue v||, v of unit norm
    vector: torch.Tensor  # flat, unit norm, detached: pass as ``init`` next time
    converged: bool = True
    bn_mode: str = "train"
    samples: int = 0


def _check_bn_mode(mode: str) -> None:
    if mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {mode!r} for the Hessian; choose from {', '.join(BN_MODES)}")


def select_params(model: nn.Module, params: Iterable[torch.Tensor | str] | None) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters: all, given ones, or those whose name or owning module matches a glob."""
    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = list(params)
    ids = {id(w) for w in wanted if isinstance(w, torch.Tensor)}
    patterns = [w for w in wanted if isinstance(w, str)]
    canonical = {id(p): n for n, p in named}
    chosen = []
    seen: set[int] = set()
    for mod_name, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            full = f"{mod_name}.{pn}" if mod_name else pn
            if id(p) not in canonical or id(p) in seen:
                continue
            if id(p) in ids or any(fnmatch.fnmatchcase(full, q) or fnmatch.fnmatchcase(mod_name, q) for q in patterns):
                seen.add(id(p))
                chosen.append((canonical[id(p)], p))
    if not chosen:
        raise ConfigError("the Hessian block selects no trainable parameter")
    return chosen


def batch_size_of(x: Any) -> int:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 0


def first_order(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], x: Any, y: Any, ps: list[torch.Tensor], bn_mode: str
) -> tuple[list[torch.Tensor | None], list[nn.Module]]:
    """grad L wrt ``ps`` with its graph kept (for double backward; None where L does not depend on
    p), and the modules with own parameters in the order their first call ended."""
    _check_bn_mode(bn_mode)
    # attention on the math backend: the fused CPU kernels have no double backward
    with (
        record_first_calls(model) as order,
        leave_no_trace(model, bn_mode),
        TwiceDifferentiable(),
        sdpa_kernel([SDPBackend.MATH]),
    ):
        loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    return [g if g is not None and g.requires_grad else None for g in grads], order


HVP = Callable[[torch.Tensor], torch.Tensor]
"""A Hessian-vector product on flat vectors (the parameters' entries concatenated in order)."""


def hvp_function(grads: Sequence[torch.Tensor | None], ps: Sequence[torch.Tensor]) -> HVP:
    """``v -> H v`` for the Hessian of the loss wrt ``ps`` (one double backward through the graph of
    ``grads``, kept for the next call): every spectral method here (power iteration, Lanczos,
    Hutchinson, SLQ) runs on it, and a block's ``grads``/``ps`` give that diagonal block's product.

    One vector per call: batching several through one double backward (``is_grads_batched``) is
    no faster on CPU once BN's double backward is cheap (:mod:`.double_backward`; on VGG with and
    without BN, ResNet-18 and ViT-Tiny one at a time was as fast or faster)."""
    sizes = [p.numel() for p in ps]
    ref = ps[0]
    live = [k for k, g in enumerate(grads) if g is not None]
    live_grads = [g for g in grads if g is not None]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if not live:
            return torch.zeros_like(v)
        parts = v.split(sizes)
        out = torch.autograd.grad(
            live_grads,
            [ps[k] for k in live],
            grad_outputs=[parts[k].view_as(ps[k]) for k in live],
            retain_graph=True,
            allow_unused=True,
        )
        products: dict[int, torch.Tensor | None] = dict(zip(live, out))
        flat = [ref.new_zeros(s) if (h := products.get(k)) is None else h.reshape(-1) for k, s in enumerate(sizes)]
        product = torch.cat(flat)  # zeros only where the loss does not depend on a parameter
        distributed.average_([product])  # under torchrun: the global batch's Hessian times v
        return product

    return hvp


def _power_iteration(
    grads: Sequence[torch.Tensor | None],
    ps: Sequence[torch.Tensor],
    tol: float,
    max_iter: int,
    init: torch.Tensor | Sequence[torch.Tensor] | None,
    seed: int,
) -> tuple[float, int, float, torch.Tensor, bool]:
    n = sum(p.numel() for p in ps)
    hvp = hvp_function(grads, ps)
    v = start_vector(init, n, ps[0], seed)
    previous: float | None = None
    eigenvalue, residual, converged = 0.0, math.nan, False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is read after the loop
        hv = hvp(v)
        lam = torch.dot(v, hv)
        res = torch.linalg.vector_norm(hv - lam * v)
        eigenvalue, residual = float(lam), float(res)  # the stopping rule needs the value on the host
        if not math.isfinite(eigenvalue):
            break
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(previous):
            converged = True
            break
        norm = torch.linalg.vector_norm(hv)
        if float(norm) == 0.0:  # H v = 0: v is an eigenvector with eigenvalue 0
            converged = True
            break
        previous = eigenvalue
        v = hv / norm
    return eigenvalue, iterations, residual, v.detach(), converged


def start_vector(init: torch.Tensor | Sequence[torch.Tensor] | None, n: int, ref: torch.Tensor, seed: int) -> torch.Tensor:
    """The unit start vector: ``init`` (a warm start) when usable, else random from ``seed``."""
    v: torch.Tensor | None = None
    if init is not None:
        v = init.detach().reshape(-1) if isinstance(init, torch.Tensor) else torch.cat([t.detach().reshape(-1) for t in init])
        if v.numel() != n:
            raise ValueError(f"init has {v.numel()} entries, the parameters have {n}")
        v = v.to(device=ref.device, dtype=ref.dtype)
    if v is None or not torch.isfinite(v).all() or float(v.norm()) == 0:
        v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype).to(ref.device)
    return v.div(v.norm())


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: torch.Tensor | Sequence[torch.Tensor] | None = None,
    params: Iterable[torch.Tensor | str] | None = None,
    bn_mode: str = "train",
    seed: int = 0,
) -> HessianResult:
    """The Hessian eigenvalue of largest magnitude on batch (x, y) by power iteration.

    ``params`` restricts the Hessian to a block: parameters, or glob patterns matched against
    parameter names and owning-module names (``"features.3"``, ``"layer1.*"``); default: every
    trainable parameter. ``init``: a start vector (flat, or one tensor per parameter), e.g. the
    previous result's ``vector``; otherwise a random one from ``seed`` (the global RNG is untouched).
    """
    if tol <= 0 or max_iter < 1:
        raise ConfigError(f"power iteration needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    named = select_params(model, params)
    ps = [p for _, p in named]
    grads, _ = first_order(model, loss_fn, x, y, ps, bn_mode)
    with refusing_what_has_no_double_backward(model, x):
        lam, its, res, v, ok = _power_iteration(grads, ps, tol, max_iter, init, seed)
    return HessianResult(lam, its, res, v, ok, bn_mode, batch_size_of(x))


def layer_blocks(
    model: nn.Module,
    order: Sequence[nn.Module],
    ps: Sequence[torch.Tensor],
    layers: Sequence[str] | str | None,
    kinds: Sequence[str] | None,
) -> list[tuple[str, list[int]]]:
    """The selected layers' diagonal blocks in forward ``order``: each layer's name and the indices
    into ``ps`` of its own parameters (layers without one left out); ``layers`` / ``kinds`` select as for ICS."""
    index = {id(p): k for k, p in enumerate(ps)}
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [(names[id(m)], [index[id(p)] for p in m.parameters(recurse=False) if id(p) in index]) for m in order]
    blocks = [(n, list(dict.fromkeys(ks))) for n, ks in blocks if ks]
    patterns = layer_patterns(layers)
    kinds_of = {names[id(m)]: layer_kind(m) for m in order}
    picked = select([(n, kinds_of[n]) for n, _ in blocks], patterns, kinds)
    if not picked:
        raise no_layer_matches(patterns, kinds)
    return [blocks[j] for j in picked]


def hessian_blocks(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    layers: Sequence[str] | str | None = None,
    kinds: Sequence[str] | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    bn_mode: str = "train",
    seed: int = 0,
) -> dict[str, HessianResult]:
    """The top eigenvalue of each probed layer's diagonal Hessian block (its own parameters).

    One forward and one first-order backward serve every block. Layers are in forward order;
    ``layers`` / ``kinds`` select them as for ICS; ``init`` maps layer names to start vectors.
    """
    if tol <= 0 or max_iter < 1:
        raise ConfigError(f"power iteration needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    ps: list[torch.Tensor] = [p for n, p in model.named_parameters() if p.requires_grad]
    grads, order = first_order(model, loss_fn, x, y, ps, bn_mode)
    out = {}
    for name, ks in layer_blocks(model, order, ps, layers, kinds):
        with refusing_what_has_no_double_backward(model, x):
            lam, its, res, v, ok = _power_iteration(
                [grads[k] for k in ks], [ps[k] for k in ks], tol, max_iter, (init or {}).get(name), seed
            )
        out[name] = HessianResult(lam, its, res, v, ok, bn_mode, batch_size_of(x))
    return out


@dataclass
class HessianProbe:
    """Top Hessian eigenvalue every ``interval`` steps, warm-started from the previous eigenvector;
    with ``blocks``, also that of each probed layer's own diagonal block."""

    interval: int
    tol: float
    max_iter: int
    samples: int
    blocks: list[str] | None = None
    bn_mode: str = "train"
    name: str = "hessian"
    performs_step: bool = False
    _vector: torch.Tensor | None = field(default=None, repr=False)
    _block_vectors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def constants(self) -> Mapping[str, Any]:
        return {"block": self.blocks} if self.blocks else {}

    @property
    def dataset_attrs(self) -> Mapping[str, Mapping[str, Any]]:
        return {"hessian/top_eigenvalue": {"bn_mode": self.bn_mode, "samples": self.samples}}

    def due(self, step: int) -> bool:
        return every(self.interval)(step)

    def compute(self, batch: StepBatch) -> Record:
        model, loss_fn, x, y = batch.model, batch.loss_fn, batch.x, batch.y
        r = top_hessian_eigenvalue(model, loss_fn, x, y, tol=self.tol, max_iter=self.max_iter, init=self._vector, bn_mode=self.bn_mode)
        self._vector = r.vector
        row: Record = {"top_eigenvalue": r.eigenvalue, "iterations": r.iterations, "residual": r.residual, "converged": r.converged}
        if self.blocks:
            exact = [glob.escape(n) for n in self.blocks]
            per = hessian_blocks(
                model, loss_fn, x, y, layers=exact, tol=self.tol, max_iter=self.max_iter, init=self._block_vectors, bn_mode=self.bn_mode
            )
            self._block_vectors = {n: b.vector for n, b in per.items()}
            nan = float("nan")  # a block with no trainable parameter
            for key, attr in (("top_eigenvalue", "eigenvalue"), ("iterations", "iterations"), ("residual", "residual")):
                row[f"block_{key}"] = np.array([getattr(per[n], attr) if n in per else nan for n in self.blocks], dtype=np.float64)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"vector": self._vector, "blocks": self._block_vectors} if self._vector is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._vector = state["vector"]
        self._block_vectors = dict(state["blocks"])


def probe_from_config(cfg: Config, layers: list[str]) -> HessianProbe | None:
    h = cfg.probes.hessian
    if not h.enabled:
        return None
    blocks = list(layers) if h.blocks and layers else None
    return HessianProbe(h.every, h.tol, h.max_iter, cfg.batch_size, blocks, h.bn_mode.value)

"""Top Hessian eigenvalue by power iteration on Hessian-vector products.

PyHessian's method, with three differences:

- **BN mode is explicit** (``bn_mode="train"`` by default: batch statistics, the function training
  sees; PyHessian silently switches to eval mode). Running statistics never move (BN's
  ``track_running_stats`` is off during the pass) and other modules keep their mode. With dropout in
  train mode, the one forward fixes one mask (replayed from the current RNG state, which is put back).
- **One forward, one first-order backward** (``create_graph=True``, :mod:`.hvp`) per call; each iteration is one
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

import glob
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .base import Record, StepBatch, every
from .double_backward import refusing_what_has_no_double_backward
from .hvp import HVP, FirstOrderPass, batch_size_of, first_order, hvp_function, layer_blocks
from .lanczos import start_vector
from .params import select_params

__all__ = [  # HVP's building blocks live in hvp (and lanczos, params); they are read from here too
    "HVP",
    "HessianProbe",
    "HessianResult",
    "batch_size_of",
    "first_order",
    "hessian_blocks",
    "hvp_function",
    "layer_blocks",
    "probe_from_config",
    "select_params",
    "start_vector",
    "top_hessian_eigenvalue",
]


class HessianResult(NamedTuple):
    """The eigenvalue of largest magnitude, how it was found, and its unit eigenvector (flat)."""

    eigenvalue: float
    iterations: int  # Hessian-vector products used
    residual: float  # ||H v - eigenvalue v||, v of unit norm
    vector: torch.Tensor  # flat, unit norm, detached: pass as ``init`` next time
    converged: bool = True
    bn_mode: str = "train"
    samples: int = 0


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


def _check(tol: float, max_iter: int) -> None:
    if tol <= 0 or max_iter < 1:
        raise ConfigError(f"power iteration needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")


def _top(
    model: nn.Module, x: Any, p: FirstOrderPass, ks: Sequence[int], tol: float, max_iter: int, init: Any, seed: int, bn_mode: str
) -> HessianResult:
    """Power iteration on the diagonal block of ``p``'s parameters ``ks``, from ``init``."""
    with refusing_what_has_no_double_backward(model, x):
        lam, its, res, v, ok = _power_iteration([p.grads[k] for k in ks], [p.ps[k] for k in ks], tol, max_iter, init, seed)
    return HessianResult(lam, its, res, v, ok, bn_mode, batch_size_of(x))


def _block_tops(
    model: nn.Module,
    x: Any,
    p: FirstOrderPass,
    layers: Sequence[str] | str | None,
    kinds: Sequence[str] | None,
    tol: float,
    max_iter: int,
    init: Mapping[str, torch.Tensor],
    seed: int,
) -> dict[str, HessianResult]:
    """The selected layers' blocks of ``p`` (every trainable parameter's pass), in forward order."""
    chosen = layer_blocks(model, p.order, p.ps, layers, kinds)
    return {name: _top(model, x, p, ks, tol, max_iter, init.get(name), seed, p.bn_mode) for name, ks in chosen}


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
    _check(tol, max_iter)
    ps = [w for _, w in select_params(model, params)]
    p = FirstOrderPass.of(model, loss_fn, x, y, bn_mode, ps)
    return _top(model, x, p, range(len(ps)), tol, max_iter, init, seed, bn_mode)


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
    _check(tol, max_iter)
    p = FirstOrderPass.of(model, loss_fn, x, y, bn_mode)
    return _block_tops(model, x, p, layers, kinds, tol, max_iter, init or {}, seed)


@dataclass
class HessianProbe:
    """Top Hessian eigenvalue every ``interval`` steps, warm-started from the previous eigenvector;
    with ``blocks``, also that of each probed layer's own diagonal block (on the same first-order
    pass: it gives every block's products, as :func:`hessian_blocks`'s own would)."""

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
        """The whole model's and the blocks' eigenvalues, all on one first-order pass."""
        model, x = batch.model, batch.x
        _check(self.tol, self.max_iter)
        p = FirstOrderPass.of(model, batch.loss_fn, x, batch.y, self.bn_mode)
        r = _top(model, x, p, range(len(p.ps)), self.tol, self.max_iter, self._vector, 0, self.bn_mode)
        self._vector = r.vector
        row: Record = {"top_eigenvalue": r.eigenvalue, "iterations": r.iterations, "residual": r.residual, "converged": r.converged}
        if self.blocks:
            exact = [glob.escape(n) for n in self.blocks]
            per = _block_tops(model, x, p, exact, None, self.tol, self.max_iter, self._block_vectors, 0)
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

"""Hessian spectrum: top-k eigenvalues, trace and eigenvalue density, per model and per layer block.

PyHessian's three quantities, on the Hessian-vector products of :mod:`bnprobe.probes.hvp` (one
forward and one first-order backward per call, graph kept; BN mode explicit, ``train`` by default;
nothing changed: parameters, buffers, ``.grad`` and RNG streams are as before):

- **top-k** (:func:`top_eigenvalues`): Lanczos with full reorthogonalisation, the k **largest
  algebraic** eigenvalues (the most positive; near a minimum PyHessian's ``eigenvalues(top_n=k)``
  finds the same ones by power iteration with deflation, which would return a large negative
  eigenvalue instead). It stops when every one of the k Ritz values has an error bound
  ``min(r, r**2 / gap) <= tol * |theta|`` (r = ||H y - theta y|| from the recurrence, gap = distance
  to the nearest other Ritz value less its residual; :func:`bnprobe.probes.lanczos.top_converged`
  says when that sharper bound is trusted), or after ``max_iter`` products. It starts
  from the unit gradient plus ``init`` (the previous call's ``vectors``, summed: a warm start) or
  a random vector (:func:`lanczos_start`). Like any Krylov method it can stop before it has seen
  an eigenvalue its start vector holds little of; the bound is then about another eigenvalue.
- **trace** (:func:`hessian_trace`): Hutchinson's estimator with Rademacher vectors, mean of v'Hv
  and its standard error (sample std / sqrt(samples)).
- **density** (:func:`spectral_density`): stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao
  2019; PyHessian's ``density``): per Rademacher probe vector, ``steps`` Lanczos steps give nodes
  (Ritz values) and weights (squared first components of the tridiagonal's eigenvectors, summing
  to 1); :func:`bnprobe.quadrature.density` broadens them with Gaussians on a grid.

The numerics (Lanczos, its stopping rule, Hutchinson, SLQ) are in :mod:`bnprobe.probes.lanczos`.

Random vectors come from a generator seeded with ``seed`` (reproducible; the global RNG is untouched).
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
from .hvp import FirstOrderPass, batch_size_of, first_order, hvp_function, lanczos_start, layer_blocks
from .lanczos import LanczosResult, TopEigen, lanczos, mean_stderr, quadratic_forms, rademacher, slq, top_k
from .params import select_params

__all__ = [
    "BlockSpectrum",
    "DensityResult",
    "LanczosResult",
    "SpectrumProbe",
    "TopEigen",
    "TraceResult",
    "block_spectra",
    "hessian_trace",
    "lanczos",
    "lanczos_start",
    "probe_from_config",
    "rademacher",
    "record_seed",
    "spectral_density",
    "top_eigenvalues",
]

LossFn = Callable[[Any, Any], torch.Tensor]


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    bn_mode: str = "train",
    params: Iterable[torch.Tensor | str] | None = None,
    seed: int = 0,
) -> TopEigen:
    """The k largest Hessian eigenvalues on batch (x, y) by Lanczos (see the module docstring).

    ``params`` restricts the Hessian to a block as in :func:`~bnprobe.probes.hessian.top_hessian_eigenvalue`;
    ``init``: the previous result's ``vectors`` (or any start vector, flat), for a warm start; with
    k > 1 a warm start can miss an eigenvalue that has risen into the top k (:class:`SpectrumProbe`).
    """
    ps = [p for _, p in select_params(model, params)]
    grads, _ = first_order(model, loss_fn, x, y, ps, bn_mode)
    n = sum(p.numel() for p in ps)
    start = lanczos_start(grads, ps, seed, init)
    with refusing_what_has_no_double_backward(model, x):
        top = top_k(hvp_function(grads, ps), ps[0], n, k, tol, max_iter, start, seed)
    return top._replace(bn_mode=bn_mode, samples=batch_size_of(x))


# ----------------------------------------------------------------------------- trace


class TraceResult(NamedTuple):
    """Hutchinson's trace estimate and its standard error."""

    trace: float
    stderr: float  # sample std / sqrt(samples); NaN with one sample
    samples: int  # Rademacher vectors (Hessian-vector products)
    bn_mode: str = "train"
    batch: int = 0


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    samples: int = 100,
    seed: int = 0,
    bn_mode: str = "train",
    params: Iterable[torch.Tensor | str] | None = None,
) -> TraceResult:
    """tr(H) on batch (x, y) by Hutchinson's estimator over ``samples`` Rademacher vectors."""
    if samples < 1:
        raise ConfigError(f"the trace needs samples >= 1, got {samples}")
    ps = [p for _, p in select_params(model, params)]
    grads, _ = first_order(model, loss_fn, x, y, ps, bn_mode)
    with refusing_what_has_no_double_backward(model, x):
        forms = quadratic_forms(hvp_function(grads, ps), ps, samples, seed)
    trace, stderr = mean_stderr(forms.sum(1))
    return TraceResult(float(trace), float(stderr), samples, bn_mode, batch_size_of(x))


# ----------------------------------------------------------------------------- density


class DensityResult(NamedTuple):
    """Stochastic Lanczos quadrature: nodes and weights per probe vector (each row's weights sum to 1).

    Where Lanczos stopped early (an invariant subspace) a row is padded with node 0 of weight 0.
    The density integrates to 1; ``parameters`` times it counts eigenvalues."""

    nodes: torch.Tensor  # float64 [probes, steps]
    weights: torch.Tensor  # float64 [probes, steps]
    parameters: int
    bn_mode: str = "train"
    batch: int = 0


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    probes: int = 1,
    steps: int = 90,
    seed: int = 0,
    bn_mode: str = "train",
    params: Iterable[torch.Tensor | str] | None = None,
) -> DensityResult:
    """The Hessian's eigenvalue density on batch (x, y) by SLQ: ``probes`` Rademacher vectors, ``steps`` Lanczos steps each."""
    ps = [p for _, p in select_params(model, params)]
    grads, _ = first_order(model, loss_fn, x, y, ps, bn_mode)
    n = sum(p.numel() for p in ps)
    with refusing_what_has_no_double_backward(model, x):
        nodes, weights = slq(hvp_function(grads, ps), ps[0], n, probes, steps, seed)
    return DensityResult(nodes, weights, n, bn_mode, batch_size_of(x))


# ----------------------------------------------------------------------------- per layer block


class BlockSpectrum(NamedTuple):
    """One layer's diagonal Hessian block (its own parameters): top eigenvalue and trace."""

    top: TopEigen  # k = 1
    trace: float  # Hutchinson, from the whole model's Rademacher vectors restricted to the block
    stderr: float  # its standard error (the cross terms with other blocks add to its variance)
    nodes: torch.Tensor | None = None  # SLQ of the block, [probes, steps], when asked for
    weights: torch.Tensor | None = None


def _blocks(
    p: FirstOrderPass,
    blocks: list[tuple[str, list[int]]],
    forms: torch.Tensor | None,
    tol: float,
    max_iter: int,
    init: Mapping[str, torch.Tensor],
    seed: int,
    density: tuple[int, int] = (0, 0),
) -> dict[str, BlockSpectrum]:
    """Top eigenvalue (Lanczos, warm-started from ``init[name]``), trace (from ``forms``, NaN
    without) and, with ``density`` = (probes, steps), the SLQ nodes and weights per block."""
    out = {}
    for name, ks in blocks:
        hvp, ref, n = p.block(ks)
        top = top_k(hvp, ref, n, 1, tol, max_iter, p.start(init.get(name), seed, ks), seed)
        trace, stderr = mean_stderr(forms[:, ks].sum(1)) if forms is not None else (torch.tensor(math.nan), torch.tensor(math.nan))
        nodes, weights = slq(hvp, ref, n, *density, seed) if density[0] > 0 else (None, None)
        out[name] = BlockSpectrum(top, float(trace), float(stderr), nodes, weights)
    return out


def block_spectra(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    layers: Sequence[str] | str | None = None,
    kinds: Sequence[str] | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    samples: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    bn_mode: str = "train",
    seed: int = 0,
    density_probes: int = 0,
    density_steps: int = 90,
) -> dict[str, BlockSpectrum]:
    """Top eigenvalue and trace of each probed layer's diagonal Hessian block, in forward order.

    One forward and first-order backward serve all; the traces come from the same ``samples``
    whole-model Rademacher products (so they sum to the whole trace's estimate when the blocks
    cover every parameter). ``layers`` / ``kinds`` select as for ICS; ``init`` maps names to start vectors.
    ``density_probes`` > 0 adds each block's SLQ nodes and weights (``density_steps`` Lanczos steps).
    """
    p = FirstOrderPass.of(model, loss_fn, x, y, bn_mode)
    with refusing_what_has_no_double_backward(model, x):
        forms = quadratic_forms(hvp_function(p.grads, p.ps), p.ps, samples, seed) if samples > 0 else None
        chosen = layer_blocks(model, p.order, p.ps, layers, kinds)
        out = _blocks(p, chosen, forms, tol, max_iter, init or {}, seed, (density_probes, density_steps))
    return {name: b._replace(top=b.top._replace(bn_mode=bn_mode, samples=batch_size_of(x))) for name, b in out.items()}


# ----------------------------------------------------------------------------- the probe


def record_seed(seed: int, step: int) -> int:
    """The random vectors' seed of the record at ``step``: fresh per record, equal in a resumed run."""
    return (seed * 1_000_003 + step) % 2**63


@dataclass
class SpectrumProbe:
    """Top-k eigenvalues, trace and SLQ density every ``interval`` steps; with ``blocks``, also each
    probed layer's block top eigenvalue and trace.

    The top eigenvalue (k = 1, and each block's) starts warm, from the previous record's vector
    (plus the gradient, :func:`lanczos_start`): fewer products per record than a cold start, at the
    same accuracy. Top-k starts cold: warm starts (all previous vectors, the top one, either plus a
    random vector) sometimes missed an eigenvalue newly risen into the top k, and saved few products."""

    interval: int
    k: int
    tol: float
    max_iter: int
    trace_samples: int  # 0: no trace
    density_probes: int  # 0: no density
    density_steps: int
    bn_mode: str
    samples: int  # batch size, recorded with the values
    blocks: list[str] | None = None
    seed: int = 0
    block_density: bool = False  # with blocks: each block's SLQ density too (probes x steps products per block)
    name: str = "spectrum"
    performs_step: bool = False
    _vectors: torch.Tensor | None = field(default=None, repr=False)
    _block_vectors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _parameters: int = field(default=0, repr=False)

    @property
    def constants(self) -> Mapping[str, Any]:
        return {"block": self.blocks} if self.blocks else {}

    @property
    def dataset_attrs(self) -> Mapping[str, Mapping[str, Any]]:
        common = {"bn_mode": self.bn_mode, "samples": self.samples, "parameters": self._parameters}
        attrs: dict[str, Mapping[str, Any]] = {f"{self.name}/top_k": common | {"tol": self.tol, "max_iter": self.max_iter}}
        if self.trace_samples:
            attrs[f"{self.name}/trace"] = common | {"vectors": self.trace_samples}
        if self.density_probes:
            attrs[f"{self.name}/density_nodes"] = common | {"probes": self.density_probes, "steps": self.density_steps}
        return attrs

    def due(self, step: int) -> bool:
        return every(self.interval)(step)

    def compute(self, batch: StepBatch) -> Record:
        model, x = batch.model, batch.x
        p = FirstOrderPass.of(model, batch.loss_fn, x, batch.y, self.bn_mode)
        self._parameters = p.n
        seed = record_seed(self.seed, batch.step)
        whole = hvp_function(p.grads, p.ps)
        with refusing_what_has_no_double_backward(model, x):
            top = top_k(whole, p.ps[0], p.n, self.k, self.tol, self.max_iter, p.start(self._vectors, seed), seed)
            self._vectors = top.vectors if self.k == 1 else None  # top-k starts cold (class docstring): k model-sized vectors less to hold
            row: Record = {
                "top_k": top.values.numpy(),
                "top_k_residual": top.residuals.numpy(),
                "iterations": top.iterations,
                "converged": top.converged,
            }
            forms = quadratic_forms(whole, p.ps, self.trace_samples, seed) if self.trace_samples else None
            if forms is not None:
                trace, stderr = mean_stderr(forms.sum(1))
                row |= {"trace": float(trace), "trace_stderr": float(stderr)}
            if self.density_probes:
                nodes, weights = slq(whole, p.ps[0], p.n, self.density_probes, self.density_steps, seed)
                row |= {"density_nodes": nodes.numpy(), "density_weights": weights.numpy()}
            if self.blocks:
                row |= self._block_row(p, model, forms, seed)
        return row

    def _block_row(self, p: FirstOrderPass, model: nn.Module, forms: torch.Tensor | None, seed: int) -> Record:
        assert self.blocks is not None
        chosen = layer_blocks(model, p.order, p.ps, [glob.escape(n) for n in self.blocks], None)
        density = (self.density_probes, self.density_steps) if self.block_density else (0, 0)
        per = _blocks(p, chosen, forms, self.tol, self.max_iter, self._block_vectors, seed, density)
        self._block_vectors = {n: b.top.vectors for n, b in per.items()}
        nan = math.nan  # a probed layer without trainable parameters
        columns: dict[str, Callable[[BlockSpectrum], float]] = {
            "block_top_eigenvalue": lambda b: float(b.top.values[0]),
            "block_iterations": lambda b: float(b.top.iterations),
            "block_residual": lambda b: float(b.top.residuals[0]),
            "block_trace": lambda b: b.trace,
            "block_trace_stderr": lambda b: b.stderr,
        }
        row: Record = {
            key: np.array([get(per[n]) if n in per else nan for n in self.blocks], dtype=np.float64) for key, get in columns.items()
        }
        if self.block_density:  # [blocks, probes, steps]; a block without parameters has weight 0 everywhere
            empty = torch.zeros(self.density_probes, self.density_steps, dtype=torch.float64)
            for key in ("nodes", "weights"):
                row[f"block_density_{key}"] = torch.stack([getattr(per[n], key) if n in per else empty for n in self.blocks]).numpy()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self._vectors, "blocks": self._block_vectors} if self._vectors is not None or self._block_vectors else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._vectors = state["vectors"]
        self._block_vectors = dict(state["blocks"])


def probe_from_config(cfg: Config, layers: list[str]) -> SpectrumProbe | None:
    s = cfg.probes.spectrum
    if not s.enabled:
        return None
    return SpectrumProbe(
        interval=s.every,
        k=s.k,
        tol=s.tol,
        max_iter=s.max_iter,
        trace_samples=s.trace_samples,
        density_probes=s.density_probes,
        density_steps=s.density_steps,
        bn_mode=cfg.probes.hessian.bn_mode.value,
        samples=cfg.batch_size,
        blocks=list(layers) if s.blocks and layers else None,
        seed=cfg.seed,
        block_density=s.block_density,
    )

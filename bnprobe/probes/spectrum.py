"""Hessian spectrum: top-k eigenvalues, trace and eigenvalue density, per model and per layer block.

PyHessian's three quantities, on the Hessian-vector products of :mod:`bnprobe.probes.hessian` (one
forward and one first-order backward per call, graph kept; BN mode explicit, ``train`` by default;
nothing changed: parameters, buffers, ``.grad`` and RNG streams are as before):

- **top-k** (:func:`top_eigenvalues`): Lanczos with full reorthogonalisation, the k **largest
  algebraic** eigenvalues (the most positive; near a minimum PyHessian's ``eigenvalues(top_n=k)``
  finds the same ones by power iteration with deflation, which would return a large negative
  eigenvalue instead). It stops when every one of the k Ritz values has an error bound
  ``min(r, r**2 / gap) <= tol * |theta|`` (r = ||H y - theta y|| from the recurrence, gap = distance
  to the nearest other Ritz value less its residual), or after ``max_iter`` products. It starts
  from the unit gradient plus ``init`` (the previous call's ``vectors``, summed: a warm start) or
  a random vector (:func:`lanczos_start`). Like any Krylov method it can stop before it has seen
  an eigenvalue its start vector holds little of; the bound is then about another eigenvalue.
- **trace** (:func:`hessian_trace`): Hutchinson's estimator with Rademacher vectors, mean of v'Hv
  and its standard error (sample std / sqrt(samples)).
- **density** (:func:`spectral_density`): stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao
  2019; PyHessian's ``density``): per Rademacher probe vector, ``steps`` Lanczos steps give nodes
  (Ritz values) and weights (squared first components of the tridiagonal's eigenvectors, summing
  to 1); :func:`bnprobe.quadrature.density` broadens them with Gaussians on a grid.

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

from .. import distributed
from ..config import Config
from ..errors import ConfigError
from .base import Record, StepBatch, every
from .double_backward import refusing_what_has_no_double_backward
from .hessian import (
    HVP,
    batch_size_of,
    first_order,
    hvp_function,
    layer_blocks,
    select_params,
    start_vector,
)

LossFn = Callable[[Any, Any], torch.Tensor]
Stop = Callable[[torch.Tensor, torch.Tensor], bool]  # (Ritz values ascending, their residuals) -> done


class LanczosResult(NamedTuple):
    """m Lanczos steps: the tridiagonal's eigen-decomposition and the orthonormal basis."""

    values: torch.Tensor  # Ritz values, ascending, float64 [m]
    eigvecs: torch.Tensor  # eigenvectors of the tridiagonal T (columns), float64 [m, m]
    residuals: torch.Tensor  # ||H y_i - theta_i y_i|| = beta_m |s_{m,i}| (exact arithmetic), float64 [m]
    basis: torch.Tensor  # Lanczos vectors (rows), orthonormal, dtype and device of the products [m, n]
    steps: int  # Hessian-vector products used

    @property
    def weights(self) -> torch.Tensor:
        """Gauss quadrature weights of the start vector: squared first components, summing to 1."""
        return self.eigvecs[0].square()

    def ritz_vectors(self, count: int) -> torch.Tensor:
        """The ``count`` Ritz vectors of the largest Ritz values, largest first [count, n]."""
        s = self.eigvecs[:, -count:].flip(1).to(self.basis.dtype).to(self.basis.device)
        return (s.T @ self.basis).detach()


_DGKS = 1 / math.sqrt(2)  # a pass that leaves less than this of w's norm is repeated


def _orthogonalised(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``w`` less its projection on the rows of ``basis``, and its norm. A second pass only where
    the first cut ``w``'s norm below 1/sqrt(2) of what it was, the case where one pass can leave it
    visibly non-orthogonal (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough", Kahan/Parlett)."""
    before = float(w.norm())
    for _ in range(2):
        w = w - torch.mv(basis.T, torch.mv(basis, w))
        after = float(w.norm())
        if after > _DGKS * before:
            break
        before = after
    return w, after


def _tridiagonal_eigh(alpha: list[float], beta: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues, eigenvectors and residual norms of the Ritz pairs of T = tridiag(beta[:-1], alpha, beta[:-1])."""
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    off = torch.tensor(beta[:-1], dtype=torch.float64)
    t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    return values, vectors, beta[-1] * vectors[-1].abs()


def lanczos(
    hvp: HVP,
    n: int,
    k_steps: int,
    init: torch.Tensor | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    restart: bool = True,
    stop: Stop | None = None,
) -> LanczosResult:
    """At most ``k_steps`` (and n) Lanczos steps on ``hvp`` from ``init`` (flat), else
    a random unit vector from ``seed``; every new vector is reorthogonalised against all before.

    The recurrence (alpha, beta) is kept in float64, the basis (steps x n entries) in ``dtype``.
    On breakdown (beta ~ 0: an invariant subspace was found, its Ritz values are exact) it goes on
    from a random vector orthogonal to the basis with ``restart`` (beta = 0 there), else it stops.
    ``stop(values, residuals)`` ends it early.
    """
    if k_steps < 1 or n < 1:
        raise ConfigError(f"Lanczos needs k_steps >= 1 and n >= 1, got k_steps={k_steps}, n={n}")
    cap = min(k_steps, n)
    ref = torch.empty(0, dtype=dtype, device=device)
    restarts = torch.Generator().manual_seed(seed + 1)
    basis = torch.empty(min(cap, 16), n, dtype=dtype, device=device)  # grows: memory follows the steps taken; rows past j unread
    q = start_vector(init, n, ref, seed)
    alpha: list[float] = []
    beta: list[float] = []  # beta[j] couples vectors j and j+1; the last one is the residual factor
    eps = torch.finfo(dtype).eps
    for j in range(cap):
        if j == len(basis):
            basis = torch.cat([basis, torch.empty(min(cap, 2 * j) - j, n, dtype=dtype, device=device)])
        basis[j] = q
        w = hvp(q)
        scale = float(w.norm())
        alpha.append(float(torch.dot(q, w)))
        w = torch.sub(w, q, alpha=alpha[-1])  # a new tensor: the caller's product is left as it was
        if j:
            w.sub_(basis[j - 1], alpha=beta[-1])
        w, norm = _orthogonalised(w, basis[: j + 1])
        beta.append(norm)
        if j + 1 == cap or (stop is not None and stop(*_tridiagonal_eigh(alpha, beta)[::2])):
            break
        if beta[-1] > 100 * eps * scale:
            q = w / beta[-1]
            continue
        beta[-1] = 0.0  # breakdown: the Krylov space is invariant
        fresh, norm = _orthogonalised(torch.randn(n, generator=restarts, dtype=dtype).to(ref.device), basis[: j + 1])
        if not restart or norm == 0.0:
            break
        q = fresh / norm
    values, vectors, residuals = _tridiagonal_eigh(alpha, beta)
    return LanczosResult(values, vectors, residuals, basis[: len(alpha)], len(alpha))


def _top_converged(k: int, tol: float) -> Stop:
    """Done when each of the k largest Ritz values has error bound min(r, r**2/gap) <= tol * |theta|.

    ``gap`` estimates the distance from theta's eigenvalue to the next one: the distance to each
    other Ritz value less that value's own residual (it stands for an eigenvalue somewhere within
    it), the smallest of these, at least 0 (then the bound is r). With the bare distance between
    Ritz values, an unresolved near-degenerate pair passed with an error above tol; with the
    residuals none did, for a few more products."""

    def done(values: torch.Tensor, residuals: torch.Tensor) -> bool:
        if len(values) < k:
            return False
        top, res = values[-k:], residuals[-k:]
        gaps = (top[:, None] - values[None, :]).abs() - residuals[None, :]
        gaps[:, -k:].fill_diagonal_(math.inf)  # each value's distance to itself
        gap = gaps.min(1).values.clamp_min(0)
        known = (gap > 0) & gap.isfinite()  # no other value, or one whose residual reaches theta: no gap known
        bound = torch.where(known, torch.minimum(res, res.square() / gap), res)
        return bool((bound <= tol * top.abs()).all())

    return done


class TopEigen(NamedTuple):
    """The k largest (algebraic) Hessian eigenvalues, largest first, and how they were found."""

    values: torch.Tensor  # float64 [k], descending
    residuals: torch.Tensor  # ||H v - theta v|| per value from the recurrence, float64 [k]
    vectors: torch.Tensor  # [k, n] unit Ritz vectors, detached: pass as ``init`` next time
    iterations: int  # Hessian-vector products used
    converged: bool
    bn_mode: str = "train"
    samples: int = 0  # batch size


def lanczos_start(
    grads: Sequence[torch.Tensor | None], ps: Sequence[torch.Tensor], seed: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Lanczos's start vector: the unit gradient plus a unit vector, the previous result's ``init``
    (rows summed: a warm start) or, without, a random one from ``seed``.

    The gradient lies mostly in the top eigenvectors' span (Gur-Ari, Roberts & Dyer 2018). Cold, it
    saves products, and makes their number depend less on the seed; the random half keeps every
    eigenvector in reach. Warm, it keeps the start from being (nearly) an eigenvector whose
    eigenvalue has since fallen below the top: from the previous vector alone, Lanczos sometimes
    stopped at such an eigenvalue, well below the top; with the gradient it did not. (Top-k with
    k > 1 is another matter: see :class:`SpectrumProbe`.) With no usable gradient (zero, not
    finite) the start is the unit vector alone."""
    n = sum(p.numel() for p in ps)
    if init is not None and init.numel() % n:
        raise ValueError(f"init has {init.numel()} entries, not a multiple of the parameters' {n}")
    v = start_vector(None if init is None else init.reshape(-1, n).sum(0), n, ps[0], seed)
    g = torch.cat([p.new_zeros(p.numel()) if t is None else t.detach().reshape(-1) for t, p in zip(grads, ps)]).to(v.dtype)
    distributed.average_([g])  # under torchrun: the global batch's gradient, so every process starts alike
    norm = float(g.norm())
    return v + g / norm if math.isfinite(norm) and norm > 0 else v


def _top_k(hvp: HVP, ref: torch.Tensor, n: int, k: int, tol: float, max_iter: int, start: torch.Tensor, seed: int) -> TopEigen:
    """Lanczos from ``start`` (:func:`lanczos_start`'s) until :func:`_top_converged`."""
    if k < 1 or tol <= 0 or max_iter < 1:
        raise ConfigError(f"Lanczos needs k >= 1, tol > 0 and max_iter >= 1, got k={k}, tol={tol}, max_iter={max_iter}")
    k = min(k, n)
    done = _top_converged(k, tol)
    r = lanczos(hvp, n, max_iter, start, seed, dtype=ref.dtype, device=ref.device, stop=done)
    converged = done(r.values, r.residuals) or r.steps == n
    return TopEigen(r.values[-k:].flip(0), r.residuals[-k:].flip(0), r.ritz_vectors(k), r.steps, converged)


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
        top = _top_k(hvp_function(grads, ps), ps[0], n, k, tol, max_iter, start, seed)
    return top._replace(bn_mode=bn_mode, samples=batch_size_of(x))


# ----------------------------------------------------------------------------- trace


def rademacher(n: int, generator: torch.Generator, ref: torch.Tensor) -> torch.Tensor:
    """n independent signs (+1 or -1 with probability 1/2) in ``ref``'s dtype and device."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1
    return signs.to(dtype=ref.dtype, device=ref.device)


def _quadratic_forms(hvp: HVP, ps: Sequence[torch.Tensor], samples: int, seed: int) -> torch.Tensor:
    """v'Hv split by parameter, for ``samples`` Rademacher v: float64 [samples, parameters].

    A row's sum is Hutchinson's sample of tr(H); the sum over a block's parameters is an unbiased
    sample of that diagonal block's trace (its cross terms with other blocks have mean zero)."""
    sizes = [p.numel() for p in ps]
    generator = torch.Generator().manual_seed(seed)
    forms = []
    for _ in range(samples):
        v = rademacher(sum(sizes), generator, ps[0])
        forms.append(torch.stack([part.sum() for part in (v * hvp(v)).split(sizes)]))
    return torch.stack(forms).double().cpu()


class TraceResult(NamedTuple):
    """Hutchinson's trace estimate and its standard error."""

    trace: float
    stderr: float  # sample std / sqrt(samples); NaN with one sample
    samples: int  # Rademacher vectors (Hessian-vector products)
    bn_mode: str = "train"
    batch: int = 0


def _estimate(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error (sample std / sqrt(m), NaN for m = 1) of the m samples along dim 0."""
    m = values.shape[0]
    stderr = values.std(0) / math.sqrt(m) if m > 1 else torch.full_like(values[0], math.nan)
    return values.mean(0), stderr


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
        forms = _quadratic_forms(hvp_function(grads, ps), ps, samples, seed)
    trace, stderr = _estimate(forms.sum(1))
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


def _slq(hvp: HVP, ref: torch.Tensor, n: int, probes: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if probes < 1 or steps < 1:
        raise ConfigError(f"the density needs probes >= 1 and steps >= 1, got probes={probes}, steps={steps}")
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(probes, steps, dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    for i in range(probes):
        v = rademacher(n, generator, ref)
        r = lanczos(hvp, n, steps, v, seed, dtype=ref.dtype, device=ref.device, restart=False)
        nodes[i, : r.steps], weights[i, : r.steps] = r.values, r.weights
    return nodes, weights


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
        nodes, weights = _slq(hvp_function(grads, ps), ps[0], n, probes, steps, seed)
    return DensityResult(nodes, weights, n, bn_mode, batch_size_of(x))


# ----------------------------------------------------------------------------- per layer block


class BlockSpectrum(NamedTuple):
    """One layer's diagonal Hessian block (its own parameters): top eigenvalue and trace."""

    top: TopEigen  # k = 1
    trace: float  # Hutchinson, from the whole model's Rademacher vectors restricted to the block
    stderr: float  # its standard error (the cross terms with other blocks add to its variance)
    nodes: torch.Tensor | None = None  # SLQ of the block, [probes, steps], when asked for
    weights: torch.Tensor | None = None


@dataclass
class _Pass:
    """One forward and first-order backward (graph kept) that every product of a measurement runs on."""

    ps: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    order: list[nn.Module]

    @classmethod
    def of(cls, model: nn.Module, loss_fn: LossFn, x: Any, y: Any, bn_mode: str) -> _Pass:
        ps: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        if not ps:
            raise ConfigError("the Hessian needs a trainable parameter; the model has none")
        grads, order = first_order(model, loss_fn, x, y, ps, bn_mode)
        return cls(ps, grads, order)

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.ps)

    def block(self, ks: Sequence[int]) -> tuple[HVP, torch.Tensor, int]:
        """The diagonal block of parameters ``ks``: its product, a reference tensor and its size."""
        ps = [self.ps[k] for k in ks]
        return hvp_function([self.grads[k] for k in ks], ps), ps[0], sum(p.numel() for p in ps)

    def start(self, init: torch.Tensor | None, seed: int, ks: Sequence[int] | None = None) -> torch.Tensor:
        """:func:`lanczos_start` on the block ``ks`` (every parameter without)."""
        ks = range(len(self.ps)) if ks is None else ks
        return lanczos_start([self.grads[k] for k in ks], [self.ps[k] for k in ks], seed, init)


def _blocks(
    p: _Pass,
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
        top = _top_k(hvp, ref, n, 1, tol, max_iter, p.start(init.get(name), seed, ks), seed)
        trace, stderr = _estimate(forms[:, ks].sum(1)) if forms is not None else (torch.tensor(math.nan), torch.tensor(math.nan))
        nodes, weights = _slq(hvp, ref, n, *density, seed) if density[0] > 0 else (None, None)
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
    p = _Pass.of(model, loss_fn, x, y, bn_mode)
    with refusing_what_has_no_double_backward(model, x):
        forms = _quadratic_forms(hvp_function(p.grads, p.ps), p.ps, samples, seed) if samples > 0 else None
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
        p = _Pass.of(model, batch.loss_fn, x, batch.y, self.bn_mode)
        self._parameters = p.n
        seed = record_seed(self.seed, batch.step)
        whole = hvp_function(p.grads, p.ps)
        with refusing_what_has_no_double_backward(model, x):
            top = _top_k(whole, p.ps[0], p.n, self.k, self.tol, self.max_iter, p.start(self._vectors, seed), seed)
            self._vectors = top.vectors if self.k == 1 else None  # top-k starts cold (class docstring): k model-sized vectors less to hold
            row: Record = {
                "top_k": top.values.numpy(),
                "top_k_residual": top.residuals.numpy(),
                "iterations": top.iterations,
                "converged": top.converged,
            }
            forms = _quadratic_forms(whole, p.ps, self.trace_samples, seed) if self.trace_samples else None
            if forms is not None:
                trace, stderr = _estimate(forms.sum(1))
                row |= {"trace": float(trace), "trace_stderr": float(stderr)}
            if self.density_probes:
                nodes, weights = _slq(whole, p.ps[0], p.n, self.density_probes, self.density_steps, seed)
                row |= {"density_nodes": nodes.numpy(), "density_weights": weights.numpy()}
            if self.blocks:
                row |= self._block_row(p, model, forms, seed)
        return row

    def _block_row(self, p: _Pass, model: nn.Module, forms: torch.Tensor | None, seed: int) -> Record:
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

"""Krylov numerics on a symmetric operator given only as a matrix-vector product (a Hessian-vector
product, :mod:`bnprobe.probes.hvp`): Lanczos with full reorthogonalisation, its top-k stopping rule,
Hutchinson's quadratic forms and stochastic Lanczos quadrature. Pure tensor math: no model here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..errors import ConfigError

MatVec = Callable[[torch.Tensor], torch.Tensor]
"""``v -> A v`` for a symmetric A, on flat vectors."""
Stop = Callable[[torch.Tensor, torch.Tensor], bool]  # (Ritz values ascending, their residuals) -> done


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
    hvp: MatVec,
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


#: the quadratic bound r**2/gap is used only where the Ritz value at the other end of the gap has a
#: residual at most this fraction of the gap: the eigenvalue it stands for is clear of theta's
RESOLVED = 0.25


def top_converged(k: int, tol: float) -> Stop:
    """Done when each of the k largest Ritz values theta has r <= tol * |theta|, or has
    r**2/gap <= tol * |theta| and moved by at most tol * |theta| since the previous step.
    Called once per step, in order.

    r bounds the distance from theta to some eigenvalue. r**2/gap (Kato-Temple) holds only if no
    other eigenvalue lies within ``gap`` of theta, which the Ritz values cannot show while the
    spectrum near theta is unresolved. So ``gap`` is the distance to the nearest other Ritz value
    less that value's residual, and it is trusted only when that value has itself converged (its
    residual at most :data:`RESOLVED` of the gap). And a top value that still moves by more than
    tol mixes eigenvalues the Krylov space has not separated yet (no Ritz value stands for them),
    whatever r**2/gap says. Trusting the gap to any Ritz value, without the second condition,
    stopped after a few products on close top eigenvalues with values off by many times tol."""
    previous: list[torch.Tensor] = []

    def done(values: torch.Tensor, residuals: torch.Tensor) -> bool:
        if len(values) < k:
            return False
        top, res = values[-k:], residuals[-k:]
        gaps = (top[:, None] - values[None, :]).abs() - residuals[None, :]
        gaps[:, -k:].fill_diagonal_(math.inf)  # each value's distance to itself
        gap, nearest = gaps.min(1)
        gap = gap.clamp_min(0)
        known = (gap > 0) & gap.isfinite() & (residuals[nearest] <= RESOLVED * gap)
        moved = (top - previous[-1]).abs() if previous and len(previous[-1]) == k else torch.full_like(top, math.inf)
        previous[:] = [top]
        limit = tol * top.abs()
        quadratic = known & (res.square() <= limit * gap) & (moved <= limit)
        return bool(((res <= limit) | quadratic).all())

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


def top_k(hvp: MatVec, ref: torch.Tensor, n: int, k: int, tol: float, max_iter: int, start: torch.Tensor, seed: int) -> TopEigen:
    """The k largest eigenvalues: Lanczos from ``start`` (:func:`bnprobe.probes.hvp.lanczos_start`'s)
    until :func:`top_converged` holds."""
    if k < 1 or tol <= 0 or max_iter < 1:
        raise ConfigError(f"Lanczos needs k >= 1, tol > 0 and max_iter >= 1, got k={k}, tol={tol}, max_iter={max_iter}")
    k = min(k, n)
    done = top_converged(k, tol)
    r = lanczos(hvp, n, max_iter, start, seed, dtype=ref.dtype, device=ref.device, stop=done)
    converged = done(r.values, r.residuals) or r.steps == n
    return TopEigen(r.values[-k:].flip(0), r.residuals[-k:].flip(0), r.ritz_vectors(k), r.steps, converged)


# ----------------------------------------------------------------------------- Hutchinson and SLQ


def rademacher(n: int, generator: torch.Generator, ref: torch.Tensor) -> torch.Tensor:
    """n independent signs (+1 or -1 with probability 1/2) in ``ref``'s dtype and device."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1
    return signs.to(dtype=ref.dtype, device=ref.device)


def quadratic_forms(hvp: MatVec, ps: Sequence[torch.Tensor], samples: int, seed: int) -> torch.Tensor:
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


def mean_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error (sample std / sqrt(m), NaN for m = 1) of the m samples along dim 0."""
    m = values.shape[0]
    stderr = values.std(0) / math.sqrt(m) if m > 1 else torch.full_like(values[0], math.nan)
    return values.mean(0), stderr


def slq(hvp: MatVec, ref: torch.Tensor, n: int, probes: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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

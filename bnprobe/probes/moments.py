"""Activation moments (DESIGN 1.3): statistics of each probed layer's output, computed on the
device in float32 or wider, with no host synchronisation until the recorder flushes.

Conventions (the tests check them against numpy):
- ``var`` is the population variance (divide by n); ``skewness`` = m3 / m2^1.5 and ``kurtosis``
  is the *excess* kurtosis m4 / m2^2 - 3, from central moments m_k; 0 when the variance is 0.
- ``zero_fraction`` counts exact zeros (dead ReLUs, pruned units).
- ``p15``, ``p50``, ``p85`` are linear-interpolation quantiles of a uniform random subsample of
  ``samples`` elements drawn with replacement (all elements when there are fewer): the 15/50/85th
  percentiles Ioffe & Szegedy plot. With 16,384 samples the standard error of a percentile is
  about 0.004 in probability (sqrt(p(1-p)/n)), well below what their plots resolve.
"""

from __future__ import annotations

import torch

from ..store import STATS

QUANTILES = (0.15, 0.50, 0.85)
DEFAULT_SAMPLES = 16384


def _subsample(flat: torch.Tensor, samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """``flat`` is [rows, n]; pick ``samples`` columns (with replacement) when n is larger."""
    n = flat.shape[-1]
    if n <= samples:
        return flat
    idx = torch.randint(n, (samples,), device=flat.device, generator=generator)
    return flat.index_select(-1, idx)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products through BLAS: no temporary the size of the activation."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(-1)


def moment_stats(
    x: torch.Tensor,
    per_channel: bool = False,
    samples: int = DEFAULT_SAMPLES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The statistics of ``STATS`` for one activation tensor, as a ``[len(STATS)]`` tensor.

    With ``per_channel`` the result is ``[len(STATS), channels]``, channels on dim 1 (N, C, ...).
    """
    x = x.detach()
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if per_channel and x.dim() >= 2:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    else:
        flat = x.reshape(1, -1)
    n = flat.shape[1]
    if n == 0:  # an empty activation (a zero-size feature map) has no statistics: NaN, not a crash
        empty = torch.full((len(STATS), flat.shape[0]), float("nan"), dtype=flat.dtype, device=flat.device)
        return empty if per_channel and x.dim() >= 2 else empty[:, 0]
    mean = flat.sum(dim=1) / n
    centred = flat - mean[:, None]
    sq = centred.square()
    var = sq.sum(dim=1) / n
    m3 = _rowdot(sq, centred) / n
    m4 = _rowdot(sq, sq) / n
    safe_var = torch.where(var > 0, var, torch.ones_like(var))
    skew = torch.where(var > 0, m3 / safe_var.pow(1.5), torch.zeros_like(var))
    kurt = torch.where(var > 0, m4 / (safe_var * safe_var) - 3.0, torch.zeros_like(var))
    if flat.shape[0] == 1:  # whole-tensor reductions are several times faster than dim=1 ones on CPU
        lo, hi = (v.reshape(1) for v in torch.aminmax(flat))
        zeros = torch.sum(flat == 0, dtype=torch.int32).reshape(1).to(flat.dtype) / n
    else:
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        zeros = torch.sum(flat == 0, dim=1, dtype=torch.int32).to(flat.dtype) / n
    q = torch.tensor(QUANTILES, dtype=flat.dtype).to(flat.device, non_blocking=True)
    pct = torch.quantile(_subsample(flat, samples, generator), q, dim=1)
    out = torch.stack([mean, var, skew, kurt, lo, hi, zeros, pct[0], pct[1], pct[2]])
    return out if per_channel and x.dim() >= 2 else out[:, 0]


def histogram(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """Counts in ``bins`` equal bins over [low, high]; values outside are clamped into the end bins."""
    flat = x.detach().reshape(-1).float().clamp(low, high)
    return torch.histc(flat, bins=bins, min=low, max=high)

"""Moment statistics of one layer's output sharded over processes (torchrun), merged into the
global batch's: each process computes its shard's :class:`~bnprobe.probes.moments.Partial`, and
one gather brings every shard's to every process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import distributed
from .moments import Partial, standardised


def _merged_raw(raw: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``raw`` [shards, 7, K] of shards with ``n`` [shards, K] elements each, as one [7, K]: with
    means mu_r and central moments M_k,r = n_r m_k,r about them (from variance, skewness and
    kurtosis), around the global mean mu
    (d = mu_r - mu): M2 = sum M2_r + n_r d^2, M3 = sum M3_r + 3 d M2_r + n_r d^3,
    M4 = sum M4_r + 4 d M3_r + 6 d^2 M2_r + n_r d^4 (Chan et al. 1979, Pebay 2008), in float64.
    Min and max are the extremes, zero fractions count-weighted."""
    total = n.sum(0)
    var_r = raw[:, 1]
    mean_r, m2_r, m3_r, m4_r = raw[:, 0], n * var_r, n * raw[:, 2] * var_r**1.5, n * (raw[:, 3] + 3) * var_r**2
    mean = (n * mean_r).sum(0) / total
    d = mean_r - mean
    m2 = (m2_r + n * d**2).sum(0)
    m3 = (m3_r + 3 * d * m2_r + n * d**3).sum(0)
    m4 = (m4_r + 4 * d * m3_r + 6 * d**2 * m2_r + n * d**4).sum(0)
    zeros = (n * raw[:, 6]).sum(0) / total
    m2, skew, kurt = standardised(torch.zeros_like(total), m2 / total, m3 / total, m4 / total)
    return torch.stack([mean, m2, skew, kurt, raw[:, 4].amin(0), raw[:, 5].amax(0), zeros])


def merged_across_processes(parts: Sequence[Partial]) -> list[Partial]:
    """Each of ``parts`` merged with the same layer's part in every other process (under torchrun;
    ``parts`` itself in one process): one gather and one merge for all layers together, and no
    host synchronisation. Every process's shard has the same shape, hence the same counts."""
    processes = distributed.world_size()
    if processes == 1 or not parts:
        return list(parts)
    widths = [p.raw.reshape(7, -1).shape[1] for p in parts]
    flat = torch.cat([p.raw.reshape(7, -1) for p in parts], dim=1).double()  # [7, all rows of all layers]
    dtype = parts[0].sample.dtype if len({p.sample.dtype for p in parts}) == 1 else torch.float64
    # One message: the float64 statistics' bits reinterpreted in the samples' dtype (exact), then the samples.
    stats_bits = flat.reshape(-1).view(dtype)
    message = torch.cat([stats_bits, *(p.sample.to(dtype).reshape(-1) for p in parts)])
    received = [m.split([stats_bits.numel(), message.numel() - stats_bits.numel()]) for m in distributed.gather(message)]
    raws = torch.stack([bits.view(torch.float64).view(flat.shape) for bits, _ in received])
    counts = torch.tensor([float(p.n) for p, w in zip(parts, widths) for _ in range(w)], dtype=torch.float64)
    merged = _merged_raw(raws, counts.to(flat.device, non_blocking=True).expand(processes, -1))
    samples = [rest.split([p.sample.numel() for p in parts]) for _, rest in received]
    out = []
    for i, (p, m) in enumerate(zip(parts, merged.split(widths, dim=1))):
        sample = torch.cat([shard[i].view_as(p.sample) for shard in samples], dim=-1).to(p.sample.dtype)
        out.append(Partial(m.reshape(p.raw.shape).to(p.raw.dtype), sample, p.n * processes))
    return out

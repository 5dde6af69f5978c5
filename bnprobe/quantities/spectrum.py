"""What the Hessian spectrum contributes to a finding: its outliers, top eigenvalue and trace."""

from __future__ import annotations

import numpy as np

from ..store import HESSIAN, SPECTRUM, RunData
from . import Quantity, Window, mean, picked, records, sliced_mean

GHORBANI = "Ghorbani et al. 2019: BN removes isolated outliers from the Hessian spectrum"


def top_eigenvalue(run: RunData, window: Window) -> float | None:
    """The spectrum's largest eigenvalue; in a run that recorded only the top Hessian eigenvalue, that one."""
    top = records(run, SPECTRUM, "top_k", window)
    if top is not None:
        return mean(top[:, 0])
    return mean(records(run, HESSIAN, "top_eigenvalue", window))


def hessian_trace(run: RunData, window: Window) -> float | None:
    return mean(records(run, SPECTRUM, "trace", window))


def bulk_edge(nodes: np.ndarray, weights: np.ndarray, mass: float = 0.97) -> float:
    """The eigenvalue below which ``mass`` of the density's weight lies (its probes pooled; nodes a
    short Lanczos run left unfilled, NaN, are no part of it)."""
    flat_nodes, flat_weights = nodes.reshape(-1), weights.reshape(-1)
    kept = np.isfinite(flat_nodes) & np.isfinite(flat_weights)
    flat_nodes, flat_weights = flat_nodes[kept], flat_weights[kept]
    if not len(flat_nodes):
        return float("nan")
    order = np.argsort(flat_nodes)
    cumulative = np.cumsum(flat_weights[order]) / np.sum(flat_weights)
    return float(flat_nodes[order][min(int(np.searchsorted(cumulative, mass)), len(order) - 1)])


def outlier_gap(run: RunData, window: Window) -> float | None:
    """Top eigenvalue over the density's bulk edge, averaged over records: large when the
    spectrum has isolated outliers (Ghorbani et al. Fig. 1)."""
    gaps = (
        np.asarray([t / edge for t, n, w in zip(top[:, 0], nodes, weights) if (edge := bulk_edge(n, w)) > 0])
        for top, nodes, weights in picked(run, SPECTRUM, ("top_k", "density_nodes", "density_weights"), window)
    )
    return sliced_mean(g for g in gaps if len(g))


QUANTITIES = (
    Quantity("spectrum.outlier_gap", "outlier gap (top / bulk edge)", outlier_gap, True, "lower", GHORBANI),
    Quantity("spectrum.top_eigenvalue", "top Hessian eigenvalue", top_eigenvalue, True, "lower", GHORBANI),
    Quantity("spectrum.trace", "Hessian trace", hessian_trace, True, "lower", GHORBANI),
)

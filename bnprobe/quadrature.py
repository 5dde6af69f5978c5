"""Stochastic Lanczos quadrature as a density: numpy only, so that ``bnprobe plot`` draws the
Hessian spectrum without importing torch (the spectrum probe computes the nodes and weights)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def density(
    nodes: ArrayLike, weights: ArrayLike, grid: np.ndarray | None = None, sigma: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SLQ nodes/weights ([probes, steps]) as a density on ``grid`` with Gaussian broadening: the
    probes' mean of sum_k w_k N(x; node_k, sigma**2), normalised to integrate to 1 on the grid.

    PyHessian's ``density_generate`` defaults: 10,000 points from the smallest to the largest node
    (of positive weight) widened by 0.01, and sigma**2 = 1e-5 * max(1, width). Returns (grid, density).
    """
    t = np.asarray(nodes, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    rows = np.asarray(nodes).shape[0] if np.asarray(nodes).ndim == 2 else 1
    used = w > 0
    if grid is None:
        low, high = float(t[used].min()) - 0.01, float(t[used].max()) + 0.01
        grid = np.linspace(low, high, 10_000)
    width = float(grid[-1] - grid[0])
    var = (1e-5 * max(1.0, width)) if sigma is None else sigma**2
    values = np.zeros(len(grid))
    for node, weight in zip(t[used], w[used]):  # one node at a time: grid x nodes could be large
        values += weight * np.exp(-((grid - node) ** 2) / (2 * var))
    values /= rows * math.sqrt(2 * math.pi * var)
    step = float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    total = values.sum() * step
    return grid, values / total if total > 0 else values

"""The numbers a finding compares between runs with and without BN, one module per measurement.

A measurement that bears on a claim names its module here in the ``findings`` field of its
entry in :data:`bnprobe.measurements.MEASUREMENTS`; the module's ``QUANTITIES`` are
:class:`Quantity` entries whose ``reduce`` turns one run's records over a window of steps into
one number. :mod:`bnprobe.findings` gathers them from the table and pairs the runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..store import STEP, RunData, aligned_slices

Window = tuple[int, int | None]  # records with first <= step < end (end None: to the last record)


@dataclass(frozen=True)
class Quantity:
    """One number that bears on a claim: how a run reduces to it, and which way the claim expects BN
    to move it (``lower``; ``not lower``: any result but a clear decrease agrees; with one seed
    nothing is clear, and no expectation can tell)."""

    key: str  # "<measurement>.<name>"
    label: str
    reduce: Callable[[RunData, Window], float | None]
    ratio: bool  # compared as BN / no BN (positive quantities); else as the difference BN - no BN
    expect: str
    claim: str


def in_window(steps: np.ndarray, window: Window) -> np.ndarray:
    """Which of ``steps`` lie in ``window``."""
    first, end = window
    return (steps >= first) & (steps < end) if end is not None else steps >= first


def records(run: RunData, section: str, quantity: str, window: Window) -> np.ndarray | None:
    """The records of ``section/quantity`` in ``window``; None when there are none."""
    steps, values = run.get(section, STEP), run.get(section, quantity)
    if steps is None or values is None or len(steps) == 0:
        return None
    picked = values[in_window(steps, window)]
    return picked if len(picked) else None


def picked(run: RunData, section: str, quantities: Sequence[str], window: Window) -> Iterator[list[np.ndarray]]:
    """The records of ``<section>/<quantity>`` (each of ``quantities``) whose steps are in
    ``window``, a slice of records at a time (a long run's moments or ICS need not fit in memory)."""
    steps = run.get(section, STEP)
    if steps is None or not all(run.holds(section, q) for q in quantities):
        return
    inside = in_window(steps, window)
    for first, blocks in aligned_slices(run, section, quantities):
        chosen = inside[first : first + len(blocks[0])]
        if chosen.any():
            yield [block[chosen] for block in blocks]


def mean(values: np.ndarray | None) -> float | None:
    """The mean of the finite values; None when there are none."""
    if values is None or not np.isfinite(values).any():
        return None
    return float(np.nanmean(values))


def sliced_mean(blocks: Iterable[np.ndarray]) -> float | None:
    """:func:`mean` of ``blocks`` put together, a block at a time: of one block, exactly its
    :func:`mean`; of several, the float64 sum of their non-NaN values over their count."""
    first: np.ndarray | None = None
    total, count, finite, seen = 0.0, 0, False, 0
    for block in blocks:
        first = block if first is None else first
        seen += 1
        kept = ~np.isnan(block)
        total += float(np.sum(block[kept], dtype=np.float64))
        count += int(kept.sum())
        finite = finite or bool(np.isfinite(block).any())
    if seen <= 1:
        return mean(first)
    return total / count if finite else None

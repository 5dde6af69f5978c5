"""The numbers a finding compares between runs with and without BN, one module per measurement.

A measurement that bears on a claim names its module here in the ``findings`` field of its
entry in :data:`bnprobe.measurements.MEASUREMENTS`; the module's ``QUANTITIES`` are
:class:`Quantity` entries whose ``reduce`` turns one run's records over a window of steps into
one number. :mod:`bnprobe.findings` gathers them from the table and pairs the runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..store import STEP, RunData

Window = tuple[int, int | None]  # records with first <= step < end (end None: to the last record)


@dataclass(frozen=True)
class Quantity:
    """One number that bears on a claim: how a run reduces to it, and which way the claim expects BN
    to move it (``lower``; ``not lower``: any result but a clear decrease agrees)."""

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


def mean(values: np.ndarray | None) -> float | None:
    """The mean of the finite values; None when there are none."""
    if values is None or not np.isfinite(values).any():
        return None
    return float(np.nanmean(values))

"""What the activation moments contribute to a finding: how far the layers' input distributions drift."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import MOMENTS, STEP, RunData, layer_kinds, moment_layers
from . import Quantity, Window, in_window, picked, sliced_mean

IOFFE = "Ioffe & Szegedy 2015: BN stabilises the distribution of layer inputs"


def _input_layers(run: RunData) -> list[int]:
    """Columns of the moments records that are a non-linearity's input: the BN layers where the
    model has them, else every conv/linear layer but the last (the output)."""
    names, kinds = moment_layers(run), layer_kinds(run)
    norms = [j for j, n in enumerate(names) if kinds.get(n) == "norm"]
    if norms:
        return norms
    weighted = [j for j, n in enumerate(names) if kinds.get(n) in ("conv", "linear")]
    return weighted[:-1] if len(weighted) > 1 else weighted


def percentile_drift(run: RunData, window: Window) -> float | None:
    """Mean absolute change of the 15/50/85th percentiles between consecutive records, over the
    layers that feed a non-linearity (Ioffe & Szegedy Fig. 1's curves, as one number)."""
    columns, steps = _input_layers(run), run.get(MOMENTS, STEP)
    if not columns or steps is None or np.count_nonzero(in_window(steps, window)) < 2:
        return None

    def changes() -> Iterator[np.ndarray]:
        before: list[np.ndarray] | None = None  # the last record of the slice before: its change to this slice's first
        for blocks in picked(run, MOMENTS, ("p15", "p50", "p85"), window):
            rows = [block[:, columns] for block in blocks]
            if before is not None:
                rows = [np.concatenate([b, r]) for b, r in zip(before, rows)]
            yield np.stack([np.abs(np.diff(r, axis=0)) for r in rows])
            before = [r[-1:] for r in rows]

    return sliced_mean(changes())


QUANTITIES = (Quantity("moments.drift", "percentile drift", percentile_drift, True, "lower", IOFFE),)

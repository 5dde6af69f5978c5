"""What the activation moments contribute to a finding: how far the layers' input distributions drift."""

from __future__ import annotations

import numpy as np

from ..store import MOMENTS, RunData, layer_kinds, moment_layers
from . import Quantity, Window, mean, records

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
    columns = _input_layers(run)
    changes = []
    for stat in ("p15", "p50", "p85"):
        values = records(run, MOMENTS, stat, window)
        if values is None or len(values) < 2 or not columns:
            return None
        changes.append(np.abs(np.diff(values[:, columns], axis=0)))
    return mean(np.stack(changes))


QUANTITIES = (Quantity("moments.drift", "percentile drift", percentile_drift, True, "lower", IOFFE),)

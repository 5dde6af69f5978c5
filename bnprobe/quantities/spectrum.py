"""What the Hessian spectrum contributes to a finding: its top eigenvalue, its trace and the share of
the one in the other (how much an outlier dominates)."""

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


def top_shares(top: np.ndarray, trace: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    """Per record, the top eigenvalue's share of the trace, lambda_1 / tr(H): near 1 when one outlier
    carries the curvature, small when it is spread over a bulk. NaN where the trace is within two
    standard errors of zero or below it (at initialisation, with BN): a share of noise."""
    return np.where(trace > 2 * stderr, top / np.where(trace > 0, trace, np.nan), np.nan)


def top_share(run: RunData, window: Window) -> float | None:
    """:func:`top_shares` averaged over records (Ghorbani et al.: without BN a few isolated
    eigenvalues dominate the spectrum)."""
    return sliced_mean(
        top_shares(top[:, 0], trace, stderr) for top, trace, stderr in picked(run, SPECTRUM, ("top_k", "trace", "trace_stderr"), window)
    )


QUANTITIES = (
    Quantity("spectrum.top_share", "top eigenvalue's share of the trace", top_share, True, "lower", GHORBANI),
    Quantity("spectrum.top_eigenvalue", "top Hessian eigenvalue", top_eigenvalue, True, "lower", GHORBANI),
    Quantity("spectrum.trace", "Hessian trace", hessian_trace, True, "lower", GHORBANI),
)

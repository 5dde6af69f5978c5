"""What the loss landscape contributes to a finding: how much loss and gradient vary along the gradient."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..store import LANDSCAPE, RunData
from . import Quantity, Window, mean, picked, records, sliced_mean

SANTURKAR_SMOOTH = "Santurkar et al. 2018: BN makes the loss landscape smoother"


def _spread(quantity: str) -> Callable[[RunData, Window], float | None]:
    """The mean over records of ``landscape/<quantity>``'s range over the step sizes η."""

    def reduce(run: RunData, window: Window) -> float | None:
        blocks = picked(run, LANDSCAPE, (quantity,), window)
        return sliced_mean(np.nanmax(block, axis=1) - np.nanmin(block, axis=1) for (block,) in blocks)

    return reduce


def effective_beta(run: RunData, window: Window) -> float | None:
    return mean(records(run, LANDSCAPE, "beta_smoothness", window))


QUANTITIES = (
    Quantity("landscape.loss_variation", "loss variation", _spread("loss"), True, "lower", SANTURKAR_SMOOTH),
    Quantity("landscape.gradient_predictiveness", "gradient change", _spread("grad_l2"), True, "lower", SANTURKAR_SMOOTH),
    Quantity("landscape.effective_beta", "effective beta", effective_beta, True, "lower", SANTURKAR_SMOOTH),
)

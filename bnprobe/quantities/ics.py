"""What the gradient-shift ICS contributes to a finding: the shift of the weight layers' gradients."""

from __future__ import annotations

from collections.abc import Callable

from ..store import ICS, RunData, ics_layers, layer_kinds
from . import Quantity, Window, picked, sliced_mean

SANTURKAR_ICS = "Santurkar et al. 2018: BN does not reduce internal covariate shift"


def _ics_mean(quantity: str) -> Callable[[RunData, Window], float | None]:
    """The mean of ``ics/<quantity>`` over records and conv/linear layers (a norm layer's own shift is left out)."""

    def reduce(run: RunData, window: Window) -> float | None:
        kinds = layer_kinds(run)
        columns = [j for j, n in enumerate(ics_layers(run)) if kinds.get(n, "conv") in ("conv", "linear")]
        return sliced_mean(block[:, columns] for (block,) in picked(run, ICS, (quantity,), window)) if columns else None

    return reduce


QUANTITIES = (
    Quantity("ics.l2", "ICS (l2 of G - G')", _ics_mean("l2"), True, "not lower", SANTURKAR_ICS),
    Quantity("ics.rel_diff", "relative ICS (‖G - G'‖ / ‖G‖)", _ics_mean("rel_diff"), True, "not lower", SANTURKAR_ICS),
    Quantity("ics.cosine", "ICS cosine of G, G'", _ics_mean("cosine"), False, "not higher", SANTURKAR_ICS),
)

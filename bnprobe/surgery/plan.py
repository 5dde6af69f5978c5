"""The plan :func:`~bnprobe.surgery.apply_bn` returns: what it changed, row by row, in forward order."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar


class Action(str, enum.Enum):
    """What a plan row did to its module. A ``str``, shown and stored as the plain word, so the
    ``inspect`` table, the stored surgery summary and comparisons with ``"inserted"`` are unchanged."""

    INSERTED = "inserted"  # a new BN after a conv/linear
    REMOVED = "removed"  # a BN stripped (replaced by its stand-in)
    REBIASED = "rebiased"  # a stripped BN's feeder got a zero bias
    FOLDED = "folded"  # a BN's eval-mode affine folded into its feeder
    NOISE = "noise"  # a BN made noisy
    KEPT = "kept"  # nothing to do (already followed by or running a BN, already noisy), or a BN other code reads

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Change:
    """One edit: ``action`` on ``module`` (its name after surgery), ``related`` the layer it sits after or is fed by."""

    action: Action
    module: str
    related: str
    detail: str


@dataclass(frozen=True)
class BnPlan:
    """What ``apply_bn`` changed, in forward order; ``bnprobe inspect`` prints ``rows()`` as a table."""

    mode: str
    pairing: str
    changes: tuple[Change, ...] = ()
    params_before: int = 0
    params_after: int = 0
    columns: ClassVar[tuple[str, str, str, str]] = ("action", "module", "after / fed by", "detail")

    def rows(self) -> list[tuple[str, str, str, str]]:
        return [(c.action.value, c.module, c.related, c.detail) for c in self.changes]

    def summary(self) -> str:
        counts = Counter(c.action for c in self.changes)
        edits = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no change"
        return f"bn {self.mode}: {edits}; parameters {self.params_before:,} -> {self.params_after:,} (pairing: {self.pairing})"

"""Findings: what BN changed, in words, with a 95% interval over seeds, and the claim it bears on.

Runs are grouped into *conditions* (the same settings but the seed); a condition whose model holds
BN is compared with its partner without BN of the same other settings (lr, optimizer, model, data,
...), paired by seed. Each quantity (declared by its measurement, in :mod:`bnprobe.quantities`) is reduced per run to one number over a window of steps: the
whole run, and the *learning window*, in which every compared run is learning: it starts once the
last of them has left its chance plateau (before, an unlearned network's flat landscape is
compared with a learning one's) and ends where the first health flag of any of them begins (after
it, records describe a collapsed, dead or fitted network, not BN's effect).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import numpy as np

from . import health
from .measurements import MEASUREMENTS
from .quantities import Quantity, Window
from .quantities.ics import SANTURKAR_ICS as SANTURKAR_ICS  # these names were defined here before their measurements declared them
from .quantities.landscape import SANTURKAR_SMOOTH as SANTURKAR_SMOOTH
from .quantities.landscape import effective_beta as effective_beta
from .quantities.moments import IOFFE as IOFFE
from .quantities.moments import percentile_drift as percentile_drift
from .quantities.spectrum import GHORBANI as GHORBANI
from .quantities.spectrum import hessian_trace as hessian_trace
from .quantities.spectrum import top_eigenvalue as top_eigenvalue
from .quantities.spectrum import top_share as top_share
from .stats import Interval, mean_interval, ratio_interval
from .store import RunData

#: settings that make two runs different conditions (the seed makes replicates, not conditions)
CONDITION_KEYS = (
    "lr", "optimizer", "momentum", "weight_decay", "batch_size", "nesterov", "model", "model_options", "data", "data_options",
    "planned_steps",
)  # fmt: skip
BN_KEYS = ("bn", "bn_targets", "keep_bias")
NO_BN_LABELS = ("no BN", "BN stripped", "BN folded")


def bn_label(attrs: dict[str, Any]) -> str:
    """What the trained model held: "no BN", "BN", "noisy BN", "BN stripped" or "BN folded"."""
    mode, count = attrs.get("bn"), attrs.get("bn_layers")
    if mode == "noisy":
        return "noisy BN"
    if mode == "strip":
        changed = attrs.get("bn_removed", 1)
        if changed:
            return "BN folded" if attrs.get("fold") else "BN stripped"
        return "no BN"
    if mode is None:
        return "BN unknown"
    if count is None:  # files written before the count: the mode is all there is
        return {"insert": "BN"}.get(str(mode), str(mode))
    return "BN" if int(count) > 0 else "no BN"


@dataclass
class Condition:
    """Runs with the same settings but the seed; ``label`` is the BN label, ``settings`` the rest."""

    label: str
    settings: tuple[tuple[str, Any], ...]
    runs: dict[int, RunData] = field(default_factory=dict)
    repeats: int = 0  # runs of a seed already present (another file): left out of the means

    @property
    def name(self) -> str:
        varying = ", ".join(f"{k}={v}" for k, v in self.settings)
        return f"{self.label} ({varying})" if varying else self.label

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)


def conditions(runs: Sequence[RunData]) -> list[Condition]:
    """Group ``runs`` by their BN label and the settings that differ between them, in first-seen order."""
    keys = [k for k in CONDITION_KEYS if len({_setting(r, k) for r in runs}) > 1]
    found: dict[tuple[Any, ...], Condition] = {}
    for run in runs:
        label = bn_label(run.attrs)
        settings = tuple((k, _setting(run, k)) for k in keys)
        cond = found.setdefault((label, settings), Condition(label, settings))
        seed = int(run.attrs.get("seed", 0))
        if seed in cond.runs:
            cond.repeats += 1
        else:
            cond.runs[seed] = run
    return list(found.values())


def _setting(run: RunData, key: str) -> Any:
    value = run.attrs.get(key)
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- quantities

#: every quantity a finding compares, declared by its measurement (``findings`` in the table), in the table's order
QUANTITIES: tuple[Quantity, ...] = tuple(q for m in MEASUREMENTS if m.findings for q in import_module(m.findings).QUANTITIES)


# ----------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Effect:
    """BN's effect on one quantity over one window: a ratio (BN / no BN) or a difference, over paired seeds."""

    interval: Interval
    ratio: bool
    window: Window

    @property
    def no_effect(self) -> float:
        return 1.0 if self.ratio else 0.0

    @property
    def direction(self) -> str:
        """``lower``, ``higher`` or ``no clear difference`` (the interval includes no effect, or 1 seed)."""
        if not self.interval.excludes(self.no_effect):
            return "no clear difference"
        return "higher" if self.interval.mean > self.no_effect else "lower"

    def agrees(self, expect: str) -> bool | None:
        """Whether the effect agrees with the claim's expectation; None when it cannot tell, as with
        one seed: without an interval even "not lower" has nothing to stand on."""
        if self.interval.n < 2:
            return None
        direction = self.direction
        if expect == "lower":
            return None if direction == "no clear difference" else direction == "lower"
        return direction != expect.removeprefix("not ")


def paired_effect(reference: Condition, treated: Condition, quantity: Quantity, window: Window) -> Effect | None:
    """The effect over the seeds both conditions ran, or None when no pair has the quantity."""
    values = []
    for seed in sorted(set(reference.runs) & set(treated.runs)):
        base, other = quantity.reduce(reference.runs[seed], window), quantity.reduce(treated.runs[seed], window)
        if base is None or other is None:
            continue
        if quantity.ratio:
            if base > 0 and other > 0:
                values.append(other / base)
        else:
            values.append(other - base)
    found = ratio_interval(values) if quantity.ratio else mean_interval(values)
    return Effect(found, quantity.ratio, window) if found is not None else None


@dataclass(frozen=True)
class LearningWindow:
    """Where every compared run is learning: from the step the last of them left its chance
    plateau to the step the first health flag of any of them began. ``window`` is None when
    there is no such step; ``why`` then says which end closed it."""

    window: Window | None
    why: str = ""


def learning_window(*conds: Condition) -> LearningWindow:
    """The learning window of the runs of ``conds`` (see :class:`LearningWindow`)."""
    runs = [run for cond in conds for run in cond.runs.values()]
    starts = [health.learning_start(run) for run in runs]
    stuck = [run.name for run, s in zip(runs, starts) if s is None]
    if stuck:
        return LearningWindow(
            None, f"{', '.join(stuck)} never left {'its' if len(stuck) == 1 else 'their'} chance level: train longer or try another lr"
        )
    first = max((s for s in starts if s is not None), default=0)
    ends = [health.first_flag_step(health.run_flags(run)) for run in runs]
    end = min((e for e in ends if e is not None), default=None)
    if end is not None and end <= first:
        return LearningWindow(None, f"a health flag at step {end}, before every run had left its chance level (step {first})")
    return LearningWindow((first, end))


def partners(conds: Sequence[Condition]) -> list[tuple[Condition, Condition]]:
    """(no BN, BN) pairs of conditions with the same settings: each BN condition with its no-BN partner."""
    refs = [c for c in conds if c.label in NO_BN_LABELS]
    return [(ref, cond) for cond in conds if cond.label not in NO_BN_LABELS for ref in refs if ref.settings == cond.settings]


def _number(value: float) -> str:
    return f"{value:.3g}"


def _span(low: float | None, high: float | None) -> str:
    return f" [{_number(low)}, {_number(high)}]" if low is not None and high is not None else ""


def describe(effect: Effect, label: str) -> str:
    """``lowered effective beta 3.1x [2.4, 3.9]``: a ratio below 1 reads as the factor it divides by;
    an interval that includes no effect reads ``no clear difference in ... (0.8x [0.5, 1.3])``."""
    i = effect.interval
    if effect.direction == "no clear difference" and i.n > 1:
        size = f"{_number(i.mean)}x" if effect.ratio else f"{i.mean:+.3g}"
        return f"no clear difference in {label} ({size}{_span(i.low, i.high)})"
    if effect.ratio:
        if i.mean < 1:
            low, high = (1 / i.high, 1 / i.low) if i.low and i.high else (None, None)
            return f"lowered {label} {_number(1 / i.mean)}x{_span(low, high)}"
        return f"raised {label} {_number(i.mean)}x{_span(i.low, i.high)}"
    if i.mean < 0:
        return (
            f"lowered {label} by {_number(-i.mean)}{_span(-i.high if i.high is not None else None, -i.low if i.low is not None else None)}"
        )
    return f"raised {label} by {_number(i.mean)}{_span(i.low, i.high)}"


def window_text(window: Window) -> str:
    first, end = window
    if end is None:
        return "the whole run" if first == 0 else f"steps {first}-end"
    return f"steps {first}-{end - 1}"


@dataclass(frozen=True)
class Finding:
    """BN's effect on one quantity for one pair of conditions, over the whole run and the learning window."""

    quantity: Quantity
    reference: Condition
    treated: Condition
    whole: Effect
    learning: Effect | None  # None: no learning window (``window.why`` says why), or no record in it
    window: LearningWindow

    @property
    def decisive(self) -> Effect | None:
        """The effect to read: over the learning window (the whole run when nothing cut it short)."""
        return self.learning

    @property
    def agrees(self) -> bool | None:
        return self.learning.agrees(self.quantity.expect) if self.learning is not None else None

    @property
    def verdict(self) -> str:
        effect = self.learning
        if effect is None:
            why = self.window.why or "no record in the learning window"
            where = "; see Health" if "health flag" in why else ""
            return f"{self.treated.label} vs {self.reference.label}, {self.quantity.label}: no learning window ({why}){where}"
        seeds = effect.interval.n
        count = f"{seeds} seeds" if seeds > 1 else "1 seed: no interval"
        subject = (
            self.treated.label
            if effect.direction != "no clear difference" or seeds < 2
            else f"{self.treated.label} vs {self.reference.label}:"
        )
        return f"{subject} {describe(effect, self.quantity.label)} over {window_text(effect.window)}, {count}"

    def as_dict(self) -> dict[str, Any]:
        def effect(e: Effect | None) -> dict[str, Any] | None:
            if e is None:
                return None
            i = e.interval
            return {"kind": "ratio" if e.ratio else "difference", "value": i.mean, "low": i.low, "high": i.high,
                    "seeds": i.n, "direction": e.direction, "first_step": e.window[0], "end_step": e.window[1]}  # fmt: skip

        window = self.window.window
        return {
            "quantity": self.quantity.key, "label": self.quantity.label, "claim": self.quantity.claim,
            "expect": self.quantity.expect, "reference": self.reference.name, "treated": self.treated.name,
            "whole_run": effect(self.whole), "learning_window": effect(self.learning),
            "window": None if window is None else {"first_step": window[0], "end_step": window[1]},
            "window_note": self.window.why, "verdict": self.verdict, "agrees": self.agrees,
        }  # fmt: skip


def findings(runs: Sequence[RunData], conds: Sequence[Condition] | None = None) -> list[Finding]:
    """Every finding the runs support: each quantity recorded by both sides of each (no BN, BN) pair.

    ``conds``: the runs' :func:`conditions`, where the caller has them already."""
    found = []
    for reference, treated in partners(conditions(runs) if conds is None else conds):
        window = learning_window(reference, treated)
        for quantity in QUANTITIES:
            whole = paired_effect(reference, treated, quantity, (0, None))
            if whole is None:
                continue
            if window.window is None:
                learning = None
            elif window.window == (0, None):
                learning = whole
            else:
                learning = paired_effect(reference, treated, quantity, window.window)
            found.append(Finding(quantity, reference, treated, whole, learning, window))
    return found

"""Health flags: what went wrong (or too well) in a run, read from its records.

A number recorded after a network collapsed, died or fitted its data describes that state, not
training: a researcher must see the flag before the numbers. Each flag names the step it began
and what it means for the records after it. Losses are smoothed over 20 steps so that one noisy
batch raises nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .store import MOMENTS, STEP, TRAIN, RunData, aligned_slices, moment_layers, record_count

WINDOW = 20  # steps in the trailing mean of the training loss and accuracy
START = 10  # steps whose mean loss is the starting loss L0

COLLAPSED = "collapsed"
FITTED = "fitted early"
DEAD = "dead layer"
DIVERGED = "diverged"

MEANINGS = {
    COLLAPSED: "the network fell back to chance: later records describe a dead network, not training",
    FITTED: "the training data is fitted: later records describe a network that has nothing left to learn",
    DEAD: "every unit of the layer is off: later records of it and after it describe a dead path",
    DIVERGED: "the loss became infinite or NaN: the run stopped there",
}


@dataclass(frozen=True)
class Flag:
    """One health flag of a run: ``kind`` (a key of :data:`MEANINGS`), the step it began, and the evidence."""

    kind: str
    step: int
    detail: str

    @property
    def meaning(self) -> str:
        return MEANINGS[self.kind]

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "step": self.step, "detail": self.detail, "meaning": self.meaning}


def trailing_mean(values: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Mean of each ``window`` consecutive values, at the last of them; NaN before a full window (a
    mean of the first few steps would flag a lucky first batch)."""
    sums = np.cumsum(np.concatenate([[0.0], values.astype(np.float64)]))
    means = np.full(len(values), np.nan)
    means[window - 1 :] = (sums[window:] - sums[:-window]) / window
    return means


def chance_loss(run: RunData) -> float | None:
    """ln K for a classification run of K classes (the loss of a uniform guess); None otherwise."""
    classes = run.attrs.get("num_outputs")
    if run.attrs.get("task") != "classification" or not isinstance(classes, (int, np.integer)) or classes < 2:
        return None
    return math.log(int(classes))


def run_flags(run: RunData) -> list[Flag]:
    """Every flag of ``run``, earliest first."""
    flags: list[Flag] = []
    if run.attrs.get("status") == DIVERGED:
        steps = run.get(TRAIN, STEP)
        at = run.attrs.get("diverged_step", int(steps[-1]) if steps is not None and len(steps) else 0)
        flags.append(Flag(DIVERGED, int(at), "non-finite loss"))
    flags += _training_flags(run)
    flags += _dead_layers(run)
    return sorted(flags, key=lambda f: (f.step, f.kind))


def _training_flags(run: RunData) -> list[Flag]:
    steps, loss = run.get(TRAIN, STEP), run.get(TRAIN, "loss")
    if steps is None or loss is None or len(loss) == 0:
        return []
    finite = np.isfinite(loss)
    steps, loss = steps[finite], loss[finite]
    if len(loss) == 0:
        return []
    smooth = trailing_mean(loss)
    start = float(np.mean(loss[:START]))
    return [f for f in (_collapse(run, steps, smooth, start), _fitted(run, steps, smooth, start, finite)) if f is not None]


def _collapse(run: RunData, steps: np.ndarray, smooth: np.ndarray, start: float) -> Flag | None:
    """Loss back above 0.95 of chance (regression: of L0) for 20 steps after it had fallen below 0.8 (0.5)."""
    chance = chance_loss(run)
    learned_below, back_above = (0.8 * chance, 0.95 * chance) if chance is not None else (0.5 * start, 0.95 * start)
    learned = np.flatnonzero(smooth < learned_below)
    if len(learned) == 0:
        return None
    after = np.flatnonzero(smooth[learned[0] :] > back_above) + learned[0]
    for i in after:
        j = np.searchsorted(steps, steps[i] + WINDOW)
        if j < len(steps) and np.all(smooth[i : j + 1] > back_above):
            best = float(np.nanmin(smooth[: i + 1]))
            return Flag(COLLAPSED, int(steps[i]), f"loss {smooth[i]:.3g} after {best:.3g}, chance {back_above / 0.95:.3g}")
    return None


def _fitted(run: RunData, steps: np.ndarray, smooth: np.ndarray, start: float, finite: np.ndarray) -> Flag | None:
    """20-step mean accuracy >= 0.99, or 20-step mean loss < 1% of the starting loss."""
    acc = run.get(TRAIN, "accuracy")
    hits: list[tuple[int, str]] = []
    if acc is not None and len(acc) == len(finite) and not np.isnan(acc[finite]).all():
        acc_smooth = trailing_mean(np.nan_to_num(acc[finite]))
        first = np.flatnonzero(acc_smooth >= 0.99)
        if len(first):
            hits.append((int(first[0]), f"accuracy {acc_smooth[first[0]]:.3f}"))
    first = np.flatnonzero(smooth < 0.01 * start)
    if len(first):
        hits.append((int(first[0]), f"loss {smooth[first[0]]:.3g}, 1% of its start {start:.3g}"))
    if not hits:
        return None
    i, detail = min(hits)
    return Flag(FITTED, int(steps[i]), detail)


def _dead_layers(run: RunData) -> list[Flag]:
    """Recorded layers whose output has variance 0, or max <= 0 where it feeds a ReLU (every unit
    off), at the first record where they are; the records are read a slice at a time."""
    if not all(run.holds(MOMENTS, q) for q in (STEP, "max", "var")) or record_count(run, MOMENTS, STEP) == 0:
        return []
    names = moment_layers(run)
    relu_fed = run.attrs.get("relu_fed", "")
    feeds_relu = np.array([name in (relu_fed if isinstance(relu_fed, list) else [relu_fed]) for name in names])
    found: dict[int, tuple[int, str]] = {}  # layer -> (first dead record, why)
    for first, (top, var) in aligned_slices(run, MOMENTS, ("max", "var")):
        dead = ((top <= 0) & feeds_relu) | (var == 0)
        for j in np.flatnonzero(dead.any(axis=0)).tolist():
            if j not in found:
                i = int(np.flatnonzero(dead[:, j])[0])
                found[j] = (first + i, "max <= 0" if top[i, j] <= 0 else "variance 0")
    steps = run.data[f"{MOMENTS}/{STEP}"]
    return [Flag(DEAD, int(steps[i]), f"{names[j]}: {why}") for j, (i, why) in sorted(found.items())]


PLATEAU = 0.9  # a classification run has left its chance plateau once its 20-step mean loss is below 0.9 ln K


def learning_start(run: RunData) -> int | None:
    """The first step whose 20-step mean training loss is below 0.9 ln K (K classes): the run has
    left its chance plateau. 0 for a regression run or one without K; None if it never left."""
    chance = chance_loss(run)
    steps, loss = run.get(TRAIN, STEP), run.get(TRAIN, "loss")
    if chance is None or steps is None or loss is None or len(loss) == 0:
        return 0
    finite = np.isfinite(loss)
    values = loss[finite].astype(np.float64)
    means = trailing_mean(values)
    head = min(WINDOW - 1, len(values))  # before a full window: the mean so far (a start is not a flag)
    means[:head] = np.cumsum(values[:head]) / np.arange(1, head + 1)
    below = np.flatnonzero(means < PLATEAU * chance)
    return int(steps[finite][below[0]]) if len(below) else None


#: the datasets the flags are computed from
INPUTS = (f"{TRAIN}/{STEP}", f"{TRAIN}/loss", f"{TRAIN}/accuracy", f"{MOMENTS}/{STEP}", f"{MOMENTS}/max", f"{MOMENTS}/var")


def flags_json(flags: list[Flag]) -> str:
    """The flags as the JSON text stored in a run's ``health`` attribute."""
    return json.dumps([f.as_dict() for f in flags])


def first_flag_step(flags: list[Flag]) -> int | None:
    """The step at which the earliest flag began; None for a healthy run."""
    return min((f.step for f in flags), default=None)

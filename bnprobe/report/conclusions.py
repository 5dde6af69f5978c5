"""The report's first screen, as plain data: findings, health flags and each condition over its seeds.

A researcher reads the answer first (what BN changed, with its interval and the claim it bears
on), then whether any run collapsed, died or fitted its data, then the conditions' training
results averaged over seeds. The per-run, per-layer tables follow in the rest of the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict, cast

import numpy as np

from ..findings import Condition, conditions, findings
from ..health import run_flags
from ..stats import mean_interval
from ..store import HELDOUT, TRAIN, RunData


class IntervalData(TypedDict):
    mean: float
    low: float | None
    high: float | None
    n: int


class ConditionData(TypedDict):
    label: str
    settings: dict[str, Any]
    seeds: list[int]
    runs: list[str]
    repeats: int
    final_loss: IntervalData | None
    final_accuracy: IntervalData | None
    heldout_accuracy: IntervalData | None
    seconds: IntervalData | None


class HealthData(TypedDict):
    run: str
    kind: str
    step: int
    detail: str
    meaning: str


class Conclusions(TypedDict):
    findings: list[dict[str, Any]]
    health: list[HealthData]
    conditions: list[ConditionData]


FINAL_STEPS = 10  # the training loss and accuracy of a run: the mean of its last steps, as train prints


def _interval(values: Sequence[float | None]) -> IntervalData | None:
    found = mean_interval([v for v in values if v is not None])
    return None if found is None else {"mean": found.mean, "low": found.low, "high": found.high, "n": found.n}


def _final(run: RunData, quantity: str) -> float | None:
    values = run.get(TRAIN, quantity)
    if values is None or len(values) == 0 or np.isnan(values[-FINAL_STEPS:]).all():
        return None
    return float(np.nanmean(values[-FINAL_STEPS:]))


def _last(run: RunData, section: str, quantity: str) -> float | None:
    value = run.last(section, quantity)
    return float(value) if value is not None and np.isfinite(value) else None


def _seconds(run: RunData) -> float | None:
    value = run.attrs.get("seconds")
    return float(value) if isinstance(value, (int, float, np.integer, np.floating)) else None


def _condition(cond: Condition) -> ConditionData:
    runs = [cond.runs[s] for s in cond.seeds]
    return {
        "label": cond.label,
        "settings": dict(cond.settings),
        "seeds": cond.seeds,
        "runs": [r.name for r in runs],
        "repeats": cond.repeats,
        "final_loss": _interval([_final(r, "loss") for r in runs]),
        "final_accuracy": _interval([_final(r, "accuracy") for r in runs]),
        "heldout_accuracy": _interval([_last(r, HELDOUT, "accuracy") for r in runs]),
        "seconds": _interval([_seconds(r) for r in runs]),
    }


def build_conclusions(runs: Sequence[tuple[str, RunData]]) -> Conclusions:
    """Findings, health flags and conditions of ``runs`` (each with the label the report shows it by)."""
    data = [run for _, run in runs]
    conds = conditions(data)
    flags = [cast(HealthData, {"run": label, **f.as_dict()}) for label, run in runs for f in run_flags(run)]
    return {
        "findings": [f.as_dict() for f in findings(data, conds)],
        "health": flags,
        "conditions": [_condition(c) for c in conds],
    }

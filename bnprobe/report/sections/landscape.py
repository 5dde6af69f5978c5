"""The report's loss landscape along the gradient: the ranges of loss and gradient over η, and β-smoothness."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np

from ...store import LANDSCAPE, STEP, RunData
from ..content import Number, Report, _nanreduce, num
from ..page import Page, fmt


class Landscape(TypedDict):
    records: int
    first_step: Number
    last_step: Number
    etas: int | None
    eta_min: Number
    eta_max: Number
    loss_min: Number
    loss_max: Number
    loss_spread_median: Number
    grad_l2_min: Number
    grad_l2_max: Number
    grad_l2_spread_median: Number
    beta_median: Number
    beta_max: Number


def build(run: RunData, patterns: Sequence[str], stat: str) -> Landscape | None:
    steps = run.get(LANDSCAPE, STEP)
    if steps is None or len(steps) == 0:
        return None
    loss, grad = run.get(LANDSCAPE, "loss"), run.get(LANDSCAPE, "grad_l2")
    beta, eta = run.get(LANDSCAPE, "beta_smoothness"), run.get(LANDSCAPE, "eta")

    def spread(arr: np.ndarray | None) -> Number:
        if arr is None or arr.ndim != 2:
            return None
        return num(_nanreduce(np.median, _nanreduce(np.max, arr, axis=1) - _nanreduce(np.min, arr, axis=1)))

    def reduced(fn: Callable[[np.ndarray], Any], arr: np.ndarray | None) -> Number:
        return num(_nanreduce(fn, arr)) if arr is not None else None

    return {
        "records": len(steps),
        "first_step": num(steps[0]),
        "last_step": num(steps[-1]),
        "etas": len(eta) if eta is not None else None,
        "eta_min": num(np.min(eta)) if eta is not None and len(eta) else None,
        "eta_max": num(np.max(eta)) if eta is not None and len(eta) else None,
        "loss_min": reduced(np.min, loss),
        "loss_max": reduced(np.max, loss),
        "loss_spread_median": spread(loss),
        "grad_l2_min": reduced(np.min, grad),
        "grad_l2_max": reduced(np.max, grad),
        "grad_l2_spread_median": spread(grad),
        "beta_median": reduced(np.median, beta),
        "beta_max": reduced(np.max, beta),
    }


_LANDSCAPE_ROWS: list[tuple[str, Callable[[Landscape], str]]] = [
    ("records", lambda d: fmt(d["records"])),
    ("η range", lambda d: f"{fmt(d['eta_min'])}…{fmt(d['eta_max'])}"),
    ("loss min…max", lambda d: f"{fmt(d['loss_min'])}…{fmt(d['loss_max'])}"),
    ("loss spread", lambda d: fmt(d["loss_spread_median"])),
    ("grad pred. min…max", lambda d: f"{fmt(d['grad_l2_min'])}…{fmt(d['grad_l2_max'])}"),
    ("grad pred. spread", lambda d: fmt(d["grad_l2_spread_median"])),
    ("β median", lambda d: fmt(d["beta_median"])),
    ("β max", lambda d: fmt(d["beta_max"])),
]


def draw(page: Page, report: Report, having: Sequence[tuple[str, Landscape]]) -> None:
    caption = "along −g: loss L(w−ηg) and ‖∇L(w)−∇L(w−ηg)‖₂ over all η and records; spread: median over records of max−min over η"
    page.row_tables("Loss landscape", having, _LANDSCAPE_ROWS, (18, 16), [caption])

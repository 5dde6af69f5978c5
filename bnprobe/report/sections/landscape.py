"""The report's loss landscape along the gradient: the ranges of loss and gradient over η, and β-smoothness."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np

from ...store import LANDSCAPE, STEP, RunData, extremes, record_ranges
from ..content import Number, Report, nanreduce, num
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
    beta, eta = run.get(LANDSCAPE, "beta_smoothness"), run.get(LANDSCAPE, "eta")

    def spread(quantity: str) -> Number:
        if not run.holds(LANDSCAPE, quantity) or len(run.data.shape(f"{LANDSCAPE}/{quantity}")) != 2:
            return None
        return num(nanreduce(np.median, record_ranges(run, LANDSCAPE, quantity)))

    loss, grad = (extremes(run, LANDSCAPE, q) if run.holds(LANDSCAPE, q) else (np.nan, np.nan) for q in ("loss", "grad_l2"))
    return {
        "records": len(steps),
        "first_step": num(steps[0]),
        "last_step": num(steps[-1]),
        "etas": len(eta) if eta is not None else None,
        "eta_min": num(np.min(eta)) if eta is not None and len(eta) else None,
        "eta_max": num(np.max(eta)) if eta is not None and len(eta) else None,
        "loss_min": num(loss[0]),
        "loss_max": num(loss[1]),
        "loss_spread_median": spread("loss"),
        "grad_l2_min": num(grad[0]),
        "grad_l2_max": num(grad[1]),
        "grad_l2_spread_median": spread("grad_l2"),
        "beta_median": num(nanreduce(np.median, beta)) if beta is not None else None,
        "beta_max": num(nanreduce(np.max, beta)) if beta is not None else None,
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

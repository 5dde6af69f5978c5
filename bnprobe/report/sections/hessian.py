"""The report's top Hessian eigenvalue at the last record, with its convergence and, if recorded, per-layer blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np

from ...store import HESSIAN, STEP, RunData, hessian_block_labels
from ..content import Number, Plain, Report, num, nums, plain
from ..page import Page, fmt, missing


class Hessian(TypedDict):
    records: int
    last_step: Number
    top_eigenvalue: Number | list[Number]
    iterations: Number | list[Number]
    residual: Number | list[Number]
    converged: bool | None
    bn_mode: Plain
    samples: Plain
    blocks: dict[str, Number]


def build(run: RunData, patterns: Sequence[str], stat: str) -> Hessian | None:
    steps = run.get(HESSIAN, STEP)
    if steps is None or len(steps) == 0:
        return None
    attrs = run.attrs_of(HESSIAN, "top_eigenvalue")

    def last(quantity: str) -> Number | list[Number]:
        value = run.last(HESSIAN, quantity)
        return num(value) if value is None or np.ndim(value) == 0 else nums(value)

    converged, blocks = run.last(HESSIAN, "converged"), run.last(HESSIAN, "block_top_eigenvalue")
    return {
        "records": len(steps),
        "last_step": num(steps[-1]),
        "top_eigenvalue": last("top_eigenvalue"),
        "iterations": last("iterations"),
        "residual": last("residual"),
        "converged": bool(converged) if converged is not None else None,
        "bn_mode": plain(attrs.get("bn_mode")),
        "samples": plain(attrs.get("samples")),
        "blocks": {name: num(v) for name, v in zip(hessian_block_labels(run), blocks)} if blocks is not None else {},
    }


_HESSIAN_ROWS: list[tuple[str, Callable[[Hessian], Any]]] = [
    ("at step", lambda d: fmt(d["last_step"])),
    ("top eigenvalue", lambda d: fmt(d["top_eigenvalue"], 4)),
    ("iterations", lambda d: fmt(d["iterations"])),
    ("residual", lambda d: fmt(d["residual"])),
    ("converged", lambda d: {True: "yes", False: "NO", None: "—"}[d["converged"]]),
    ("bn mode", lambda d: str(d["bn_mode"] or "—")),
    ("samples", lambda d: fmt(d["samples"])),
]


def _block_row(block: str) -> tuple[str, Callable[[Hessian], Any]]:
    return f"λ {block}", lambda d: fmt(d["blocks"][block], 4) if block in d["blocks"] else missing()


def draw(page: Page, report: Report, having: Sequence[tuple[str, Hessian]]) -> None:
    blocks = list(dict.fromkeys(b for _, hess in having for b in hess["blocks"]))
    rows = _HESSIAN_ROWS + [_block_row(b) for b in blocks]
    captions = ["largest in magnitude (it can be negative); residual ‖Hv−λv‖₂ of the unit vector v found"]
    if blocks:
        captions.append("λ LAYER: top eigenvalue of that layer's own block of the Hessian")
    page.row_tables("Top Hessian eigenvalue (last record)", having, rows, (14, 14), captions)
    if any(hess["converged"] is False for _, hess in having):
        page.note("not converged: raise probes.hessian.max_iter or loosen probes.hessian.tol (--set probes.hessian.max_iter=300)")

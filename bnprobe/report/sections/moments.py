"""The report's activation moments: per layer, the first and last record and a sparkline of ``--stat``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from rich.text import Text

from ...store import MOMENTS, STATS, STEP, RunData, layer_kinds, matches, moment_layers
from ..content import Number, Report, _nums, num
from ..page import Page, aligned, fmt, groups, missing, sparkline


class MomentLayer(TypedDict):
    name: str
    kind: str
    first: dict[str, Number]  # mean, std, p15, p50, p85 of the first record
    last: dict[str, Number]
    series: list[Number]  # the --stat statistic over the records


class Moments(TypedDict):
    records: int
    first_step: Number
    last_step: Number
    steps: list[Number]
    stat: str
    layers: list[MomentLayer]
    per_channel_layers: list[str]
    histogram: bool


def build(run: RunData, patterns: Sequence[str], stat: str) -> Moments | None:
    steps = run.get(MOMENTS, STEP)
    if steps is None or run.get(MOMENTS, "mean") is None:
        return None
    recorded = {s: arr for s in STATS if (arr := run.get(MOMENTS, s)) is not None}
    n = min(len(steps), *(len(arr) for arr in recorded.values()))
    if n == 0:
        return None

    def column(s: str, j: int) -> np.ndarray:
        if s == "std":
            var = recorded.get("var")
            return np.sqrt(np.asarray(var[:n, j], dtype=np.float64)) if var is not None else np.full(n, np.nan)
        arr = recorded.get(s)
        return np.asarray(arr[:n, j]) if arr is not None else np.full(n, np.nan)

    kinds = layer_kinds(run)
    layers: list[MomentLayer] = []
    for j, name in enumerate(moment_layers(run)):
        if not matches(name, patterns):
            continue
        first = {s: num(column(s, j)[0]) for s in ("mean", "std", "p15", "p50", "p85")}
        last = {s: num(column(s, j)[-1]) for s in ("mean", "std", "p15", "p50", "p85")}
        layers.append({"name": name, "kind": kinds.get(name, ""), "first": first, "last": last, "series": _nums(column(stat, j))})
    return {
        "records": int(n),
        "first_step": num(steps[0]),
        "last_step": num(steps[n - 1]),
        "steps": _nums(steps[:n]),
        "stat": stat,
        "layers": layers,
        "per_channel_layers": run.per_channel_layers(),
        "histogram": run.holds(MOMENTS, "histogram"),
    }


def _moment_cell(layer: MomentLayer, show_kind: bool, spark_w: int, lo: float | None, hi: float | None) -> Text:
    a, b = layer["first"], layer["last"]
    return Text.assemble(
        (f"({layer['kind']})\n" if show_kind else "", "dim"),
        ("mean ", "dim"),
        f"{fmt(a['mean'])}→{fmt(b['mean'])}\n",
        ("std  ", "dim"),
        f"{fmt(a['std'])}→{fmt(b['std'])}\n",
        ("p15/50/85\n", "dim"),
        f"{fmt(a['p15'])} {fmt(a['p50'])} {fmt(a['p85'])}\n",
        f"→{fmt(b['p15'])} {fmt(b['p50'])} {fmt(b['p85'])}\n",
        (sparkline(layer["series"], spark_w, lo, hi), "cyan"),
    )


def _moment_row(name: str, present: list[MomentLayer | None], spark_w: int) -> tuple[Text, list[Text]]:
    """The row of one layer: its name (and kind, when the variants agree on it) and a cell per column."""
    layers = [lay for lay in present if lay is not None]
    finite = [v for lay in layers for v in lay["series"] if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (None, None)
    kinds = {lay["kind"] for lay in layers}
    cells = [missing() if lay is None else _moment_cell(lay, len(kinds) > 1, spark_w, lo, hi) for lay in present]
    kind = next(iter(kinds)) if len(kinds) == 1 else ""
    return Text.assemble(name, ("\n" + kind if kind else "", "dim")), cells


def draw(page: Page, report: Report, having: Sequence[tuple[str, Moments]]) -> None:
    names, by_layer = aligned([(label, m["layers"]) for label, m in having])
    kinds = {lay["kind"] for rows_of in by_layer.values() for lay in rows_of.values()}
    name_w = min(16, max([5, *map(len, names), *map(len, kinds)]))
    first = having[0][1]
    steps = f"{fmt(first['first_step'])}–{fmt(first['last_step'])}"
    for group in groups(having, page.width, name_w, 20):
        spark_w = max(8, min(24, (page.width - name_w) // len(group) - 3))
        t = page.table("Activation moments", "layer", name_w, [label for label, _ in group])
        for name in names:
            head, cells = _moment_row(name, [by_layer[label].get(name) for label, _ in group], spark_w)
            t.add_row(head, *cells, end_section=True)
        page.console.print(t)
        page.note(f"first → last record; sparkline: {report['stat']} over steps {steps}, one scale per row")
    page.renamed_note(by_layer)

"""The report's activation moments: per layer, the first and last record and a sparkline of ``--stat``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from rich.text import Text

from ...store import MOMENTS, STATS, STEP, Binned, RunData, binned, layer_kinds, matches, moment_layers, record_at, record_count
from ..content import Number, Report, num, nums
from ..page import Page, aligned, fmt, groups, missing, sparkline

#: points of a sparkline series at most: a longer run's records are cut evenly into this many bins,
#: each bin's mean kept, so that memory does not grow with the run (most sparkline widths divide it)
SERIES_POINTS = 240


class MomentLayer(TypedDict):
    name: str
    kind: str
    first: dict[str, Number]  # mean, std, p15, p50, p85 of the first record
    last: dict[str, Number]
    series: list[Number]  # the --stat statistic of each record, or of each of SERIES_POINTS bins of a longer run
    low: Number  # the least and greatest --stat value over all records: the sparkline's scale
    high: Number


class Moments(TypedDict):
    records: int
    first_step: Number
    last_step: Number
    steps: list[Number]  # of each point of the series (a bin: its first record)
    stat: str
    layers: list[MomentLayer]
    per_channel_layers: list[str]
    histogram: bool


def _moment_record(run: RunData, index: int, width: int) -> dict[str, np.ndarray]:
    """Record ``index`` of mean, std, p15, p50 and p85, a value per layer (NaN: not recorded)."""
    rows = {
        s: record_at(run, MOMENTS, s, index) if run.holds(MOMENTS, s) else np.full(width, np.nan)
        for s in ("mean", "var", "p15", "p50", "p85")
    }
    return {"std" if s == "var" else s: np.sqrt(np.asarray(v, dtype=np.float64)) if s == "var" else v for s, v in rows.items()}


def build(run: RunData, patterns: Sequence[str], stat: str) -> Moments | None:
    if not run.holds(MOMENTS, STEP) or not run.holds(MOMENTS, "mean"):
        return None
    n = min(record_count(run, MOMENTS, q) for q in (STEP, *STATS) if run.holds(MOMENTS, q))
    if n == 0:
        return None
    stored, width = "var" if stat == "std" else stat, run.data.shape(f"{MOMENTS}/mean")[1]
    if run.holds(MOMENTS, stored):
        series = binned(run, MOMENTS, stored, SERIES_POINTS, n, np.sqrt if stat == "std" else None)
    else:  # a statistic this run did not record: a blank sparkline
        series = Binned.unrecorded(SERIES_POINTS, n, width)
    first, last, kinds = _moment_record(run, 0, width), _moment_record(run, n - 1, width), layer_kinds(run)
    layers: list[MomentLayer] = [
        {
            "name": name,
            "kind": kinds.get(name, ""),
            "first": {s: num(v[j]) for s, v in first.items()},
            "last": {s: num(v[j]) for s, v in last.items()},
            "series": nums(series.means[:, j]),
            "low": num(series.low[j]),
            "high": num(series.high[j]),
        }
        for j, name in enumerate(moment_layers(run))
        if matches(name, patterns)
    ]
    steps = run.data[f"{MOMENTS}/{STEP}"]
    return {
        "records": int(n),
        "first_step": num(steps[0]),
        "last_step": num(steps[n - 1]),
        "steps": nums(steps[series.starts]),
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
    lows, highs = [lay["low"] for lay in layers if lay["low"] is not None], [lay["high"] for lay in layers if lay["high"] is not None]
    lo, hi = (min(lows), max(highs)) if lows else (None, None)  # over every record, not only the sparkline's points
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

"""The report's gradient-shift ICS: per layer, the median over records of the shift's l2 and cosine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from rich.text import Text

from ...store import ICS, STEP, RunData, column_medians, ics_layers, layer_kinds, matches
from ..content import Number, Report, num
from ..page import Page, aligned, fmt, groups, missing


class IcsLayer(TypedDict):
    name: str
    kind: str
    median_l2: Number
    median_cosine: Number


class Ics(TypedDict):
    records: int
    first_step: Number
    last_step: Number
    layers: list[IcsLayer]


def build(run: RunData, patterns: Sequence[str], stat: str) -> Ics | None:
    steps = run.get(ICS, STEP)
    if steps is None or not run.holds(ICS, "l2") or len(steps) == 0:
        return None
    names, kinds = ics_layers(run), layer_kinds(run)
    l2 = column_medians(run, ICS, "l2")
    cos = column_medians(run, ICS, "cosine") if run.holds(ICS, "cosine") else np.full(len(names), np.nan)
    layers: list[IcsLayer] = [
        {"name": name, "kind": kinds.get(name, ""), "median_l2": num(l2[j]), "median_cosine": num(cos[j])}
        for j, name in enumerate(names)
        if matches(name, patterns)
    ]
    return {"records": len(steps), "first_step": num(steps[0]), "last_step": num(steps[-1]), "layers": layers}


def _ics_cell(layer: IcsLayer | None) -> Text:
    if layer is None:
        return missing()
    return Text.assemble(("l2  ", "dim"), fmt(layer["median_l2"]), ("\ncos ", "dim"), fmt(layer["median_cosine"], 4))


def draw(page: Page, report: Report, having: Sequence[tuple[str, Ics]]) -> None:
    names, by_layer = aligned([(label, ics["layers"]) for label, ics in having])
    name_w = min(16, max([5, *map(len, names)]))
    for group in groups(having, page.width, name_w, 14):
        counts = "/".join(map(str, sorted({ics["records"] for _, ics in group})))
        t = page.table("Gradient-shift ICS", "layer", name_w, [label for label, _ in group])
        for name in names:
            t.add_row(name, *(_ics_cell(by_layer[label].get(name)) for label, _ in group))
        page.console.print(t)
        page.note(f"median over {counts} records of l2 = ‖G−G′‖₂ (0: no shift) and cos = cos(G, G′) (1: no shift)")
    page.renamed_note(by_layer)

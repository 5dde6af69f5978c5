"""The page ``bnprobe report`` is printed on: number cells, sparklines and the table pieces every section shares.

Each report section (:mod:`bnprobe.report.sections`) draws its tables on a :class:`Page`, which
folds a table with more variants than the console's width holds into several narrower ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .content import RunReport, align_layers, merge_order

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"

# ----------------------------------------------------------------------------- cells


def sparkline(values: Sequence[float | None], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """``values`` as at most ``width`` block characters (bin means); missing values are spaces.

    ``lo``/``hi`` fix the scale (so that several sparklines compare); by default the series' own.
    """
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if arr.size == 0 or width <= 0:
        return ""
    if arr.size > width:
        bins = np.array_split(arr, width)
        arr = np.array([np.nanmean(b) if np.isfinite(b).any() else np.nan for b in bins])
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return " " * arr.size
    lo = float(finite.min()) if lo is None else lo
    hi = float(finite.max()) if hi is None else hi
    top = len(SPARK_BLOCKS) - 1
    out = []
    for v in arr:
        if not np.isfinite(v):
            out.append(" ")
        elif hi - lo <= 1e-3 * max(abs(lo), abs(hi)):  # flat to 0.1%: 8 levels would only magnify noise
            out.append(SPARK_BLOCKS[top // 2])
        else:
            out.append(SPARK_BLOCKS[round((min(max(v, lo), hi) - lo) / (hi - lo) * top)])
    return "".join(out)


def fmt(value: Any, digits: int = 3) -> str:
    """A compact number: ``—`` for missing, 3 significant digits, scientific when tiny or huge."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(fmt(v, digits) for v in value)
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(digits - 1, 0)}e}"
    return f"{v:.{digits}g}"


# ----------------------------------------------------------------------------- page

T = TypeVar("T")


class LayerRow(TypedDict):
    """What a per-layer entry of a section has for its row to be matched across variants."""

    name: str
    kind: str


L = TypeVar("L", bound=LayerRow)
Cols = list[tuple[str, RunReport]]


def groups(labels: Sequence[T], width: int, first_col: int, min_col: int) -> list[list[T]]:
    per = max(1, (width - first_col) // (min_col + 3))
    return [list(labels[i : i + per]) for i in range(0, len(labels), per)] or [[]]


@dataclass
class Page:
    """The console a report is printed on, and the pieces every section's tables share."""

    console: Console
    cols: Cols

    @property
    def width(self) -> int:
        return self.console.width

    def table(self, title: str, first: str, first_width: int, labels: Iterable[str]) -> Table:
        t = Table(
            title=title,
            title_justify="left",
            title_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            expand=False,
            show_edge=False,
            min_width=min(self.width, len(title)),
        )
        t.add_column(first, max_width=first_width, overflow="fold", style="bold")
        for label in labels:
            t.add_column(label, overflow="fold", no_wrap=False)
        return t

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"), overflow="fold")

    def row_tables(
        self,
        title: str,
        having: Sequence[tuple[str, T]],
        rows: Sequence[tuple[str, Callable[[T], Any]]],
        widths: tuple[int, int],
        captions: Sequence[str] = (),
    ) -> None:
        """One row per quantity, one column per run (groups of columns as the width allows)."""
        for group in groups(having, self.width, *widths):
            t = self.table(title, "", widths[0], [label for label, _ in group])
            for name, get in rows:
                t.add_row(name, *(get(content) for _, content in group))
            self.console.print(t)
            for caption in captions:
                self.note(caption)

    def renamed_note(self, by_row: dict[str, dict[str, L]]) -> None:
        renamed = [(label, row, lay["name"]) for label, rows_of in by_row.items() for row, lay in rows_of.items() if row != lay["name"]]
        if renamed:
            labels = ", ".join(dict.fromkeys(label for label, _, _ in renamed))
            _, row, name = renamed[0]
            self.note(f"{labels}: layers renamed by BN surgery are shown in the row of their original name ({name} as {row})")


def missing() -> Text:
    return Text("—", style="dim")


def aligned(having: Sequence[tuple[str, list[L]]]) -> tuple[list[str], dict[str, dict[str, L]]]:
    """Row names (in order) and, per column label, {row name: layer entry}."""
    maps = align_layers([[(lay["name"], lay["kind"]) for lay in layers] for _, layers in having])
    rows = merge_order([m[lay["name"]] for lay in layers] for m, (_, layers) in zip(maps, having))
    by_row = {label: {m[lay["name"]]: lay for lay in layers} for m, (label, layers) in zip(maps, having)}
    return rows, by_row

"""``bnprobe report`` on a console: the content of :func:`~bnprobe.report.content.build_report` as rich tables.

:func:`render_report` prints variants side by side, folding wide tables into several narrower
ones so that everything fits the console (80 columns included): one small renderer per
section, chosen from :data:`_SECTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..measurements import BY_NAME
from ..store import HESSIAN, ICS, LANDSCAPE, MOMENTS, SPECTRUM, TRAIN, Status
from .content import (
    RECORD_HINTS,
    Hessian,
    IcsLayer,
    Landscape,
    MomentLayer,
    Report,
    RunReport,
    Spectrum,
    Summary,
    align_layers,
    merge_order,
)
from .render_conclusions import draw_conclusions

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
L = TypeVar("L", MomentLayer, IcsLayer)
Cols = list[tuple[str, RunReport]]


def _groups(labels: Sequence[T], width: int, first_col: int, min_col: int) -> list[list[T]]:
    per = max(1, (width - first_col) // (min_col + 3))
    return [list(labels[i : i + per]) for i in range(0, len(labels), per)] or [[]]


@dataclass
class _Page:
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
        for group in _groups(having, self.width, *widths):
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


def _missing() -> Text:
    return Text("—", style="dim")


def _aligned(having: Sequence[tuple[str, list[L]]]) -> tuple[list[str], dict[str, dict[str, L]]]:
    """Row names (in order) and, per column label, {row name: layer entry}."""
    maps = align_layers([[(lay["name"], lay.get("kind", "")) for lay in layers] for _, layers in having])
    rows = merge_order([m[lay["name"]] for lay in layers] for m, (_, layers) in zip(maps, having))
    by_row = {label: {m[lay["name"]]: lay for lay in layers} for m, (label, layers) in zip(maps, having)}
    return rows, by_row


# ----------------------------------------------------------------------------- renderers


def _draw_files(page: _Page, report: Report) -> None:
    for f in report["files"]:
        line = Text(f["path"], style="bold")
        line.append(f"  bnprobe {f.get('bnprobe_version') or '?'}, {f.get('created') or ''}", style="dim")
        page.console.print(line, overflow="fold")
        if not f["runs"] and f.get("variants"):
            page.note(f"  no run matches --variant {report['variant']}; runs: {', '.join(f['variants'])}")
        elif not f["runs"]:
            page.note(f"  no runs recorded; {RECORD_HINTS[TRAIN]}")


_SUMMARY_ROWS: list[tuple[str, Callable[[Summary], str]]] = [
    ("model", lambda s: str(s["model"] or "—")),
    ("BN", lambda s: f"{s['bn_label']} ({s['bn']})" if s["bn"] and s["bn_label"] != s["bn"] else str(s["bn"] or "—")),
    ("data", lambda s: str(s["data"] or "—")),
    ("status", lambda s: str(s["status"]) + (f" at {s['diverged_step']}" if s.get("diverged_step") is not None else "")),
    ("steps", lambda s: fmt(s["steps"])),
    ("final loss", lambda s: fmt(s["final_loss"], 4)),
    ("final acc.", lambda s: "—" if s["final_accuracy"] is None else f"{100 * s['final_accuracy']:.1f} %"),
    ("held-out loss", lambda s: fmt(s["heldout_loss"], 4)),
    ("held-out acc.", lambda s: "—" if s["heldout_accuracy"] is None else f"{100 * s['heldout_accuracy']:.1f} %"),
    ("time", lambda s: "—" if s["seconds"] is None else f"{s['seconds']:.1f} s"),
    ("seed, device", lambda s: f"{fmt(s['seed'])}, {s['device'] or '—'}"),
]


def _draw_summary(page: _Page, having: Cols) -> None:
    held_out = any(run["summary"]["heldout_loss"] is not None for _, run in having)
    rows = [row for row in _SUMMARY_ROWS if held_out or not row[0].startswith("held-out")]
    page.row_tables("Runs", [(label, run["summary"]) for label, run in having], rows, (14, 14))
    for label, run in having:
        status = run["summary"]["status"]
        if status == Status.RUNNING:
            page.note(f"{label}: status running: the run did not finish (or is still writing); showing records up to its last flush")
        elif status == Status.INTERRUPTED:
            page.note(f"{label}: interrupted; showing records up to the stop")
        elif status == Status.FAILED:
            page.note(f"{label}: failed: {run['summary']['error'] or 'no reason recorded'}; showing records up to then")


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
    cells = [_missing() if lay is None else _moment_cell(lay, len(kinds) > 1, spark_w, lo, hi) for lay in present]
    kind = next(iter(kinds)) if len(kinds) == 1 else ""
    return Text.assemble(name, ("\n" + kind if kind else "", "dim")), cells


def _draw_moments(page: _Page, report: Report, having: Cols) -> None:
    contents = [(label, m) for label, run in having if (m := run["moments"]) is not None]
    names, by_layer = _aligned([(label, m["layers"]) for label, m in contents])
    kinds = {lay["kind"] for rows_of in by_layer.values() for lay in rows_of.values()}
    name_w = min(16, max([5, *map(len, names), *map(len, kinds)]))
    first = contents[0][1]
    steps = f"{fmt(first['first_step'])}–{fmt(first['last_step'])}"
    for group in _groups(contents, page.width, name_w, 20):
        spark_w = max(8, min(24, (page.width - name_w) // len(group) - 3))
        t = page.table("Activation moments", "layer", name_w, [label for label, _ in group])
        for name in names:
            head, cells = _moment_row(name, [by_layer[label].get(name) for label, _ in group], spark_w)
            t.add_row(head, *cells, end_section=True)
        page.console.print(t)
        page.note(f"first → last record; sparkline: {report['stat']} over steps {steps}, one scale per row")
    page.renamed_note(by_layer)


def _ics_cell(layer: IcsLayer | None) -> Text:
    if layer is None:
        return _missing()
    return Text.assemble(("l2  ", "dim"), fmt(layer["median_l2"]), ("\ncos ", "dim"), fmt(layer["median_cosine"], 4))


def _draw_ics(page: _Page, _report: Report, having: Cols) -> None:
    contents = [(label, ics) for label, run in having if (ics := run["ics"]) is not None]
    names, by_layer = _aligned([(label, ics["layers"]) for label, ics in contents])
    name_w = min(16, max([5, *map(len, names)]))
    for group in _groups(contents, page.width, name_w, 14):
        counts = "/".join(map(str, sorted({ics["records"] for _, ics in group})))
        t = page.table("Gradient-shift ICS", "layer", name_w, [label for label, _ in group])
        for name in names:
            t.add_row(name, *(_ics_cell(by_layer[label].get(name)) for label, _ in group))
        page.console.print(t)
        page.note(f"median over {counts} records of l2 = ‖G−G′‖₂ (0: no shift) and cos = cos(G, G′) (1: no shift)")
    page.renamed_note(by_layer)


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


def _draw_landscape(page: _Page, _report: Report, having: Cols) -> None:
    contents = [(label, land) for label, run in having if (land := run["landscape"]) is not None]
    caption = "along −g: loss L(w−ηg) and ‖∇L(w)−∇L(w−ηg)‖₂ over all η and records; spread: median over records of max−min over η"
    page.row_tables("Loss landscape", contents, _LANDSCAPE_ROWS, (18, 16), [caption])


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
    return f"λ {block}", lambda d: fmt(d["blocks"][block], 4) if block in d["blocks"] else _missing()


def _draw_hessian(page: _Page, _report: Report, having: Cols) -> None:
    contents = [(label, hess) for label, run in having if (hess := run["hessian"]) is not None]
    blocks = list(dict.fromkeys(b for _, hess in contents for b in hess["blocks"]))
    rows = _HESSIAN_ROWS + [_block_row(b) for b in blocks]
    captions = ["largest in magnitude (it can be negative); residual ‖Hv−λv‖₂ of the unit vector v found"]
    if blocks:
        captions.append("λ LAYER: top eigenvalue of that layer's own block of the Hessian")
    page.row_tables("Top Hessian eigenvalue (last record)", contents, rows, (14, 14), captions)
    if any(hess["converged"] is False for _, hess in contents):
        page.note("not converged: raise probes.hessian.max_iter or loosen probes.hessian.tol (--set probes.hessian.max_iter=300)")


def _spectrum_rows(contents: Sequence[tuple[str, Spectrum]]) -> list[tuple[str, Callable[[Spectrum], Any]]]:
    k = max(len(spec["top_k"]) for _, spec in contents)
    blocks = list(dict.fromkeys(b for _, spec in contents for b in spec["blocks"]))

    def top(i: int) -> Callable[[Spectrum], Any]:
        return lambda d: fmt(d["top_k"][i], 4) if i < len(d["top_k"]) else _missing()

    def block(name: str) -> Callable[[Spectrum], Any]:
        return lambda d: f"{fmt(d['blocks'][name][0], 4)} / {fmt(d['blocks'][name][1], 4)}" if name in d["blocks"] else _missing()

    return [
        ("at step", lambda d: fmt(d["last_step"])),
        *((f"λ{i + 1}", top(i)) for i in range(k)),
        ("trace", lambda d: f"{fmt(d['trace'], 4)} ± {fmt(d['trace_stderr'], 2)}" if d["trace"] is not None else _missing()),
        ("iterations", lambda d: fmt(d["iterations"])),
        ("converged", lambda d: {True: "yes", False: "NO", None: "—"}[d["converged"]]),
        ("bn mode", lambda d: str(d["bn_mode"] or "—")),
        ("samples", lambda d: fmt(d["samples"])),
        *((f"λ1 / tr {b}", block(b)) for b in blocks),
    ]


def _draw_spectrum(page: _Page, _report: Report, having: Cols) -> None:
    contents = [(label, spec) for label, run in having if (spec := run["spectrum"]) is not None]
    captions = ["λ1 ≥ λ2 ≥ …: the largest eigenvalues (Lanczos); trace: Hutchinson estimate ± its standard error"]
    if any(spec["blocks"] for _, spec in contents):
        captions.append("λ1 / tr LAYER: top eigenvalue and trace of that layer's own block of the Hessian")
    page.row_tables("Hessian spectrum (last record)", contents, _spectrum_rows(contents), (14, 14), captions)
    if any(spec["converged"] is False for _, spec in contents):
        page.note("not converged: raise probes.spectrum.max_iter or loosen probes.spectrum.tol")


SectionKey = Literal["moments", "ics", "landscape", "hessian", "spectrum"]


@dataclass(frozen=True)
class _Section:
    """A section of the report: where its content is, what the registry calls it, and how to draw it."""

    key: SectionKey
    draw: Callable[[_Page, Report, Cols], None]

    @property
    def title(self) -> str:  # in the hint when no run has it
        return BY_NAME[self.key].title

    @property
    def what(self) -> str:  # in the note for a run without it
        return BY_NAME[self.key].what


#: the sections with a table of their own, in the registry's order (training and held-out records are in the summary)
_SECTIONS = (
    _Section(MOMENTS, _draw_moments),
    _Section(ICS, _draw_ics),
    _Section(LANDSCAPE, _draw_landscape),
    _Section(HESSIAN, _draw_hessian),
    _Section(SPECTRUM, _draw_spectrum),
)


def render_report(report: Report, console: Console) -> None:
    """Print ``report`` (from :func:`build_report`) on a ``rich`` console, variants side by side.

    Tables with more variants than fit the console's width are split into several tables.
    Sections without data are skipped with a dim hint saying how to record them.
    """
    page = _Page(console, [(run["label"], run) for f in report["files"] for run in f["runs"].values()])
    if page.cols:
        draw_conclusions(console, report["conclusions"])
    _draw_files(page, report)
    if not page.cols:
        return
    _draw_summary(page, page.cols)
    for section in _SECTIONS:
        having = [(label, run) for label, run in page.cols if run[section.key]]
        if not having:
            page.note(f"{section.title}: not recorded ({RECORD_HINTS[section.key]})")
            continue
        section.draw(page, report, having)
        for label, run in page.cols:
            if run[section.key] is None:
                page.note(f"{label}: no {section.what} recorded")

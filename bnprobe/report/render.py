"""``bnprobe report`` on a console: the content of :func:`~bnprobe.report.content.build_report` as rich tables.

:func:`render_report` prints variants side by side, folding wide tables into several narrower
ones so that everything fits the console (80 columns included): the runs' summary here,
then each section of :mod:`bnprobe.report.sections` drawn by its own ``draw`` (:data:`_SECTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.text import Text

from ..measurements import Measurement
from ..store import TRAIN, Status
from .content import RECORD_HINTS, Report, Summary
from .page import Cols, Page, fmt
from .render_conclusions import draw_conclusions
from .sections import section_modules


def _draw_files(page: Page, report: Report) -> None:
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


def _draw_summary(page: Page, having: Cols) -> None:
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


@dataclass(frozen=True)
class _Section:
    """A section of the report: the measurement it shows (its name is the section's key in a run's
    content; its title, hint and noun are in the notes of runs without it) and how to draw it."""

    measurement: Measurement
    draw: Callable[[Page, Report, Sequence[tuple[str, Any]]], None]

    @property
    def key(self) -> str:
        return self.measurement.name


#: the sections with a table of their own, in the registry's order (training and held-out records are in the summary)
_SECTIONS = tuple(_Section(m, module.draw) for m, module in section_modules())


def render_report(report: Report, console: Console) -> None:
    """Print ``report`` (from :func:`build_report`) on a ``rich`` console, variants side by side.

    Tables with more variants than fit the console's width are split into several tables.
    Sections without data are skipped with a dim hint saying how to record them.
    """
    page = Page(console, [(run["label"], run) for f in report["files"] for run in f["runs"].values()])
    if page.cols:
        draw_conclusions(console, report["conclusions"])
    _draw_files(page, report)
    if not page.cols:
        return
    _draw_summary(page, page.cols)
    for section in _SECTIONS:
        having = [(label, content) for label, run in page.cols if (content := run.get(section.key))]
        if not having:
            page.note(f"{section.measurement.title}: not recorded ({section.measurement.hint})")
            continue
        section.draw(page, report, having)
        for label, run in page.cols:
            if run.get(section.key) is None:
                page.note(f"{label}: no {section.measurement.what} recorded")

"""The report's first screen on a rich console: findings, health flags, conditions over seeds."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .conclusions import Conclusions, ConditionData, IntervalData

_MARKS = {True: ("✓", "green"), False: ("✗", "bold red"), None: ("·", "yellow")}
_AGREES = {True: "agrees", False: "CONTRADICTS the claim", None: "cannot tell"}


def _marked_list(console: Console, title: str, rows: list[tuple[Text, Text]]) -> None:
    """``title``, then each (mark, text) row with the text's wrapped lines indented past the mark."""
    console.print(Text(title, style="bold"))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=3, justify="right")
    grid.add_column(overflow="fold")
    for mark, text in rows:
        grid.add_row(mark, text)
    console.print(grid)


def draw_findings(console: Console, conclusions: Conclusions) -> None:
    found = conclusions["findings"]
    if not found:
        console.print(Text("Findings: none (needs runs with and without BN, with the same other settings)", style="dim"))
        return
    rows = []
    for f in found:
        mark, style = _MARKS[f["agrees"]]
        text = Text(f["verdict"])
        text.append(f"\n{f['claim']}: {_AGREES[f['agrees']]}", style="dim")
        rows.append((Text(mark, style=style), text))
    if any(f["window"] != {"first_step": 0, "end_step": None} for f in found):
        window = "Learning window: from the step every compared run had left its chance level to the first health flag of any of them; whole-run numbers are in --json."
        rows.append((Text(""), Text(window, style="dim")))
    _marked_list(console, "Findings", rows)


def draw_health(console: Console, conclusions: Conclusions) -> None:
    flags = conclusions["health"]
    if not flags:
        console.print(Text("Health: no flags (no collapse, dead layer, early fit or divergence)", style="dim"))
        return
    rows = []
    for flag in flags:
        text = Text(f"{flag['run']}: ", style="bold yellow")
        text.append(f"{flag['kind']} from step {flag['step']} ({flag['detail']})")
        text.append(f"\n{flag['meaning']}", style="dim")
        rows.append((Text("!", style="bold yellow"), text))
    _marked_list(console, "Health", rows)


def _interval(value: IntervalData | None, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± half-width`` (a t interval is symmetric), or the mean alone for one seed."""
    if value is None:
        return "—"
    mean = f"{value['mean'] * scale:.{digits}g}"
    if value["low"] is None or value["high"] is None:
        return mean
    return f"{mean} ± {(value['high'] - value['low']) * scale / 2:.2g}"


def draw_conditions(console: Console, conclusions: Conclusions) -> None:
    conds = conclusions["conditions"]
    if not conds:
        return
    t = Table(title="Conditions (mean ± 95% interval over seeds)", title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    t.add_column("condition", overflow="fold", style="bold")
    held_out = any(c["heldout_accuracy"] for c in conds)
    for name in ("seeds", "final loss", "final acc. %", *(["held-out acc. %"] if held_out else []), "time s"):
        t.add_column(name, overflow="fold")
    for cond in conds:
        held = [_interval(cond["heldout_accuracy"], 3, 100.0)] if held_out else []
        t.add_row(_name(cond), str(len(cond["seeds"])), _interval(cond["final_loss"]),
                  _interval(cond["final_accuracy"], 3, 100.0), *held, _mean(cond["seconds"]))  # fmt: skip
    console.print(t)
    for cond in conds:
        if cond["repeats"]:
            console.print(Text(f"  {_name(cond)}: {cond['repeats']} more run(s) of a seed already counted, left out", style="dim"))


def _mean(value: IntervalData | None) -> str:
    return "—" if value is None else f"{value['mean']:.3g}"


def _name(cond: ConditionData) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in cond["settings"].items())
    return f"{cond['label']} ({settings})" if settings else cond["label"]


def draw_conclusions(console: Console, conclusions: Conclusions) -> None:
    """Findings, then health, then the conditions: what a researcher must read before any number."""
    draw_findings(console, conclusions)
    draw_health(console, conclusions)
    draw_conditions(console, conclusions)

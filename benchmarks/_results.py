"""Where the benchmarks' measured figures live: each benchmark rewrites its own section of
``benchmarks/RESULTS.md`` at the end of a run, stamped with the date, the machine and the command.

Docstrings and comments say what a benchmark measures and why; the numbers a run gives belong
here, next to where and how they were measured, so that a new run replaces them instead of
leaving prose that no longer matches. A section lies between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; everything outside it is left as it was.

The scripts import this module inside ``main`` (``benchmarks/`` is ``sys.path[0]`` when one runs
as a script), so that tests can load a script by its path without it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_NUMBER = re.compile(r"^$|^n/a$|^[<>~=+-]*\d")

HEADER = """# Benchmark results

Written by the scripts in `benchmarks/`: each run rewrites its own section (between the two
HTML comments that name it) with the date, the machine and the exact command, and leaves the rest
of this file alone. Run with `--no-record` to leave this file untouched. Numbers from a busy
or shared machine say little; the load average at the end of the run is stamped to show it.
"""


@dataclass
class Table:
    """A result table: printed as aligned text by the script, recorded as Markdown."""

    title: str
    header: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def numeric(self) -> list[bool]:
        """Per column: right-aligned, as numbers are (every cell a number, maybe after < > or ~, or empty)."""
        return [i > 0 and all(_NUMBER.match(row[i]) for row in self.rows) for i in range(len(self.header))]

    def text(self) -> str:
        """Aligned columns for the console: numbers right-aligned, text left-aligned."""
        cells = [list(self.header), *(list(r) for r in self.rows)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        right = self.numeric()
        lines = [self.title] if self.title else []
        for row in cells:
            lines.append("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        return "\n".join([*lines, *self.notes])

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "|".join("---:" if r else ":---" for r in self.numeric()) + "|"
        parts = [f"**{self.title}**\n"] if self.title else []
        parts += [line(self.header), rule, *(line(r) for r in self.rows)]
        if self.notes:
            parts += ["", *self.notes]
        return "\n".join(parts)


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-record", action="store_true", help="do not write this run's results to benchmarks/RESULTS.md")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``sys.argv`` by default), ready to paste into a shell."""
    return shlex.join(["python", *(sys.argv if argv is None else argv)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """CPU model and core count, torch's version and threads, the CUDA device if any, and the load."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"CUDA device: {gpu}; Python {platform.python_version()} on {platform.system()}; load average (1 min) {load}"
    )


def section(benchmark: str, command: str, table_markdown: str, when: datetime.datetime, where: str) -> str:
    """The section's text, markers included."""
    return "\n".join(
        [
            f"<!-- bench:{benchmark} -->",
            f"## {benchmark}",
            "",
            f"- date: {when.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {where}",
            f"- command: `{command}`",
            "",
            table_markdown.strip(),
            "",
            f"<!-- /bench:{benchmark} -->",
        ]
    )


def replace_section(text: str, benchmark: str, body: str) -> str:
    """``text`` with the section of ``benchmark`` replaced by ``body`` (appended when there is none)."""
    pattern = re.compile(rf"<!-- bench:{re.escape(benchmark)} -->.*?<!-- /bench:{re.escape(benchmark)} -->", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: body, text, count=1)
    return f"{text.rstrip()}\n\n{body}\n" if text.strip() else f"{HEADER}\n{body}\n"


def record(
    benchmark: str,
    command: str,
    table_markdown: str,
    path: Path = RESULTS,
    when: datetime.datetime | None = None,
    where: str | None = None,
) -> Path:
    """Rewrite ``benchmark``'s section of ``path`` (RESULTS.md) with this run's table and stamp."""
    body = section(benchmark, command, table_markdown, when or datetime.datetime.now(datetime.timezone.utc), where or machine())
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, benchmark, body))
    return path


def finish(benchmark: str, tables: Sequence[Table], no_record: bool) -> None:
    """What every benchmark does at the end: record its tables unless ``--no-record``, and say where."""
    if no_record:
        return
    written = record(benchmark, command_line(), "\n\n".join(t.markdown() for t in tables), RESULTS)
    print(f"recorded in {written}", file=sys.stderr)

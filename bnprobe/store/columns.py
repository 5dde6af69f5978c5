"""Runs as columns: the runs of one or more files that the report, export and plot put side by
side, picked by variant name, and the names along their records' axes."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import layer_patterns
from ..errors import ConfigError
from ..measurements import BLOCK, HESSIAN, ICS, LAYER, MOMENTS
from .reader import FileData, RunData, read_file


@dataclass
class Column:
    """One run of one file: a column of the side-by-side tables and figures."""

    label: str
    path: Path
    run: RunData


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the globs ``patterns`` (all names do when there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def listing(values: Iterable[str], limit: int = 12) -> str:
    """Names for a "choose from" hint: the first ``limit`` of them, and how many there are in all."""
    values = list(dict.fromkeys(values))
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "") if values else "(none)"


def load_columns(paths: Sequence[str | Path], variant: str | None = None) -> tuple[list[FileData], list[Column]]:
    """Read ``paths`` and pick the runs ``variant`` names (comma-separated names or globs).

    Columns are labelled by variant, prefixed with the file's stem (or more of its path, where
    stems repeat) when several files are read.
    Raises :class:`ConfigError` when ``variant`` matches no run in any file.
    """
    files = [read_file(p) for p in paths]
    patterns = layer_patterns(variant) if variant else ()
    all_names = [name for f in files for name in f.runs]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    if unknown:
        raise ConfigError(f"no variant {unknown[0]!r} in {_file_list(files)}; choose from {listing(all_names)}")
    prefixes = _file_labels([f.path for f in files])
    columns = [
        Column(f"{prefix}:{name}" if len(files) > 1 else name, f.path, run)
        for f, prefix in zip(files, prefixes)
        for name, run in f.runs.items()
        if matches(name, patterns)
    ]
    return files, columns


def _file_labels(paths: Sequence[Path]) -> list[str]:
    """Each file's stem; where stems repeat (``a/run.h5``, ``b/run.h5``), as many parent folders
    as it takes to tell them apart, and a position number when even the full paths agree."""
    parts = [p.resolve().with_suffix("").parts for p in paths]
    for depth in range(1, max(len(q) for q in parts) + 1):
        labels = ["/".join(q[-depth:]) for q in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i + 1}" for i, label in enumerate(p.stem for p in paths)]


def _file_list(files: Sequence[FileData]) -> str:
    return ", ".join(str(f.path) for f in files) or "the given files"


def moment_layers(run: RunData) -> list[str]:
    """Names of the columns of the ``moments`` records: the layers table, in order."""
    return run.labels(MOMENTS, LAYER)


def ics_layers(run: RunData) -> list[str]:
    """Names of the columns of the ``ics`` records (its own list, else the layers table)."""
    return run.labels(ICS, LAYER)


def hessian_block_labels(run: RunData) -> list[str]:
    """Names of the columns of the per-block ``hessian`` records."""
    return run.labels(HESSIAN, BLOCK)


def layer_kinds(run: RunData) -> dict[str, str]:
    return {lay["name"]: str(lay["kind"]) for lay in run.layers}

"""The content of ``bnprobe report``: what a run recorded, as plain JSON-ready data.

:func:`build_report` reads one or more bnprobe files (through :mod:`bnprobe.store` only) and
summarises every run (variant): the run itself, then each section of
:mod:`bnprobe.report.sections` (one per measurement with a table in the report) from its own
``build``.

Every number is a plain ``float`` or ``int`` (non-finite values become ``None``), so
``json.dumps(build_report(...))`` is the ``--json`` output. Nothing here knows about rich.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypedDict, cast

import numpy as np

from ..config import layer_patterns
from ..errors import ConfigError
from ..findings import bn_label
from ..measurements import MEASUREMENTS
from ..store import HELDOUT, ICS, STATS, STEP, TRAIN, Column, RunData, ics_layers, listing, load_columns, matches, moment_layers
from .conclusions import Conclusions, build_conclusions
from .sections import section_modules

#: statistics ``--stat`` accepts: the recorded ones plus ``std`` (square root of ``var``).
STAT_CHOICES = (*STATS, "std")


# ----------------------------------------------------------------------------- content types

Number: TypeAlias = "float | int | None"
Plain: TypeAlias = "str | int | float | list[Plain] | None"  # an attribute, JSON-ready


class Summary(TypedDict):
    model: Plain
    bn: Plain
    bn_label: str  # what the model held: "no BN", "BN", "noisy BN", ...
    data: Plain
    seed: Plain
    device: Plain
    status: Plain
    steps: Number
    records: int
    last_step: Number
    final_loss: Number
    final_accuracy: Number
    heldout_loss: Number  # the last held-out record, eval mode
    heldout_accuracy: Number
    seconds: Number
    diverged_step: Number
    error: Plain  # why a failed run stopped


class RunReport(TypedDict):
    """A run's label and summary; then, under each report section's name, its content (``None``
    where the run did not record it), typed in its module of :mod:`bnprobe.report.sections`."""

    label: str
    summary: Summary


class FileReport(TypedDict):
    path: str
    bnprobe_version: Plain
    created: Plain
    variants: list[str]
    runs: dict[str, RunReport]


class Report(TypedDict):
    conclusions: Conclusions
    stat: str
    layers: str | None
    variant: str | None
    files: list[FileReport]


# ----------------------------------------------------------------------------- numbers (the section modules build with these too)


def num(value: Any) -> Number:
    """A JSON-ready number: finite floats and ints as is, NaN/inf/missing as ``None``."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def nums(values: Any) -> list[Number]:
    """Every value of ``values`` (any shape), flattened, as :func:`num`."""
    return [num(v) for v in np.asarray(values).reshape(-1).tolist()]


def plain(value: Any) -> Plain:
    """Attributes as JSON-ready values (numpy scalars and arrays included)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(value, (int, float, np.generic)):
        return num(value)
    return str(value)


def nanreduce(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> Any:
    """``np.nanmedian`` & co. without the all-NaN warning (the result is NaN then); infinities are left out too."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return fn(values[finite]) if finite.any() else np.nan


# ----------------------------------------------------------------------------- runs and their sections


def _device(attrs: Mapping[str, Any]) -> str:
    """The run's device, and under torchrun how many processes shared the batch (``2x cpu gloo``)."""
    device, processes = str(attrs.get("device", "")), num(attrs.get("world_size"))
    return device if processes is None or processes <= 1 else f"{int(processes)}x {device} {attrs.get('dist_backend', '')}".rstrip()


def _summary(run: RunData) -> Summary:
    a = run.attrs
    steps_attr = a.get("steps")
    steps = run.get(TRAIN, STEP)
    last_step = run.last(TRAIN, STEP)
    seconds = a.get("seconds")
    if seconds is None or num(seconds) is None:
        seconds = run.last(TRAIN, "seconds")
    return {
        "model": plain(a.get("model", "")),
        "bn": plain(a.get("bn", "")),
        "bn_label": bn_label(a),
        "data": plain(a.get("data", "")),
        "seed": plain(a.get("seed")),
        "device": _device(a),
        "status": plain(a.get("status", "unknown")),
        "steps": num(steps_attr) if steps_attr is not None else (int(last_step) + 1 if last_step is not None else None),
        "records": len(steps) if steps is not None else 0,
        "last_step": num(last_step),
        "final_loss": num(run.last(TRAIN, "loss")),
        "final_accuracy": num(run.last(TRAIN, "accuracy")),
        "heldout_loss": num(run.last(HELDOUT, "loss")),
        "heldout_accuracy": num(run.last(HELDOUT, "accuracy")),
        "seconds": num(seconds),
        "diverged_step": num(a.get("diverged_step")),
        "error": plain(a.get("error")),
    }


def _run_report(column: Column, patterns: Sequence[str], stat: str) -> RunReport:
    run = column.run
    sections = {m.name: module.build(run, patterns, stat) for m, module in section_modules()}
    return cast(RunReport, {"label": column.label, "summary": _summary(run), **sections})


def build_report(
    paths: Sequence[str | Path],
    layers: str | None = None,
    stat: str | None = None,
    variant: str | None = None,
) -> Report:
    """The content of ``bnprobe report``, JSON-ready.

    ``layers``: comma-separated globs over layer names (moments and ICS rows); ``stat``: the
    statistic of the sparkline series (default ``mean``; one of :data:`STAT_CHOICES`);
    ``variant``: comma-separated run names or globs. Unknown choices raise :class:`ConfigError`.
    """
    stat = stat or "mean"
    if stat not in STAT_CHOICES:
        raise ConfigError(f"unknown --stat {stat!r}; choose from {', '.join(STAT_CHOICES)}")
    files, columns = load_columns(paths, variant)
    patterns = layer_patterns(layers) if layers else ()
    if patterns:
        names = merge_order([*moment_layers(c.run), *(ics_layers(c.run) if c.run.has(ICS) else [])] for c in columns)
        if not any(matches(n, patterns) for n in names):
            raise ConfigError(f"--layers {layers!r} matches no layer; layers: {listing(names)}")
    conclusions = build_conclusions([(c.label, c.run) for c in columns])
    report: Report = {"conclusions": conclusions, "stat": stat, "layers": layers, "variant": variant, "files": []}
    for f in files:
        report["files"].append(
            {
                "path": str(f.path),
                "bnprobe_version": plain(f.attrs.get("bnprobe_version")),
                "created": plain(f.attrs.get("created")),
                "variants": list(f.runs),
                "runs": {c.run.name: _run_report(c, patterns, stat) for c in columns if c.path == f.path},
            }
        )
    return report


# ----------------------------------------------------------------------------- layout
# column/layout knowledge shared with plot, not report knowledge: it belongs with the store's columns

#: how to get each section's data, for hints and errors
RECORD_HINTS = {m.name: m.hint for m in MEASUREMENTS}


def merge_order(lists: Iterable[Sequence[str]]) -> list[str]:
    """Union of name lists, keeping each list's order (new names go after their predecessor)."""
    merged: list[str] = []
    for names in lists:
        prev = -1
        for name in names:
            if name in merged:
                prev = merged.index(name)
            else:
                merged.insert(prev + 1, name)
                prev += 1
    return merged


def align_layers(per_column: Sequence[Sequence[tuple[str, str]]]) -> list[dict[str, str]]:
    """Row keys that match layers across variants: per column, ``{layer name: row name}``.

    BN surgery may rename a layer (``features.0`` becomes ``features.0.conv`` next to a new
    ``features.0.bn``); a layer whose name extends a layer of the same kind in another column,
    absent from its own, is matched to that name. Everything else keeps its own name.
    """
    present = {(n, k) for layers in per_column for n, k in layers}
    maps = []
    for layers in per_column:
        own = {n for n, _ in layers}
        mapping: dict[str, str] = {}
        for name, kind in layers:
            row = name
            parts = name.split(".")
            for j in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:j])
                if prefix not in own and (prefix, kind) in present and prefix not in mapping.values():
                    row = prefix
                    break
            mapping[name] = row
        maps.append(mapping)
    return maps

"""The content of ``bnprobe report``: what a run recorded, as plain JSON-ready data.

:func:`build_report` reads one or more bnprobe files (through :mod:`bnprobe.store` only) and
summarises every run (variant): the run itself, per-layer activation moments (first vs last
record and a series for a sparkline), per-layer ICS medians, the landscape and the Hessian.

Every number is a plain ``float`` or ``int`` (non-finite values become ``None``), so
``json.dumps(build_report(...))`` is the ``--json`` output. Nothing here knows about rich.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypedDict

import numpy as np

from ..config import layer_patterns
from ..errors import ConfigError
from ..findings import bn_label
from ..measurements import MEASUREMENTS
from ..store import (
    BLOCK,
    HELDOUT,
    HESSIAN,
    ICS,
    LANDSCAPE,
    MOMENTS,
    SPECTRUM,
    STATS,
    STEP,
    TRAIN,
    Binned,
    Column,
    RunData,
    binned,
    column_medians,
    extremes,
    hessian_block_labels,
    ics_layers,
    layer_kinds,
    listing,
    load_columns,
    matches,
    moment_layers,
    record_at,
    record_count,
    record_ranges,
)
from .conclusions import Conclusions, build_conclusions

#: statistics ``--stat`` accepts: the recorded ones plus ``std`` (square root of ``var``).
STAT_CHOICES = (*STATS, "std")
#: points of a sparkline series at most: a longer run's records are cut evenly into this many bins,
#: each bin's mean kept, so that memory does not grow with the run (most sparkline widths divide it)
SERIES_POINTS = 240


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


class Landscape(TypedDict):
    records: int
    first_step: Number
    last_step: Number
    etas: int | None
    eta_min: Number
    eta_max: Number
    loss_min: Number
    loss_max: Number
    loss_spread_median: Number
    grad_l2_min: Number
    grad_l2_max: Number
    grad_l2_spread_median: Number
    beta_median: Number
    beta_max: Number


class Hessian(TypedDict):
    records: int
    last_step: Number
    top_eigenvalue: Number | list[Number]
    iterations: Number | list[Number]
    residual: Number | list[Number]
    converged: bool | None
    bn_mode: Plain
    samples: Plain
    blocks: dict[str, Number]


class Spectrum(TypedDict):
    records: int
    last_step: Number
    top_k: list[Number]  # largest first
    iterations: Number
    converged: bool | None
    trace: Number
    trace_stderr: Number
    bn_mode: Plain
    samples: Plain
    blocks: dict[str, tuple[Number, Number]]  # layer -> (top eigenvalue, trace) of its block


class RunReport(TypedDict):
    label: str
    summary: Summary
    moments: Moments | None
    ics: Ics | None
    landscape: Landscape | None
    hessian: Hessian | None
    spectrum: Spectrum | None


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


# ----------------------------------------------------------------------------- numbers


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


def _nums(values: Any) -> list[Number]:
    return [num(v) for v in np.asarray(values).reshape(-1).tolist()]


def _plain(value: Any) -> Plain:
    """Attributes as JSON-ready values (numpy scalars and arrays included)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(value, (int, float, np.generic)):
        return num(value)
    return str(value)


def _nanreduce(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> Any:
    """``np.nanmedian`` & co. without the all-NaN warning (the result is NaN then); infinities are left out too."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return fn(values[finite]) if finite.any() else np.nan


# ----------------------------------------------------------------------------- sections


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
        "model": _plain(a.get("model", "")),
        "bn": _plain(a.get("bn", "")),
        "bn_label": bn_label(a),
        "data": _plain(a.get("data", "")),
        "seed": _plain(a.get("seed")),
        "device": _device(a),
        "status": _plain(a.get("status", "unknown")),
        "steps": num(steps_attr) if steps_attr is not None else (int(last_step) + 1 if last_step is not None else None),
        "records": len(steps) if steps is not None else 0,
        "last_step": num(last_step),
        "final_loss": num(run.last(TRAIN, "loss")),
        "final_accuracy": num(run.last(TRAIN, "accuracy")),
        "heldout_loss": num(run.last(HELDOUT, "loss")),
        "heldout_accuracy": num(run.last(HELDOUT, "accuracy")),
        "seconds": num(seconds),
        "diverged_step": num(a.get("diverged_step")),
        "error": _plain(a.get("error")),
    }


def _moment_record(run: RunData, index: int, width: int) -> dict[str, np.ndarray]:
    """Record ``index`` of mean, std, p15, p50 and p85, a value per layer (NaN: not recorded)."""
    rows = {
        s: record_at(run, MOMENTS, s, index) if run.holds(MOMENTS, s) else np.full(width, np.nan)
        for s in ("mean", "var", "p15", "p50", "p85")
    }
    return {"std" if s == "var" else s: np.sqrt(np.asarray(v, dtype=np.float64)) if s == "var" else v for s, v in rows.items()}


def _moments(run: RunData, patterns: Sequence[str], stat: str) -> Moments | None:
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
            "series": _nums(series.means[:, j]),
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
        "steps": _nums(steps[series.starts]),
        "stat": stat,
        "layers": layers,
        "per_channel_layers": run.per_channel_layers(),
        "histogram": run.holds(MOMENTS, "histogram"),
    }


def _ics(run: RunData, patterns: Sequence[str]) -> Ics | None:
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


def _landscape(run: RunData) -> Landscape | None:
    steps = run.get(LANDSCAPE, STEP)
    if steps is None or len(steps) == 0:
        return None
    beta, eta = run.get(LANDSCAPE, "beta_smoothness"), run.get(LANDSCAPE, "eta")

    def spread(quantity: str) -> Number:
        if not run.holds(LANDSCAPE, quantity) or len(run.data.shape(f"{LANDSCAPE}/{quantity}")) != 2:
            return None
        return num(_nanreduce(np.median, record_ranges(run, LANDSCAPE, quantity)))

    loss, grad = (extremes(run, LANDSCAPE, q) if run.holds(LANDSCAPE, q) else (np.nan, np.nan) for q in ("loss", "grad_l2"))
    return {
        "records": len(steps),
        "first_step": num(steps[0]),
        "last_step": num(steps[-1]),
        "etas": len(eta) if eta is not None else None,
        "eta_min": num(np.min(eta)) if eta is not None and len(eta) else None,
        "eta_max": num(np.max(eta)) if eta is not None and len(eta) else None,
        "loss_min": num(loss[0]),
        "loss_max": num(loss[1]),
        "loss_spread_median": spread("loss"),
        "grad_l2_min": num(grad[0]),
        "grad_l2_max": num(grad[1]),
        "grad_l2_spread_median": spread("grad_l2"),
        "beta_median": num(_nanreduce(np.median, beta)) if beta is not None else None,
        "beta_max": num(_nanreduce(np.max, beta)) if beta is not None else None,
    }


def _hessian(run: RunData) -> Hessian | None:
    steps = run.get(HESSIAN, STEP)
    if steps is None or len(steps) == 0:
        return None
    attrs = run.attrs_of(HESSIAN, "top_eigenvalue")

    def last(quantity: str) -> Number | list[Number]:
        value = run.last(HESSIAN, quantity)
        return num(value) if value is None or np.ndim(value) == 0 else _nums(value)

    converged, blocks = run.last(HESSIAN, "converged"), run.last(HESSIAN, "block_top_eigenvalue")
    return {
        "records": len(steps),
        "last_step": num(steps[-1]),
        "top_eigenvalue": last("top_eigenvalue"),
        "iterations": last("iterations"),
        "residual": last("residual"),
        "converged": bool(converged) if converged is not None else None,
        "bn_mode": _plain(attrs.get("bn_mode")),
        "samples": _plain(attrs.get("samples")),
        "blocks": {name: num(v) for name, v in zip(hessian_block_labels(run), blocks)} if blocks is not None else {},
    }


def _spectrum(run: RunData) -> Spectrum | None:
    steps = run.get(SPECTRUM, STEP)
    if steps is None or len(steps) == 0:
        return None
    attrs = run.attrs_of(SPECTRUM, "top_k")
    converged, top, trace = run.last(SPECTRUM, "converged"), run.last(SPECTRUM, "block_top_eigenvalue"), run.last(SPECTRUM, "block_trace")
    names = run.labels(SPECTRUM, BLOCK) if top is not None else []
    return {
        "records": len(steps),
        "last_step": num(steps[-1]),
        "top_k": _nums(run.last(SPECTRUM, "top_k")),
        "iterations": num(run.last(SPECTRUM, "iterations")),
        "converged": bool(converged) if converged is not None else None,
        "trace": num(run.last(SPECTRUM, "trace")),
        "trace_stderr": num(run.last(SPECTRUM, "trace_stderr")),
        "bn_mode": _plain(attrs.get("bn_mode")),
        "samples": _plain(attrs.get("samples")),
        "blocks": {n: (num(top[i]), num(trace[i]) if trace is not None else None) for i, n in enumerate(names)},
    }


def _run_report(column: Column, patterns: Sequence[str], stat: str) -> RunReport:
    run = column.run
    return {
        "label": column.label,
        "summary": _summary(run),
        "moments": _moments(run, patterns, stat),
        "ics": _ics(run, patterns),
        "landscape": _landscape(run),
        "hessian": _hessian(run),
        "spectrum": _spectrum(run),
    }


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
                "bnprobe_version": _plain(f.attrs.get("bnprobe_version")),
                "created": _plain(f.attrs.get("created")),
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

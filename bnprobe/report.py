"""``bnprobe report``: what a run recorded, as JSON-ready content and as rich tables.

:func:`build_report` reads one or more bnprobe files (through :mod:`bnprobe.store` only) and
summarises every run (variant): the run itself, per-layer activation moments (first vs last
record and a series for a sparkline), per-layer ICS medians, the landscape and the Hessian.
:func:`render_report` prints that content with variants side by side, folding wide tables
into several narrower ones so that everything fits the console (80 columns included).

Every number in the report is a plain ``float`` or ``int`` (non-finite values become ``None``),
so ``json.dumps(build_report(...))`` is the ``--json`` output.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .probes.moments import STATS
from .store import FileData, RunData, read_file

#: statistics ``--stat`` accepts: the recorded ones plus ``std`` (square root of ``var``).
STAT_CHOICES = (*STATS, "std")
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
ICS_QUANTITIES = ("l2", "cosine", "grad_norm", "grad_norm_shifted", "rel_diff")

#: how to get each section's data, for hints and errors
RECORD_HINTS = {
    "train": "run bnprobe train",
    "moments": "run bnprobe train; moments are recorded every probes.record_every steps",
    "ics": "run bnprobe measure-ics, or set probes.ics_every",
    "landscape": "run bnprobe measure-ics with probes.landscape: true",
    "hessian": "set probes.hessian: true",
}


# ----------------------------------------------------------------------------- reading helpers


@dataclass
class Column:
    """One run of one file: a column of the side-by-side tables."""

    label: str
    path: Path
    run: RunData


def split_patterns(value: str | None) -> list[str]:
    """``"a,b*"`` -> ``["a", "b*"]``; ``None`` or empty -> ``[]`` (no filter)."""
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _choices(values: Iterable[str], limit: int = 12) -> str:
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
    patterns = split_patterns(variant)
    all_names = [name for f in files for name in f.runs]
    if patterns:
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
        if unknown:
            raise ConfigError(f"no variant {unknown[0]!r} in {_file_list(files)}; choose from {_choices(all_names)}")
    prefixes = _file_labels([f.path for f in files])
    columns = [
        Column(f"{prefix}:{name}" if len(files) > 1 else name, f.path, run)
        for f, prefix in zip(files, prefixes)
        for name, run in f.runs.items()
        if _matches(name, patterns)
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


def strings(values: Any) -> list[str]:
    """A stored string array (bytes, str or object) as a list of ``str``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1).tolist()]


def moment_layers(run: RunData) -> list[str]:
    """Names of the columns of ``moments/<stat>``: the layers table, in order."""
    width = run.data["moments/mean"].shape[1] if "moments/mean" in run.data else len(run.layers)
    names = [lay["name"] for lay in sorted(run.layers, key=lambda lay: lay["order"])]
    return names if len(names) == width else [f"#{i}" for i in range(width)]


def ics_layers(run: RunData) -> list[str]:
    """Names of the columns of the ``ics/*`` datasets (``ics/layer``, else the layers table)."""
    width = next((run.data[f"ics/{q}"].shape[1] for q in ICS_QUANTITIES if f"ics/{q}" in run.data), 0)
    if "ics/layer" in run.data:
        names = strings(run.data["ics/layer"])
        if len(names) == width:
            return names
    names = moment_layers(run) if run.layers else []
    return names if len(names) == width else [f"#{i}" for i in range(width)]


def hessian_blocks(run: RunData) -> list[str]:
    """Names of the columns of the ``hessian/block_*`` datasets (``hessian/block``)."""
    width = run.data["hessian/block_top_eigenvalue"].shape[1] if "hessian/block_top_eigenvalue" in run.data else 0
    names = strings(run.data["hessian/block"]) if "hessian/block" in run.data else []
    return names if len(names) == width else [f"block{i}" for i in range(width)]


def layer_kinds(run: RunData) -> dict[str, str]:
    return {lay["name"]: str(lay["kind"]) for lay in run.layers}


def num(value: Any) -> float | int | None:
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


def _nums(values: Any) -> list[float | int | None]:
    return [num(v) for v in np.asarray(values).reshape(-1).tolist()]


def _plain(value: Any) -> Any:
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


def _last(run: RunData, key: str) -> Any:
    arr = run.data.get(key)
    return arr[-1] if arr is not None and len(arr) else None


def _nanreduce(fn: Any, values: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmedian`` & co. without the all-NaN warning (the result is NaN then)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if axis is None:
        return fn(values[finite]) if finite.any() else np.nan
    out = np.full(values.shape[1 - axis], np.nan)
    for j in range(values.shape[1 - axis]):
        col = values[:, j] if axis == 0 else values[j]
        ok = np.isfinite(col)
        if ok.any():
            out[j] = fn(col[ok])
    return out


# ----------------------------------------------------------------------------- sections


def _summary(run: RunData) -> dict[str, Any]:
    a = run.attrs
    steps_attr = a.get("steps")
    last_step = _last(run, "train/step")
    seconds = a.get("seconds")
    if seconds is None or num(seconds) is None:
        seconds = _last(run, "train/seconds")
    return {
        "model": _plain(a.get("model", "")),
        "bn": _plain(a.get("bn", "")),
        "data": _plain(a.get("data", "")),
        "seed": _plain(a.get("seed")),
        "device": _plain(a.get("device", "")),
        "status": _plain(a.get("status", "unknown")),
        "steps": num(steps_attr) if steps_attr is not None else (int(last_step) + 1 if last_step is not None else None),
        "records": len(run.data.get("train/step", ())),
        "last_step": num(last_step),
        "final_loss": num(_last(run, "train/loss")),
        "final_accuracy": num(_last(run, "train/accuracy")),
        "seconds": num(seconds),
        "diverged_step": num(a.get("diverged_step")),
        "error": _plain(a.get("error")),  # why a failed run stopped
    }


def _moments(run: RunData, patterns: Sequence[str], stat: str) -> dict[str, Any] | None:
    if not run.has("moments") or "moments/mean" not in run.data:
        return None
    steps = run.data["moments/step"]
    names = moment_layers(run)
    kinds = layer_kinds(run)
    n = min(len(steps), *(len(run.data[f"moments/{s}"]) for s in STATS if f"moments/{s}" in run.data))
    if n == 0:
        return None

    def column(s: str, j: int) -> np.ndarray:
        if s == "std":
            var = run.data.get("moments/var")
            return np.sqrt(np.asarray(var[:n, j], dtype=np.float64)) if var is not None else np.full(n, np.nan)
        arr = run.data.get(f"moments/{s}")
        return np.asarray(arr[:n, j]) if arr is not None else np.full(n, np.nan)

    layers = []
    for j, name in enumerate(names):
        if not _matches(name, patterns):
            continue
        first = {s: num(column(s, j)[0]) for s in ("mean", "std", "p15", "p50", "p85")}
        last = {s: num(column(s, j)[-1]) for s in ("mean", "std", "p15", "p50", "p85")}
        layers.append({"name": name, "kind": kinds.get(name, ""), "first": first, "last": last, "series": _nums(column(stat, j))})
    per_channel = sorted({k.split("/")[2] for k in run.data if k.startswith("moments/per_channel/") and k.endswith("/step")})
    return {
        "records": int(n),
        "first_step": num(steps[0]),
        "last_step": num(steps[n - 1]),
        "steps": _nums(steps[:n]),
        "stat": stat,
        "layers": layers,
        "per_channel_layers": per_channel,
        "histogram": "moments/histogram" in run.data,
    }


def _ics(run: RunData, patterns: Sequence[str]) -> dict[str, Any] | None:
    if not run.has("ics") or "ics/l2" not in run.data:
        return None
    steps = run.data["ics/step"]
    if len(steps) == 0:
        return None
    names = ics_layers(run)
    kinds = layer_kinds(run)
    l2 = _nanreduce(np.median, run.data["ics/l2"], axis=0)
    cos = _nanreduce(np.median, run.data["ics/cosine"], axis=0) if "ics/cosine" in run.data else np.full(len(names), np.nan)
    layers = [
        {"name": name, "kind": kinds.get(name, ""), "median_l2": num(l2[j]), "median_cosine": num(cos[j])}
        for j, name in enumerate(names)
        if _matches(name, patterns)
    ]
    return {"records": len(steps), "first_step": num(steps[0]), "last_step": num(steps[-1]), "layers": layers}


def _landscape(run: RunData) -> dict[str, Any] | None:
    if not run.has("landscape") or len(run.data["landscape/step"]) == 0:
        return None
    d = run.data
    steps = d["landscape/step"]
    loss = d.get("landscape/loss")
    grad = d.get("landscape/grad_l2")
    beta = d.get("landscape/beta_smoothness")
    eta = d.get("landscape/eta")

    def spread(arr: np.ndarray | None) -> Any:
        if arr is None or arr.ndim != 2:
            return None
        return num(_nanreduce(np.median, _nanreduce(np.max, arr, axis=1) - _nanreduce(np.min, arr, axis=1)))

    return {
        "records": len(steps),
        "first_step": num(steps[0]),
        "last_step": num(steps[-1]),
        "etas": len(eta) if eta is not None else None,
        "eta_min": num(np.min(eta)) if eta is not None and len(eta) else None,
        "eta_max": num(np.max(eta)) if eta is not None and len(eta) else None,
        "loss_min": num(_nanreduce(np.min, loss)) if loss is not None else None,
        "loss_max": num(_nanreduce(np.max, loss)) if loss is not None else None,
        "loss_spread_median": spread(loss),
        "grad_l2_min": num(_nanreduce(np.min, grad)) if grad is not None else None,
        "grad_l2_max": num(_nanreduce(np.max, grad)) if grad is not None else None,
        "grad_l2_spread_median": spread(grad),
        "beta_median": num(_nanreduce(np.median, beta)) if beta is not None else None,
        "beta_max": num(_nanreduce(np.max, beta)) if beta is not None else None,
    }


def _hessian(run: RunData) -> dict[str, Any] | None:
    if not run.has("hessian") or len(run.data["hessian/step"]) == 0:
        return None
    d = run.data
    attrs = run.dataset_attrs.get("hessian/top_eigenvalue", {})

    def last(key: str) -> Any:
        arr = d.get(key)
        if arr is None or not len(arr):
            return None
        return num(arr[-1]) if np.ndim(arr[-1]) == 0 else _nums(arr[-1])

    return {
        "records": len(d["hessian/step"]),
        "last_step": num(d["hessian/step"][-1]),
        "top_eigenvalue": last("hessian/top_eigenvalue"),
        "iterations": last("hessian/iterations"),
        "residual": last("hessian/residual"),
        "converged": bool(d["hessian/converged"][-1]) if "hessian/converged" in d and len(d["hessian/converged"]) else None,
        "bn_mode": _plain(attrs.get("bn_mode")),
        "samples": _plain(attrs.get("samples")),
        "blocks": {name: num(v) for name, v in zip(hessian_blocks(run), d["hessian/block_top_eigenvalue"][-1])}
        if "hessian/block_top_eigenvalue" in d and len(d["hessian/block_top_eigenvalue"])
        else {},
    }


def build_report(
    paths: Sequence[str | Path],
    layers: str | None = None,
    stat: str | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """The content of ``bnprobe report``, JSON-ready.

    ``layers``: comma-separated globs over layer names (moments and ICS rows); ``stat``: the
    statistic of the sparkline series (default ``mean``; one of :data:`STAT_CHOICES`);
    ``variant``: comma-separated run names or globs. Unknown choices raise :class:`ConfigError`.
    """
    stat = stat or "mean"
    if stat not in STAT_CHOICES:
        raise ConfigError(f"unknown --stat {stat!r}; choose from {', '.join(STAT_CHOICES)}")
    files, columns = load_columns(paths, variant)
    patterns = split_patterns(layers)
    if patterns:
        names = _merge_order([*moment_layers(c.run), *(ics_layers(c.run) if c.run.has("ics") else [])] for c in columns)
        if not any(_matches(n, patterns) for n in names):
            raise ConfigError(f"--layers {layers!r} matches no layer; layers: {_choices(names)}")
    report: dict[str, Any] = {"stat": stat, "layers": layers, "variant": variant, "files": []}
    for f in files:
        runs = {}
        for c in columns:
            if c.path != f.path:
                continue
            runs[c.run.name] = {
                "label": c.label,
                "summary": _summary(c.run),
                "moments": _moments(c.run, patterns, stat),
                "ics": _ics(c.run, patterns),
                "landscape": _landscape(c.run),
                "hessian": _hessian(c.run),
            }
        report["files"].append(
            {
                "path": str(f.path),
                "bnprobe_version": _plain(f.attrs.get("bnprobe_version")),
                "created": _plain(f.attrs.get("created")),
                "variants": list(f.runs),
                "runs": runs,
            }
        )
    return report


# ----------------------------------------------------------------------------- rendering


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


def _render_cols(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(run["label"], run) for f in report["files"] for run in f["runs"].values()]


def _merge_order(lists: Iterable[Sequence[str]]) -> list[str]:
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


def _groups(labels: Sequence[Any], width: int, first_col: int, min_col: int) -> list[list[Any]]:
    per = max(1, (width - first_col) // (min_col + 3))
    return [list(labels[i : i + per]) for i in range(0, len(labels), per)] or [[]]


def render_report(report: dict[str, Any], console: Any) -> None:
    """Print ``report`` (from :func:`build_report`) on a ``rich`` console, variants side by side.

    Tables with more variants than fit the console's width are split into several tables.
    Sections without data are skipped with a dim hint saying how to record them.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cols = _render_cols(report)
    width = console.width
    for f in report["files"]:
        line = Text(f["path"], style="bold")
        line.append(f"  bnprobe {f.get('bnprobe_version') or '?'}, {f.get('created') or ''}", style="dim")
        console.print(line, overflow="fold")
        if not f["runs"] and f.get("variants"):
            console.print(
                Text(f"  no run matches --variant {report['variant']}; runs: {', '.join(f['variants'])}", style="dim"), overflow="fold"
            )
        elif not f["runs"]:
            console.print(Text(f"  no runs recorded; {RECORD_HINTS['train']}", style="dim"), overflow="fold")
    if not cols:
        return

    def table(title: str, first: str, first_width: int, labels: Sequence[str]) -> Table:
        t = Table(
            title=title,
            title_justify="left",
            title_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            expand=False,
            show_edge=False,
            min_width=min(width, len(title)),
        )
        t.add_column(first, max_width=first_width, overflow="fold", style="bold")
        for label in labels:
            t.add_column(label, overflow="fold", no_wrap=False)
        return t

    def note(text: str) -> None:
        console.print(Text(text, style="dim"), overflow="fold")

    def hint(section: str, what: str) -> None:
        note(f"{what}: not recorded ({RECORD_HINTS[section]})")

    def missing() -> Text:
        return Text("—", style="dim")

    def aligned(key: str, having: Sequence[tuple[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Row names (in order) and, per column label, {row name: layer entry}."""
        maps = align_layers([[(lay["name"], lay.get("kind", "")) for lay in run[key]["layers"]] for _, run in having])
        rows = _merge_order([m[lay["name"]] for lay in run[key]["layers"]] for m, (_, run) in zip(maps, having))
        by_row = {label: {m[lay["name"]]: lay for lay in run[key]["layers"]} for m, (label, run) in zip(maps, having)}
        return rows, by_row

    def renamed_note(by_row: dict[str, dict[str, Any]]) -> None:
        renamed = [(label, row, lay["name"]) for label, rows_of in by_row.items() for row, lay in rows_of.items() if row != lay["name"]]
        if renamed:
            labels = ", ".join(dict.fromkeys(label for label, _, _ in renamed))
            _, row, name = renamed[0]
            note(f"{labels}: layers renamed by BN surgery are shown in the row of their original name ({name} as {row})")

    def lacking(key: str, what: str, having: Sequence[tuple[str, Any]]) -> None:
        if having:
            for label, run in cols:
                if run[key] is None:
                    note(f"{label}: no {what} recorded")

    Row = tuple[str, Callable[[dict[str, Any]], Any]]

    def row_tables(
        section: str,
        title: str,
        having: Sequence[tuple[str, Any]],
        rows: Sequence[Row],
        widths: tuple[int, int],
        captions: Sequence[str] = (),
    ) -> None:
        """One row per quantity, one column per run (groups of columns as the width allows)."""
        for group in _groups(having, width, *widths):
            t = table(title, "", widths[0], [label for label, _ in group])
            for name, get in rows:
                t.add_row(name, *(get(run[section]) for _, run in group))
            console.print(t)
            for caption in captions:
                note(caption)

    # --- run summary -------------------------------------------------------------------
    rows: list[Row] = [
        ("model", lambda s: str(s["model"] or "—")),
        ("bn mode", lambda s: str(s["bn"] or "—")),
        ("data", lambda s: str(s["data"] or "—")),
        ("status", lambda s: str(s["status"]) + (f" at {s['diverged_step']}" if s.get("diverged_step") is not None else "")),
        ("steps", lambda s: fmt(s["steps"])),
        ("final loss", lambda s: fmt(s["final_loss"], 4)),
        ("final acc.", lambda s: "—" if s["final_accuracy"] is None else f"{100 * s['final_accuracy']:.1f} %"),
        ("time", lambda s: "—" if s["seconds"] is None else f"{s['seconds']:.1f} s"),
        ("seed, device", lambda s: f"{fmt(s['seed'])}, {s['device'] or '—'}"),
    ]
    row_tables("summary", "Runs", cols, rows, (14, 14))
    for label, run in cols:
        status = run["summary"]["status"]
        if status == "running":
            note(f"{label}: status running: the run did not finish (or is still writing); showing records up to its last flush")
        elif status == "interrupted":
            note(f"{label}: interrupted; showing records up to the stop")
        elif status == "failed":
            note(f"{label}: failed: {run['summary']['error'] or 'no reason recorded'}; showing records up to then")

    # --- moments -----------------------------------------------------------------------
    stat = report["stat"]
    with_moments = [(label, run) for label, run in cols if run["moments"]]
    if not with_moments:
        hint("moments", "Activation moments")
    else:
        names, by_layer = aligned("moments", with_moments)
        kind_sets: dict[str, set[str]] = {}
        for rows_of in by_layer.values():
            for row, lay in rows_of.items():
                kind_sets.setdefault(row, set()).add(lay["kind"])
        name_w = min(16, max([5, *map(len, names), *(len(k) for ks in kind_sets.values() for k in ks)]))
        first = with_moments[0][1]["moments"]
        for group in _groups(with_moments, width, name_w, 20):
            spark_w = max(8, min(24, (width - name_w) // len(group) - 3))
            caption = (
                f"first → last record; sparkline: {stat} over steps {fmt(first['first_step'])}–{fmt(first['last_step'])}, one scale per row"
            )
            t = table("Activation moments", "layer", name_w, [label for label, _ in group])
            for name in names:
                series = [by_layer[label][name]["series"] for label, _ in group if name in by_layer[label]]
                finite = [v for s in series for v in s if v is not None]
                lo, hi = (min(finite), max(finite)) if finite else (None, None)
                kinds = {by_layer[label][name]["kind"] for label, _ in group if name in by_layer[label]}
                cells: list[Any] = []
                for label, _ in group:
                    layer = by_layer[label].get(name)
                    if layer is None:
                        cells.append(missing())
                        continue
                    a, b = layer["first"], layer["last"]
                    cells.append(
                        Text.assemble(
                            (f"({layer['kind']})\n" if len(kinds) > 1 else "", "dim"),
                            ("mean ", "dim"),
                            f"{fmt(a['mean'])}→{fmt(b['mean'])}\n",
                            ("std  ", "dim"),
                            f"{fmt(a['std'])}→{fmt(b['std'])}\n",
                            ("p15/50/85\n", "dim"),
                            f"{fmt(a['p15'])} {fmt(a['p50'])} {fmt(a['p85'])}\n",
                            f"→{fmt(b['p15'])} {fmt(b['p50'])} {fmt(b['p85'])}\n",
                            (sparkline(layer["series"], spark_w, lo, hi), "cyan"),
                        )
                    )
                kind = next(iter(kinds)) if len(kinds) == 1 else ""
                t.add_row(Text.assemble(name, ("\n" + kind if kind else "", "dim")), *cells, end_section=True)
            console.print(t)
            note(caption)
        renamed_note(by_layer)
    lacking("moments", "moments", with_moments)

    # --- ICS ---------------------------------------------------------------------------
    with_ics = [(label, run) for label, run in cols if run["ics"]]
    if not with_ics:
        hint("ics", "Gradient-shift ICS")
    else:
        names, by_layer = aligned("ics", with_ics)
        name_w = min(16, max([5, *map(len, names)]))
        for group in _groups(with_ics, width, name_w, 14):
            counts = sorted({run["ics"]["records"] for _, run in group})
            caption = f"median over {'/'.join(map(str, counts))} records of l2 = ‖G−G′‖₂ (0: no shift) and cos = cos(G, G′) (1: no shift)"
            t = table("Gradient-shift ICS", "layer", name_w, [label for label, _ in group])
            for name in names:
                cells = []
                for label, _ in group:
                    layer = by_layer[label].get(name)
                    cells.append(
                        missing()
                        if layer is None
                        else Text.assemble(("l2  ", "dim"), fmt(layer["median_l2"]), ("\ncos ", "dim"), fmt(layer["median_cosine"], 4))
                    )
                t.add_row(name, *cells)
            console.print(t)
            note(caption)
        renamed_note(by_layer)
    lacking("ics", "ICS", with_ics)

    # --- landscape ---------------------------------------------------------------------
    with_land = [(label, run) for label, run in cols if run["landscape"]]
    if not with_land:
        hint("landscape", "Loss landscape")
    else:
        land_rows: list[Row] = [
            ("records", lambda d: fmt(d["records"])),
            ("η range", lambda d: f"{fmt(d['eta_min'])}…{fmt(d['eta_max'])}"),
            ("loss min…max", lambda d: f"{fmt(d['loss_min'])}…{fmt(d['loss_max'])}"),
            ("loss spread", lambda d: fmt(d["loss_spread_median"])),
            ("grad pred. min…max", lambda d: f"{fmt(d['grad_l2_min'])}…{fmt(d['grad_l2_max'])}"),
            ("grad pred. spread", lambda d: fmt(d["grad_l2_spread_median"])),
            ("β median", lambda d: fmt(d["beta_median"])),
            ("β max", lambda d: fmt(d["beta_max"])),
        ]
        caption = "along −g: loss L(w−ηg) and ‖∇L(w)−∇L(w−ηg)‖₂ over all η and records; spread: median over records of max−min over η"
        row_tables("landscape", "Loss landscape", with_land, land_rows, (18, 16), [caption])
    lacking("landscape", "landscape", with_land)

    # --- Hessian -----------------------------------------------------------------------
    with_hess = [(label, run) for label, run in cols if run["hessian"]]
    if not with_hess:
        hint("hessian", "Top Hessian eigenvalue")
    else:
        hess_rows: list[Row] = [
            ("at step", lambda d: fmt(d["last_step"])),
            ("top eigenvalue", lambda d: fmt(d["top_eigenvalue"], 4)),
            ("iterations", lambda d: fmt(d["iterations"])),
            ("residual", lambda d: fmt(d["residual"])),
            ("converged", lambda d: {True: "yes", False: "NO", None: "—"}[d["converged"]]),
            ("bn mode", lambda d: str(d["bn_mode"] or "—")),
            ("samples", lambda d: fmt(d["samples"])),
        ]
        blocks = list(dict.fromkeys(b for _, run in with_hess for b in run["hessian"]["blocks"]))
        hess_rows += [(f"λ {b}", lambda d, b=b: fmt(d["blocks"][b], 4) if b in d["blocks"] else missing()) for b in blocks]
        captions = ["largest in magnitude (it can be negative); residual ‖Hv−λv‖₂ of the unit vector v found"]
        if blocks:
            captions.append("λ LAYER: top eigenvalue of that layer's own block of the Hessian")
        row_tables("hessian", "Top Hessian eigenvalue (last record)", with_hess, hess_rows, (14, 14), captions)
        if any(run["hessian"]["converged"] is False for _, run in with_hess):
            note("not converged: raise probes.hessian_max_iter or loosen probes.hessian_tol (--set probes.hessian_max_iter=300)")
    lacking("hessian", "Hessian eigenvalue", with_hess)

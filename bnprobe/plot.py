"""``bnprobe plot``: the papers' figures from recorded runs, variants overlaid (matplotlib, Agg).

Kinds:

- ``moments``: the 15th, 50th and 85th percentiles of one layer's output over training steps
  (Ioffe & Szegedy 2015, Fig. 1b,c). Default layer: per variant, the layer before the output
  layer (the input of the last hidden non-linearity: the BN output when BN is there).
- ``ics``: ||G - G'||_2 and cos(G, G') over steps for a few layers (Santurkar et al. 2018, Fig. 5
  style): one row per layer, one column per metric. Default layers: the second, a middle and the
  last one (the first layer has no preceding layers, so its shift is zero by definition).
- ``landscape``: per variant the band between the min and max over step sizes eta of the loss
  L(w - eta g) and of the gradient predictiveness ||grad L(w) - grad L(w - eta g)||_2, over
  steps, and the effective beta-smoothness (Santurkar et al., Fig. 4 style).
- ``training``: loss and accuracy over steps.

Runs that differ only in their seed are replicates of one condition: in ``training``, ``ics`` and
``landscape`` each is drawn faint and their mean (over the steps they share) bold, one colour per
condition; in ``moments`` each seed's median is faint and the percentiles drawn are the seeds' means.
- ``hessian``: the Hessian eigenvalue density of each variant's last spectrum record (stochastic
  Lanczos quadrature, Gaussian-broadened, log scale, as PyHessian and Ghorbani et al. 2019 draw
  it) and the top eigenvalues over steps.

The output format follows the file suffix (png, svg, pdf).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BnprobeError, ConfigError
from .findings import conditions
from .measurements import PLOT_KINDS
from .quadrature import density as slq_density
from .quantities.spectrum import top_shares
from .report.content import RECORD_HINTS, align_layers
from .store import (
    ICS,
    LANDSCAPE,
    MOMENTS,
    SPECTRUM,
    STEP,
    TRAIN,
    Column,
    Status,
    atomic_output,
    bin_sizes,
    check_output_path,
    ics_layers,
    layer_kinds,
    load_columns,
    moment_layers,
)

KINDS = tuple(PLOT_KINDS)  # a kind draws one measurement's records
FORMATS = ("png", "svg", "pdf")
#: points of a line over steps at most, about one per pixel of a figure's width (see _thinned)
PLOT_POINTS = 1000


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BnprobeError("plotting needs matplotlib: pip install 'bnprobe[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _check_out(out: Path, force: bool) -> str:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"cannot tell the image format from {out.name!r}; use a .png, .svg or .pdf file name")
    check_output_path(out, force)
    return fmt


def _with_section(columns: list[Column], kind: str, paths: Sequence[str | Path]) -> list[Column]:
    drawn = PLOT_KINDS[kind]
    have = [c for c in columns if c.run.has(drawn.name)]
    if not have:
        where = ", ".join(str(p) for p in paths)
        raise BnprobeError(f"no {drawn.what} recorded in {where}; {drawn.hint}")
    return have


def _name(c: Column) -> str:
    """A legend entry: the column label, with the status of a run that did not finish."""
    status = str(c.run.attrs.get("status", ""))
    return c.label if status in (Status.FINISHED, "") else f"{c.label} ({status})"


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _finite(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _recorded(c: Column, section: str, quantity: str, column: int | None = None) -> np.ndarray:
    """A dataset the columns drawn are known to have (``_with_section`` checked the section's steps),
    or its column ``column`` alone; floats, except the steps."""
    records = c.run.get(section, quantity) if column is None else c.run.column(section, quantity, column)
    if records is None:
        raise BnprobeError(f"no {section} {quantity} recorded in {c.path} (run {c.run.name}); {RECORD_HINTS[section]}")
    return records if quantity == STEP else _finite(records)


def _thinned(steps: np.ndarray, *series: np.ndarray) -> tuple[np.ndarray, ...]:
    """``steps`` and ``series`` (as many records each) as they are, or, longer than
    :data:`PLOT_POINTS`, the means of that many even runs of consecutive records: drawing a long
    run then takes the memory of a short one (the renderer's grows with a line's segments)."""
    if len(steps) <= PLOT_POINTS:
        return (steps, *series)
    sizes = bin_sizes(PLOT_POINTS, len(steps))
    return tuple(np.add.reduceat(np.asarray(a, dtype=np.float64), np.cumsum(sizes) - sizes) / sizes for a in (steps, *series))


def _points(steps: np.ndarray, size: float = 3) -> dict[str, Any]:
    """Line style of a series over steps: a marker on each record when records are steps apart
    (a bare line between two records reads as data between them) or when there is only one; none
    on a line of :data:`PLOT_POINTS` points (a long run's, whose points are means of records)."""
    gaps = np.diff(np.asarray(steps, dtype=np.float64))
    markers = gaps.size == 0 or bool((gaps > 1).any())
    return {"marker": "o", "markersize": size} if markers and len(steps) < PLOT_POINTS else {}


def _maybe_log(ax: Any, arrays: Sequence[np.ndarray]) -> None:
    """Log scale when all values are positive and span more than two decades."""
    vals = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.zeros(0)
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 100:
        ax.set_yscale("log")


@dataclass
class _Group:
    """Runs drawn as one: a condition's replicates (seeds), faint, with their mean bold."""

    label: str
    color: Any
    columns: list[Column]


def _groups(columns: list[Column]) -> list[_Group]:
    """One group per condition (the same settings but the seed) when some condition has several
    seeds; else one per run, as before."""
    conds = conditions([c.run for c in columns])
    if all(len(cond.runs) + cond.repeats <= 1 for cond in conds):
        return [_Group(_name(c), color, [c]) for c, color in zip(columns, _colors(len(columns)))]
    of_run = {id(run): cond for cond in conds for run in cond.runs.values()}
    groups: dict[int, _Group] = {}
    for c in columns:
        cond = of_run.get(id(c.run))
        if cond is None:
            continue  # a repeat of a seed already drawn
        seeds = len(cond.runs)
        groups.setdefault(id(cond), _Group(f"{cond.name} ({seeds} seed{'s' if seeds > 1 else ''})", None, [])).columns.append(c)
    found = list(groups.values())
    for group, color in zip(found, _colors(len(found))):
        group.color = color
    return found


Series = tuple[np.ndarray, np.ndarray]  # steps, values


def _replicates(ax: Any, group: _Group, series: Sequence[Series], width: float = 1.2, label: bool = True) -> Series | None:
    """Draw a group's series: a single one as a line; several faint, and their mean over the steps
    they share bold. Returns what was drawn bold (the mean, or the single series)."""
    series = [(s, v) for s, v in series if len(v)]
    if not series:
        return None
    name = group.label if label else None
    if len(series) == 1:
        steps, values = series[0]
        ax.plot(steps, values, color=group.color, linewidth=width, **_points(steps), label=name)
        return series[0]
    for steps, values in series:
        ax.plot(steps, values, color=group.color, linewidth=0.7, alpha=0.3)
    shared, mean = _shared_mean(series)
    ax.plot(shared, mean, color=group.color, linewidth=width + 0.8, **_points(shared), label=name)
    return shared, mean


def _shared_mean(series: Sequence[Series]) -> Series:
    """The mean of ``series`` over the steps all of them have."""
    shared = series[0][0]
    for steps, _ in series[1:]:
        shared = np.intersect1d(shared, steps)
    return shared, np.mean([v[np.searchsorted(s, shared)] for s, v in series], axis=0)


# ----------------------------------------------------------------------------- kinds


def _pick_moment_layer(c: Column, layer: str | None) -> str | None:
    names = moment_layers(c.run)
    if layer is None:
        return names[-2] if len(names) >= 2 else (names[0] if names else None)
    if layer in names:
        return layer
    return next((n for n in names if fnmatch.fnmatchcase(n, layer)), None)


def _percentiles(c: Column, name: str) -> list[Series]:
    """One run's 15th, 50th and 85th percentiles of layer ``name`` over its records."""
    j = moment_layers(c.run).index(name)
    steps, *records = (_recorded(c, MOMENTS, q, None if q == STEP else j) for q in (STEP, "p15", "p50", "p85"))
    n = min(len(steps), *map(len, records))
    steps, *thinned = _thinned(steps[:n], *(p[:n] for p in records))
    return [(steps, p) for p in thinned]


def _moments(plt: Any, columns: list[Column], layer: str | None) -> Any:
    picks = [(c, _pick_moment_layer(c, layer)) for c in columns]
    if layer is not None and not any(name for _, name in picks):
        names = list(dict.fromkeys(n for c in columns for n in moment_layers(c.run)))
        raise ConfigError(f"--layer {layer!r} matches no recorded layer; layers: {', '.join(names)}")
    picked = {id(c): name for c, name in picks}
    fig, ax = plt.subplots(figsize=(9, 5.4), constrained_layout=True)
    drawn = 0
    for group in _groups(columns):
        runs = [(c, name) for c in group.columns if (name := picked[id(c)]) is not None]
        if not runs:
            continue
        drawn += 1
        per_run = [_percentiles(c, name) for c, name in runs]
        if len(per_run) > 1:  # each seed's median faint; the percentiles drawn below are the seeds' means
            for _, (steps, p50), _ in per_run:
                ax.plot(steps, p50, color=group.color, linewidth=0.7, alpha=0.3)
        (steps, p15), (_, p50), (_, p85) = (_shared_mean([run[k] for run in per_run]) for k in range(3))
        c, name = runs[0]
        kind = layer_kinds(c.run).get(name, "")
        ax.fill_between(steps, p15, p85, color=group.color, alpha=0.15, linewidth=0)
        label = f"{group.label}, layer {name}" + (f" ({kind})" if kind else "") + ": 50th"
        ax.plot(steps, p50, color=group.color, linewidth=2, **_points(steps), label=label)
        ax.plot(steps, p15, color=group.color, linewidth=1, linestyle="--", **_points(steps, 2), label=f"{group.label}: 15th and 85th")
        ax.plot(steps, p85, color=group.color, linewidth=1, linestyle="--", **_points(steps, 2))
    drawn_names = list(dict.fromkeys(name for _, name in picks if name is not None))
    if layer is None:
        where = "the last hidden layer (the layer before the output layer)"
    else:  # a glob picks each variant's first match: name what was drawn
        where = f"layer {', '.join(drawn_names)}"
    ax.set_title(f"Activation percentiles (15th, 50th, 85th) of {where}", fontsize="medium")
    ax.set_xlabel("training step")
    ax.set_ylabel("activation value (layer output, before the non-linearity)", fontsize="small")
    ax.grid(alpha=0.3)
    # below the axes, one column per variant (median above its 15th/85th entry): never over the data
    fig.legend(loc="outside lower center", ncols=max(1, min(drawn, 3)), fontsize="small")
    return fig


def _ics_rows(columns: list[Column], layer: str | None) -> tuple[list[str], list[dict[str, str]]]:
    """The row names to draw and, per column, ``{row name: ICS layer name}`` (see align_layers)."""
    maps = align_layers([[(n, layer_kinds(c.run).get(n, "")) for n in ics_layers(c.run)] for c in columns])
    per_run = [list(m.values()) for m in maps]
    inverse = [{row: name for name, row in m.items()} for m in maps]
    if layer is not None:
        names = list(
            dict.fromkeys(
                row for m in maps for name, row in m.items() if fnmatch.fnmatchcase(row, layer) or fnmatch.fnmatchcase(name, layer)
            )
        )
        if not names:
            allnames = list(dict.fromkeys(n for names in per_run for n in names))
            raise ConfigError(f"--layer {layer!r} matches no ICS layer; layers: {', '.join(allnames)}")
        return names[:6], inverse
    common = [n for n in per_run[0] if all(n in names for names in per_run)] or per_run[0]
    if len(common) > 1:
        common = common[1:]  # the first layer has no preceding layers: its G' is G by definition
    if len(common) <= 3:
        return common, inverse
    return [common[i] for i in sorted({0, len(common) // 2, len(common) - 1})], inverse


def _ics_series(c: Column, rename: dict[str, str], row: str, quantity: str) -> Series | None:
    """One run's ``ics/<quantity>`` of the layer drawn in ``row`` (None where the run has none)."""
    if row not in rename:
        return None
    records = c.run.column(ICS, quantity, ics_layers(c.run).index(rename[row]))  # the layer's alone
    if records is None:
        return None
    steps = _recorded(c, ICS, STEP)
    n = min(len(steps), len(records))
    x, y = _thinned(steps[:n], _finite(records[:n]))
    return x, y


def _ics(plt: Any, columns: list[Column], layer: str | None) -> Any:
    rows, inverse = _ics_rows(columns, layer)
    renames = {id(c): rename for c, rename in zip(columns, inverse)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.6 * len(rows) + 0.8), squeeze=False, sharex=True, constrained_layout=True)
    groups = _groups(columns)
    l2s: list[np.ndarray] = []
    for r, name in enumerate(rows):
        for group in groups:
            for col, quantity in enumerate(("l2", "cosine")):
                series = [s for c in group.columns if (s := _ics_series(c, renames[id(c)], name, quantity)) is not None]
                _replicates(axes[r][col], group, series, 1.5)
                if col == 0:
                    l2s += [values for _, values in series]
        axes[r][0].set_ylabel(f"layer {name}\n‖G − G′‖₂")
        axes[r][1].set_ylabel("cos(G, G′)")
        axes[r][1].axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        for ax in axes[r]:
            ax.grid(alpha=0.3)
    for r in range(len(rows)):
        _maybe_log(axes[r][0], l2s)  # one scale rule for the whole column
    axes[0][0].set_title("ℓ2 difference of gradients (0: no shift)")
    axes[0][1].set_title("cosine of gradients (1: no shift)")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(6, max(1, len(labels))), fontsize="small")
    fig.suptitle("Gradient-shift ICS: G = ∇L before, G′ = ∇L after the preceding layers' update", fontsize="medium")
    return fig


def _band(c: Column, quantity: str) -> tuple[Series, Series] | None:
    """The min and max over step sizes of a landscape record, per record."""
    steps, records = _recorded(c, LANDSCAPE, STEP), c.run.get(LANDSCAPE, quantity)
    if records is None:
        return None
    arr = _finite(records)
    n = min(len(steps), len(arr))
    arr = np.where(np.isfinite(arr[:n]), arr[:n], np.nan)
    lo, hi = (np.nanmin(arr, axis=1), np.nanmax(arr, axis=1)) if arr.ndim == 2 else (arr, arr)
    return (steps[:n], lo), (steps[:n], hi)


def _beta(c: Column) -> Series:
    steps, beta = _recorded(c, LANDSCAPE, STEP), _recorded(c, LANDSCAPE, "beta_smoothness")
    n = min(len(steps), len(beta))
    return steps[:n], beta[:n]


def _landscape(plt: Any, columns: list[Column]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), constrained_layout=True)
    eta_text = []
    for group in _groups(columns):
        for ax, quantity in zip(axes[:2], ("loss", "grad_l2")):
            bands = [band for c in group.columns if (band := _band(c, quantity)) is not None]
            low = _replicates(ax, group, [lo for lo, _ in bands], 0.8, label=False)
            high = _replicates(ax, group, [hi for _, hi in bands], 0.8, label=False)
            if low is not None and high is not None and len(low[0]) == len(high[0]):
                ax.fill_between(low[0], low[1], high[1], color=group.color, alpha=0.3, linewidth=0, label=group.label)
        _replicates(axes[2], group, [_beta(c) for c in group.columns if c.run.get(LANDSCAPE, "beta_smoothness") is not None], 1.5)
        for c in group.columns:
            eta = c.run.get(LANDSCAPE, "eta")
            if eta is not None and len(eta):
                eta_text.append(f"{float(np.min(eta)):.3g}–{float(np.max(eta)):.3g}")
    axes[0].set_title("Loss landscape: L(w − ηg) over η")
    axes[0].set_ylabel("loss (range over η)")
    axes[1].set_title("Gradient predictiveness over η")
    axes[1].set_ylabel("‖∇L(w) − ∇L(w − ηg)‖₂ (range over η)")
    axes[2].set_title("Effective β-smoothness")
    axes[2].set_ylabel("max over η of ‖Δ∇L‖₂ / ‖ηg‖₂")
    _over_steps(axes)
    etas = ", ".join(dict.fromkeys(eta_text))
    fig.suptitle("Loss landscape along the gradient" + (f" (step sizes η = {etas})" if etas else ""), fontsize="medium")
    return fig


def _over_steps(axes: Any) -> None:
    """The shared finish of panels drawn over training steps: x label, grid, a legend each."""
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")


def _training(plt: Any, columns: list[Column]) -> Any:
    has_acc = any((acc := c.run.get(TRAIN, "accuracy")) is not None and np.isfinite(_finite(acc)).any() for c in columns)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.4), squeeze=False, constrained_layout=True)
    axes = axes[0]
    losses = []
    for group in _groups(columns):
        losses += [v for _, v in _train_series(group, "loss")]
        _replicates(axes[0], group, _train_series(group, "loss"))
        if has_acc:
            _replicates(axes[1], group, [(s, 100 * v) for s, v in _train_series(group, "accuracy")])
    _maybe_log(axes[0], losses)
    axes[0].set_title("Training loss")
    axes[0].set_ylabel("loss (per batch)")
    if has_acc:
        axes[1].set_title("Training accuracy")
        axes[1].set_ylabel("accuracy (%, per batch)")
    _over_steps(axes)
    return fig


def _train_series(group: _Group, quantity: str) -> list[Series]:
    found = []
    for c in group.columns:
        steps, records = _recorded(c, TRAIN, STEP), c.run.get(TRAIN, quantity)
        if records is not None:
            values = _finite(records)[: len(steps)]
            x, y = _thinned(steps[: len(values)], values)
            found.append((x, y))
    return found


def _hessian(plt: Any, columns: list[Column]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    lasts = [(_recorded(c, SPECTRUM, "density_nodes")[-1], _recorded(c, SPECTRUM, "density_weights")[-1]) for c in columns]
    used = [n[w > 0] for n, w in lasts]
    lo, hi = min(float(u.min()) for u in used), max(float(u.max()) for u in used)
    sigma = math.sqrt(1e-5 * max(1.0, hi - lo))  # PyHessian's broadening; the grid spares 5 sigma so no node's mass is cut off
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 10_000)
    last_of = {id(c): last for c, last in zip(columns, lasts)}
    others = False  # lambda_2.. drawn (a single run per condition)
    for group in _groups(columns):
        tops, shares = [], []
        for i, c in enumerate(group.columns):
            _, density = slq_density(*last_of[id(c)], grid, sigma)
            steps, top = _recorded(c, SPECTRUM, STEP), _recorded(c, SPECTRUM, "top_k")
            label = f"{group.label} (step {int(steps[-1])})" if i == 0 else None
            axes[0].semilogy(
                grid, np.maximum(density, 1e-12), color=group.color, linewidth=1.2 if len(group.columns) == 1 else 0.8, label=label
            )
            n = min(len(steps), len(top))
            tops.append((steps[:n], top[:n, 0]))
            trace, stderr = c.run.get(SPECTRUM, "trace"), c.run.get(SPECTRUM, "trace_stderr")
            if trace is not None and stderr is not None:  # a spectrum recorded without its trace: no share
                m = min(n, len(trace), len(stderr))
                share = top_shares(top[:m, 0], _finite(trace[:m]), _finite(stderr[:m]))
                shares.append((steps[:m][np.isfinite(share)], share[np.isfinite(share)]))
            for j in range(1, top.shape[1] if len(group.columns) == 1 else 1):
                others = True
                axes[1].plot(steps[:n], top[:n, j], color=group.color, linewidth=0.8, alpha=0.5, **_points(steps[:n], 2))
        _replicates(axes[1], group, tops, 1.5)
        _replicates(axes[2], group, shares, 1.5)
    axes[0].set_title("Eigenvalue density (last record)")
    axes[0].set_xlabel("eigenvalue")
    axes[0].set_ylabel("density (log scale)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="best")
    axes[1].set_title("Top eigenvalue over training" + (" (λ1 bold, the others faint)" if others else ""))
    axes[1].set_ylabel("eigenvalue")
    axes[2].set_title("Top eigenvalue's share of the trace")
    axes[2].set_ylabel("λ1 / tr(H)")
    over_steps = list(axes[1:])
    if not axes[2].get_lines():  # no trace recorded, or none clear of zero: say so, not an empty legend
        axes[2].text(0.5, 0.5, "no trace clear of zero recorded", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_xlabel("training step")
        over_steps.pop()
    _over_steps(over_steps)
    fig.suptitle("Hessian spectrum: stochastic Lanczos quadrature and Lanczos top-k", fontsize="medium")
    return fig


def plot(
    paths: Sequence[str | Path],
    out: str | Path,
    kind: str = "moments",
    layer: str | None = None,
    force: bool = False,
    variant: str | None = None,
) -> Path:
    """Draw ``kind`` (moments, ics, landscape, training, hessian) for the runs in ``paths`` into ``out``.

    ``layer``: a layer name or glob (moments: the layer to show; ics: the layers, at most 6);
    ``variant``: comma-separated run names or globs. Returns ``out``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown plot kind {kind!r}; choose from {', '.join(KINDS)}")
    out = Path(out)
    fmt = _check_out(out, force)
    plt = _pyplot()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    _, columns = load_columns(paths, variant)
    columns = _with_section(columns, kind, paths)
    if kind == "moments":
        fig = _moments(plt, columns, layer)
    elif kind == "ics":
        fig = _ics(plt, columns, layer)
    elif kind == "landscape":
        fig = _landscape(plt, columns)
    elif kind == "hessian":
        fig = _hessian(plt, columns)
    else:
        fig = _training(plt, columns)
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return out

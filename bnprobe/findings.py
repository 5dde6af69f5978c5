"""Findings: what BN changed, in words, with a 95% interval over seeds, and the claim it bears on.

Runs are grouped into *conditions* (the same settings but the seed); a condition whose model holds
BN is compared with its partner without BN of the same other settings (lr, optimizer, model, data,
...), paired by seed. Each quantity is reduced per run to one number over a window of steps: the
whole run, and the *learning window*, in which every compared run is learning: it starts once the
last of them has left its chance plateau (before, an unlearned network's flat landscape is
compared with a learning one's) and ends where the first health flag of any of them begins (after
it, records describe a collapsed, dead or fitted network, not BN's effect).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import health
from .stats import Interval, mean_interval, ratio_interval
from .store import HESSIAN, ICS, LANDSCAPE, MOMENTS, SPECTRUM, STEP, RunData, aligned_slices, ics_layers, layer_kinds, moment_layers

#: settings that make two runs different conditions (the seed makes replicates, not conditions)
CONDITION_KEYS = (
    "lr", "optimizer", "momentum", "weight_decay", "batch_size", "nesterov", "model", "model_options", "data", "data_options",
    "planned_steps",
)  # fmt: skip
BN_KEYS = ("bn", "bn_targets", "keep_bias")
NO_BN_LABELS = ("no BN", "BN stripped", "BN folded")

IOFFE = "Ioffe & Szegedy 2015: BN stabilises the distribution of layer inputs"
SANTURKAR_ICS = "Santurkar et al. 2018: BN does not reduce internal covariate shift"
SANTURKAR_SMOOTH = "Santurkar et al. 2018: BN makes the loss landscape smoother"
GHORBANI = "Ghorbani et al. 2019: BN removes isolated outliers from the Hessian spectrum"


def bn_label(attrs: dict[str, Any]) -> str:
    """What the trained model held: "no BN", "BN", "noisy BN", "BN stripped" or "BN folded"."""
    mode, count = attrs.get("bn"), attrs.get("bn_layers")
    if mode == "noisy":
        return "noisy BN"
    if mode == "strip":
        changed = attrs.get("bn_removed", 1)
        if changed:
            return "BN folded" if attrs.get("fold") else "BN stripped"
        return "no BN"
    if mode is None:
        return "BN unknown"
    if count is None:  # files written before the count: the mode is all there is
        return {"insert": "BN"}.get(str(mode), str(mode))
    return "BN" if int(count) > 0 else "no BN"


@dataclass
class Condition:
    """Runs with the same settings but the seed; ``label`` is the BN label, ``settings`` the rest."""

    label: str
    settings: tuple[tuple[str, Any], ...]
    runs: dict[int, RunData] = field(default_factory=dict)
    repeats: int = 0  # runs of a seed already present (another file): left out of the means

    @property
    def name(self) -> str:
        varying = ", ".join(f"{k}={v}" for k, v in self.settings)
        return f"{self.label} ({varying})" if varying else self.label

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)


def conditions(runs: Sequence[RunData]) -> list[Condition]:
    """Group ``runs`` by their BN label and the settings that differ between them, in first-seen order."""
    keys = [k for k in CONDITION_KEYS if len({_setting(r, k) for r in runs}) > 1]
    found: dict[tuple[Any, ...], Condition] = {}
    for run in runs:
        label = bn_label(run.attrs)
        settings = tuple((k, _setting(run, k)) for k in keys)
        cond = found.setdefault((label, settings), Condition(label, settings))
        seed = int(run.attrs.get("seed", 0))
        if seed in cond.runs:
            cond.repeats += 1
        else:
            cond.runs[seed] = run
    return list(found.values())


def _setting(run: RunData, key: str) -> Any:
    value = run.attrs.get(key)
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- per-run numbers

Window = tuple[int, int | None]  # records with first <= step < end (end None: to the last record)


def _in(steps: np.ndarray, window: Window) -> np.ndarray:
    first, end = window
    return (steps >= first) & (steps < end) if end is not None else steps >= first


def _records(run: RunData, section: str, quantity: str, window: Window) -> np.ndarray | None:
    steps, values = run.get(section, STEP), run.get(section, quantity)
    if steps is None or values is None or len(steps) == 0:
        return None
    picked = values[_in(steps, window)]
    return picked if len(picked) else None


def _picked(run: RunData, section: str, quantities: Sequence[str], window: Window) -> Iterator[list[np.ndarray]]:
    """The records of ``<section>/<quantity>`` (each of ``quantities``) whose steps are in
    ``window``, a slice of records at a time (a long run's moments or ICS need not fit in memory)."""
    steps = run.get(section, STEP)
    if steps is None or not all(run.holds(section, q) for q in quantities):
        return
    inside = _in(steps, window)
    for first, blocks in aligned_slices(run, section, quantities):
        chosen = inside[first : first + len(blocks[0])]
        if chosen.any():
            yield [block[chosen] for block in blocks]


def _mean(values: np.ndarray | None) -> float | None:
    if values is None or not np.isfinite(values).any():
        return None
    return float(np.nanmean(values))


def _sliced_mean(blocks: Iterable[np.ndarray]) -> float | None:
    """:func:`_mean` of ``blocks`` put together, a block at a time: of one block, exactly its
    :func:`_mean`; of several, the float64 sum of their non-NaN values over their count."""
    first: np.ndarray | None = None
    total, count, finite, seen = 0.0, 0, False, 0
    for block in blocks:
        first = block if first is None else first
        seen += 1
        kept = ~np.isnan(block)
        total += float(np.sum(block[kept], dtype=np.float64))
        count += int(kept.sum())
        finite = finite or bool(np.isfinite(block).any())
    if seen <= 1:
        return _mean(first)
    return total / count if finite else None


def _input_layers(run: RunData) -> list[int]:
    """Columns of the moments records that are a non-linearity's input: the BN layers where the
    model has them, else every conv/linear layer but the last (the output)."""
    names, kinds = moment_layers(run), layer_kinds(run)
    norms = [j for j, n in enumerate(names) if kinds.get(n) == "norm"]
    if norms:
        return norms
    weighted = [j for j, n in enumerate(names) if kinds.get(n) in ("conv", "linear")]
    return weighted[:-1] if len(weighted) > 1 else weighted


def percentile_drift(run: RunData, window: Window) -> float | None:
    """Mean absolute change of the 15/50/85th percentiles between consecutive records, over the
    layers that feed a non-linearity (Ioffe & Szegedy Fig. 1's curves, as one number)."""
    columns, steps = _input_layers(run), run.get(MOMENTS, STEP)
    if not columns or steps is None or np.count_nonzero(_in(steps, window)) < 2:
        return None

    def changes() -> Iterator[np.ndarray]:
        before: list[np.ndarray] | None = None  # the last record of the slice before: its change to this slice's first
        for blocks in _picked(run, MOMENTS, ("p15", "p50", "p85"), window):
            rows = [block[:, columns] for block in blocks]
            if before is not None:
                rows = [np.concatenate([b, r]) for b, r in zip(before, rows)]
            yield np.stack([np.abs(np.diff(r, axis=0)) for r in rows])
            before = [r[-1:] for r in rows]

    return _sliced_mean(changes())


def _ics_mean(quantity: str) -> Callable[[RunData, Window], float | None]:
    def reduce(run: RunData, window: Window) -> float | None:
        kinds = layer_kinds(run)
        columns = [j for j, n in enumerate(ics_layers(run)) if kinds.get(n, "conv") in ("conv", "linear")]
        return _sliced_mean(block[:, columns] for (block,) in _picked(run, ICS, (quantity,), window)) if columns else None

    return reduce


def _spread(quantity: str) -> Callable[[RunData, Window], float | None]:
    def reduce(run: RunData, window: Window) -> float | None:
        blocks = _picked(run, LANDSCAPE, (quantity,), window)
        return _sliced_mean(np.nanmax(block, axis=1) - np.nanmin(block, axis=1) for (block,) in blocks)

    return reduce


def effective_beta(run: RunData, window: Window) -> float | None:
    return _mean(_records(run, LANDSCAPE, "beta_smoothness", window))


def top_eigenvalue(run: RunData, window: Window) -> float | None:
    top = _records(run, SPECTRUM, "top_k", window)
    if top is not None:
        return _mean(top[:, 0])
    return _mean(_records(run, HESSIAN, "top_eigenvalue", window))


def hessian_trace(run: RunData, window: Window) -> float | None:
    return _mean(_records(run, SPECTRUM, "trace", window))


def bulk_edge(nodes: np.ndarray, weights: np.ndarray, mass: float = 0.97) -> float:
    """The eigenvalue below which ``mass`` of the density's weight lies (its probes pooled; nodes a
    short Lanczos run left unfilled, NaN, are no part of it)."""
    flat_nodes, flat_weights = nodes.reshape(-1), weights.reshape(-1)
    kept = np.isfinite(flat_nodes) & np.isfinite(flat_weights)
    flat_nodes, flat_weights = flat_nodes[kept], flat_weights[kept]
    if not len(flat_nodes):
        return float("nan")
    order = np.argsort(flat_nodes)
    cumulative = np.cumsum(flat_weights[order]) / np.sum(flat_weights)
    return float(flat_nodes[order][min(int(np.searchsorted(cumulative, mass)), len(order) - 1)])


def outlier_gap(run: RunData, window: Window) -> float | None:
    """Top eigenvalue over the density's bulk edge, averaged over records: large when the
    spectrum has isolated outliers (Ghorbani et al. Fig. 1)."""
    gaps = (
        np.asarray([t / edge for t, n, w in zip(top[:, 0], nodes, weights) if (edge := bulk_edge(n, w)) > 0])
        for top, nodes, weights in _picked(run, SPECTRUM, ("top_k", "density_nodes", "density_weights"), window)
    )
    return _sliced_mean(g for g in gaps if len(g))


@dataclass(frozen=True)
class Quantity:
    """One number that bears on a claim: how a run reduces to it, and which way the claim expects BN
    to move it (``lower``; ``not lower``: any result but a clear decrease agrees)."""

    key: str
    label: str
    reduce: Callable[[RunData, Window], float | None]
    ratio: bool  # compared as BN / no BN (positive quantities); else as the difference BN - no BN
    expect: str
    claim: str


QUANTITIES = (
    Quantity("moments.drift", "percentile drift", percentile_drift, True, "lower", IOFFE),
    Quantity("ics.l2", "ICS (l2 of G - G')", _ics_mean("l2"), True, "not lower", SANTURKAR_ICS),
    Quantity("ics.rel_diff", "relative ICS (‖G - G'‖ / ‖G‖)", _ics_mean("rel_diff"), True, "not lower", SANTURKAR_ICS),
    Quantity("ics.cosine", "ICS cosine of G, G'", _ics_mean("cosine"), False, "not higher", SANTURKAR_ICS),
    Quantity("landscape.loss_variation", "loss variation", _spread("loss"), True, "lower", SANTURKAR_SMOOTH),
    Quantity("landscape.gradient_predictiveness", "gradient change", _spread("grad_l2"), True, "lower", SANTURKAR_SMOOTH),
    Quantity("landscape.effective_beta", "effective beta", effective_beta, True, "lower", SANTURKAR_SMOOTH),
    Quantity("spectrum.outlier_gap", "outlier gap (top / bulk edge)", outlier_gap, True, "lower", GHORBANI),
    Quantity("spectrum.top_eigenvalue", "top Hessian eigenvalue", top_eigenvalue, True, "lower", GHORBANI),
    Quantity("spectrum.trace", "Hessian trace", hessian_trace, True, "lower", GHORBANI),
)


# ----------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Effect:
    """BN's effect on one quantity over one window: a ratio (BN / no BN) or a difference, over paired seeds."""

    interval: Interval
    ratio: bool
    window: Window

    @property
    def no_effect(self) -> float:
        return 1.0 if self.ratio else 0.0

    @property
    def direction(self) -> str:
        """``lower``, ``higher`` or ``no clear difference`` (the interval includes no effect, or 1 seed)."""
        if not self.interval.excludes(self.no_effect):
            return "no clear difference"
        return "higher" if self.interval.mean > self.no_effect else "lower"

    def agrees(self, expect: str) -> bool | None:
        """Whether the effect agrees with the claim's expectation; None when it cannot tell."""
        direction = self.direction
        if expect == "lower":
            return None if direction == "no clear difference" else direction == "lower"
        return direction != expect.removeprefix("not ")


def paired_effect(reference: Condition, treated: Condition, quantity: Quantity, window: Window) -> Effect | None:
    """The effect over the seeds both conditions ran, or None when no pair has the quantity."""
    values = []
    for seed in sorted(set(reference.runs) & set(treated.runs)):
        base, other = quantity.reduce(reference.runs[seed], window), quantity.reduce(treated.runs[seed], window)
        if base is None or other is None:
            continue
        if quantity.ratio:
            if base > 0 and other > 0:
                values.append(other / base)
        else:
            values.append(other - base)
    found = ratio_interval(values) if quantity.ratio else mean_interval(values)
    return Effect(found, quantity.ratio, window) if found is not None else None


@dataclass(frozen=True)
class LearningWindow:
    """Where every compared run is learning: from the step the last of them left its chance
    plateau to the step the first health flag of any of them began. ``window`` is None when
    there is no such step; ``why`` then says which end closed it."""

    window: Window | None
    why: str = ""


def learning_window(*conds: Condition) -> LearningWindow:
    """The learning window of the runs of ``conds`` (see :class:`LearningWindow`)."""
    runs = [run for cond in conds for run in cond.runs.values()]
    starts = [health.learning_start(run) for run in runs]
    stuck = [run.name for run, s in zip(runs, starts) if s is None]
    if stuck:
        return LearningWindow(
            None, f"{', '.join(stuck)} never left {'its' if len(stuck) == 1 else 'their'} chance level: train longer or raise lr"
        )
    first = max((s for s in starts if s is not None), default=0)
    ends = [health.first_flag_step(health.run_flags(run)) for run in runs]
    end = min((e for e in ends if e is not None), default=None)
    if end is not None and end <= first:
        return LearningWindow(None, f"a health flag at step {end}, before every run had left its chance level (step {first})")
    return LearningWindow((first, end))


def partners(conds: Sequence[Condition]) -> list[tuple[Condition, Condition]]:
    """(no BN, BN) pairs of conditions with the same settings: each BN condition with its no-BN partner."""
    refs = [c for c in conds if c.label in NO_BN_LABELS]
    return [(ref, cond) for cond in conds if cond.label not in NO_BN_LABELS for ref in refs if ref.settings == cond.settings]


def _number(value: float) -> str:
    return f"{value:.3g}"


def _span(low: float | None, high: float | None) -> str:
    return f" [{_number(low)}, {_number(high)}]" if low is not None and high is not None else ""


def describe(effect: Effect, label: str) -> str:
    """``lowered effective beta 3.1x [2.4, 3.9]``: a ratio below 1 reads as the factor it divides by;
    an interval that includes no effect reads ``no clear difference in ... (0.8x [0.5, 1.3])``."""
    i = effect.interval
    if effect.direction == "no clear difference" and i.n > 1:
        size = f"{_number(i.mean)}x" if effect.ratio else f"{i.mean:+.3g}"
        return f"no clear difference in {label} ({size}{_span(i.low, i.high)})"
    if effect.ratio:
        if i.mean < 1:
            low, high = (1 / i.high, 1 / i.low) if i.low and i.high else (None, None)
            return f"lowered {label} {_number(1 / i.mean)}x{_span(low, high)}"
        return f"raised {label} {_number(i.mean)}x{_span(i.low, i.high)}"
    if i.mean < 0:
        return (
            f"lowered {label} by {_number(-i.mean)}{_span(-i.high if i.high is not None else None, -i.low if i.low is not None else None)}"
        )
    return f"raised {label} by {_number(i.mean)}{_span(i.low, i.high)}"


def window_text(window: Window) -> str:
    first, end = window
    if end is None:
        return "the whole run" if first == 0 else f"steps {first}-end"
    return f"steps {first}-{end - 1}"


@dataclass(frozen=True)
class Finding:
    """BN's effect on one quantity for one pair of conditions, over the whole run and the learning window."""

    quantity: Quantity
    reference: Condition
    treated: Condition
    whole: Effect
    learning: Effect | None  # None: no learning window (``window.why`` says why), or no record in it
    window: LearningWindow

    @property
    def decisive(self) -> Effect | None:
        """The effect to read: over the learning window (the whole run when nothing cut it short)."""
        return self.learning

    @property
    def agrees(self) -> bool | None:
        return self.learning.agrees(self.quantity.expect) if self.learning is not None else None

    @property
    def verdict(self) -> str:
        effect = self.learning
        if effect is None:
            why = self.window.why or "no record in the learning window"
            where = "; see Health" if "health flag" in why else ""
            return f"{self.treated.label} vs {self.reference.label}, {self.quantity.label}: no learning window ({why}){where}"
        seeds = effect.interval.n
        count = f"{seeds} seeds" if seeds > 1 else "1 seed: no interval"
        subject = (
            self.treated.label
            if effect.direction != "no clear difference" or seeds < 2
            else f"{self.treated.label} vs {self.reference.label}:"
        )
        return f"{subject} {describe(effect, self.quantity.label)} over {window_text(effect.window)}, {count}"

    def as_dict(self) -> dict[str, Any]:
        def effect(e: Effect | None) -> dict[str, Any] | None:
            if e is None:
                return None
            i = e.interval
            return {"kind": "ratio" if e.ratio else "difference", "value": i.mean, "low": i.low, "high": i.high,
                    "seeds": i.n, "direction": e.direction, "first_step": e.window[0], "end_step": e.window[1]}  # fmt: skip

        window = self.window.window
        return {
            "quantity": self.quantity.key, "label": self.quantity.label, "claim": self.quantity.claim,
            "expect": self.quantity.expect, "reference": self.reference.name, "treated": self.treated.name,
            "whole_run": effect(self.whole), "learning_window": effect(self.learning),
            "window": None if window is None else {"first_step": window[0], "end_step": window[1]},
            "window_note": self.window.why, "verdict": self.verdict, "agrees": self.agrees,
        }  # fmt: skip


def findings(runs: Sequence[RunData], conds: Sequence[Condition] | None = None) -> list[Finding]:
    """Every finding the runs support: each quantity recorded by both sides of each (no BN, BN) pair.

    ``conds``: the runs' :func:`conditions`, where the caller has them already."""
    found = []
    for reference, treated in partners(conditions(runs) if conds is None else conds):
        window = learning_window(reference, treated)
        for quantity in QUANTITIES:
            whole = paired_effect(reference, treated, quantity, (0, None))
            if whole is None:
                continue
            if window.window is None:
                learning = None
            elif window.window == (0, None):
                learning = whole
            else:
                learning = paired_effect(reference, treated, quantity, window.window)
            found.append(Finding(quantity, reference, treated, whole, learning, window))
    return found

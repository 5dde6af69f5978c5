"""The report's Hessian spectrum at the last record: the top eigenvalues, the trace and per-layer blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

from ...store import BLOCK, SPECTRUM, STEP, RunData
from ..content import Number, Plain, Report, num, nums, plain
from ..page import Page, fmt, missing


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


def build(run: RunData, patterns: Sequence[str], stat: str) -> Spectrum | None:
    steps = run.get(SPECTRUM, STEP)
    if steps is None or len(steps) == 0:
        return None
    attrs = run.attrs_of(SPECTRUM, "top_k")
    converged, top, trace = run.last(SPECTRUM, "converged"), run.last(SPECTRUM, "block_top_eigenvalue"), run.last(SPECTRUM, "block_trace")
    names = run.labels(SPECTRUM, BLOCK) if top is not None else []
    return {
        "records": len(steps),
        "last_step": num(steps[-1]),
        "top_k": nums(run.last(SPECTRUM, "top_k")),
        "iterations": num(run.last(SPECTRUM, "iterations")),
        "converged": bool(converged) if converged is not None else None,
        "trace": num(run.last(SPECTRUM, "trace")),
        "trace_stderr": num(run.last(SPECTRUM, "trace_stderr")),
        "bn_mode": plain(attrs.get("bn_mode")),
        "samples": plain(attrs.get("samples")),
        "blocks": {n: (num(top[i]), num(trace[i]) if trace is not None else None) for i, n in enumerate(names)},
    }


def _spectrum_rows(contents: Sequence[tuple[str, Spectrum]]) -> list[tuple[str, Callable[[Spectrum], Any]]]:
    k = max(len(spec["top_k"]) for _, spec in contents)
    blocks = list(dict.fromkeys(b for _, spec in contents for b in spec["blocks"]))

    def top(i: int) -> Callable[[Spectrum], Any]:
        return lambda d: fmt(d["top_k"][i], 4) if i < len(d["top_k"]) else missing()

    def block(name: str) -> Callable[[Spectrum], Any]:
        return lambda d: f"{fmt(d['blocks'][name][0], 4)} / {fmt(d['blocks'][name][1], 4)}" if name in d["blocks"] else missing()

    return [
        ("at step", lambda d: fmt(d["last_step"])),
        *((f"λ{i + 1}", top(i)) for i in range(k)),
        ("trace", lambda d: f"{fmt(d['trace'], 4)} ± {fmt(d['trace_stderr'], 2)}" if d["trace"] is not None else missing()),
        ("iterations", lambda d: fmt(d["iterations"])),
        ("converged", lambda d: {True: "yes", False: "NO", None: "—"}[d["converged"]]),
        ("bn mode", lambda d: str(d["bn_mode"] or "—")),
        ("samples", lambda d: fmt(d["samples"])),
        *((f"λ1 / tr {b}", block(b)) for b in blocks),
    ]


def draw(page: Page, report: Report, having: Sequence[tuple[str, Spectrum]]) -> None:
    captions = ["λ1 ≥ λ2 ≥ …: the largest eigenvalues (Lanczos); trace: Hutchinson estimate ± its standard error"]
    if any(spec["blocks"] for _, spec in having):
        captions.append("λ1 / tr LAYER: top eigenvalue and trace of that layer's own block of the Hessian")
    page.row_tables("Hessian spectrum (last record)", having, _spectrum_rows(having), (14, 14), captions)
    if any(spec["converged"] is False for _, spec in having):
        page.note("not converged: raise probes.spectrum.max_iter or loosen probes.spectrum.tol")

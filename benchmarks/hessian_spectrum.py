"""Cost of the Hessian spectrum against PyHessian's methods, re-implemented here, measured in one run.

Same model and batch for both (VGG-11 with BN inserted, ``--width``, batch 64, BN in train mode for
both, after a few SGD steps), each including its own forward and first-order backward:

- **top eigenvalue, relative tolerance 1e-3**: PyHessian's power iteration (random start, stops when
  the eigenvalue's relative change is below tol, at most 100 iterations) against bnprobe's Lanczos
  (``top_eigenvalues(k=1, tol=1e-3)``, error bound below tol), cold and warm-started (from the
  previous SGD step's Ritz vector). Both are checked against a reference (Lanczos to 1e-9).
  PyHessian's rule stops long before its estimate is within 1e-3 of the answer, so its time "for
  the same accuracy" is the time until its estimate first came within 1e-3 of the reference (at
  most ``--most`` products; its own rule's time and error are shown too). Each seed times the two
  methods back to back, in alternating order, so that a machine slowing down or speeding up
  during the run weighs on both alike. PyHessian's cost depends much on its random start (its
  products to 1e-3 vary several-fold from seed to seed, and a couple of seeds can sit far from
  the mean), so take several seeds (``--repeats``, default 6). Target: at most 0.3x PyHessian's
  time. Rows and ratios:

  - "PyHessian power, its own rule" / "to 1e-3 true": products, and the time from its forward to
    the product where its rule stops / where it is first within 1e-3 (its forward and first-order
    backward included); mean over ``--repeats`` seeds.
  - "bnprobe Lanczos (cold)": ``top_eigenvalues`` as a user calls it (from the gradient plus a
    random vector of each seed), stopping by its own bound, timed end to end (forward and
    first-order backward included); mean over the seeds.
  - "bnprobe Lanczos, to 1e-3 true" (cold): the products its Ritz value needed to get within 1e-3
    of the reference (the same Lanczos run on, untimed, for twice its own products; never
    within: counted as that many) times its per-product time (own-rule time / products).
  - "bnprobe Lanczos (warm, per step)": ``--repeats`` SGD steps, each followed by a run from the
    previous step's Ritz vector (as the probe records during training), beside PyHessian to 1e-3
    of that step's reference (another seed each step); means per step.
  - "time ratio at the same accuracy": bnprobe's own-rule time / PyHessian's "to 1e-3 true" time
    (the target; warm: the warm runs' time over their paired PyHessian runs'). "both credited
    alike": the two "to 1e-3 true" rows' ratio. "against PyHessian's own rule": bnprobe's
    own-rule time / PyHessian's own-rule time (PyHessian less accurate there).
- **trace at equal standard error**: PyHessian's Hutchinson (Rademacher vectors, stops when the
  running mean's relative change is below 1e-3, at most 100) against ``hessian_trace`` with as
  many vectors (the same estimator, so the same standard error); each timed twice, the faster
  run counts. Target: no slower.

    python benchmarks/hessian_spectrum.py [--width 0.5] [--repeats 6] [--most 200] [--threads 2] [--json] [--no-record]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from bnprobe.models import vgg
from bnprobe.probes.hessian import first_order, hvp_function
from bnprobe.probes.spectrum import hessian_trace, lanczos, lanczos_start, top_eigenvalues
from bnprobe.surgery import apply_bn

Vectors = list[torch.Tensor]


class PyHessian:
    """PyHessian's ``hessian`` class (single batch), as its source does it: gradients with
    ``create_graph=True`` once, products through that graph, lists of tensors throughout."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(model(x), y)
        self.grads = list(torch.autograd.grad(loss, self.params, create_graph=True))
        self.products = 0

    def hvp(self, v: Vectors) -> Vectors:
        self.products += 1
        return list(torch.autograd.grad(self.grads, self.params, grad_outputs=v, only_inputs=True, retain_graph=True))

    @staticmethod
    def dot(a: Vectors, b: Vectors) -> float:
        return float(sum(torch.sum(x * y) for x, y in zip(a, b)))

    def top_eigenvalue(self, tol: float, max_iter: int, seed: int, trail: list[float], until: Callable[[], bool] = lambda: False) -> float:
        """PyHessian's loop; ``trail`` gets each product's estimate, and ``until()`` (checked after
        each) ends the run early (the benchmark's stop once it has what it measures)."""
        torch.manual_seed(seed)
        v = [torch.randn_like(p) for p in self.params]
        norm = math.sqrt(self.dot(v, v))
        v = [t / norm for t in v]
        eigenvalue: float | None = None
        for _ in range(max_iter):
            hv = self.hvp(v)
            value = self.dot(hv, v)
            trail.append(value)
            norm = math.sqrt(self.dot(hv, hv))
            v = [t / (norm + 1e-6) for t in hv]
            if (eigenvalue is not None and abs(eigenvalue - value) / (abs(eigenvalue) + 1e-6) < tol) or until():
                break
            eigenvalue = value
        return eigenvalue if eigenvalue is not None else math.nan

    def trace(self, tol: float, max_iter: int, seed: int) -> list[float]:
        torch.manual_seed(seed)
        samples: list[float] = []
        trace = 0.0
        for _ in range(max_iter):
            v = [torch.randint_like(p, high=2) for p in self.params]
            for t in v:
                t[t == 0] = -1
            samples.append(self.dot(self.hvp(v), v))
            if abs(float(np.mean(samples)) - trace) / (abs(trace) + 1e-6) < tol:
                break
            trace = float(np.mean(samples))
        return samples


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def setup(width: float) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(10, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = apply_bn(vgg(10, (3, 32, 32), width=width), "insert", x[:2])[0].train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(10):  # leave the first chaotic steps behind, as a measurement mid-training would
        sgd_step(model, loss_fn, x, y, opt)
    return model, loss_fn, x, y, opt


def sgd_step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()


def first_within(trail: list[float], ref: float, tol: float) -> int | None:
    """Products a method needed before its estimate was within ``tol`` of ``ref`` (None: never)."""
    return next((i + 1 for i, v in enumerate(trail) if abs(v - ref) <= tol * abs(ref)), None)


def own_stop(trail: list[float], tol: float) -> int:
    """Products PyHessian's rule uses: until the relative change between two estimates is below ``tol``."""
    return next((i + 1 for i in range(1, len(trail)) if abs(trail[i - 1] - trail[i]) / (abs(trail[i - 1]) + 1e-6) < tol), len(trail))


def pyhessian_top(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, ref: float, seed: int, most: int
) -> dict[str, Any]:
    """PyHessian's power iteration run on (tolerance 0) until both its own rule would have stopped
    and its estimate is within 1e-3 of ``ref`` (at most ``most`` products): when each happened, in
    products and in seconds from the start of its forward."""
    trail: list[float] = []
    stamps: list[float] = []
    start = time.perf_counter()

    def enough() -> bool:
        stamps.append(time.perf_counter() - start)
        return len(trail) > 1 and own_stop(trail, 1e-3) < len(trail) and first_within(trail, ref, 1e-3) is not None

    PyHessian(model, loss_fn, x, y).top_eigenvalue(0.0, most, seed, trail, enough)
    stop, true = own_stop(trail, 1e-3), first_within(trail, ref, 1e-3)
    return {
        "own_hvps": stop,
        "own_s": stamps[stop - 1],
        "own_rel_error": abs(trail[stop - 1] - ref) / abs(ref),
        "true_hvps": true,
        "true_s": stamps[(true or len(stamps)) - 1],  # never within: its time for `most` products, a lower bound
        "per_product_s": stamps[-1] / len(trail),
    }


def lanczos_trail(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> list[float]:
    """The largest Ritz value after each product of the cold Lanczos that ``top_eigenvalues(seed=seed)``
    runs (same start), run on for ``steps`` products regardless of its stopping rule (untimed)."""
    ps: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    grads, _ = first_order(model, loss_fn, x, y, ps, "train")
    trail: list[float] = []

    def record(values: torch.Tensor, _: torch.Tensor) -> bool:
        trail.append(float(values[-1]))
        return False

    n = sum(p.numel() for p in ps)
    lanczos(hvp_function(grads, ps), n, steps, lanczos_start(grads, ps, seed), seed, dtype=ps[0].dtype, stop=record)
    return trail


def in_turn(turn: int, ours: Callable[[], Any], theirs: Callable[[], Any]) -> tuple[Any, Any]:
    """Both results; PyHessian's run first on even turns, ours first on odd ones (drift weighs on both alike)."""
    if turn % 2:
        mine = ours()
        return mine, theirs()
    other = theirs()
    return ours(), other


def bench_top(width: float, repeats: int, most: int) -> dict[str, Any]:
    model, loss_fn, x, y, opt = setup(width)
    ref = float(top_eigenvalues(model, loss_fn, x, y, tol=1e-9, max_iter=300).values[0])
    py: list[dict[str, Any]] = []
    ours_s, ours_hvps, ours_err, ours_true = [], [], [], []
    for seed in range(repeats):
        ours_run = functools.partial(top_eigenvalues, model, loss_fn, x, y, tol=1e-3, seed=seed)
        (res, seconds), theirs = in_turn(
            seed, functools.partial(timed, ours_run), functools.partial(pyhessian_top, model, loss_fn, x, y, ref, seed, most)
        )
        py.append(theirs)
        ours_s.append(seconds)
        ours_hvps.append(res.iterations)
        ours_err.append(abs(float(res.values[0]) - ref) / abs(ref))
        ours_true.append(first_within(lanczos_trail(model, loss_fn, x, y, seed, 2 * res.iterations), ref, 1e-3) or 2 * res.iterations)
    warm_py, warm_s, warm_hvps, warm_err = [], [], [], []
    vectors = top_eigenvalues(model, loss_fn, x, y, tol=1e-3).vectors
    for step in range(repeats):  # as during training: one SGD step, then the record warm-started from the last one's vector
        sgd_step(model, loss_fn, x, y, opt)
        new_ref = float(top_eigenvalues(model, loss_fn, x, y, tol=1e-9, max_iter=300).values[0])
        warm_run = functools.partial(top_eigenvalues, model, loss_fn, x, y, tol=1e-3, init=vectors, seed=step)
        (warm, seconds), theirs = in_turn(
            step, functools.partial(timed, warm_run), functools.partial(pyhessian_top, model, loss_fn, x, y, new_ref, step, most)
        )
        warm_py.append(theirs["true_s"])
        vectors = warm.vectors
        warm_s.append(seconds)
        warm_hvps.append(warm.iterations)
        warm_err.append(abs(float(warm.values[0]) - new_ref) / abs(new_ref))

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in py]))

    ours_per = sum(ours_s) / sum(ours_hvps)  # its forward and first-order backward spread over its few products
    return {
        "reference": ref,
        "pyhessian": {
            "own_rule_s": mean("own_s"),
            "own_rule_hvps": mean("own_hvps"),
            "own_rule_max_rel_error": max(r["own_rel_error"] for r in py),
            "true_1e-3_hvps": float(np.mean([r["true_hvps"] or most for r in py])),
            "true_1e-3_reached": all(r["true_hvps"] for r in py),
            "true_1e-3_s": mean("true_s"),
            "per_product_s": mean("per_product_s"),
        },
        "bnprobe": {
            "s": float(np.mean(ours_s)),
            "hvps": float(np.mean(ours_hvps)),
            "max_rel_error": max(ours_err),
            "per_product_s": ours_per,
            "true_1e-3_hvps": float(np.mean(ours_true)),
            "true_1e-3_s": ours_per * float(np.mean(ours_true)),
        },
        "bnprobe_warm": {"s": float(np.mean(warm_s)), "hvps": float(np.mean(warm_hvps)), "max_rel_error": max(warm_err)},
        "pyhessian_warm_steps_s": float(np.mean(warm_py)),
        "time_ratio_same_accuracy": float(np.mean(ours_s)) / mean("true_s"),
        "time_ratio_own_rules": float(np.mean(ours_s)) / mean("own_s"),
        "warm_time_ratio_same_accuracy": sum(warm_s) / sum(warm_py),
        "time_ratio_both_credited_alike": ours_per * float(np.mean(ours_true)) / (mean("per_product_s") * mean("true_hvps")),
    }


def pyhessian_trace(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> list[float]:
    """PyHessian's ``trace()`` with its defaults (tol 1e-3, at most 100 vectors), from its own forward."""
    return PyHessian(model, loss_fn, x, y).trace(1e-3, 100, seed)


def bench_trace(width: float, repeats: int) -> dict[str, Any]:
    """Per vector set (seed): PyHessian's run gives the vector count, ours uses as many; each runs
    twice, once first and once second, and the faster time counts (runs of a few tenths of a
    second: on a shared machine the faster one is the one others slowed less)."""
    model, loss_fn, x, y, _ = setup(width)
    pyhessian_trace(model, loss_fn, x, y, 0)  # warm-up
    py_s, ours_s, rows = [], [], []
    for seed in range(repeats):
        samples, first = timed(functools.partial(pyhessian_trace, model, loss_fn, x, y, seed))
        ours_run = functools.partial(hessian_trace, model, loss_fn, x, y, samples=max(len(samples), 2), seed=seed)
        ours, ours_first = timed(ours_run)
        _, ours_second = timed(ours_run)
        _, second = timed(functools.partial(pyhessian_trace, model, loss_fn, x, y, seed))
        py_s.append(min(first, second))
        ours_s.append(min(ours_first, ours_second))
        m = len(samples)
        rows.append(
            (m, float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(m)) if m > 1 else math.nan, ours.trace, ours.stderr)
        )
    vectors, py_t, py_e, ours_t, ours_e = (float(np.mean(c)) for c in zip(*rows))
    return {
        "vectors": vectors,
        "pyhessian": {"s": float(np.mean(py_s)), "trace": py_t, "stderr": py_e},
        "bnprobe": {"s": float(np.mean(ours_s)), "trace": ours_t, "stderr": ours_e},
        "time_ratio": sum(ours_s) / sum(py_s),
    }


def top_table(top: dict[str, Any], meta: dict[str, Any], most: int) -> Any:
    """The top-eigenvalue comparison as a ``_results.Table``."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script

    py, ours, warm = top["pyhessian"], top["bnprobe"], top["bnprobe_warm"]
    rows = [
        ["PyHessian power, its own rule", f"{py['own_rule_hvps']:.1f}", f"{py['own_rule_s']:.2f}", f"{py['own_rule_max_rel_error']:.1e}"]
    ]
    if py["true_1e-3_reached"]:
        rows.append(["PyHessian power, to 1e-3 true", f"{py['true_1e-3_hvps']:.1f}", f"{py['true_1e-3_s']:.2f}", "<=1e-3"])
    else:  # counted as --most products: PyHessian's real cost is higher, the ratios below lower
        rows.append(["PyHessian power, to 1e-3 true", f">{most}", f">{py['true_1e-3_s']:.2f}", "not reached"])
    rows += [
        ["bnprobe Lanczos (cold)", f"{ours['hvps']:.1f}", f"{ours['s']:.2f}", f"{ours['max_rel_error']:.1e}"],
        ["bnprobe Lanczos, to 1e-3 true", f"{ours['true_1e-3_hvps']:.1f}", f"{ours['true_1e-3_s']:.2f}", "<=1e-3"],
        ["bnprobe Lanczos (warm, per step)", f"{warm['hvps']:.1f}", f"{warm['s']:.2f}", f"{warm['max_rel_error']:.1e}"],
        ["PyHessian, to 1e-3 true, same steps", "", f"{top['pyhessian_warm_steps_s']:.2f}", ""],
    ]
    notes = [
        f"time ratio at the same accuracy {top['time_ratio_same_accuracy']:.2f}x (warm {top['warm_time_ratio_same_accuracy']:.2f}x; "
        f"target <= 0.3x); against PyHessian's own, looser, rule {top['time_ratio_own_rules']:.2f}x",
        f"per product: PyHessian {py['per_product_s']:.3f} s, bnprobe {ours['per_product_s']:.3f} s; both credited alike "
        f"(products to 1e-3 true x per-product time) {top['time_ratio_both_credited_alike']:.2f}x",
    ]
    title = f"Top Hessian eigenvalue, tol 1e-3 (vgg w{meta['width']} +BN, batch 64, train mode, CPU, {meta['threads']} threads)"
    return Table(title, ["method", "HVPs", "seconds", "max rel err"], rows, notes)


def trace_table(trace: dict[str, Any]) -> Any:
    """The trace comparison as a ``_results.Table``."""
    from _results import Table

    return Table(
        f"Trace, Hutchinson at equal standard error ({trace['vectors']:.0f} Rademacher vectors, PyHessian's stopping rule)",
        ["method", "seconds", "trace", "+- s.e."],
        [
            [label, f"{trace[label]['s']:.2f}", f"{trace[label]['trace']:.4g}", f"{trace[label]['stderr']:.2g}"]
            for label in ("pyhessian", "bnprobe")
        ],
        [f"time ratio {trace['time_ratio']:.2f}x (target <= 1x)"],
    )


def main(argv: list[str] | None = None) -> int:
    from _results import add_record_flag, finish

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.5, help="VGG-11 width (0.5: the half-width VGG)")
    ap.add_argument("--repeats", type=int, default=6, help="random starts / vector sets per method")
    ap.add_argument("--most", type=int, default=200, help="power iterations at most while waiting for 1e-3 true accuracy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    top, trace = bench_top(args.width, args.repeats, args.most), bench_trace(args.width, args.repeats)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "width": args.width, "repeats": args.repeats}
    out = [top_table(top, meta, args.most), trace_table(trace)]
    print(json.dumps({"meta": meta, "top": top, "trace": trace}, indent=2) if args.json else "\n\n".join(t.text() for t in out))
    finish("hessian_spectrum", out, args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

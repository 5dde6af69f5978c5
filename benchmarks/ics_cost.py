"""Cost of one ICS-measured training step, as a ratio to a plain training step.

For each model: a plain SGD step, ``gradient_shift(method="naive")`` (one extra forward and full
backward per layer) and ``gradient_shift(method="fast")``, timed in one run, interleaved, each from
the same starting weights. Ratios use the fastest of ``--repeats`` runs of each (the minimum is the
estimate least disturbed by other processes on a shared machine; the medians are in ``--json``).
Also checks that the two methods give the same numbers: the largest relative difference over l2,
cosine, ||G|| and ||G'|| of all layers.

    python benchmarks/ics_cost.py            # the table
    python benchmarks/ics_cost.py --json     # machine-readable
    python benchmarks/ics_cost.py --cases vgg dln --repeats 3
    python benchmarks/ics_cost.py --cases dln --repeats 1 --no-record   # a quick check that it runs

Target: fast at most half the naive cost on every model, identical numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnprobe.data import synthetic_linear
from bnprobe.models import dln, vgg
from bnprobe.probes.ics import FIELDS, gradient_shift
from bnprobe.surgery import apply_bn


def insert_bn(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``--bn insert``: BN after every conv (VGG) or hidden linear layer (DLN)."""
    return apply_bn(model, "insert", example)[0]


def cases(names: list[str]) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, nn.Module, float]]:
    g = torch.Generator().manual_seed(0)
    out = []
    img = torch.randn(64, 3, 32, 32, generator=g)
    labels = torch.randint(10, (64,), generator=g)
    if "vgg" in names:
        torch.manual_seed(0)
        out.append(("vgg w0.5 b64", vgg(10, (3, 32, 32), width=0.5), img, labels, nn.CrossEntropyLoss(), 0.1))
    if "vgg_bn" in names:
        torch.manual_seed(0)
        out.append(("vgg w0.5 b64 +BN", insert_bn(vgg(10, (3, 32, 32), width=0.5), img[:2]), img, labels, nn.CrossEntropyLoss(), 0.1))
    lin = synthetic_linear(seed=0, n=1024)
    xl, yl = lin.train.tensors  # type: ignore[attr-defined]
    if "dln" in names:
        torch.manual_seed(0)
        out.append(("dln 25x10 b1024", dln(10, (10,)), xl, yl, nn.MSELoss(), 1e-2))
    if "dln_bn" in names:
        torch.manual_seed(0)
        out.append(("dln 25x10 b1024 +BN", insert_bn(dln(10, (10,)), xl[:2]), xl, yl, nn.MSELoss(), 1e-2))
    if "resnet18" in names:
        import torchvision

        torch.manual_seed(0)
        out.append(("resnet18 32x32 b64", torchvision.models.resnet18(num_classes=10), img, labels, nn.CrossEntropyLoss(), 0.1))
    return out


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, lr: float, repeats: int) -> dict[str, Any]:
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(base).train()
        return m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def plain(m: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], Any]:
        def step() -> None:
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()

        return step

    def measured(m: nn.Module, opt: torch.optim.Optimizer, method: str) -> Callable[[], Any]:
        return lambda: gradient_shift(m, loss_fn, x, y, opt, method=method)

    runs = {"plain": plain, "naive": lambda m, o: measured(m, o, "naive"), "fast": lambda m, o: measured(m, o, "fast")}
    for make in runs.values():  # warm-up
        make(*fresh())()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, make in runs.items():
            fn = make(*fresh())
            times[key].append(timed(fn))
    # same start, same RNG: the two methods' numbers
    results = {}
    for method in ("naive", "fast"):
        m, opt = fresh()
        torch.manual_seed(1)
        results[method] = gradient_shift(m, loss_fn, x, y, opt, method=method)
    worst = 0.0
    for layer, a in results["naive"].items():
        b = results["fast"][layer]
        for f in FIELDS[:4]:
            va, vb = getattr(a, f), getattr(b, f)
            worst = max(worst, abs(va - vb) / max(abs(va), 1e-30))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "layers": len(results["fast"]),
        "plain_ms": 1e3 * best["plain"],
        "naive_x": best["naive"] / best["plain"],
        "fast_x": best["fast"] / best["plain"],
        "fast_over_naive": best["fast"] / best["naive"],
        "median_naive_x": med["naive"] / med["plain"],
        "median_fast_x": med["fast"] / med["plain"],
        "max_rel_diff": worst,
    }


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> Any:
    """The rows as a ``_results.Table``."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script; tests load scripts by path

    title = f"ICS cost per measured step, ratio to a plain SGD step (CPU, {meta['threads']} threads, best of {meta['repeats']})"
    header = ["model", "layers", "plain ms", "naive", "fast", "fast/naive", "max rel diff"]
    cells = [
        [
            r["model"],
            str(r["layers"]),
            f"{r['plain_ms']:.1f}",
            f"{r['naive_x']:.1f}x",
            f"{r['fast_x']:.1f}x",
            f"{r['fast_over_naive']:.2f}",
            f"{r['max_rel_diff']:.1e}",
        ]
        for r in rows
    ]
    return Table(title, header, cells)


def main(argv: list[str] | None = None) -> int:
    from _results import add_record_flag, finish

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases", nargs="+", default=["vgg", "vgg_bn", "dln", "dln_bn", "resnet18"], choices=["vgg", "vgg_bn", "dln", "dln_bn", "resnet18"]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(*case, repeats=args.repeats) for case in cases(args.cases)]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    out = table(rows, meta)
    print(json.dumps({"meta": meta, "rows": rows}, indent=2) if args.json else out.text())
    finish("ics_cost", [out], args.no_record)
    ok = all(r["fast_over_naive"] <= 0.5 and r["max_rel_diff"] < 1e-4 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

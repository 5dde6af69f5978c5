"""Cost of the landscape scan and of the top Hessian eigenvalue, measured in one run.

Landscape (VGG-11 half width, batch 64, m step sizes): ``bnprobe.landscape`` against

- a naive re-computation (deep-copy the model per step size, set the weights, forward + backward),
- ``torch.func.vmap`` over the m step sizes (the obvious way to batch them), on the
  model without BN (vmap cannot batch BN's in-place running statistics),

each as a ratio to one plain forward + backward pass. Target: under m naive passes.

Hessian (VGG-11 quarter width, batch 64): over ``--steps`` consecutive SGD steps, PyHessian's method
(power iteration from a fresh random vector each time, relative tolerance 1e-3, at most 100
iterations) against bnprobe's (the same rule, warm-started from the previous step's eigenvector).
Reported: Hessian-vector products and seconds in total, and the largest relative difference of the
eigenvalues. Target: half PyHessian's time at the same accuracy.

    python benchmarks/landscape_hessian_cost.py [--json] [--m 8] [--steps 6] [--threads 2] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from bnprobe.models import vgg
from bnprobe.probes.hessian import top_hessian_eigenvalue
from bnprobe.probes.landscape import default_etas, landscape
from bnprobe.surgery import apply_bn


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def naive_landscape(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: list[float]) -> list[float]:
    """The textbook way: one deep copy per step size."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
    out = []
    for eta in etas:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, gi in zip(m.parameters(), g):
                p.sub_(eta * gi)
        m.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        out.append(loss.item())
    model.zero_grad()
    return out


def vmap_landscape(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All step sizes in one batched call: loss and ||g - grad L(w - eta g)|| for every eta."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_at(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    g, _ = grad_and_value(loss_at)(params)
    eta = torch.tensor(etas)
    shifted = {k: params[k] - eta.view(-1, *[1] * params[k].dim()) * g[k] for k in params}
    grads, losses = vmap(grad_and_value(loss_at))(shifted)
    grad_l2 = torch.sqrt(sum(((grads[k] - g[k]) ** 2).flatten(1).sum(1) for k in params))
    return losses, grad_l2


def bench_landscape(m: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(10, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    plain_model = vgg(10, (3, 32, 32), width=0.5).train()
    bn_model = apply_bn(copy.deepcopy(plain_model), "insert", x[:2])[0].train()
    etas = default_etas(0.1, "vgg", m)
    row: dict[str, Any] = {"m": m}
    for label, model in (("vgg w0.5 b64", plain_model), ("vgg w0.5 b64 +BN", bn_model)):

        def pass_once(model: nn.Module = model) -> None:
            model.zero_grad()
            loss_fn(model(x), y).backward()

        one = best_of(pass_once, repeats)
        entry = {
            "pass_ms": 1e3 * one,
            "bnprobe_passes": best_of(lambda model=model: landscape(model, loss_fn, x, y, etas), repeats) / one,
            "naive_passes": best_of(lambda model=model: naive_landscape(model, loss_fn, x, y, etas), repeats) / one,
        }
        if model is plain_model:
            entry["vmap_passes"] = best_of(lambda model=model: vmap_landscape(model, loss_fn, x, y, etas), repeats) / one
            ours = landscape(model, loss_fn, x, y, etas)
            losses, grad_l2 = vmap_landscape(model, loss_fn, x, y, etas)
            pairs = [*zip(ours.loss, losses.tolist()), *zip(ours.grad_l2, grad_l2.tolist())]
            entry["vmap_max_rel_diff"] = max(abs(a - b) / abs(a) for a, b in pairs)
        row[label] = entry
    return row


def bench_hessian(steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(10, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = vgg(10, (3, 32, 32), width=0.25).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(20):  # leave the first chaotic steps behind, as a measurement mid-training would
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    totals = {"cold": [0, 0.0], "warm": [0, 0.0]}
    worst = 0.0
    vector = None
    for step in range(steps):
        t = time.perf_counter()
        cold = top_hessian_eigenvalue(model, loss_fn, x, y, tol=1e-3, max_iter=100, seed=step)
        totals["cold"][0] += cold.iterations
        totals["cold"][1] += time.perf_counter() - t
        t = time.perf_counter()
        warm = top_hessian_eigenvalue(model, loss_fn, x, y, tol=1e-3, max_iter=100, init=vector, seed=step)
        totals["warm"][0] += warm.iterations
        totals["warm"][1] += time.perf_counter() - t
        vector = warm.vector
        if step:  # the first warm call has nothing to start from: it is a cold start
            worst = max(worst, abs(cold.eigenvalue - warm.eigenvalue) / abs(cold.eigenvalue))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return {
        "steps": steps,
        "pyhessian_hvps": totals["cold"][0],
        "pyhessian_s": totals["cold"][1],
        "bnprobe_hvps": totals["warm"][0],
        "bnprobe_s": totals["warm"][1],
        "time_ratio": totals["warm"][1] / totals["cold"][1],
        "max_rel_diff": worst,
    }


def tables(scan: dict[str, Any], hess: dict[str, Any], meta: dict[str, Any]) -> list[Any]:
    """The landscape and Hessian results as ``_results.Table``s."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script

    landscape_rows = [
        [
            label,
            f"{e['pass_ms']:.1f}",
            f"{e['bnprobe_passes']:.1f}",
            f"{e['naive_passes']:.1f}",
            f"{e['vmap_passes']:.1f}" if "vmap_passes" in e else "n/a",
        ]
        for label, e in scan.items()
        if label != "m"
    ]
    scan_table = Table(
        f"Landscape scan, m = {scan['m']} step sizes, cost in plain forward+backward passes (CPU, {meta['threads']} threads)",
        ["model", "pass ms", "bnprobe", "naive", "vmap"],
        landscape_rows,
        [f"vmap and bnprobe agree to {scan['vgg w0.5 b64']['vmap_max_rel_diff']:.1e} (relative)"],
    )
    hessian_table = Table(
        f"Top Hessian eigenvalue over {hess['steps']} consecutive steps (vgg w0.25 b64, tol 1e-3)",
        ["method", "HVPs", "seconds"],
        [
            ["PyHessian (cold start)", str(hess["pyhessian_hvps"]), f"{hess['pyhessian_s']:.2f}"],
            ["bnprobe (warm start)", str(hess["bnprobe_hvps"]), f"{hess['bnprobe_s']:.2f}"],
        ],
        [f"time ratio {hess['time_ratio']:.2f}, largest relative eigenvalue difference {hess['max_rel_diff']:.1e}"],
    )
    return [scan_table, hessian_table]


def main(argv: list[str] | None = None) -> int:
    from _results import add_record_flag, finish

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8, help="step sizes in the landscape scan")
    ap.add_argument("--steps", type=int, default=6, help="consecutive steps with a Hessian measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scan = bench_landscape(args.m, args.repeats)
    hess = bench_hessian(args.steps)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    out = tables(scan, hess, meta)
    print(json.dumps({"meta": meta, "landscape": scan, "hessian": hess}, indent=2) if args.json else "\n\n".join(t.text() for t in out))
    finish("landscape_hessian_cost", out, args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

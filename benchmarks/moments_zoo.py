"""Cost of the moment probes across networks, as a ratio to the same loop without the Recorder.

``moments_overhead.py`` measures the built-in VGG, whose few large layers make the statistics'
cost proportional to the data. Networks of many small layers (MobileNets, EfficientNets, deep
MLPs) show two other costs: a fixed cost per layer on each record step, and whatever the steps
between records pay. This runs ``Recorder(model, path, layers="*")`` in a plain SGD loop with
momentum on each model, recording every step and every 10th, beside the loop without it.

Each model runs ``--blocks`` blocks; a block times a round of ``--steps`` steps of each setting
(plain, every step, every 10th) in a new order, each probed setting with a fresh Recorder whose
first, untimed steps fix the layer order. A setting's ratio is the mean over blocks of its round's
mean step over that block's plain round's, with the standard error of that mean: pairing each
round with the plain one beside it cancels the drift of a shared machine's speed over minutes
(a VGG step's time wandered between rounds by more than the costs measured), which
comparing each setting's fastest round did not. A round of the every-10th setting holds whole
periods of ten steps (one record step each); "between records" is its other steps alone, the
Recorder's cost where it does not record. Each step is timed by two clocks: the process's CPU
time, which a busy machine's other processes leave nearly alone (one thread: it is the work the
loop did), and the wall clock, which they do not. It runs one thread unless ``--threads`` says
otherwise: on a shared machine a multi-threaded loop of small operations waits for whichever
thread is descheduled (a 200-layer deep linear net's step took 0.3-3 s on 2 threads beside other
work, 25 ms on 1). "per layer" is what a record step adds per probed layer, (every step -
plain) / layers: on the deep linear nets, whose layers hold 640 values each, it is the fixed
cost a layer brings whatever its size.

    python benchmarks/moments_zoo.py [--steps 10] [--blocks 8] [--models resnet18 dln200 ...]
        [--vgg-batch 128] [--threads 1] [--no-record]

A quick check that it runs (figures meaningless): ``--steps 10 --blocks 2 --models dln25 --no-record``.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnprobe import Recorder
from bnprobe.layers import parameter_holders
from bnprobe.models import build_model

SETTINGS = {"plain": None, "every step": 1, "every 10th": 10}  # label: record_every (None: no Recorder)
CLOCKS = {"CPU": time.process_time, "wall": time.perf_counter}  # this process's CPU time, and the time that passed
WARMUP = 2  # untimed steps before each round's timed ones; the Recorder's first fixes its layer order


@dataclass
class Case:
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model: nn.Module = torchvision.models.get_model(name, num_classes=10)
        return model

    return build


def cases(vgg_batch: int) -> dict[str, Case]:
    image = (3, 64, 64)
    out = {
        "resnet18": Case("resnet18 64x64 b32", torchvision_model("resnet18"), image, 32),
        "mobilenet_v3_small": Case("mobilenet_v3_small 64x64 b32", torchvision_model("mobilenet_v3_small"), image, 32),
        "efficientnet_b0": Case("efficientnet_b0 64x64 b16", torchvision_model("efficientnet_b0"), image, 16),
        "vgg": Case(f"vgg (built-in) 32x32 b{vgg_batch}", lambda: build_model("vgg", 10, (3, 32, 32)), (3, 32, 32), vgg_batch),
    }
    for depth in (25, 100, 200):
        out[f"dln{depth}"] = Case(
            f"dln {depth} layers width 10 b64", functools.partial(build_model, "dln", 10, (10,), depth=depth, width=10), (10,), 64
        )
    return out


def time_setting(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, record_every: int | None, steps: int, tmp: Path
) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` SGD steps after ``WARMUP`` untimed ones, by each clock, with a
    fresh Recorder (closed after, untimed) unless ``record_every`` is None."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    recorder = None
    if record_every is not None:
        recorder = Recorder(model, tmp / f"{time.perf_counter_ns()}.h5", layers="*", record_every=record_every).__enter__()
    times: dict[str, list[float]] = {k: [] for k in CLOCKS}
    times["recorded"] = []  # 1.0 for a record step, 0.0 for one between records (or without a Recorder)
    for i in range(WARMUP + steps):
        recording = recorder is not None and recorder.step_index % recorder.record_every == 0
        start = {k: clock() for k, clock in CLOCKS.items()}
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if recorder is not None:
            recorder.step(loss=loss.detach())
        if i >= WARMUP:
            for k, clock in CLOCKS.items():
                times[k].append(clock() - start[k])
            times["recorded"].append(float(recording))
    if recorder is not None:
        recorder.close()
    return times


def measure(case: Case, steps: int, blocks: int, tmp: Path) -> dict[str, Any]:
    """By clock, :func:`paired` over ``blocks`` blocks of one round per setting; the layer count."""
    torch.manual_seed(0)
    model = case.build()
    x = torch.randn(case.batch, *case.input_shape)
    y = torch.randint(0, 10, (case.batch,))
    rounds: dict[str, list[dict[str, list[float]]]] = {k: [] for k in SETTINGS}
    for b in range(blocks):
        for label in random.Random(b).sample(list(SETTINGS), len(SETTINGS)):
            rounds[label].append(time_setting(model, x, y, SETTINGS[label], steps, tmp))
    return {"layers": len(parameter_holders(model)), **{clock: paired(rounds, clock) for clock in CLOCKS}}


def paired(rounds: dict[str, list[dict[str, list[float]]]], clock: str) -> dict[str, Any]:
    """Per block: plain's mean step, each setting's mean over it (and the every-10th rounds' steps
    between records over it), and the time every step adds over it."""
    plain = [statistics.fmean(r[clock]) for r in rounds["plain"]]
    means = {label: [statistics.fmean(r[clock]) for r in rounds[label]] for label in ("every step", "every 10th")}
    means["between records"] = [statistics.fmean(between_records(r)[clock]) for r in rounds["every 10th"]]
    return {
        "plain": plain,
        "ratios": {label: [m / p for m, p in zip(v, plain)] for label, v in means.items()},
        "added": [m - p for m, p in zip(means["every step"], plain)],
    }


def between_records(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """The steps of a round that did not record, alone: what a Recorder costs between records."""
    kept = [i for i, r in enumerate(times["recorded"]) if not r]
    return {k: [v[i] for i in kept] for k, v in times.items()}


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (NaN from one value)."""
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else math.nan


def table(results: dict[str, dict[str, Any]], clock: str, steps: int, blocks: int) -> Any:
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script

    rows: list[Sequence[str]] = []
    for label, result in results.items():
        r = result[clock]
        every, tenth, between = (summary(r["ratios"][k]) for k in ("every step", "every 10th", "between records"))
        per_layer = statistics.fmean(r["added"]) / result["layers"]
        rows.append(
            [
                label,
                str(result["layers"]),
                f"{statistics.median(r['plain']) * 1000:.1f}",
                f"{every[0]:.3f}x",
                f"{every[1]:.3f}",
                f"{tenth[0]:.3f}x",
                f"{tenth[1]:.3f}",
                f"{between[0]:.3f}x",
                f"{between[1]:.3f}",
                f"{per_layer * 1e6:.0f}",
            ]
        )
    title = (
        f"{clock} time, {torch.get_num_threads()} threads, {blocks} blocks of one {steps}-step round per setting; "
        "ratio to the plain round of the same block, mean over blocks +- standard error; "
        "between records: the every-10th rounds' steps that did not record; per layer: µs a record step adds per probed layer"
    )
    header = [
        "model",
        "layers",
        "plain ms/step",
        "every step",
        "+- s.e.",
        "every 10th",
        "+- s.e.",
        "between records",
        "+- s.e.",
        "per layer µs",
    ]
    return Table(title, header, rows, notes=marginal(results, clock))


def marginal(results: dict[str, dict[str, Any]], clock: str) -> list[str]:
    """What each further layer adds to a record step, from the shallowest and deepest linear nets
    measured: the difference of their added times over that of their layer counts, without
    whatever a record step costs once (its sort, its few dozen reductions, the file)."""
    nets = [r for label, r in results.items() if label.startswith("dln")]
    if len(nets) < 2:
        return []
    low, high = min(nets, key=lambda r: r["layers"]), max(nets, key=lambda r: r["layers"])

    def added(r: dict[str, Any]) -> float:
        return statistics.fmean(r[clock]["added"])

    per_layer = (added(high) - added(low)) / (high["layers"] - low["layers"])
    return [
        "",
        f"Each further layer of the deep linear nets adds {per_layer * 1e6:.0f} µs to a record step ({low['layers']} to {high['layers']} layers).",
    ]


def main() -> None:
    from _results import add_record_flag, finish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (a multiple of 10)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks (one round of each setting) per model")
    parser.add_argument("--vgg-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    names = list(cases(128))
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    add_record_flag(parser)
    args = parser.parse_args()
    if args.steps % 10:
        parser.error("--steps must be a multiple of 10: a round of the every-10th setting holds whole periods")
    torch.set_num_threads(args.threads)

    zoo = cases(args.vgg_batch)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[zoo[name].label] = measure(zoo[name], args.steps, args.blocks, Path(tmp))
    tables = [table(results, clock, args.steps, args.blocks) for clock in CLOCKS]
    print("\n\n".join(t.text() for t in tables))
    finish("moments_zoo", tables, args.no_record)


if __name__ == "__main__":
    main()

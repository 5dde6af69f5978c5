"""Cost of the moment probes, as a ratio to a plain training step.

Times SGD steps of the built-in ``vgg`` with no probes, with moments every step, and with
``record_every=10``, eager and with ``probes.moments.compiled`` (one ``torch.compile``d kernel,
compiled in a warm-up before the timing). Each setting has its own Recorder on one model, which
all settings train in turns, step by step, in a new random order each round, so that a machine
that slows down or speeds up during the run weighs on all alike, and so does whatever a step
leaves behind for the next. (With a copy of the model per setting, two identical plain copies came
out several standard errors apart, presumably from where each copy's memory lies; with one model
they agree within their errors. The Recorders' hooks all stay on the model, and those of the
settings not in turn return at once: every setting, plain ones too, pays for calling them, a
negligible share of a step.) Two settings are plain; their mean, round by round, is
the reference. A setting's cost is its mean step time (record steps and HDF5 flushes included, the
flushes as often per step as in a run of its own); its ratio is that over the reference's mean,
with a standard error from the rounds' pairing. The two plain settings' ratios, 1 but for noise,
show what the run resolves. Targets: <= 1.05x (every step), <= 1.01x (every 10th).

On a shared machine step times vary from one step to the next (CPU time as much as wall time:
the processor's speed varies, not the scheduling), so at the default step count a ratio's
standard error is larger than the every-10th cost it should resolve, and bringing it down would
take thousands of steps per setting. So the benchmark also clocks the probe's own code (its
forward hooks and ``Recorder.step``) inside each step: "own" is that time per step over the
reference's mean, which repeats far better between runs. The rest of the cost, the training's
operations running slower after the probe's (in a cache it filled), comes on record steps only,
so every step's ratio less its own measures it, and "(implied)" gives every 10th's ratio as its
own plus a tenth of that (see ``implied_every_10th``), to a tenth of every step's standard error.

It runs one thread unless ``--threads`` says otherwise: on the 2-core machine it was written on,
the probe's element-wise operations on 2 threads ran several times slower in some processes than
in others, alternating from one process to the next, while the convolutions kept their speed; on
one thread every process ran them alike. A 2-thread ratio said more about the process than about
the probe.

    python benchmarks/moments_overhead.py [--batch 128] [--width 1.0] [--steps 60] [--threads 1]
        [--only eager1 eager10 compiled1 compiled10] [--json] [--no-record]

A quick check that it runs (figures meaningless): ``--width 0.125 --batch 16 --steps 10 --only eager1 --no-record``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from bnprobe import Recorder
from bnprobe.data import synthetic_images
from bnprobe.models import build_model

PROBED: dict[str, tuple[str, tuple[int, bool]]] = {  # --only key: (label, (record_every, compiled))
    "eager1": ("every step", (1, False)),
    "eager10": ("record_every 10", (10, False)),
    "compiled1": ("every step, compiled", (1, True)),
    "compiled10": ("record_every 10, compiled", (10, True)),
}

IMPLIED = [(PROBED["eager1"][0], PROBED["eager10"][0]), (PROBED["compiled1"][0], PROBED["compiled10"][0])]


def ratio_with_error(times: list[float], reference: list[float]) -> tuple[float, float]:
    """mean(times) / mean(reference) over paired rounds, and its standard error (delta method).

    Pairing by round takes out what the two share (the machine's drift from round to round).
    """
    ratio = statistics.fmean(times) / statistics.fmean(reference)
    residuals = [t - ratio * r for t, r in zip(times, reference)]
    return ratio, statistics.stdev(residuals) / len(times) ** 0.5 / statistics.fmean(reference)


def implied_every_10th(every_step: tuple[float, float], own_every_step: float, own_10th: float) -> tuple[float, float]:
    """record_every 10's ratio, from its own cost and the every-step setting's ratio and own cost.

    Beyond its own code, the probe costs only by slowing the training's operations after its own
    (in a cache it filled), and only on record steps: elsewhere its hooks return at once. Every
    step's ratio shows that slowdown per record step (its ratio less 1 and its own); every 10th
    pays a tenth of it, with a tenth of its standard error, far below what a direct ratio resolves.
    """
    ratio, error = every_step
    return 1 + own_10th + (ratio - 1 - own_every_step) / 10, error / 10


class ClockedRecorder(Recorder):
    """A Recorder that adds up the time its hooks and ``step`` take (the probe's own cost), and
    whose hooks act only while it is ``active``: its setting's turn on a model all settings share."""

    own_seconds = 0.0
    active = False

    def _hook(self, name: str) -> Any:
        hook = super()._hook(name)

        def clocked(*args: Any) -> None:
            if not self.active:
                return
            t0 = time.perf_counter()
            hook(*args)
            self.own_seconds += time.perf_counter() - t0

        return clocked

    def step(self, loss: Any = None, accuracy: Any = None, lr: float | None = None) -> None:
        t0 = time.perf_counter()
        super().step(loss, accuracy, lr)
        self.own_seconds += time.perf_counter() - t0


def table(result: dict[str, Any]) -> Any:
    """The run's result as a ``_results.Table``: ms per step, ratio +- standard error and own cost per setting."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script; tests load this module by path

    title = (
        f"{result['model']}, batch {result['batch']}, {result['threads']} threads, {result['steps']} steps per setting, "
        "in turns; ratio to the two plain settings' mean, +- standard error"
    )
    rows = [
        [
            k,
            f"{s * 1000:.1f}",
            f"{result['ratio'][k]:.3f}x",
            f"{result['standard_error'][k]:.3f}",
            f"{result['own'][k]:.2%}" if k in result["own"] else "",
        ]
        for k, s in result["seconds_per_step"].items()
    ]
    rows += [[k, "", f"{r:.4f}x", f"{result['implied_standard_error'][k]:.4f}", ""] for k, r in result["implied"].items()]
    return Table(title, ["setting", "ms/step", "ratio", "+- s.e.", "own"], rows)


def _arguments() -> argparse.Namespace:
    from _results import add_record_flag

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per setting (a multiple of 10)")
    parser.add_argument("--only", nargs="+", choices=list(PROBED), default=list(PROBED), help="probed settings to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--json", action="store_true")
    add_record_flag(parser)
    return parser.parse_args()


def _timed_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, tuple[int, bool] | None], steps: int
) -> tuple[dict[str, list[float]], dict[str, ClockedRecorder]]:
    """Each setting's step times over ``steps`` rounds (settings in a new random order each round,
    on one model and optimizer), and the Recorders with their own time."""
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        recorders = {
            # Each Recorder's steps come len(settings) times further apart than in a run of its own,
            # so it flushes as often in its own steps as the default 5 s would there.
            name: ClockedRecorder(model, Path(tmp) / f"{k}.h5", record_every=s[0], compiled_moments=s[1], flush_seconds=5.0 * len(settings))
            for k, (name, s) in enumerate(settings.items())
            if s is not None
        }
        for recorder in recorders.values():
            stack.enter_context(recorder)

        def step(name: str) -> float:
            recorder = recorders.get(name)
            if recorder is not None:
                recorder.active = True
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            if recorder is not None:
                recorder.step(loss=loss.detach())
                recorder.active = False
            return time.perf_counter() - t0

        names = list(settings)
        for _ in range(10):  # warm-up, compiling the moment kernel; each Recorder's next record step is then a timed one
            for name in names:
                step(name)
        for recorder in recorders.values():
            recorder.own_seconds = 0.0
        for i in range(steps):
            for name in random.Random(i).sample(names, len(names)):
                times[name].append(step(name))
    return times, recorders


def _result(args: argparse.Namespace, times: dict[str, list[float]], recorders: dict[str, ClockedRecorder]) -> dict[str, Any]:
    """The ratios to the mean of the two plain settings, with standard errors, and the implied every-10th ratios."""
    reference = [(a + b) / 2 for a, b in zip(times["plain"], times["plain again (control)"])]
    base = statistics.fmean(reference)
    ratios = {k: ratio_with_error(v, reference) for k, v in times.items()}
    result: dict[str, Any] = {
        "model": f"vgg width {args.width}",
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "seconds_per_step": {k: statistics.fmean(v) for k, v in times.items()},
        "ratio": {k: r for k, (r, _) in ratios.items()},
        "standard_error": {k: e for k, (_, e) in ratios.items()},
        "own": {k: r.own_seconds / args.steps / base for k, r in recorders.items()},
        "step_seconds": times,  # by round; round i ran in the order random.Random(i).sample(settings, len(settings))
    }
    pairs = [(every, tenth) for every, tenth in IMPLIED if every in recorders and tenth in recorders]
    implied = {
        f"{tenth} (implied)": implied_every_10th(ratios[every], result["own"][every], result["own"][tenth]) for every, tenth in pairs
    }
    result["implied"] = {k: r for k, (r, _) in implied.items()}
    result["implied_standard_error"] = {k: e for k, (_, e) in implied.items()}
    return result


def main() -> None:
    from _results import finish

    args = _arguments()
    torch.set_num_threads(args.threads)
    data = synthetic_images("cifar10", n=args.batch)
    x, y = data.train[:]  # the whole TensorDataset: one fixed batch
    torch.manual_seed(0)
    model = build_model("vgg", 10, (3, 32, 32), width=args.width)
    settings: dict[str, tuple[int, bool] | None] = {
        "plain": None,
        "plain again (control)": None,
        **{label: setting for key, (label, setting) in PROBED.items() if key in args.only},
    }
    times, recorders = _timed_steps(model, x, y, settings, args.steps)
    result = _result(args, times, recorders)
    out = table(result)
    print(json.dumps(result, indent=2) if args.json else out.text())
    finish("moments_overhead", [out], args.no_record)


if __name__ == "__main__":
    main()

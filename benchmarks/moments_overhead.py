"""Cost of the moment probes, as a ratio to a plain training step (DESIGN section 5).

Times one SGD step of the built-in ``vgg`` with no probes, with moments every step, and with
``record_every=10``, interleaved in one run (so machine load hits all three alike), and prints
the median step time of each and the ratios; the same with ``probes.compiled_moments`` (one
``torch.compile``d kernel, compiled in a warm-up before the timing). Targets: <= 1.05x (every
step), <= 1.01x (every 10th; issue 14).

    python benchmarks/moments_overhead.py [--batch 128] [--width 1.0] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bnprobe import Recorder
from bnprobe.data import synthetic_images
from bnprobe.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    data = synthetic_images("cifar10", n=args.batch)
    x, y = data.train.tensors
    torch.manual_seed(0)
    model = build_model("vgg", 10, (3, 32, 32), width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    settings: dict[str, tuple[int, bool] | None] = {
        "plain": None,
        "every step": (1, False),
        "record_every 10": (10, False),
        "every step, compiled": (1, True),
        "record_every 10, compiled": (10, True),
    }
    times: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            step()  # warm-up
        with Recorder(model, Path(tmp) / "compile.h5", record_every=1, compiled_moments=True) as rec:
            for _ in range(2):  # compiles the moment kernel (once per process), outside the timing
                rec.step(loss=step())
        for r in range(args.rounds):
            for name, setting in settings.items():
                with ExitStack() as stack:
                    rec = None
                    if setting is not None:
                        every, compiled = setting
                        path = Path(tmp) / f"{r}-{every}-{compiled}.h5"
                        rec = stack.enter_context(Recorder(model, path, record_every=every, compiled_moments=compiled))
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        loss = step()
                        if rec is not None:
                            rec.step(loss=loss)
                    times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["plain"])
    result = {
        "model": f"vgg width {args.width}",
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
        "ratio": {k: statistics.median(v) / base for k, v in times.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"vgg (width {args.width}), batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps"
    )
    for k in settings:
        print(f"  {k:<26} {result['seconds_per_step'][k] * 1000:8.1f} ms/step   {result['ratio'][k]:.3f}x")


if __name__ == "__main__":
    main()

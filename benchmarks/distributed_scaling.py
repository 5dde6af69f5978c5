"""Steps per second of one process against two (torchrun, gloo, CPU) on the same global batch,
with moments recorded every step and ICS every 10th step, and the cost of reducing the
moments across the processes as a share of the step (target: under 2%).

Each configuration trains VGG (``--width``, batch ``--batch``, ``--steps`` steps) with
``bnprobe.experiment.run_experiment`` in fresh processes: one process with 1 thread, one process with
``--threads`` threads (the same cores as two processes of 1 thread each), and two processes of 1
thread each under ``torchrun --standalone``. Steps/s is taken from the run's own clock after
``--warmup`` steps. The moment reduction (``merged_across_processes``: one all-gather and the merge,
plus the check that every process recorded the same layers and shapes) is timed inside the
two-process run, and so are the all-reduces of gradients and losses and the broadcast of rank 0's
buffers (for a view of what data parallelism itself costs here).

    python benchmarks/distributed_scaling.py [--width 0.5] [--batch 128] [--steps 40] [--threads 2] [--json] [--no-record]
    python benchmarks/distributed_scaling.py --width 0.125 --batch 16 --steps 14 --warmup 4 --no-record   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The benchmark's run: the built-in VGG, moments every step and ICS every 10th, flushed once."""
    return {
        "model": "vgg",
        "model_options": {"width": args.width},
        "data": "synthetic:cifar10",
        "data_options": {"n": args.batch * 8},
        "batch_size": args.batch,
        "steps": args.steps,
        "device": "cpu",
        "lr": 0.02,
        "output": str(out.with_suffix(".h5")),
        "probes.moments.every": 1,
        "probes.ics.every": 10,
        "flush_every": 10**6,
        "flush_seconds": 1e9,
    }


def _worker(args: argparse.Namespace) -> None:
    """One process of a configuration: train, and write steps/s and the reduction's time (rank 0)."""
    import torch

    import bnprobe.recorder
    from bnprobe import distributed
    from bnprobe.config import load_config
    from bnprobe.experiment import run_experiment
    from bnprobe.store import read_file

    torch.set_num_threads(args.worker_threads)
    spent = {"moments": 0.0, "records": 0, "layout": 0.0, "averages": 0.0, "buffers": 0.0}

    def timed(function: Any, key: str) -> Any:
        def wrapper(*a: Any) -> Any:
            t0 = time.perf_counter()
            out = function(*a)
            spent[key] += time.perf_counter() - t0
            spent["records"] += key == "moments"
            return out

        return wrapper

    bnprobe.recorder.merged_across_processes = timed(bnprobe.recorder.merged_across_processes, "moments")  # type: ignore[assignment]
    distributed.check_same_everywhere = timed(distributed.check_same_everywhere, "layout")  # type: ignore[assignment]
    distributed.average_ = timed(distributed.average_, "averages")  # type: ignore[assignment]
    distributed.broadcast_ = timed(distributed.broadcast_, "buffers")  # type: ignore[assignment]
    out = Path(args.worker_out)
    run_experiment(load_config(None, _settings(args, out)))
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank: the process group is gone by now
        run = read_file(out.with_suffix(".h5")).runs["keep"]
        seconds = run.get("train", "seconds")
        assert seconds is not None
        timed_steps = len(seconds) - args.warmup
        step_seconds = (float(seconds[-1]) - float(seconds[args.warmup - 1])) / (timed_steps - 1)
        result = {
            "steps_per_second": 1 / step_seconds,
            "step_seconds": step_seconds,
            "reduce_seconds": (spent["moments"] + spent["layout"]) / max(1, spent["records"]),
            "average_seconds": spent["averages"] / args.steps,  # gradients, losses, HVPs: whole run, per step
            "buffer_seconds": spent["buffers"] / args.steps,
        }
        out.write_text(json.dumps(result))


def _launch(processes: int, threads: int, args: argparse.Namespace, where: Path) -> dict[str, float]:
    out = where / f"p{processes}t{threads}.json"
    worker = [__file__, "--worker-out", str(out), "--worker-threads", str(threads), *_shared(args)]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, *worker], check=True, env=env, capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.read_text())
    return result


def _shared(args: argparse.Namespace) -> list[str]:
    return ["--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]


def table(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> Any:
    """Steps/s per configuration, and the 2-process run's reduction and communication costs as notes."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script

    two = rows["2 processes, 1 thread each"]
    share = two["reduce_seconds"] / two["step_seconds"]
    return Table(
        f"vgg width {args.width}, global batch {args.batch}, moments every step, ICS every 10th; {args.steps - args.warmup} timed steps",
        ["configuration", "steps/s"],
        [[name, f"{r['steps_per_second']:.2f}"] for name, r in rows.items()],
        [
            f"moment reduction in the 2-process run: {1000 * two['reduce_seconds']:.2f} ms per step = {share:.2%} of the step (target < 2%)",
            f"gradient/loss all-reduces {1000 * two['average_seconds']:.2f} ms per step, buffer broadcast {1000 * two['buffer_seconds']:.2f} ms",
        ],
    )


def main() -> None:
    from _results import add_record_flag, finish  # benchmarks/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    add_record_flag(parser)
    args = parser.parse_args()
    if args.worker_out:
        _worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "1 process, 1 thread": _launch(1, 1, args, Path(tmp)),
            f"1 process, {args.threads} threads": _launch(1, args.threads, args, Path(tmp)),
            "2 processes, 1 thread each": _launch(2, 1, args, Path(tmp)),
        }
    two = rows["2 processes, 1 thread each"]
    share = two["reduce_seconds"] / two["step_seconds"]  # in --json only: the table's note has it
    out = table(rows, args)
    print(json.dumps({"rows": rows, "moment_reduction_share": share}, indent=2) if args.json else out.text())
    finish("distributed_scaling", [out], args.no_record)


if __name__ == "__main__":
    main()

"""Share of a run's time spent writing HDF5 (DESIGN section 5: under 1% for 1,000 steps, 50 layers).

Trains the built-in deep linear network with 50 layers for 1,000 steps with moments recorded
every ``record_every`` steps (default 10, also try 1) and reads back the run's ``write_seconds``
(time inside HDF5 writes, checkpoint included) against its ``seconds``.

    python benchmarks/store_overhead.py [--steps 1000] [--depth 50] [--record-every 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bnprobe.config import load_config
from bnprobe.store import read_file
from bnprobe.trainer import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.h5"
        cfg = load_config(
            None,
            {
                "model": "dln",
                "model_options": {"depth": args.depth, "width": 10},
                "data": "synthetic:linear",
                "data_options": {"n": 256},
                "batch_size": 64,
                "lr": 1e-3,
                "steps": args.steps,
                "output": str(path),
                "probes.record_every": args.record_every,
            },
        )
        run_experiment(cfg)
        run = read_file(path).runs["keep"]
        layers = len(run.layers)
    seconds, write = float(run.attrs["seconds"]), float(run.attrs["write_seconds"])
    result = {
        "steps": args.steps,
        "layers": layers,
        "record_every": args.record_every,
        "run_seconds": seconds,
        "write_seconds": write,
        "share": write / seconds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.steps} steps, {layers} layers, record_every {args.record_every}: HDF5 writes {write:.3f} s of {seconds:.2f} s = {100 * write / seconds:.2f}%"
        )


if __name__ == "__main__":
    main()

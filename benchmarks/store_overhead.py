"""Share of a run's time spent writing HDF5 (target: under 1% for 1,000 steps, 50 layers).

Trains the built-in deep linear network with 50 layers for 1,000 steps with moments recorded
every ``record_every`` steps (default 10, also try 1) and reads back the run's ``write_seconds``
(time inside HDF5 writes, checkpoint included) against its ``seconds``.

    python benchmarks/store_overhead.py [--steps 1000] [--depth 50] [--record-every 10] [--json] [--no-record]
    python benchmarks/store_overhead.py --steps 50 --no-record   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bnprobe.config import load_config
from bnprobe.experiment import run_experiment
from bnprobe.store import read_file


def main() -> None:
    from _results import Table, add_record_flag, finish  # benchmarks/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    add_record_flag(parser)
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
                "probes.moments.every": args.record_every,
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
    out = Table(
        "HDF5 writes against the whole run (dln, batch 64)",
        ["steps", "layers", "record_every", "HDF5 writes s", "run s", "share"],
        [[str(args.steps), str(layers), str(args.record_every), f"{write:.3f}", f"{seconds:.2f}", f"{write / seconds:.2%}"]],
    )
    print(json.dumps(result, indent=2) if args.json else out.text())
    finish("store_overhead", [out], args.no_record)


if __name__ == "__main__":
    main()

"""Time and peak memory of ``report``, ``plot`` and ``export`` (every format) on a long run's file.

Builds a file of ``--layers`` layers and ``--records`` moment records (10 statistics each, so
10 x layers x records rows in the tidy table: 200 x 5,000 make 10 million rows from a ~40 MB
file) and a training loss per record, with the store's own writer. Each command then runs as a
user runs it (``python -m bnprobe ...``) in a child of a fresh helper process, which reports the
child's wall time and peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``): each
figure is that command's alone, interpreter and imports included. The same commands run on a file
with a tenth of the records, and "flat" is the peak memory at full size over that at a tenth
(targets: every export under 1 GiB, parquet under 10 s, CSV under 30 s, report under 2 s, memory
within 20% (flat <= 1.2) when the file grows 10x).

    python benchmarks/export_large.py [--layers 200] [--records 5000] [--only report csv ...] [--json] [--no-record]
    python benchmarks/export_large.py --layers 20 --records 200 --no-record   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bnprobe.layers import LayerInfo
from bnprobe.store import STATS, Store

COMMANDS = ("startup", "report", "plot", "csv", "json", "npz", "parquet")
#: runs argv[1:], its output thrown away, and prints its wall time, CPU time, peak memory (KiB) and exit status
_HELPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss, rc)"
)


def build(path: Path, layers: int, records: int, flush_every: int = 500) -> Path:
    """A run with moments of ``layers`` layers and a training loss, ``records`` records of each."""
    rng = np.random.default_rng(0)
    with Store.create(path) as store:
        writer = store.run("long", {"bn": "insert", "model": "mlp", "seed": 0, "lr": 0.1})
        writer.set_layers([LayerInfo(f"block{i // 4}.layer{i % 4}", "linear", 1024, (128, 32), i) for i in range(layers)])
        for step in range(records):
            writer.append("train", step, {"loss": 2.0 / (1 + step), "accuracy": min(1.0, step / records)})
            writer.append("moments", step, {s: rng.random(layers, dtype=np.float32) for s in STATS})
            if step % flush_every == flush_every - 1:
                writer.flush()
        writer.set_status("finished", steps=records, seconds=1.0)
    return path


def argv(command: str, path: Path, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "bnprobe"]
    if command == "startup":
        return [*cli, "--help"]
    if command == "report":
        return [*cli, "report", str(path)]
    if command == "plot":
        return [*cli, "plot", str(path), "-o", str(out / "moments.png"), "--force"]
    return [*cli, "export", str(path), "-f", command, "-o", str(out / f"table.{command}"), "--force"]


def measure(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak resident memory (MiB) of ``command``, run as a child of
    a new process (CPU time says more than wall time on a busy machine)."""
    done = subprocess.run([sys.executable, "-c", _HELPER, *command], capture_output=True, text=True, check=True)
    seconds, cpu, kib, rc = done.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(command)} failed (exit {rc}): {done.stderr.strip()}")
    return float(seconds), float(cpu), int(kib) / 1024


Results = dict[str, dict[int, tuple[float, float, float]]]  # command -> records -> (s, CPU s, MiB)


def table(layers: int, sizes: tuple[int, int], results: Results, file_mb: float) -> Any:
    from _results import Table

    small, full = sizes
    rows = 10 * layers * full

    def cells(r: tuple[float, float, float]) -> list[str]:
        return [f"{r[0]:.2f}", f"{r[1]:.2f}", f"{r[2]:.0f}"]

    return Table(
        f"{layers} layers x {full:,} records: {rows:,} tidy rows, a {file_mb:.0f} MB file",
        ["command", "s", "CPU s", "peak MiB", f"s at {small:,}", f"CPU s at {small:,}", f"peak MiB at {small:,}", "flat"],
        [[c, *cells(r[full]), *cells(r[small]), f"{r[full][2] / r[small][2]:.2f}"] for c, r in results.items()],
        [
            "startup: `python -m bnprobe --help`, what every command pays; csv ... parquet: `bnprobe export -f FORMAT`; "
            "plot: the moments figure. s: wall time, CPU s: user + system time (wall time on a shared machine is "
            "mostly waiting). flat: peak memory at full size over that at a tenth of the records."
        ],
    )


def main() -> None:
    from _results import add_record_flag, finish  # benchmarks/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--only", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--json", action="store_true")
    add_record_flag(parser)
    args = parser.parse_args()
    sizes = (max(1, args.records // 10), args.records)
    results: Results = {c: {} for c in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        for records in sizes:
            path = build(Path(tmp) / f"run{records}.h5", args.layers, records)
            for command in args.only:
                results[command][records] = measure(argv(command, path, Path(tmp)))
                print(f"{command} at {records} records: {results[command][records][0]:.2f} s", file=sys.stderr)
        file_mb = path.stat().st_size / 1e6
    out = table(args.layers, sizes, results, file_mb)
    if args.json:
        found = {c: {str(k): v for k, v in r.items()} for c, r in results.items()}
        print(json.dumps({"layers": args.layers, "records": args.records, "file_mb": file_mb, "results": found}, indent=2))
    else:
        print(out.text())
    finish("export_large", [out], args.no_record)


if __name__ == "__main__":
    main()

"""The shipped protocols, run as shipped, and whether each reproduces its paper's direction.

Runs every config in ``configs/`` the way its header says (``measure-ics`` for the Santurkar
protocols, ``train`` for the others), then prints one table: each finding's claim, BN's effect
with its 95% interval over seeds, whether it holds, and the protocol's wall time. A second table
checks the training itself: the step at which each run's 20-step mean training accuracy first
exceeds 95% (it must not come before half the steps) and whether the run without BN is still
learning at the end (its loss over the last fifth of the run still falling).

    python benchmarks/protocols.py                       # all four (long: tens of minutes on 2 cores)
    python benchmarks/protocols.py --only santurkar-dln  # one
    python benchmarks/protocols.py --no-record           # print only, leave RESULTS.md as it is
    python benchmarks/protocols.py --from runs           # table runs/<protocol>.h5 made earlier with the
                                                         # shipped configs (wall time: the runs' own seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnprobe.config import config_for_ics, config_for_train
from bnprobe.errors import ModelError
from bnprobe.experiment import run_experiment
from bnprobe.findings import Finding, bn_label, findings, window_text
from bnprobe.health import trailing_mean
from bnprobe.store import TRAIN, RunData, read_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: protocol -> the command its config header gives
PROTOCOLS = {"santurkar-dln": "measure-ics", "ioffe-mnist": "train", "santurkar-vgg": "measure-ics", "ghorbani-density": "train"}


@dataclass
class Outcome:
    name: str
    seconds: float
    runs: list[RunData]
    found: list[Finding]


def run_protocol(name: str, workdir: Path) -> Outcome:
    make = config_for_ics if PROTOCOLS[name] == "measure-ics" else config_for_train
    cfg = make(CONFIGS / f"{name}.yaml", {"output": str(workdir / f"{name}.h5")})
    start = time.perf_counter()
    try:
        run_experiment(cfg)
    except ModelError as e:  # a diverged or failed variant: its records are kept, and reported
        print(f"{name}: {e}", file=sys.stderr)
    seconds = time.perf_counter() - start
    runs = list(read_file(cfg.output_path).runs.values())
    return Outcome(name, seconds, runs, findings(runs))


def read_protocol(name: str, directory: Path) -> Outcome:
    """A protocol run earlier into ``directory/<name>.h5``; its time is the sum of its runs' seconds."""
    runs = list(read_file(directory / f"{name}.h5").runs.values())
    seconds = sum(float(r.attrs.get("seconds", 0.0)) for r in runs)
    return Outcome(name, seconds, runs, findings(runs))


def _holds(f: Finding) -> str:
    return {True: "yes", False: "NO (inverted)", None: "cannot tell"}[f.agrees]


def findings_table(outcomes: list[Outcome]) -> str:
    lines = ["| protocol | claim | quantity | BN's effect (95% CI, seeds) | window | holds | wall time |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        for f in o.found:
            verdict = f.verdict.split(" over ")[0]
            window = window_text(f.decisive.window) if f.decisive is not None else f.window.why
            lines.append(f"| {o.name} | {f.quantity.claim} | {f.quantity.label} | {verdict} | {window} | {_holds(f)} | {o.seconds:.0f} s |")
    return "\n".join(lines)


def first_above(run: RunData, level: float = 0.95) -> int | None:
    """The first step whose 20-step mean training accuracy exceeds ``level``; None if none does."""
    steps, acc = run.get(TRAIN, "step"), run.get(TRAIN, "accuracy")
    if steps is None or acc is None or np.isnan(acc).all():
        return None
    above = np.flatnonzero(trailing_mean(np.nan_to_num(acc)) > level)
    return int(steps[above[0]]) if len(above) else None


def still_learning(run: RunData) -> bool:
    """The loss over the last fifth of the run falls: its first half's mean is above its second's."""
    loss = run.get(TRAIN, "loss")
    if loss is None or len(loss) < 20:
        return False
    tail = loss[-max(len(loss) // 5, 10) :]
    half = len(tail) // 2
    return bool(np.nanmean(tail[:half]) > np.nanmean(tail[half:]))


def training_table(outcomes: list[Outcome]) -> str:
    lines = ["| protocol | run | BN | steps | >95% train acc. at | before half? | still learning at end |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        for run in o.runs:
            steps = int(run.attrs.get("steps", 0))
            at = first_above(run)
            early = "—" if at is None else ("NO" if at < steps // 2 else "no")
            lines.append(f"| {o.name} | {run.name} | {bn_label(run.attrs)} | {steps} | {at if at is not None else 'never'} | {early} | "
                         f"{'yes' if still_learning(run) else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PROTOCOLS), help="run these protocols only")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--from", dest="source", type=Path, help="read <protocol>.h5 files from this directory instead of running")
    args = parser.parse_args()
    names = args.only or list(PROTOCOLS)
    outcomes = []
    if args.source is not None:
        outcomes = [read_protocol(name, args.source) for name in names]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                outcomes.append(run_protocol(name, Path(tmp)))
                print(f"{name}: {outcomes[-1].seconds:.0f} s", file=sys.stderr)
    table = findings_table(outcomes) + "\n\n" + training_table(outcomes)
    print(table)
    if not args.no_record:
        from _results import command_line, record

        print(f"recorded in {record('protocols' + ('-' + '-'.join(names) if args.only else ''), command_line(), table)}", file=sys.stderr)


if __name__ == "__main__":
    main()

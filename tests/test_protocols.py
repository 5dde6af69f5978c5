"""The shipped protocols reproduce their papers' direction, at reduced size (the full-size figures
come from benchmarks/protocols.py). Slow: each trains six runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnprobe.config import config_for_ics, config_for_train
from bnprobe.experiment import run_experiment
from bnprobe.findings import findings
from bnprobe.store import read_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

pytestmark = pytest.mark.slow


def _verdicts(tmp_path: Path, name: str, measure_ics: bool, **overrides: object) -> dict[str, bool | None]:
    make = config_for_ics if measure_ics else config_for_train
    cfg = make(CONFIGS / f"{name}.yaml", {"output": str(tmp_path / f"{name}.h5"), **overrides})
    run_experiment(cfg)
    found = findings(list(read_file(cfg.output_path).runs.values()))
    assert all(f.decisive.interval.n == 3 for f in found), "the protocol runs three seeds"
    return {f.quantity.key: f.agrees for f in found}


def test_deep_linear_network_bn_does_not_reduce_ics(tmp_path: Path) -> None:
    """Santurkar et al. Fig. 5: with BN, cos(G, G') falls and the relative shift grows."""
    agrees = _verdicts(tmp_path, "santurkar-dln", True, steps=40)
    assert agrees["ics.cosine"] is True and agrees["ics.rel_diff"] is True


def test_ioffe_bn_stabilises_the_input_percentiles(tmp_path: Path) -> None:
    """Ioffe & Szegedy Fig. 1: the percentiles of a hidden layer's input drift less with BN."""
    agrees = _verdicts(tmp_path, "ioffe-mnist", False, steps=700)  # the runs without BN leave chance near step 550
    assert agrees["moments.drift"] is True

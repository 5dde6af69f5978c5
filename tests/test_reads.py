"""report and plot read what they show, not the whole file: a long run's per-channel moments,
histograms and spectral densities stay on disk unless drawn, and of the Hessian and spectrum
records the report shows only the last one is read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _fixtures import write_run_file

from bnprobe.errors import StoreError
from bnprobe.plot import KINDS, plot
from bnprobe.report import build_report
from bnprobe.store import read_file

UNDRAWN = ("per_channel", "histogram")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reads") / "f.h5"
    return write_run_file(path, variants=("keep", "insert"), per_channel=True, histogram_bins=4, hessian_blocks=True, spectrum=True)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Numbers read from each dataset (by its path in its run), counted as h5py hands them over."""
    counts: Counter[str] = Counter()
    getitem = h5py.Dataset.__getitem__

    def counting(self: h5py.Dataset, selection: Any) -> Any:
        out = getitem(self, selection)
        counts[self.name.split("/", 3)[-1]] += np.size(out)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return counts


def test_the_report_reads_what_it_shows(run_file: Path, reads: Counter[str]) -> None:
    build_report([run_file])
    assert not [p for p in reads if any(u in p for u in UNDRAWN) or "density" in p]
    assert reads["moments/mean"] == 8 * (4 + 7)  # records x layers of both runs: the sparklines
    assert reads["hessian/block_top_eigenvalue"] == 2 * 4  # runs x blocks: the last record only
    assert reads["spectrum/top_k"] == 2 * 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_plot_reads_its_section(run_file: Path, reads: Counter[str], tmp_path: Path, kind: str) -> None:
    plot([run_file], tmp_path / "p.png", kind=kind)
    section = {"training": "train", "hessian": "spectrum"}.get(kind, kind)
    assert {p.split("/")[0] for p in reads} == {"layers", section}
    assert not [p for p in reads if any(u in p for u in UNDRAWN)]
    if kind == "moments":  # one layer's percentiles: a number per record and run
        assert reads["moments/p50"] == 2 * 8


def test_a_file_gone_before_its_numbers_are_read_is_one_line(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "f.h5", variants=("keep",))
    run = read_file(path).runs["keep"]
    path.rename(tmp_path / "elsewhere.h5")
    with pytest.raises(StoreError, match=r"f\.h5 was moved or deleted while it was being read"):
        run.get("train", "loss")

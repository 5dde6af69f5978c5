"""report and plot read what they show, not the whole file: a long run's per-channel moments,
histograms and spectral densities stay on disk unless drawn, and of the Hessian and spectrum
records the report shows only the last one is read."""

from __future__ import annotations

import shutil
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _benchmarks import load_benchmark
from _fixtures import write_run_file

from bnprobe.errors import StoreError
from bnprobe.plot import KINDS, plot
from bnprobe.report import build_report
from bnprobe.store import RunData, read_file, scan

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
    assert reads["moments/mean"] == (8 + 2) * (4 + 7)  # (records: the sparklines, and the first and last) x layers of both runs
    assert reads["hessian/block_top_eigenvalue"] == 2 * 4  # runs x blocks: the last record only
    assert reads["spectrum/top_k"] == 2 * 3


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """A run with BN of 50 layers and its partner without (the same file, relabelled), 300 and
    3,000 records long (moments and a training loss each step): longer than a sparkline's points,
    and a finding to compute."""
    folder = tmp_path_factory.mktemp("long")
    pairs = []
    for n in (300, 3000):
        with_bn = load_benchmark("export_large").build(folder / f"bn{n}.h5", 50, n)
        without = folder / f"plain{n}.h5"
        shutil.copy(with_bn, without)
        with h5py.File(without, "r+") as h5:
            h5["runs/long"].attrs.update({"bn": "keep", "bn_layers": 0})
            h5["runs"].move("long", "plain")
        pairs.append([with_bn, without])
    return pairs


def _peak(call: Callable[[], object]) -> int:
    """The most memory ``call`` held at once (what Python and numpy allocate)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_report_of_a_ten_times_longer_run_takes_the_same_memory(long_runs: list[list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Moments are reduced a slice of records at a time (here 10,000 numbers, a fraction of the
    shorter run) for the tables, the health flags and the findings, and a sparkline keeps a bounded
    number of points: neither the largest read nor the memory grows."""
    monkeypatch.setattr(scan, "SLICE_NUMBERS", 10_000)
    largest = Counter[str]()
    getitem = h5py.Dataset.__getitem__

    def counting(self: h5py.Dataset, selection: Any) -> Any:
        out = getitem(self, selection)
        largest[self.name] = max(largest[self.name], np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    short, long = (_peak(lambda p=p: build_report(p)) for p in long_runs)
    assert long < 1.2 * short, (short, long)
    assert build_report(long_runs[1])["conclusions"]["findings"]
    assert max(n for name, n in largest.items() if "/moments/" in name and not name.endswith("/step")) <= 10_000


def test_bins_leave_non_finite_values_out() -> None:
    """A bin or column without a finite value is NaN; inf and NaN count nowhere."""
    run = RunData("r", {}, [])
    run.data["moments/step"] = np.arange(4)
    run.data["moments/mean"] = np.array([[1.0, np.nan], [np.inf, np.nan], [3.0, np.nan], [np.nan, -np.inf]])
    found = scan.binned(run, "moments", "mean", 2, 4)
    np.testing.assert_array_equal(found.means, [[1.0, np.nan], [3.0, np.nan]])
    np.testing.assert_array_equal(found.starts, [0, 2])
    np.testing.assert_array_equal(np.c_[found.low, found.high], [[1.0, 3.0], [np.nan, np.nan]])


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

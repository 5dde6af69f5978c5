"""export: the files it writes stay byte for byte what they are (golden CSV and JSON; NPZ and
Parquet as numpy and pyarrow write the golden table in one call)."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from _fixtures import write_run_file

from bnprobe.export import COLUMNS, export

GOLDEN = Path(__file__).parent / "golden" / "export"  # written by the export that built the whole table in memory
INTS = ("seed", "batch_size", "step", "channel", "bin")  # -1 where missing
FLOATS = ("lr", "momentum", "weight_decay", "eta", "value")  # NaN where missing


def golden_source(path: Path) -> Path:
    """The small file the golden exports were written from: one run with every kind of record, a
    NaN, an infinity, and settings that CSV must quote."""
    write_run_file(path, variants=("noisy",), steps=10, per_channel=True, histogram_bins=2, hessian_blocks=True, spectrum=True)
    with h5py.File(path, "r+") as h5:
        run = h5["runs/noisy"]
        run["train/loss"][0] = np.nan
        run["landscape/loss"][1, 2] = -np.inf
        run.attrs.update({"lr": 0.1, "bn_targets": 'conv,"linear"', "keep_bias": True, "weight_decay": 5e-4})
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden_source(tmp_path_factory.mktemp("golden") / "small.h5")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_text_is_byte_for_byte_what_it_was(source: Path, tmp_path: Path, fmt: str) -> None:
    out = export(source, fmt, tmp_path / f"t.{fmt}")
    assert out.read_bytes() == gzip.decompress((GOLDEN / f"small.{fmt}.gz").read_bytes())


def golden_columns() -> dict[str, np.ndarray]:
    """The golden CSV's columns as arrays, typed as the NPZ export holds them (text as unicode)."""
    rows = list(csv.reader(io.StringIO(gzip.decompress((GOLDEN / "small.csv.gz").read_bytes()).decode())))
    cells = {c: [row[j] for row in rows[1:]] for j, c in enumerate(rows[0])}
    return {
        c: np.array([int(v) if v else -1 for v in vs], dtype=np.int64)
        if c in INTS
        else np.array([float(v) if v else np.nan for v in vs])
        if c in FLOATS
        else np.array(vs)
        for c, vs in cells.items()
    }


def test_npz_is_what_numpy_writes_for_the_whole_table(source: Path, tmp_path: Path) -> None:
    """Member by member, byte for byte (the zip's own timestamps say when it was written)."""
    np.savez_compressed(tmp_path / "ref.npz", **golden_columns())
    out = export(source, "npz", tmp_path / "t.npz")
    with zipfile.ZipFile(out) as new, zipfile.ZipFile(tmp_path / "ref.npz") as ref:
        assert new.namelist() == ref.namelist() == [f"{c}.npy" for c in COLUMNS]
        for name in ref.namelist():
            assert new.read(name) == ref.read(name), name


def test_parquet_is_what_pyarrow_writes_for_the_whole_table(source: Path, tmp_path: Path) -> None:
    """The golden table written in one call, as the export does. Missing values are null, a NaN value stays NaN."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for c, v in golden_columns().items():
        kind = pa.string() if v.dtype.kind == "U" else pa.from_numpy_dtype(v.dtype)
        missing = (v < 0) if c in INTS else ~np.isfinite(v) if c in FLOATS else np.zeros(len(v), dtype=bool)
        arrays[c] = pa.array(v.tolist(), type=kind, mask=missing if c not in ("step", "value") else None)
    pq.write_table(pa.table(arrays), tmp_path / "ref.parquet")
    out = export(source, "parquet", tmp_path / "t.parquet")
    assert out.read_bytes() == (tmp_path / "ref.parquet").read_bytes()

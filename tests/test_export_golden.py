"""export streams: the files it writes stay byte for byte what they were when it built the whole
table in memory (golden files written then), however the rows are cut into blocks, and its memory
is bounded by a block, not by the file."""

from __future__ import annotations

import csv
import gzip
import io
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from _fixtures import write_run_file

from bnprobe import export as export_module
from bnprobe.export import COLUMNS, export
from bnprobe.layers import LayerInfo
from bnprobe.store import STATS, Store

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


@pytest.fixture(params=[None, 7, 1], ids=["one-block", "blocks-of-7-rows", "one-record-blocks"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param is not None:
        monkeypatch.setattr(export_module, "CHUNK_ROWS", request.param)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_text_is_byte_for_byte_what_it_was(source: Path, tmp_path: Path, chunk: None, fmt: str) -> None:
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


def test_npz_is_what_numpy_writes_for_the_whole_table(source: Path, tmp_path: Path, chunk: None) -> None:
    """Member by member, byte for byte (the zip's own timestamps say when it was written)."""
    np.savez_compressed(tmp_path / "ref.npz", **golden_columns())
    out = export(source, "npz", tmp_path / "t.npz")
    with zipfile.ZipFile(out) as new, zipfile.ZipFile(tmp_path / "ref.npz") as ref:
        assert new.namelist() == ref.namelist() == [f"{c}.npy" for c in COLUMNS]
        for name in ref.namelist():
            assert new.read(name) == ref.read(name), name


def test_parquet_is_what_pyarrow_writes_for_the_whole_table(
    source: Path, tmp_path: Path, chunk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The golden table written in one call, as the export did; and with row groups of 100 rows,
    the groups ``write_table`` makes with that size. Missing values are null, a NaN value stays NaN."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for c, v in golden_columns().items():
        kind = pa.string() if v.dtype.kind == "U" else pa.from_numpy_dtype(v.dtype)
        missing = (v < 0) if c in INTS else ~np.isfinite(v) if c in FLOATS else np.zeros(len(v), dtype=bool)
        arrays[c] = pa.array(v.tolist(), type=kind, mask=missing if c not in ("step", "value") else None)
    for group in (None, 100):
        if group is not None:
            monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", group)
        pq.write_table(pa.table(arrays), tmp_path / "ref.parquet", row_group_size=group)
        out = export(source, "parquet", tmp_path / "t.parquet", force=True)
        assert out.read_bytes() == (tmp_path / "ref.parquet").read_bytes(), group
    assert pq.ParquetFile(out).num_row_groups == -(-len(arrays["value"]) // 100)


def long_run(path: Path, layers: int, records: int) -> Path:
    """A run of ``records`` moment records of ``layers`` layers (10 rows per layer and record)."""
    rng = np.random.default_rng(0)
    with Store.create(path) as store:
        writer = store.run("long", {"bn": "insert", "seed": 0})
        writer.set_layers([LayerInfo(f"layer{i}", "linear", 10, (8, 4), i) for i in range(layers)])
        for step in range(records):
            writer.append("moments", step, {s: rng.random(layers, dtype=np.float32) for s in STATS})
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "npz", "parquet"])
def test_memory_is_bounded_by_a_block_not_the_file(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """100,000 rows in blocks of 1,000 (Parquet row groups of 5,000): what Python allocates at
    its peak is well under what the table's columns alone take (21 x 100,000 x 8 bytes)."""
    path = long_run(tmp_path / "long.h5", layers=10, records=1000)
    monkeypatch.setattr(export_module, "CHUNK_ROWS", 1000)
    monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", 5000)
    export(source, fmt, tmp_path / f"warm.{fmt}")  # what an export imports (pyarrow, pandas) allocates more than it

    tracemalloc.start()
    try:
        export(path, fmt, tmp_path / f"t.{fmt}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4e6, f"{peak / 1e6:.1f} MB"

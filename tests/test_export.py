"""export: every row equals the file's number (read with h5py), in each format; overwrite rules."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _fixtures import write_run_file

from bnprobe import export as export_module
from bnprobe.errors import BnprobeError, ConfigError, StoreError
from bnprobe.export import COLUMNS, SETTINGS, export, tidy_table
from bnprobe.store import AXES_ATTR, STATS, Store, read_file

KEYS = ("variant", "section", "step", "layer", "quantity", "channel", "eta", "bin")  # what tells a row apart

Key = tuple  # (variant, section, step, layer, quantity, channel, eta, bin); missing = None


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_file(tmp_path_factory.mktemp("export") / "full.h5", per_channel=True, histogram_bins=4, hessian_blocks=True)


def _names(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def expected_rows(path: Path) -> dict[Key, float]:
    """Every number of the file, keyed like a tidy row, straight from h5py (the layout of docs/hdf5-format.md)."""
    rows: dict[Key, float] = {}

    def put(key: Key, value: float) -> None:
        assert key not in rows, key
        rows[key] = float(value)

    with h5py.File(path, "r") as h5:
        for variant, g in h5["runs"].items():
            layers = _names(g["layers"]["name"]) if "layers" in g else []
            if "train" in g:
                for q in ("loss", "accuracy", "lr", "seconds"):
                    if q in g["train"] and not np.isnan(g[f"train/{q}"][()]).all():
                        for s, v in zip(g["train/step"][()], g[f"train/{q}"][()]):
                            put((variant, "train", int(s), "", q, None, None, None), v)
            if "moments" in g:
                steps = g["moments/step"][()]
                for stat in STATS:
                    for r, s in enumerate(steps):
                        for j, name in enumerate(layers):
                            put((variant, "moments", int(s), name, stat, None, None, None), g[f"moments/{stat}"][r, j])
                if "histogram" in g["moments"]:
                    hist = g["moments/histogram"][()]
                    for r, s in enumerate(steps):
                        for j, name in enumerate(layers):
                            for b in range(hist.shape[2]):
                                put((variant, "moments", int(s), name, "histogram", None, None, b), hist[r, j, b])
                for name, pc in g["moments"].get("per_channel", {}).items():
                    for stat in STATS:
                        for r, s in enumerate(pc["step"][()]):
                            for c, v in enumerate(pc[stat][r]):
                                put((variant, "moments", int(s), name, stat, c, None, None), v)
            if "ics" in g:
                names = _names(g["ics/layer"][()])
                for q in ("l2", "cosine", "grad_norm", "grad_norm_shifted", "rel_diff"):
                    for r, s in enumerate(g["ics/step"][()]):
                        for j, name in enumerate(names):
                            put((variant, "ics", int(s), name, q, None, None, None), g[f"ics/{q}"][r, j])
            if "landscape" in g:
                eta = g["landscape/eta"][()]
                for r, s in enumerate(g["landscape/step"][()]):
                    for q in ("loss", "grad_l2"):
                        for k, e in enumerate(eta):
                            put((variant, "landscape", int(s), "", q, None, float(e), None), g[f"landscape/{q}"][r, k])
                    for q in ("beta_smoothness", "loss_at_w"):
                        put((variant, "landscape", int(s), "", q, None, None, None), g[f"landscape/{q}"][r])
            if "hessian" in g:
                for q in ("top_eigenvalue", "iterations", "residual", "converged"):
                    for s, v in zip(g["hessian/step"][()], g[f"hessian/{q}"][()]):
                        put((variant, "hessian", int(s), "", q, None, None, None), v)
                if "hessian/block" in g:
                    blocks = _names(g["hessian/block"][()])
                    for q in ("block_top_eigenvalue", "block_iterations", "block_residual"):
                        for r, s in enumerate(g["hessian/step"][()]):
                            for j, name in enumerate(blocks):
                                put((variant, "hessian", int(s), name, q, None, None, None), g[f"hessian/{q}"][r, j])
    return rows


def _same(a: float | None, b: float) -> bool:
    return (a is None and math.isnan(b)) or (a is not None and (a == b or (math.isnan(a) and math.isnan(b))))


def _check(rows: list[Key], values: list[float | None], path: Path) -> None:
    expected = expected_rows(path)
    got = dict(zip(rows, values))
    assert len(got) == len(rows), "duplicate rows"
    assert set(got) == set(expected)
    bad = [k for k in expected if not _same(got[k], expected[k])]
    assert not bad, bad[:5]


def _opt_int(text: str) -> int | None:
    return None if text == "" else int(text)


def test_csv_equals_file(full_file: Path, tmp_path: Path) -> None:
    out = export(full_file, "csv", tmp_path / "t.csv")
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        records = list(reader)
    keys = [
        (
            r["variant"],
            r["section"],
            int(r["step"]),
            r["layer"],
            r["quantity"],
            _opt_int(r["channel"]),
            None if r["eta"] == "" else float(r["eta"]),
            _opt_int(r["bin"]),
        )
        for r in records
    ]
    _check(keys, [float(r["value"]) for r in records], full_file)


def test_json_equals_file(full_file: Path, tmp_path: Path) -> None:
    out = export(full_file, "json", tmp_path / "t.json")
    records = json.loads(out.read_text())
    assert list(records[0]) == list(COLUMNS)
    keys = [(r["variant"], r["section"], r["step"], r["layer"], r["quantity"], r["channel"], r["eta"], r["bin"]) for r in records]
    _check(keys, [r["value"] for r in records], full_file)


def test_npz_equals_file(full_file: Path, tmp_path: Path) -> None:
    out = export(full_file, "npz", tmp_path / "t.npz")
    assert out == tmp_path / "t.npz" and out.is_file()
    with np.load(out) as z:  # no pickle needed
        cols = {c: z[c] for c in COLUMNS}
    assert cols["step"].dtype == np.int64 and cols["value"].dtype == np.float64
    keys = [
        (
            str(v),
            str(s),
            int(st),
            str(la),
            str(q),
            None if c < 0 else int(c),
            None if math.isnan(e) else float(e),
            None if b < 0 else int(b),
        )
        for v, s, st, la, q, c, e, b in zip(*(cols[c] for c in KEYS))
    ]
    _check(keys, cols["value"].tolist(), full_file)


def test_parquet_equals_file(full_file: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq  # in the dev extra: missing is a failure, not a skip

    out = export(full_file, "parquet", tmp_path / "t.parquet")
    table = pq.read_table(out).to_pydict()
    assert list(table) == list(COLUMNS)
    keys = list(zip(*(table[c] for c in KEYS)))
    _check(keys, table["value"], full_file)


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_pandas_reads_it_in_one_call(full_file: Path, tmp_path: Path, fmt: str) -> None:
    """One pandas call gives the table back, every row equal to the file's number (pandas and
    pyarrow are in the dev extra: a missing one is a failure here, not a skip)."""
    import pandas as pd

    out = export(full_file, fmt, tmp_path / f"t.{fmt}")
    # read_json's default float parser drops the last digits (pandas' choice): ask for exact floats
    read = {"csv": pd.read_csv, "json": lambda p: pd.read_json(p, precise_float=True), "parquet": pd.read_parquet}[fmt]
    frame = read(out)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == len(expected_rows(full_file))

    def opt(v: object, cast: type) -> object:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else cast(v)

    def text(v: object) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # pandas reads "" as NaN

    records = frame.to_dict("records")
    keys = [
        (
            r["variant"],
            r["section"],
            int(r["step"]),
            text(r["layer"]),
            r["quantity"],
            opt(r["channel"], int),
            opt(r["eta"], float),
            opt(r["bin"], int),
        )
        for r in records
    ]
    _check(keys, [opt(r["value"], float) for r in records], full_file)


def test_regression_accuracy_is_left_out_and_missing_sections(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "r.h5", variants=("keep",), sections=("train", "landscape"), regression=True)
    table = tidy_table(path)
    assert "accuracy" not in set(table["quantity"].tolist())
    assert set(table["section"].tolist()) == {"train", "landscape"}
    out = export(path, "csv", tmp_path / "r.csv")
    with open(out, newline="") as fh:
        records = list(csv.DictReader(fh))
    keys = [
        (r["variant"], r["section"], int(r["step"]), r["layer"], r["quantity"], None, None if r["eta"] == "" else float(r["eta"]), None)
        for r in records
    ]
    _check(keys, [float(r["value"]) for r in records], path)


def test_interrupted_file_exports(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "crashed.h5", status=None, steps=17)
    out = export(path, "json", tmp_path / "crashed.json")
    records = json.loads(out.read_text())
    keys = [(r["variant"], r["section"], r["step"], r["layer"], r["quantity"], r["channel"], r["eta"], r["bin"]) for r in records]
    _check(keys, [r["value"] for r in records], path)


def test_variant_filter(full_file: Path) -> None:
    table = tidy_table(full_file, variant="noisy")
    assert set(table["variant"].tolist()) == {"noisy"}
    assert set(tidy_table(full_file, variant="keep,ins*")["variant"].tolist()) == {"keep", "insert"}
    with pytest.raises(ConfigError, match=r"no variant 'strip' in .*; choose from keep, insert, noisy"):
        tidy_table(full_file, variant="strip")


def test_refuses_to_overwrite_unless_forced(full_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    out.write_text("precious\n")
    with pytest.raises(StoreError, match="already exists"):
        export(full_file, "csv", out)
    assert out.read_text() == "precious\n"
    export(full_file, "csv", out, force=True)
    assert out.read_text().startswith(",".join(COLUMNS))
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(StoreError, match="does not exist"):
        export(full_file, "csv", tmp_path / "nowhere" / "t.csv")
    with pytest.raises(StoreError, match="directory"):
        export(full_file, "csv", tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_output_dash_is_standard_output(full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """``-o -`` writes the table alone to stdout (no file named '-', no "Wrote" line), as the file would hold it."""
    from typer.testing import CliRunner

    from bnprobe.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", str(full_file), "-f", fmt, "-o", "-"])
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert list(tmp_path.iterdir()) == []
    assert result.stdout == export(full_file, fmt, tmp_path / f"t.{fmt}").read_text()


def test_binary_formats_to_standard_output_are_refused(full_file: Path) -> None:
    for fmt in ("npz", "parquet"):
        with pytest.raises(ConfigError, match=f"^{fmt} is a binary format: give a file name"):
            export(full_file, fmt, "-")


def test_bad_format_and_bad_files(full_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose from csv, json, npz, parquet"):
        export(full_file, "xlsx", tmp_path / "t.xlsx")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a bnprobe file"):
        export(other, "csv", tmp_path / "o.csv")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(full_file.read_bytes()[:5000])
    with pytest.raises(StoreError, match="truncated"):
        export(cut, "csv", tmp_path / "c.csv")
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "c.csv").exists()


def test_parquet_without_pyarrow_is_one_line(full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BnprobeError, match="parquet export needs pyarrow") as info:
        export(full_file, "parquet", tmp_path / "t.parquet")
    assert str(info.value) == "parquet export needs pyarrow: pip install 'bnprobe[parquet]'"
    assert not (tmp_path / "t.parquet").exists()


def _tables_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    floats = [c for c in COLUMNS if a[c].dtype == np.float64]
    return all(a[c].dtype == b[c].dtype and a[c].tolist() == b[c].tolist() for c in COLUMNS if c not in floats) and all(
        np.array_equal(a[c], b[c], equal_nan=True) for c in floats
    )


def test_a_file_without_axis_labels_exports_the_same(full_file: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.h5"
    old.write_bytes(full_file.read_bytes())
    with h5py.File(old, "r+") as f:
        f.visititems(lambda _, obj: obj.attrs.__delitem__(AXES_ATTR) if AXES_ATTR in obj.attrs else None)
    new, before = tidy_table(full_file), tidy_table(old)
    assert len(new["value"]) == len(expected_rows(full_file)) and _tables_equal(new, before)


def test_axes_pick_the_columns(tmp_path: Path) -> None:
    """A section the layout does not know: records by channel, unless the file labels the axes."""
    path = tmp_path / "x.h5"
    with Store.create(path) as store:
        w = store.run("r", {})
        for step in range(2):
            w.append("extra", step, {"x": np.arange(3.0) + step})

    def rows() -> list[tuple]:
        t = tidy_table(path)
        return list(zip(*(t[c].tolist() for c in ("section", "step", "quantity", "channel", "bin", "value"))))

    assert rows() == [("extra", s, "x", c, -1, float(c + s)) for s in range(2) for c in range(3)]
    with h5py.File(path, "r+") as f:
        f["runs/r/extra/x"].attrs[AXES_ATTR] = ["record", "bin"]
    assert rows() == [("extra", s, "x", -1, c, float(c + s)) for s in range(2) for c in range(3)]
    with h5py.File(path, "r+") as f:
        f["runs/r/extra/x"].attrs[AXES_ATTR] = ["record", "colour"]  # an axis the table has no column for
    assert rows() == []


def test_a_failed_write_leaves_nothing(full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.csv"
    out.write_text("precious\n")

    def full_disk(table: dict, fh: object) -> None:
        fh.write("variant,")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_write_csv", full_disk)
    with pytest.raises(StoreError, match=r"cannot write .*t\.csv: No space left on device"):
        export(full_file, "csv", out, force=True)
    assert out.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_the_spectrum_exports_its_top_k_by_rank_and_leaves_the_density_out(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "s.h5", variants=("keep",), spectrum=True)
    table = tidy_table(path)
    rows = table["section"] == "spectrum"
    top = rows & (table["quantity"] == "top_k")
    data = read_file(path).runs["keep"].data
    assert table["layer"][top].tolist()[:3] == ["λ1", "λ2", "λ3"]
    np.testing.assert_array_equal(table["value"][top], data["spectrum/top_k"].reshape(-1))
    assert not set(table["quantity"][rows]) & {"density_nodes", "density_weights"}
    assert {"trace", "trace_stderr", "block_top_eigenvalue", "block_trace"} <= set(table["quantity"][rows])


def test_every_row_carries_its_runs_settings(full_file: Path) -> None:
    """The settings columns hold each run's attributes, read here with h5py; bn is the BN label."""
    table = tidy_table(full_file)
    with h5py.File(full_file, "r") as h5:
        attrs = {name: dict(group.attrs) for name, group in h5["runs"].items()}
    for name, run_attrs in attrs.items():
        rows = table["variant"] == name
        assert rows.any()
        for column, (attr, kind) in SETTINGS.items():
            values = set(table[column][rows].tolist())
            stored = run_attrs.get(attr)
            if stored is None:
                assert values == ({""} if kind == "text" else {-1} if kind == "int" else values), column
                continue
            expected = str(stored.decode() if isinstance(stored, bytes) else stored) if kind == "text" else stored
            assert values == {expected} or (kind == "text" and values == {str(expected).lower()}), (column, values, expected)
        # this file stores no count of BN layers: the label is what the mode alone says
        mode = run_attrs["bn"]
        assert set(table["bn"][rows].tolist()) == {{"insert": "BN", "noisy": "noisy BN"}.get(mode, mode)}

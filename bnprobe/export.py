"""``bnprobe export``: a run file as one tidy long table (one row per recorded number).

Columns, in this order:

========  ======================================================================================
variant   the run group's name (``/runs/<variant>``)
bn        what the model held: ``no BN``, ``BN``, ``noisy BN``, ``BN stripped``, ``BN folded``
settings  one column each: ``bn_mode`` (the surgery mode), ``seed``, ``lr``, ``optimizer``,
          ``momentum``, ``weight_decay``, ``batch_size``, ``bn_targets``, ``keep_bias``,
          ``nesterov``, ``model`` (the run's settings, so that replicates and conditions group
          by column; missing where an older file did not store one)
section   ``train``, ``moments``, ``ics``, ``landscape``, ``hessian``, ``spectrum`` (or any other recorded one)
step      the training step of the record
layer     layer name (moments, ICS, per-block Hessian values); ``λ1``, ``λ2``, ... for the spectrum's
          top-k eigenvalues (largest first); empty otherwise
quantity  the dataset's name: ``loss``, ``mean``, ``p85``, ``l2``, ``cosine``, ``grad_l2``, ...
channel   channel index for per-channel moments; missing otherwise
eta       the absolute step size of landscape ``loss``/``grad_l2`` values; missing otherwise
bin       histogram bin index (``quantity == "histogram"``); missing otherwise
value     the number, as stored (float64; NaN where the file holds NaN)
========  ======================================================================================

The spectrum's density (``density_nodes``/``density_weights``, [records, probes, nodes]) has no
column for its probe and node axes and is not in the table: read it with :func:`bnprobe.read_file`.

"Missing" is an empty field in CSV, ``null`` in JSON and Parquet; in NPZ (one array per column)
it is ``-1`` for ``channel``/``bin`` and NaN for ``eta``. A ``train`` quantity that is NaN
throughout (accuracy of a regression run, an unrecorded lr) is left out. JSON is a list of
records (``pandas.read_json(path)``); non-finite values are ``null`` there, as JSON has no NaN.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from .errors import BnprobeError, ConfigError
from .findings import bn_label
from .store import BIN, BLOCK, CHANNEL, ETA, LAYER, RANK, Recorded, RunData, atomic_output, check_output_path, load_columns

FORMATS = ("csv", "json", "npz", "parquet")
#: the run settings each row carries: column -> (run attribute, kind)
SETTINGS = {
    "bn_mode": ("bn", "text"), "seed": ("seed", "int"), "lr": ("lr", "float"), "optimizer": ("optimizer", "text"),
    "momentum": ("momentum", "float"), "weight_decay": ("weight_decay", "float"), "batch_size": ("batch_size", "int"),
    "bn_targets": ("bn_targets", "text"), "keep_bias": ("keep_bias", "text"), "nesterov": ("nesterov", "text"),
    "model": ("model", "text"),
}  # fmt: skip
COLUMNS = ("variant", "bn", *SETTINGS, "section", "step", "layer", "quantity", "channel", "eta", "bin", "value")
_MISSING_INT = ("channel", "bin", *(c for c, (_, kind) in SETTINGS.items() if kind == "int"))  # -1 where missing
_MISSING_FLOAT = ("eta", *(c for c, (_, kind) in SETTINGS.items() if kind == "float"))  # NaN where missing
_NUMBERS = ("step", "value", *_MISSING_INT, *_MISSING_FLOAT)
#: the column that tells positions along each axis apart (record is the ``step`` column)
_COLUMN_OF_AXIS = {LAYER: "layer", BLOCK: "layer", RANK: "layer", CHANNEL: "channel", ETA: "eta", BIN: "bin"}


def _block(run: RunData, rec: Recorded) -> dict[str, np.ndarray] | None:
    """One column block per record dataset: a row per number, each axis in its column (names or
    values along it where the run has them, the index otherwise). None for an axis with no column."""
    if any(axis not in _COLUMN_OF_AXIS for axis in rec.axes[1:]):
        return None  # an axis this table has no column for
    n = min(len(rec.steps), len(rec.values))
    values = rec.values[:n]
    idx = np.indices(values.shape).reshape(values.ndim, -1)
    size = idx.shape[1]
    cols: dict[str, np.ndarray] = {
        "variant": np.full(size, run.name, dtype=object),
        "bn": np.full(size, bn_label(run.attrs), dtype=object),
        **{col: np.full(size, _setting(run, attr, kind), dtype=_DTYPES[kind]) for col, (attr, kind) in SETTINGS.items()},
        "section": np.full(size, rec.section, dtype=object),
        "step": np.asarray(rec.steps[:n], dtype=np.int64)[idx[0]],
        "layer": np.full(size, rec.fixed.get(LAYER, ""), dtype=object),
        "quantity": np.full(size, rec.quantity, dtype=object),
        "channel": np.full(size, -1, dtype=np.int64),
        "eta": np.full(size, np.nan, dtype=np.float64),
        "bin": np.full(size, -1, dtype=np.int64),
        "value": values.reshape(-1).astype(np.float64),
    }
    for axis_index, axis in enumerate(rec.axes[1:], start=1):
        col, i, along = _COLUMN_OF_AXIS[axis], idx[axis_index], run.along(rec.section, axis)
        if isinstance(along, list):  # names; a column beyond them is its index
            names = along + [f"#{k}" for k in range(len(along), values.shape[axis_index])]
            cols[col] = np.asarray(names, dtype=object)[i]
        elif along is not None:
            if len(along) == values.shape[axis_index]:
                cols[col] = along[i]
        elif cols[col].dtype == np.int64:  # channels and bins are their index; a value without values is missing
            cols[col] = i.astype(np.int64)
    return cols


_DTYPES = {"text": object, "int": np.int64, "float": np.float64}


def _setting(run: RunData, attr: str, kind: str) -> Any:
    """A run attribute as its column holds it; the column's missing value where the run has none."""
    value = run.attrs.get(attr)
    if kind == "text":
        return "" if value is None else str(value).lower() if isinstance(value, (bool, np.bool_)) else str(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return -1 if kind == "int" else np.nan
    return int(value) if kind == "int" else float(value)


def tidy_table(path: str | Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """The tidy table of a bnprobe file as columns (see the module docstring for missing values).

    ``variant``: comma-separated run names or globs (:class:`ConfigError` when none matches).
    """
    _, columns = load_columns([path], variant)
    blocks = [b for c in columns for rec in c.run.records() if (b := _block(c.run, rec)) is not None]
    if not blocks:
        return {
            c: np.zeros(0, dtype=np.float64 if c in ("value", *_MISSING_FLOAT) else np.int64 if c in _NUMBERS else object) for c in COLUMNS
        }
    return {c: np.concatenate([b[c] for b in blocks]) for c in COLUMNS}


def _missing_to_none(col: str, values: np.ndarray) -> list[Any]:
    if col in _MISSING_INT:
        return [None if v < 0 else int(v) for v in values.tolist()]
    if col in ("value", *_MISSING_FLOAT):
        return [v if math.isfinite(v) else None for v in values.tolist()]
    if col == "step":
        return [int(v) for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def _write_csv(table: dict[str, np.ndarray], fh: TextIO) -> None:
    def cell(col: str, v: Any) -> str:
        if col in _MISSING_INT:
            return "" if v < 0 else str(v)
        if col in _MISSING_FLOAT:
            return "" if math.isnan(v) else repr(v)
        if col == "value":
            return repr(v)  # shortest exact round trip; "nan"/"inf" as Python and pandas read them
        return str(v)

    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    lists = {c: table[c].tolist() for c in COLUMNS}
    for i in range(len(table["value"])):
        writer.writerow([cell(c, lists[c][i]) for c in COLUMNS])


def _write_json(table: dict[str, np.ndarray], fh: TextIO) -> None:
    lists = {c: _missing_to_none(c, table[c]) for c in COLUMNS}
    records = [dict(zip(COLUMNS, row)) for row in zip(*(lists[c] for c in COLUMNS))]
    json.dump(records, fh, allow_nan=False)


def _write_npz(table: dict[str, np.ndarray], fh: BinaryIO) -> None:
    arrays: dict[str, Any] = {c: (table[c].astype(str) if table[c].dtype == object else table[c]) for c in COLUMNS}
    np.savez_compressed(fh, **arrays)


def _write_parquet(table: dict[str, np.ndarray], out: Path) -> None:
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise BnprobeError("parquet export needs pyarrow: pip install 'bnprobe[parquet]'") from None
    types = {
        "step": pa.int64(),
        "value": pa.float64(),
        **dict.fromkeys(_MISSING_INT, pa.int64()),
        **dict.fromkeys(_MISSING_FLOAT, pa.float64()),
    }
    arrays = {}
    for c in COLUMNS:
        if c in (*_MISSING_INT, *_MISSING_FLOAT):
            arrays[c] = pa.array(_missing_to_none(c, table[c]), type=types[c])
        elif c in types:
            arrays[c] = pa.array(table[c], type=types[c])
        else:
            arrays[c] = pa.array(table[c].tolist(), type=pa.string())
    pq.write_table(pa.table(arrays), out)


def export(path: str | Path, fmt: str, out: str | Path, force: bool = False, variant: str | None = None) -> Path:
    """Write the tidy table of ``path`` to ``out`` as ``fmt`` (csv, json, npz or parquet).

    Refuses to replace an existing ``out`` unless ``force`` (:class:`StoreError`); the file is
    written under a temporary name and renamed, so a failed export leaves nothing half-written.
    ``out`` ``-`` is standard output, for the text formats (csv, json) only.
    ``variant`` (comma-separated run names or globs) restricts the table to those runs.
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if str(out) == "-":
        if fmt not in ("csv", "json"):
            raise ConfigError(f"{fmt} is a binary format: give a file name for it (-o - writes csv or json to standard output)")
        (_write_csv if fmt == "csv" else _write_json)(tidy_table(path, variant), sys.stdout)
        return Path("-")
    out = Path(out)
    check_output_path(out, force, inputs=[path])
    if fmt == "parquet":
        try:
            import pyarrow  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
        except ImportError:
            raise BnprobeError("parquet export needs pyarrow: pip install 'bnprobe[parquet]'") from None
    table = tidy_table(path, variant)
    with atomic_output(out) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                _write_csv(table, fh)
        elif fmt == "json":
            with open(tmp, "w", encoding="utf-8") as fh:
                _write_json(table, fh)
        elif fmt == "npz":
            with open(tmp, "wb") as fh:
                _write_npz(table, fh)
        else:
            _write_parquet(table, tmp)
    return out

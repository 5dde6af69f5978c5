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

The export streams: it reads a file's records a slice at a time and writes each slice's rows as
it goes, so that its memory is bounded by :data:`CHUNK_ROWS` (and a Parquet row group), not by
the file: a long run of a large network exports on the machine that recorded it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, repeat
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
_FLOATS = ("value", *_MISSING_FLOAT)
_DTYPE = {c: np.float64 if c in _FLOATS else np.int64 if c in ("step", *_MISSING_INT) else object for c in COLUMNS}
#: the column that tells positions along each axis apart (record is the ``step`` column)
_COLUMN_OF_AXIS = {LAYER: "layer", BLOCK: "layer", RANK: "layer", CHANNEL: "channel", ETA: "eta", BIN: "bin"}
#: rows made at a time: what bounds the memory of an export, whatever the size of the file
CHUNK_ROWS = 1 << 16
#: rows per Parquet row group, held in memory until written: a quarter of pyarrow's default (which
#: takes some 400 MB more, for files a tenth smaller); a table of one group is what ``write_table`` writes
ROW_GROUP_ROWS = 1 << 18


@dataclass(frozen=True)
class _Block:
    """The rows of records ``[start, stop)`` of one dataset. A column is one value for every row
    (``const``), a pattern repeated for each record (``inner``: one entry per position in a
    record), ``step`` (one per record) or ``value`` (read only when asked for)."""

    rec: Recorded
    start: int
    stop: int
    const: dict[str, Any]
    inner: dict[str, np.ndarray]

    @property
    def records(self) -> int:
        return self.stop - self.start

    @property
    def width(self) -> int:
        return math.prod(self.rec.shape[1:])

    @property
    def rows(self) -> int:
        return self.records * self.width

    def steps(self) -> np.ndarray:
        return np.asarray(self.rec.steps[self.start : self.stop], dtype=np.int64)

    def values(self) -> np.ndarray:
        return self.rec.read(self.start, self.stop).reshape(-1).astype(np.float64)

    def column(self, col: str) -> np.ndarray:
        """One column in full, one entry per row."""
        if col == "value":
            return self.values()
        if col == "step":
            return np.repeat(self.steps(), self.width)
        if col in self.inner:
            return np.tile(self.inner[col], self.records)
        return np.full(self.rows, self.const[col], dtype=_DTYPE[col])


def _blocks(run: RunData, rec: Recorded, rows: int) -> Iterator[_Block]:
    """The rows of one record dataset, a few records at a time (at most ``rows`` rows, or one
    record); each axis in its column (names or values along it where the run has them, the index
    otherwise). Nothing for a dataset with an axis that has no column."""
    if any(axis not in _COLUMN_OF_AXIS for axis in rec.axes[1:]):
        return
    const: dict[str, Any] = {
        "variant": run.name,
        "bn": bn_label(run.attrs),
        **{col: _setting(run, attr, kind) for col, (attr, kind) in SETTINGS.items()},
        "section": rec.section,
        "layer": rec.fixed.get(LAYER, ""),
        "quantity": rec.quantity,
        "channel": -1,
        "eta": math.nan,
        "bin": -1,
    }
    inner = _inner_columns(run, rec)
    const = {c: v for c, v in const.items() if c not in inner}
    n, width = min(len(rec.steps), rec.shape[0]), math.prod(rec.shape[1:])
    if width == 0:
        return
    per_chunk = max(1, rows // width)
    for start in range(0, n, per_chunk):
        yield _Block(rec, start, min(n, start + per_chunk), const, inner)


def _inner_columns(run: RunData, rec: Recorded) -> dict[str, np.ndarray]:
    """The columns that vary within a record: their entries for one record, position by position."""
    shape = rec.shape[1:]
    idx = np.indices(shape).reshape(len(shape), math.prod(shape))
    inner: dict[str, np.ndarray] = {}
    for axis_index, axis in enumerate(rec.axes[1:]):
        col, i, along = _COLUMN_OF_AXIS[axis], idx[axis_index], run.along(rec.section, axis)
        if isinstance(along, list):  # names; a column beyond them is its index
            names = along + [f"#{k}" for k in range(len(along), shape[axis_index])]
            inner[col] = np.asarray(names, dtype=object)[i]
        elif along is not None:
            if len(along) == shape[axis_index]:
                inner[col] = along[i]
        elif _DTYPE[col] == np.int64:  # channels and bins are their index; a value without values is missing
            inner[col] = i.astype(np.int64)
    return inner


def _setting(run: RunData, attr: str, kind: str) -> Any:
    """A run attribute as its column holds it; the column's missing value where the run has none."""
    value = run.attrs.get(attr)
    if kind == "text":
        return "" if value is None else str(value).lower() if isinstance(value, (bool, np.bool_)) else str(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return -1 if kind == "int" else np.nan
    return int(value) if kind == "int" else float(value)


def _table_blocks(path: str | Path, variant: str | None) -> Callable[[], Iterator[_Block]]:
    """The blocks of the tidy table of ``path``, to go through as often as a writer needs (the
    files and runs are read once, here, so that a bad file or variant fails before any writing)."""
    _, columns = load_columns([path], variant)
    recorded = [(c.run, rec) for c in columns for rec in c.run.records()]
    return lambda: chain.from_iterable(_blocks(run, rec, CHUNK_ROWS) for run, rec in recorded)


def tidy_table(path: str | Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """The tidy table of a bnprobe file as columns, in memory (see the module docstring for
    missing values; :func:`export` writes a table of any size without holding it).

    ``variant``: comma-separated run names or globs (:class:`ConfigError` when none matches).
    """
    blocks = list(_table_blocks(path, variant)())
    return {c: np.concatenate([np.zeros(0, dtype=_DTYPE[c]), *(b.column(c) for b in blocks)]) for c in COLUMNS}


@functools.lru_cache(maxsize=4096)
def _csv_text(text: str) -> str:
    """``text`` as :mod:`csv` writes it in a row: quoted where it holds a comma, quote or newline."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([text, ""])
    return buf.getvalue()[:-2]


def _csv_cell(col: str) -> Callable[[Any], str]:
    if col in _MISSING_INT:
        return lambda v: "" if v < 0 else str(v)
    if col in _MISSING_FLOAT:
        return lambda v: "" if math.isnan(v) else repr(v)
    if col in ("step", "value"):
        return repr  # shortest exact round trip; "nan"/"inf" as Python and pandas read them
    return _csv_text


_json_text = functools.lru_cache(maxsize=4096)(json.dumps)


def _json_cell(col: str) -> Callable[[Any], str]:
    """A column's cells as ``"col": value``; the first opens a record, the last closes it."""
    key = ("{" if col == COLUMNS[0] else "") + json.dumps(col) + ": "
    end = "}" if col == COLUMNS[-1] else ""
    if col in _MISSING_INT:
        return lambda v: f"{key}null{end}" if v < 0 else f"{key}{v!r}{end}"
    if col in _FLOATS:
        return lambda v: f"{key}{v!r}{end}" if math.isfinite(v) else f"{key}null{end}"
    if col == "step":
        return lambda v: f"{key}{v!r}{end}"
    return lambda v: f"{key}{_json_text(str(v))}{end}"


def _cells(block: _Block, col: str, cell: Callable[[Any], str]) -> Iterable[str]:
    """One column's cells, one per row: a constant or a record's pattern is formatted once."""
    if col == "value":
        return map(cell, block.values().tolist())
    if col == "step":
        return chain.from_iterable(repeat(cell(s), block.width) for s in block.steps().tolist())
    if col in block.inner:
        return [cell(v) for v in block.inner[col].tolist()] * block.records
    return repeat(cell(block.const[col]), block.rows)


def _rows(block: _Block, cells: dict[str, Callable[[Any], str]], sep: str) -> Iterator[str]:
    return map(sep.join, zip(*(_cells(block, c, cells[c]) for c in COLUMNS)))


def _write_csv(blocks: Iterable[_Block], fh: TextIO) -> None:
    cells = {c: _csv_cell(c) for c in COLUMNS}
    csv.writer(fh, lineterminator="\n").writerow(COLUMNS)
    for block in blocks:
        fh.write("\n".join(_rows(block, cells, ",")) + "\n")


def _write_json(blocks: Iterable[_Block], fh: TextIO) -> None:
    """A list of records, as ``json.dump`` writes it, a block at a time."""
    cells = {c: _json_cell(c) for c in COLUMNS}
    fh.write("[")
    for i, block in enumerate(blocks):
        fh.write((", " if i else "") + ", ".join(_rows(block, cells, ", ")))
    fh.write("]")


def _write_npz(blocks: Callable[[], Iterable[_Block]], fh: BinaryIO) -> None:
    """One ``.npy`` member per column, as ``numpy.savez_compressed`` writes it, a block at a time
    (text as fixed-width unicode, as wide as its longest entry, measured first)."""
    rows, widths = 0, {c: 1 for c in COLUMNS if _DTYPE[c] is object}
    for block in blocks():
        rows += block.rows
        for c in widths:
            found = block.inner[c].tolist() if c in block.inner else [block.const[c]]
            widths[c] = max(widths[c], *map(len, found))
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for c in COLUMNS:
            dtype = np.dtype(f"<U{widths[c]}") if c in widths else np.dtype(_DTYPE[c])
            with zf.open(f"{c}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
                np.lib.format.write_array_header_1_0(member, header)
                for block in blocks():
                    member.write(block.column(c).astype(dtype).tobytes())


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise BnprobeError("parquet export needs pyarrow: pip install 'bnprobe[parquet]'") from None
    return pa, pq


def _arrow(pa: Any, schema: Any, block: _Block) -> Any:
    """A block as an Arrow table: missing values are null (``value`` keeps NaN as NaN)."""
    arrays = []
    for c in COLUMNS:
        kind = schema.field(c).type
        if c in block.const:
            v = block.const[c]
            missing = (c in _MISSING_INT and v < 0) or (c in _MISSING_FLOAT and not math.isfinite(v))
            same = _same_text(pa, v, block.rows) if isinstance(v, str) else pa.repeat(pa.scalar(v, kind), block.rows)
            arrays.append(pa.nulls(block.rows, kind) if missing else same)
        else:
            col = block.column(c)
            mask = col < 0 if c in _MISSING_INT else ~np.isfinite(col) if c in _MISSING_FLOAT else None
            arrays.append(pa.array(col, type=kind, mask=mask))
    return pa.Table.from_arrays(arrays, schema=schema)


def _same_text(pa: Any, text: str, rows: int) -> Any:
    """``rows`` times ``text``, an Arrow string array built from its buffers (``pa.repeat`` of a
    string takes about a microsecond a row, as long as all the rest of a Parquet export)."""
    data = text.encode()
    offsets = np.arange(rows + 1, dtype=np.int32) * len(data)
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data * rows))


def _write_parquet(blocks: Iterable[_Block], out: Path) -> None:
    """Row groups of :data:`ROW_GROUP_ROWS` rows, each written as soon as it is full (a group is
    made contiguous first, as ``write_table`` gets it: the pages come out the same)."""
    pa, pq = _pyarrow()
    types = {c: pa.float64() if _DTYPE[c] == np.float64 else pa.int64() if _DTYPE[c] == np.int64 else pa.string() for c in COLUMNS}
    schema = pa.schema(list(types.items()))
    with pq.ParquetWriter(out, schema) as writer:
        pending, held, written = [], 0, False
        for block in blocks:
            pending.append(_arrow(pa, schema, block))
            held += block.rows
            while held >= ROW_GROUP_ROWS:
                table = pa.concat_tables(pending).combine_chunks()
                writer.write_table(table.slice(0, ROW_GROUP_ROWS))
                pending, held, written = [table.slice(ROW_GROUP_ROWS)], held - ROW_GROUP_ROWS, True
        if held or not written:
            writer.write_table(pa.concat_tables(pending).combine_chunks() if pending else schema.empty_table())


def export(path: str | Path, fmt: str, out: str | Path, force: bool = False, variant: str | None = None) -> Path:
    """Write the tidy table of ``path`` to ``out`` as ``fmt`` (csv, json, npz or parquet), a
    block of rows at a time.

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
        (_write_csv if fmt == "csv" else _write_json)(_table_blocks(path, variant)(), sys.stdout)
        return Path("-")
    out = Path(out)
    check_output_path(out, force, inputs=[path])
    if fmt == "parquet":
        _pyarrow()
    blocks = _table_blocks(path, variant)
    with atomic_output(out) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                _write_csv(blocks(), fh)
        elif fmt == "json":
            with open(tmp, "w", encoding="utf-8") as fh:
                _write_json(blocks(), fh)
        elif fmt == "npz":
            with open(tmp, "wb") as fh:
                _write_npz(blocks, fh)
        else:
            _write_parquet(blocks(), tmp)
    return out

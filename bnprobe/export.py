"""``bnprobe export``: a run file as one tidy long table (one row per recorded number).

Columns, in this order:

========  ======================================================================================
variant   the run group's name (``/runs/<variant>``)
section   ``train``, ``moments``, ``ics``, ``landscape``, ``hessian`` (or any other recorded one)
step      the training step of the record
layer     layer name (moments, ICS); ``block<k>`` for per-block Hessian values; empty otherwise
quantity  the dataset's name: ``loss``, ``mean``, ``p85``, ``l2``, ``cosine``, ``grad_l2``, ...
channel   channel index for per-channel moments; missing otherwise
eta       the absolute step size of landscape ``loss``/``grad_l2`` values; missing otherwise
bin       histogram bin index (``quantity == "histogram"``); missing otherwise
value     the number, as stored (float64; NaN where the file holds NaN)
========  ======================================================================================

"Missing" is an empty field in CSV, ``null`` in JSON and Parquet; in NPZ (one array per column)
it is ``-1`` for ``channel``/``bin`` and NaN for ``eta``. A ``train`` quantity that is NaN
throughout (accuracy of a regression run, an unrecorded lr) is left out. JSON is a list of
records (``pandas.read_json(path)``); non-finite values are ``null`` there, as JSON has no NaN.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BnprobeError, ConfigError, StoreError
from .probes.moments import STATS
from .report import ICS_QUANTITIES, hessian_blocks, ics_layers, load_columns, moment_layers
from .store import RunData, check_output_path

FORMATS = ("csv", "json", "npz", "parquet")
COLUMNS = ("variant", "section", "step", "layer", "quantity", "channel", "eta", "bin", "value")
_SECTION_ORDER = ("train", "moments", "ics", "landscape", "hessian")
_QUANTITY_ORDER = (
    "loss",
    "accuracy",
    "lr",
    "seconds",
    *STATS,
    "histogram",
    *ICS_QUANTITIES,
    "grad_l2",
    "beta_smoothness",
    "loss_at_w",
    "top_eigenvalue",
    "iterations",
    "residual",
)
_CONSTANTS = {"ics/layer", "landscape/eta"}


def _blocks(run: RunData) -> Iterator[dict[str, np.ndarray]]:
    """Column blocks for every recorded dataset of ``run`` (sections with a ``step`` dataset)."""
    data = run.data
    keys = []
    for key in data:
        section, _, quantity = key.rpartition("/")
        if quantity == "step" or key in _CONSTANTS or f"{section}/step" not in data:
            continue
        top = section.split("/", 1)[0]
        rank = _SECTION_ORDER.index(top) if top in _SECTION_ORDER else len(_SECTION_ORDER)
        qrank = _QUANTITY_ORDER.index(quantity) if quantity in _QUANTITY_ORDER else len(_QUANTITY_ORDER)
        keys.append((rank, top, section.count("/"), section, qrank, quantity, key))
    for _, top, _, section, _, quantity, key in sorted(keys):
        values = np.asarray(data[key])
        steps = np.asarray(data[f"{section}/step"])
        if values.dtype.kind not in "biuf" or values.ndim == 0:
            continue
        if top == "train" and values.ndim == 1 and values.dtype.kind == "f" and np.isnan(values).all():
            continue
        layer = ""
        roles: list[tuple[str, Any]] = []
        if section.startswith("moments/per_channel/"):
            layer = section[len("moments/per_channel/") :]
            roles = [("channel", None)]
        elif top == "moments" and values.ndim >= 2:
            roles = [("layer", moment_layers(run))] + ([("bin", None)] if values.ndim == 3 else [])
        elif top == "ics" and values.ndim == 2:
            roles = [("layer", ics_layers(run))]
        elif top == "landscape" and values.ndim == 2 and "landscape/eta" in data:
            roles = [("eta", np.asarray(data["landscape/eta"], dtype=np.float64))]
        elif top == "hessian" and values.ndim == 2:
            roles = [("layer", hessian_blocks(run))]
        elif values.ndim == 2:
            roles = [("channel", None)]
        if values.ndim != 1 + len(roles):
            continue  # a shape this table has no columns for
        yield _block(run.name, top, quantity, steps, values, roles, layer)


def _block(
    variant: str, section: str, quantity: str, steps: np.ndarray, values: np.ndarray, roles: list[tuple[str, Any]], layer: str
) -> dict[str, np.ndarray]:
    n = min(len(steps), len(values))
    values = values[:n]
    idx = np.indices(values.shape).reshape(values.ndim, -1)
    size = idx.shape[1]
    cols: dict[str, np.ndarray] = {
        "variant": np.full(size, variant, dtype=object),
        "section": np.full(size, section, dtype=object),
        "step": np.asarray(steps[:n], dtype=np.int64)[idx[0]],
        "layer": np.full(size, layer, dtype=object),
        "quantity": np.full(size, quantity, dtype=object),
        "channel": np.full(size, -1, dtype=np.int64),
        "eta": np.full(size, np.nan, dtype=np.float64),
        "bin": np.full(size, -1, dtype=np.int64),
        "value": values.reshape(-1).astype(np.float64),
    }
    for axis, (role, labels) in enumerate(roles, start=1):
        i = idx[axis]
        if role == "layer":
            names = list(labels) + [f"#{k}" for k in range(len(labels), values.shape[axis])]
            cols["layer"] = np.asarray(names, dtype=object)[i]
        elif role == "eta" and len(labels) == values.shape[axis]:
            cols["eta"] = labels[i]
        elif role in ("channel", "bin"):
            cols[role] = i.astype(np.int64)
    return cols


def tidy_table(path: str | Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """The tidy table of a bnprobe file as columns (see the module docstring for missing values).

    ``variant``: comma-separated run names or globs (:class:`ConfigError` when none matches).
    """
    _, columns = load_columns([path], variant)
    runs = [c.run for c in columns]
    blocks = [b for r in runs for b in _blocks(r)]
    if not blocks:
        return {
            c: np.zeros(
                0, dtype=object if c in ("variant", "section", "layer", "quantity") else np.float64 if c in ("eta", "value") else np.int64
            )
            for c in COLUMNS
        }
    return {c: np.concatenate([b[c] for b in blocks]) for c in COLUMNS}


def _missing_to_none(col: str, values: np.ndarray) -> list[Any]:
    if col in ("channel", "bin"):
        return [None if v < 0 else int(v) for v in values.tolist()]
    if col in ("eta", "value"):
        return [v if math.isfinite(v) else None for v in values.tolist()]
    if col == "step":
        return [int(v) for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def _write_csv(table: dict[str, np.ndarray], fh: Any) -> None:
    def cell(col: str, v: Any) -> str:
        if col in ("channel", "bin"):
            return "" if v < 0 else str(v)
        if col == "eta":
            return "" if math.isnan(v) else repr(v)
        if col == "value":
            return repr(v)  # shortest exact round trip; "nan"/"inf" as Python and pandas read them
        return str(v)

    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    lists = {c: table[c].tolist() for c in COLUMNS}
    for i in range(len(table["value"])):
        writer.writerow([cell(c, lists[c][i]) for c in COLUMNS])


def _write_json(table: dict[str, np.ndarray], fh: Any) -> None:
    lists = {c: _missing_to_none(c, table[c]) for c in COLUMNS}
    records = [dict(zip(COLUMNS, row)) for row in zip(*(lists[c] for c in COLUMNS))]
    json.dump(records, fh, allow_nan=False)


def _write_npz(table: dict[str, np.ndarray], fh: Any) -> None:
    arrays: dict[str, Any] = {c: (table[c].astype(str) if table[c].dtype == object else table[c]) for c in COLUMNS}
    np.savez_compressed(fh, **arrays)


def _write_parquet(table: dict[str, np.ndarray], out: Path) -> None:
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise BnprobeError("parquet export needs pyarrow: pip install 'bnprobe[parquet]'") from None
    types = {"step": pa.int64(), "channel": pa.int64(), "bin": pa.int64(), "eta": pa.float64(), "value": pa.float64()}
    arrays = {}
    for c in COLUMNS:
        if c in ("channel", "bin", "eta"):
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
    ``variant`` (comma-separated run names or globs) restricts the table to those runs.
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    check_output_path(out, force, inputs=[path])
    if fmt == "parquet":
        try:
            import pyarrow  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
        except ImportError:
            raise BnprobeError("parquet export needs pyarrow: pip install 'bnprobe[parquet]'") from None
    table = tidy_table(path, variant)
    tmp = out.with_name(f".{out.name}.partial")
    try:
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
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

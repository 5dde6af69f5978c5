"""Reading bnprobe files: a whole file (:func:`read_file`), checked against the layout first, as
plain arrays and attributes; a run's checkpoint (:func:`load_checkpoint`); plain HDF5 data files.

Readers take axis labels from a dataset's ``axes`` attribute, else from :data:`LAYOUT` (files
written before that attribute). Reading needs no torch, except to load a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError, first_line, usable_path
from .layout import (
    _FIRST,
    _LAYER_FIELDS,
    _NAMED,
    _PLACEHOLDER,
    _RANK,
    AXES_ATTR,
    LAYER,
    LAYOUT,
    MOMENTS,
    PER_CHANNEL,
    RECORD,
    SECTIONS,
    STEP,
    LayerRow,
    _names_spec,
    _plural,
    _with_axis,
    axes_for,
    spec_of,
)


@dataclass(frozen=True)
class Recorded:
    """One record dataset of a run: ``values`` is ``[record, ...]``, ``axes`` labels its axes
    (``record`` first), ``fixed`` what its whole group is about (per-channel moments: the layer)."""

    section: str
    quantity: str
    steps: np.ndarray
    values: np.ndarray
    axes: tuple[str, ...]
    fixed: Mapping[str, str]


@dataclass
class RunData:
    """Everything one run group holds: attributes, layers table and datasets by relative path.

    Readers use the accessors (:meth:`get`, :meth:`labels`, :meth:`records`), which know the
    layout; ``data`` holds the datasets by their path in the run group.
    """

    name: str
    attrs: dict[str, Any]
    layers: list[LayerRow]
    data: dict[str, np.ndarray] = field(default_factory=dict)
    dataset_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [lay["name"] for lay in self.layers]

    def has(self, section: str) -> bool:
        return f"{section}/{STEP}" in self.data

    def get(self, section: str, quantity: str) -> np.ndarray | None:
        """Dataset ``<section>/<quantity>`` (``STEP``: the steps of the records), None when not
        recorded; a name :data:`LAYOUT` does not list is a ``KeyError`` (a reader's typo)."""
        path = f"{section}/{quantity}"
        if path not in _NAMED and quantity != STEP:
            raise KeyError(f"{path} is not a dataset of the layout")
        return self.data.get(path)

    def last(self, section: str, quantity: str) -> Any:
        """The last record of ``<section>/<quantity>``; None when there is none."""
        arr = self.get(section, quantity)
        return arr[-1] if arr is not None and len(arr) else None

    def attrs_of(self, section: str, quantity: str) -> dict[str, Any]:
        """Attributes of dataset ``<section>/<quantity>`` (the Hessian's BN mode and sample size)."""
        self.get(section, quantity)
        return self.dataset_attrs.get(f"{section}/{quantity}", {})

    def per_channel_layers(self) -> list[str]:
        """The layers with per-channel moments, sorted by name."""
        prefix = f"{MOMENTS}/{PER_CHANNEL}/"
        return sorted({k[len(prefix) :].split("/")[0] for k in self.data if k.startswith(prefix) and k.endswith(f"/{STEP}")})

    def axes(self, path: str) -> tuple[str, ...] | None:
        """Labels of the axes of dataset ``path``: its ``axes`` attribute, else :data:`LAYOUT`'s
        (files written before the attribute); None when neither fits its shape."""
        ndim = np.ndim(self.data[path])
        stored = self.dataset_attrs.get(path, {}).get(AXES_ATTR)
        if isinstance(stored, list) and len(stored) == ndim and all(isinstance(a, str) for a in stored):
            return tuple(stored)
        return axes_for(path, ndim)

    def labels(self, section: str, axis: str) -> list[str]:
        """Names along ``axis`` (``layer``, ``block``) of the section's records: the section's own
        list (``ics/layer``), else the layers table (a ``layer`` axis), else placeholders (``#0``,
        ``block0``), whichever has as many names as the records have columns."""
        own = _names_spec(section, axis)
        width = next((np.shape(self.data[s.path])[s.axes.index(axis)] for s in _with_axis(section, axis) if s.path in self.data), None)
        if width is None:  # nothing recorded: a section without its own list is about the layers table
            width = len(self.layers) if own is None and axis == LAYER else 0
        if own is not None and own.path in self.data:
            names = strings(self.data[own.path])
            if len(names) == width:
                return names
        if axis == LAYER:
            names = [lay["name"] for lay in sorted(self.layers, key=lambda lay: lay["order"])]
            if len(names) == width:
                return names
        return [_PLACEHOLDER.get(axis, "#{}").format(i + _FIRST.get(axis, 0)) for i in range(width)]

    def along(self, section: str, axis: str) -> list[str] | np.ndarray | None:
        """What tells the positions along ``axis`` apart: names (:meth:`labels`), the numbers of the
        section's constant for it (``landscape/eta``), or None (channels and bins: their index)."""
        if axis in _PLACEHOLDER:
            return self.labels(section, axis)
        own = _names_spec(section, axis)
        return np.asarray(self.data[own.path], dtype=np.float64) if own is not None and own.path in self.data else None

    def records(self) -> list[Recorded]:
        """Every numeric record dataset (in a group with steps) whose shape fits its axes, ordered by
        section, group (per-channel groups after their section), :data:`LAYOUT` entry and name.
        Series that :data:`LAYOUT` marks unrecorded when NaN throughout are left out."""
        found: list[tuple[tuple[int, str, int, str, int, str], Recorded]] = []
        for path, values in self.data.items():
            group, _, quantity = path.rpartition("/")
            axes = self.axes(path) if quantity != STEP and f"{group}/{STEP}" in self.data else None
            if axes is None or axes[0] != RECORD or values.dtype.kind not in "biuf":
                continue
            spec = spec_of(path)
            if spec is not None and spec.nan_is_unrecorded and values.ndim == 1 and values.dtype.kind == "f" and np.isnan(values).all():
                continue
            section = group.split("/", 1)[0]
            rank = SECTIONS.index(section) if section in SECTIONS else len(SECTIONS)
            fixed = {spec.group_axis: group.rsplit("/", 1)[-1]} if spec is not None and spec.group_axis else {}
            key = (rank, section, group.count("/"), group, _RANK[spec] if spec is not None else len(LAYOUT), quantity)
            found.append((key, Recorded(section, quantity, self.data[f"{group}/{STEP}"], values, axes, fixed)))
        return [rec for _, rec in sorted(found, key=lambda item: item[0])]


@dataclass
class FileData:
    path: Path
    attrs: dict[str, Any]
    runs: dict[str, RunData]


def _decode(value: Any) -> Any:
    """Attribute and table values as plain Python; text that is not valid UTF-8 gets U+FFFD
    (h5py hands undecodable bytes over as lone surrogates, which no console can print)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, str):
        return value.encode(errors="surrogatepass").decode(errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def strings(values: Any) -> list[str]:
    """A stored string array (bytes, str or object) as a list of ``str``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1).tolist()]


def read_file(path: str | Path, load: bool = True) -> FileData:
    """Read a bnprobe file (all runs, all datasets but checkpoints); one-line errors for bad files."""
    path = usable_path(path, StoreError)
    if path.is_dir():
        raise StoreError(f"{path} is a directory; give a bnprobe .h5 file")
    if not path.is_file():
        raise StoreError(f"{path} does not exist")
    try:
        h5 = h5py.File(path, "r", locking=False)  # a run still writing holds the lock; reading is safe up to its last flush
    except OSError as e:
        raise StoreError(f"{path} is not a readable HDF5 file (truncated or another format)") from e
    with h5:
        try:
            if "format_version" not in h5.attrs:
                raise StoreError(f"{path} is an HDF5 file but not a bnprobe file (no format_version)")
            _check_layout(h5, path)
            attrs = {k: _decode(v) for k, v in h5.attrs.items()}
            runs: dict[str, RunData] = {}
            for name, group in h5.get("runs", {}).items():
                run = run_header(name, group)
                if load:
                    _load_datasets(group, run)
                runs[name] = run
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as e:
            # what h5py raises on a damaged file: bad checksums, unreadable objects, garbled types
            detail = str(e.args[0]) if e.args else type(e).__name__  # KeyError's str() adds quotes
            raise StoreError(f"{path} is damaged and cannot be read: {detail.splitlines()[0][:160]}") from e
    return FileData(path, attrs, runs)


def run_header(name: str, group: h5py.Group) -> RunData:
    """A run group's attributes and layers table, without its datasets."""
    layers = [_layer_row(row) for row in group["layers"][()]] if "layers" in group else []
    return RunData(name, {k: _decode(v) for k, v in group.attrs.items()}, layers)


def _layer_row(row: np.void) -> LayerRow:
    return LayerRow(
        name=str(_decode(row["name"])),
        kind=str(_decode(row["kind"])),
        param_count=int(row["param_count"]),
        output_shape=str(_decode(row["output_shape"])),
        order=int(row["order"]),
    )


def _check_layout(h5: h5py.File, path: Path) -> None:
    """The layout, checked before anything is read: ``/runs`` and each run are
    groups, ``layers`` a table, a section (``train``, ``moments``, ...) a group whose records are
    numbers indexed by a 1-D integer ``step``. Readers rely on it; a file that breaks it is a
    one-line error rather than a crash somewhere in a report or plot."""
    runs = h5.get("runs")
    if runs is None:
        return
    _expect(path, runs, h5py.Group)
    for run in runs.values():
        _expect(path, run, h5py.Group)
        layers = run.get("layers")
        if layers is not None:
            _expect(path, layers, h5py.Dataset)
            if layers.ndim != 1 or not set(_LAYER_FIELDS) <= set(layers.dtype.names or ()):
                raise StoreError(f"{path}: {layers.name} is not a layers table ({', '.join(_LAYER_FIELDS)}); {_NOT_OURS}")
        if "checkpoint" in run:
            _expect(path, run["checkpoint"], h5py.Dataset)
        for section in SECTIONS:
            if section in run:
                _expect(path, run[section], h5py.Group)
                _check_records(path, section, run[section])
                run[section].visititems(lambda rel, obj, s=section: _check_records(path, f"{s}/{rel}", obj))


_NOT_OURS = "the file is damaged or was not written by bnprobe"


def _expect(path: Path, obj: Any, kind: type) -> None:
    if not isinstance(obj, kind):
        found, wanted = ("a group", "a dataset") if isinstance(obj, h5py.Group) else ("a dataset", "a group")
        raise StoreError(f"{path}: {obj.name} is {found}, not {wanted}; {_NOT_OURS}")


def _check_records(path: Path, rel: str, obj: Any) -> None:
    """A group's ``step`` is a 1-D integer dataset; every other dataset holds numbers per record
    (strings only where :data:`LAYOUT` says ``text``), with two axes or more where it says so."""
    spec = spec_of(rel)
    if isinstance(obj, h5py.Group):
        step = obj.get(STEP)
        if step is not None and not (isinstance(step, h5py.Dataset) and step.ndim == 1 and step.dtype.kind in "iu"):
            raise StoreError(f"{path}: {obj.name}/{STEP} is not a 1-D integer dataset; {_NOT_OURS}")
    elif not (spec is not None and spec.text) and (obj.dtype.kind not in "biuf" or obj.ndim == 0):
        raise StoreError(
            f"{path}: {obj.name} holds {obj.dtype} {'scalar' if obj.ndim == 0 else 'values'}, not numbers per record; {_NOT_OURS}"
        )
    elif spec is not None and len(spec.axes) > 1 and obj.ndim < 2:
        raise StoreError(f"{path}: {obj.name} is {obj.ndim}-D, not {_plural(spec.axes)}; {_NOT_OURS}")


def _load_datasets(group: h5py.Group, run: RunData) -> None:
    def visit(rel: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and rel not in ("layers", "checkpoint"):
            run.data[rel] = obj[()]
            if obj.attrs:
                run.dataset_attrs[rel] = {k: _decode(v) for k, v in obj.attrs.items()}

    group.visititems(visit)


def load_checkpoint(path: str | Path, run: str) -> tuple[dict[str, Any], int]:
    """The checkpoint blob of ``run`` (``torch.load(weights_only=True)``) and its step."""
    read_file(path, load=False)
    with h5py.File(path, "r", locking=False) as h5:
        return _checkpoint(h5, Path(path), run)


def saved_checkpoint(path: str | Path, run: str) -> tuple[dict[str, Any], int] | None:
    """Like :func:`load_checkpoint`, but None when ``run`` has no checkpoint (killed before its first)."""
    read_file(path, load=False)
    with h5py.File(path, "r", locking=False) as h5:
        return _checkpoint(h5, Path(path), run) if "checkpoint" in h5.get(f"runs/{run}", {}) else None


def _checkpoint(h5: h5py.File, path: Path, run: str) -> tuple[dict[str, Any], int]:
    group = h5.get(f"runs/{run}")
    if group is None:
        raise StoreError(f"{path} has no run {run!r}")
    if "checkpoint" not in group:
        raise StoreError(f"run {run!r} in {path} has no checkpoint")
    import torch  # only checkpoints need it: reading records does not

    blob = group["checkpoint"][()].tobytes()
    digest = group["checkpoint"].attrs.get("sha256")  # files written before checksums have none
    if digest is not None and hashlib.sha256(blob).hexdigest() != _decode(digest):
        raise StoreError(f"the checkpoint of run {run!r} in {path} is damaged (its SHA-256 does not match); it cannot be resumed")
    try:
        step = int(group["checkpoint"].attrs.get("step", 0))
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), step
    except Exception as e:  # any failure to unpickle is a corrupted checkpoint
        raise StoreError(f"the checkpoint of run {run!r} in {path} is corrupted: {first_line(e)}") from e


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Top-level datasets of a plain HDF5 data file (for ``h5:FILE`` data)."""
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return {k: v[()] for k, v in h5.items() if isinstance(v, h5py.Dataset)}
    except OSError as e:
        from ..errors import DataError

        raise DataError(f"{path} is not a readable HDF5 file") from e

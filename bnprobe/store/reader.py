"""Reading bnprobe files: a whole file (:func:`read_file`), checked against the layout first, as
attributes and arrays read when first asked for; a run's checkpoint (:func:`load_checkpoint`);
plain HDF5 data files.

Readers take axis labels from a dataset's ``axes`` attribute, else from :data:`LAYOUT` (files
written before that attribute). Reading needs no torch, except to load a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError, first_line, usable_path
from ..measurements import LAYER, MOMENTS, PER_CHANNEL, RECORD, SECTIONS, STEP
from .layout import (
    _FIRST,
    _LAYER_FIELDS,
    _NAMED,
    _PLACEHOLDER,
    _RANK,
    AXES_ATTR,
    FORMAT_VERSION,
    LAYOUT,
    LayerRow,
    _names_spec,
    _plural,
    _with_axis,
    axes_for,
    spec_of,
)


class Datasets(MutableMapping[str, np.ndarray]):
    """A run's datasets by path in its group, each read from the file the first time it is asked
    for and kept: a report reads what it draws, not every record of a long run. :meth:`read` reads
    records of one without keeping them, so that an export holds one slice at a time."""

    def __init__(self, file: Path | None = None, group: str = "", on_disk: Mapping[str, h5py.Dataset] | None = None) -> None:
        self._file, self._group = file, group
        self._arrays: dict[str, np.ndarray | None] = dict.fromkeys(on_disk or {})  # None: not read yet
        self._meta = {k: (ds.shape, ds.dtype) for k, ds in (on_disk or {}).items()}
        self._rows = _committed_rows(self._meta)

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._arrays[key]
        if value is None:
            value = self._arrays[key] = self.read(key)
        return value

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self._arrays[key] = value
        self._meta.pop(key, None)

    def __delitem__(self, key: str) -> None:
        del self._arrays[key]
        self._meta.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._arrays  # without reading it

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        value = self._arrays[key]
        if value is not None:
            return np.shape(value)
        shape = self._meta[key][0]
        return (self._rows[key], *shape[1:]) if key in self._rows else shape

    def dtype(self, key: str) -> np.dtype[Any]:
        value = self._arrays[key]
        return np.asarray(value).dtype if value is not None else self._meta[key][1]

    def read(self, key: str, selection: slice | tuple[slice | int, ...] = slice(None)) -> np.ndarray:
        """Part of dataset ``key`` (records ``[a:b]``, or ``[:, j]`` for a column; all of it by
        default), read without keeping it."""
        value = self._arrays[key]
        if value is not None:
            return value[selection]
        assert self._file is not None  # only datasets listed from a file are left unread
        try:
            with h5py.File(self._file, "r", locking=False) as h5:
                ds = h5[self._group][key]
                if key in self._rows:  # only the records every dataset of its section holds
                    selection = _within(selection, self._rows[key])
                return np.asarray(ds[()] if selection == slice(None) else ds[selection])
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
            if not self._file.is_file():
                raise StoreError(f"{self._file} was moved or deleted while it was being read") from e
            raise _damaged(self._file, e) from e


def _within(selection: slice | tuple[slice | int, ...], rows: int) -> slice | tuple[slice | int, ...]:
    """``selection`` with its records (first axis) limited to the first ``rows``."""
    first, rest = (selection[0], selection[1:]) if isinstance(selection, tuple) else (selection, ())
    assert isinstance(first, slice)  # records are selected by slices
    limited = slice(*first.indices(rows))
    return (limited, *rest) if rest else limited


def _committed_rows(meta: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, int]:
    """Rows of each record dataset that every record dataset of its section holds (its ``step``
    axis included): a write the disk refused half-way, or a process killed inside one, can leave
    one dataset a record longer than the others, and that record was never whole."""
    sections: dict[str, list[str]] = {}
    for key, (shape, _) in meta.items():
        spec, section = spec_of(key), key.split("/", 1)[0]
        if spec is not None and spec.is_record and len(shape) >= 1 and f"{section}/{STEP}" in meta:
            sections.setdefault(section, []).append(key)
    return {key: min(meta[k][0][0] for k in keys) for keys in sections.values() for key in keys}


@dataclass(frozen=True)
class Recorded:
    """One record dataset of a run (``path`` in its group) of ``shape`` ``[record, ...]``: ``axes``
    labels its axes (``record`` first), ``fixed`` what its whole group is about (per-channel
    moments: the layer). :meth:`read` reads some of its records."""

    section: str
    quantity: str
    steps: np.ndarray
    path: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    fixed: Mapping[str, str]
    data: Datasets = field(repr=False, compare=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.data.read(self.path, slice(start, stop))


@dataclass
class RunData:
    """Everything one run group holds: attributes, layers table and datasets by relative path.

    Readers use the accessors (:meth:`get`, :meth:`labels`, :meth:`records`), which know the
    layout; ``data`` holds the datasets by their path in the run group.
    """

    name: str
    attrs: dict[str, Any]
    layers: list[LayerRow]
    data: Datasets = field(default_factory=Datasets)
    dataset_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [lay["name"] for lay in self.layers]

    def has(self, section: str) -> bool:
        return f"{section}/{STEP}" in self.data

    def get(self, section: str, quantity: str) -> np.ndarray | None:
        """Dataset ``<section>/<quantity>`` (``STEP``: the steps of the records), None when not
        recorded; a name :data:`LAYOUT` does not list is a ``KeyError`` (a reader's typo)."""
        path = _layout_path(section, quantity)
        return self.data.get(path)

    def holds(self, section: str, quantity: str) -> bool:
        """Whether the run has dataset ``<section>/<quantity>`` (nothing is read to tell)."""
        return _layout_path(section, quantity) in self.data

    def last(self, section: str, quantity: str) -> Any:
        """The last record of ``<section>/<quantity>`` (only it is read); None when there is none."""
        path = _layout_path(section, quantity)
        n = self.data.shape(path)[0] if path in self.data else 0
        return self.data.read(path, slice(n - 1, n))[0] if n else None

    def column(self, section: str, quantity: str, index: int) -> np.ndarray | None:
        """Column ``index`` of ``<section>/<quantity>`` (one layer's records), only it read; None
        when not recorded."""
        path = _layout_path(section, quantity)
        return self.data.read(path, (slice(None), index)) if path in self.data else None

    def attrs_of(self, section: str, quantity: str) -> dict[str, Any]:
        """Attributes of dataset ``<section>/<quantity>`` (the Hessian's BN mode and sample size)."""
        return self.dataset_attrs.get(_layout_path(section, quantity), {})

    def per_channel_layers(self) -> list[str]:
        """The layers with per-channel moments, sorted by name."""
        prefix = f"{MOMENTS}/{PER_CHANNEL}/"
        return sorted({k[len(prefix) :].split("/")[0] for k in self.data if k.startswith(prefix) and k.endswith(f"/{STEP}")})

    def axes(self, path: str) -> tuple[str, ...] | None:
        """Labels of the axes of dataset ``path``: its ``axes`` attribute, else :data:`LAYOUT`'s
        (files written before the attribute); None when neither fits its shape."""
        ndim = len(self.data.shape(path))
        stored = self.dataset_attrs.get(path, {}).get(AXES_ATTR)
        if isinstance(stored, list) and len(stored) == ndim and all(isinstance(a, str) for a in stored):
            return tuple(stored)
        return axes_for(path, ndim)

    def labels(self, section: str, axis: str) -> list[str]:
        """Names along ``axis`` (``layer``, ``block``) of the section's records: the section's own
        list (``ics/layer``), else the layers table (a ``layer`` axis), else placeholders (``#0``,
        ``block0``), whichever has as many names as the records have columns."""
        own = _names_spec(section, axis)
        width = next((self.data.shape(s.path)[s.axes.index(axis)] for s in _with_axis(section, axis) if s.path in self.data), None)
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
        for path in self.data:
            group, _, quantity = path.rpartition("/")
            axes = self.axes(path) if quantity != STEP and f"{group}/{STEP}" in self.data else None
            kind, shape = self.data.dtype(path).kind, self.data.shape(path)
            if axes is None or axes[0] != RECORD or kind not in "biuf":
                continue
            spec = spec_of(path)
            if spec is not None and spec.nan_is_unrecorded and len(shape) == 1 and kind == "f" and np.isnan(self.data[path]).all():
                continue
            section = group.split("/", 1)[0]
            rank = SECTIONS.index(section) if section in SECTIONS else len(SECTIONS)
            fixed = {spec.group_axis: group.rsplit("/", 1)[-1]} if spec is not None and spec.group_axis else {}
            key = (rank, section, group.count("/"), group, _RANK[spec] if spec is not None else len(LAYOUT), quantity)
            found.append((key, Recorded(section, quantity, self.data[f"{group}/{STEP}"], path, shape, axes, fixed, self.data)))
        return [rec for _, rec in sorted(found, key=lambda item: item[0])]


def _layout_path(section: str, quantity: str) -> str:
    path = f"{section}/{quantity}"
    if path not in _NAMED and quantity != STEP:
        raise KeyError(f"{path} is not a dataset of the layout")
    return path


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
    """Read a bnprobe file (all runs, all datasets but checkpoints, each read when first asked for;
    ``load=False``: headers only); one-line errors for bad files."""
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
            _check_version(h5.attrs["format_version"], path)
            _check_layout(h5, path)
            attrs = {k: _decode(v) for k, v in h5.attrs.items()}
            runs: dict[str, RunData] = {}
            for name, group in h5.get("runs", {}).items():
                run = run_header(name, group)
                if load:
                    _list_datasets(path, group, run)
                runs[name] = run
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as e:
            # what h5py raises on a damaged file: bad checksums, unreadable objects, garbled types
            raise _damaged(path, e) from e
    return FileData(path, attrs, runs)


def _check_version(stored: Any, path: Path) -> None:
    """A file of a newer major format version (``2``, ``2.1``) is refused: this bnprobe would
    misread what it does not know, or write into it and break it."""
    try:
        major = int(str(_decode(stored)).split(".")[0])
    except ValueError:
        raise StoreError(f"{path} has a format_version bnprobe cannot read: {str(_decode(stored))[:40]!r}") from None
    if major > FORMAT_VERSION:
        raise StoreError(f"{path} has format version {major}, newer than this bnprobe reads ({FORMAT_VERSION}); upgrade bnprobe to read it")


def _damaged(path: Path, e: Exception) -> StoreError:
    detail = str(e.args[0]) if e.args else type(e).__name__  # KeyError's str() adds quotes
    return StoreError(f"{path} is damaged and cannot be read: {detail.splitlines()[0][:160]}")


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


def _list_datasets(path: Path, group: h5py.Group, run: RunData) -> None:
    """The run's datasets (not their values) and their attributes."""
    found: dict[str, h5py.Dataset] = {}

    def visit(rel: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and rel not in ("layers", "checkpoint"):
            found[rel] = obj
            if obj.attrs:
                run.dataset_attrs[rel] = {k: _decode(v) for k, v in obj.attrs.items()}

    group.visititems(visit)
    run.data = Datasets(path, group.name, found)


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


LAZY_BYTES = 2**30  # a data array this large is mapped from its file (read as used) where its layout allows


def read_arrays(path: str | Path, names: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The top-level datasets ``names`` of a plain HDF5 data file (for ``h5:FILE`` data), those
    present, and the names of all its top-level datasets. Only the named ones are read: the file
    may hold others of any size. One of :data:`LAZY_BYTES` or more, stored contiguous and
    uncompressed, is mapped from the file (copy-on-write) rather than read into memory."""
    try:
        with h5py.File(path, "r", locking=False) as h5:
            found = [k for k, v in h5.items() if isinstance(v, h5py.Dataset)]
            return {k: _mapped(h5[k], Path(path)) for k in names if k in found}, found
    except OSError as e:
        from ..errors import DataError

        raise DataError(f"{path} is not a readable HDF5 file") from e


def _mapped(dataset: h5py.Dataset, path: Path) -> np.ndarray:
    """``dataset``'s values: mapped from the file when large and laid out as one plain block of
    numbers (see :func:`read_arrays`), else read."""
    offset = dataset.id.get_offset()  # None where the data is chunked, compressed or never written
    plain = dataset.dtype.kind in "biuf" and dataset.dtype.isnative and dataset.chunks is None and offset is not None
    if dataset.nbytes < LAZY_BYTES or not plain:
        try:
            values: np.ndarray = dataset[()]
        except MemoryError:
            from ..errors import DataError

            raise DataError(
                f"{path}: array {dataset.name.lstrip('/')!r} ({dataset.nbytes / 2**30:.1f} GiB) does not fit in memory; "
                "store it contiguous and uncompressed (h5py's chunks=None) to have it read from the file as used"
            ) from None
        return values
    return np.memmap(path, dtype=dataset.dtype, mode="c", offset=offset, shape=dataset.shape)

"""The HDF5 writer and reader: the only module that imports h5py (layout in DESIGN section 4).

One file per experiment, one group per variant under ``/runs``. Records are buffered in memory
and appended to resizable, chunked datasets on :meth:`RunWriter.flush`, followed by an HDF5
flush, so a run killed at any point leaves a file that opens and holds everything up to the last
flush, with the run's ``status`` attribute saying what happened.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .errors import StoreError, clip, first_line, usable_path
from .layers import LayerInfo

FORMAT_VERSION = 1
STATUSES = ("running", "finished", "diverged", "interrupted", "failed")
SECTIONS = ("train", "moments", "ics", "landscape", "hessian")
_TEXT_DATASETS = ("ics/layer", "hessian/block")  # the only datasets in a section holding strings
_TABLES = ("moments/", "ics/", "hessian/block_")  # records of these are [records, layers, ...]
_LAYER_DTYPE = np.dtype(
    [
        ("name", h5py.string_dtype()),
        ("kind", h5py.string_dtype()),
        ("param_count", "i8"),
        ("output_shape", h5py.string_dtype()),
        ("order", "i4"),
    ]
)


def check_output_path(path: Path, force: bool = False, create_parent: bool = False, inputs: Sequence[str | Path] = ()) -> bool:
    """Refuse an output that would replace a user's file (without ``force``), one of the ``inputs``
    it is made from (even with ``force``), or cannot be written (a name too long for the file
    system, a NUL byte in it). Returns whether it made the parent directory (``create_parent``),
    which whoever discards the output then removes too."""
    where = clip(str(path))
    made_parent = False
    try:
        if path.exists() and any(path.samefile(p) for p in inputs if Path(p).exists()):
            raise StoreError(f"{where} is the file being read; choose another --output")
        if create_parent and not path.parent.exists() and path.parent.parent.is_dir():
            path.parent.mkdir()
            made_parent = True
        if path.is_dir():
            raise StoreError(f"{where} is a directory, not an output file")
        if path.exists() and not force:
            raise StoreError(f"{where} already exists; choose another --output or pass --force to replace it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreError(f"output directory {clip(str(parent))} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"output directory {clip(str(parent))} is not writable")
        # The temporary '.NAME.partial' is the longest name written: one too long fails here, before any writing.
        os.stat(parent / f".{path.name}.partial", follow_symlinks=False)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        if made_parent:
            path.parent.rmdir()
        raise StoreError(f"cannot write {where}: {getattr(e, 'strerror', None) or e}") from None
    return made_parent


class Store:
    """An experiment file being written. Create with :meth:`create`, add runs with :meth:`run`.

    With ``force`` an existing file is replaced only once the new one holds its first flush: the
    new file is written under a temporary name and renamed over the old one then.
    """

    def __init__(self, h5: h5py.File, path: Path, pending_rename: Path | None, created: bool = False, made_parent: bool = False) -> None:
        self._h5 = h5
        self.path = path
        self._pending_rename = pending_rename
        self._created = created  # a file this store made (not one it appends to): it may discard it
        self._made_parent = made_parent  # ... and the directory it made for it
        self.writers: dict[str, RunWriter] = {}

    @classmethod
    def create(
        cls, path: str | Path, config_yaml: str = "", force: bool = False, create_parent: bool = False, inputs: Sequence[str | Path] = ()
    ) -> Store:
        """Start a new experiment file; refuses to touch an existing one unless ``force``, and
        ``inputs`` (files it is made from) even then.

        ``create_parent`` makes a missing parent directory (one level: the default ``runs/``).
        """
        path = Path(path)
        made_parent = check_output_path(path, force, create_parent, inputs)
        target = path.with_name(f".{path.name}.partial") if path.exists() else path
        try:
            # locking=False: readers (report on a live run) must not need the writer's lock
            h5 = h5py.File(target, "w" if target != path else "x", locking=False, track_order=True)
        except (OSError, FileExistsError) as e:
            if made_parent:
                path.parent.rmdir()
            raise StoreError(f"cannot create {path}: {e}") from e
        h5.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "bnprobe_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "torch_version": str(torch.__version__),
                "config": config_yaml,
            }
        )
        h5.flush()  # with force, the old file is replaced at the first flush holding records, not now
        return cls(h5, path, target if target != path else None, created=True, made_parent=made_parent)

    @classmethod
    def append_to(cls, path: str | Path) -> Store:
        """Open an existing bnprobe file to add runs or records (checked first)."""
        path = Path(path)
        read_file(path, load=False)
        try:
            return cls(h5py.File(path, "r+", locking=False), path, None)
        except OSError as e:
            raise StoreError(f"cannot open {path} for writing: {e}") from e

    def run(self, name: str, attrs: Mapping[str, Any]) -> RunWriter:
        """The writer for run group ``/runs/<name>``, created with ``attrs`` and status ``running``."""
        if "/" in name or not name:
            raise StoreError(f"invalid run name {name!r}")
        runs = self._h5["runs"] if "runs" in self._h5 else self._h5.create_group("runs", track_order=True)
        if name in runs:
            group = runs[name]
        else:
            group = runs.create_group(name, track_order=True)
            group.attrs.update({k: _attr(v) for k, v in attrs.items()})
            group.attrs["status"] = "running"
        writer = RunWriter(self, group)
        writer.write_seconds = float(group.attrs.get("write_seconds", 0.0))  # a resumed run goes on counting
        self.writers[name] = writer
        return writer

    def run_names(self) -> list[str]:
        return list(self._h5.get("runs", {}))

    def checkpoint(self, run: str) -> tuple[dict[str, Any], int] | None:
        """The checkpoint of ``run`` and its step, or None when it has none."""
        if "checkpoint" not in self._h5.get(f"runs/{run}", {}):
            return None
        return _checkpoint(self._h5, self.path, run)

    def has_records(self) -> bool:
        """Whether any run has logged a training step (flushed or still buffered)."""
        if any(w.has_pending_steps() for w in self.writers.values()):
            return True
        runs = self._h5.get("runs")
        return runs is not None and any("train/step" in g and g["train/step"].shape[0] > 0 for g in runs.values())

    def flush(self) -> None:
        self._h5.flush()
        if self._pending_rename is not None and self.has_records():
            self._commit()

    def _commit(self) -> None:
        if self._pending_rename is not None:
            os.replace(self._pending_rename, self.path)
            self._pending_rename = None

    def close(self) -> None:
        if not self._h5.id.valid:
            return
        for writer in self.writers.values():
            writer.flush()
        self._h5.flush()
        self._commit()
        self._h5.close()

    def discard(self) -> None:
        """Close and delete the file this store created (an existing file it would replace stays)."""
        if self._h5.id.valid:
            self._h5.close()
        if self._created:
            (self._pending_rename or self.path).unlink(missing_ok=True)
            self._pending_rename = None
        if self._made_parent and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # A run that fails before its first step (a user error found late, Ctrl-C at start-up)
        # leaves no file behind, and with --force the user's old file untouched.
        if exc_type is not None and self._created and not self.has_records():
            self.discard()
        else:
            self.close()


def _attr(value: Any) -> Any:
    """An HDF5-storable attribute value (None as "", str subclasses as str)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return [str(v) for v in value]
    return value


class RunWriter:
    """Buffers one run's records and appends them to ``/runs/<name>/<section>/<dataset>`` on
    :meth:`flush` (its owner, the Recorder, decides when: every N records or S seconds)."""

    def __init__(self, store: Store, group: h5py.Group) -> None:
        self._store = store
        self._group = group
        self._pending: dict[str, list[np.ndarray]] = defaultdict(list)
        self.write_seconds = 0.0  # time spent writing HDF5, so runs can report the store's overhead

    @property
    def name(self) -> str:
        return self._group.name.rsplit("/", 1)[-1]

    def set_layers(self, layers: Sequence[LayerInfo]) -> None:
        """Write the layers table (name, kind, param_count, output shape, order)."""
        rows = np.array(
            [(lay.name, lay.kind, lay.param_count, "x".join(map(str, lay.output_shape)), lay.order) for lay in layers], dtype=_LAYER_DTYPE
        )
        if "layers" in self._group:
            del self._group["layers"]
        self._group.create_dataset("layers", data=rows)

    def set_attrs(self, **attrs: Any) -> None:
        self._group.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def set_status(self, status: str, **extra: Any) -> None:
        """Set ``status`` (running|finished|diverged|interrupted), flush, and make it durable."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        self.flush()
        self.set_attrs(status=status, **extra)
        self._store.flush()

    def write_constant(self, path: str, values: Any, **attrs: Any) -> None:
        """A dataset written once (e.g. ``landscape/eta``), replaced if present."""
        if path in self._group:
            del self._group[path]
        data = np.asarray(values)
        if data.dtype.kind == "U":
            data = data.astype(h5py.string_dtype())
        ds = self._group.create_dataset(path, data=data)
        ds.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def append(self, section: str, step: int, values: Mapping[str, Any]) -> None:
        """One record at ``step``: ``section/step`` gets the step, ``section/<key>`` each value (any shape)."""
        self._pending[f"{section}/step"].append(np.asarray(step, dtype=np.int64))
        for key, value in values.items():
            self._pending[f"{section}/{key}"].append(np.asarray(value))

    def has_pending_steps(self) -> bool:
        return bool(self._pending.get("train/step"))

    def flush(self) -> None:
        """Append buffered records to their datasets and flush the file to disk."""
        t0 = time.perf_counter()
        for path, rows in self._pending.items():
            block = np.stack(rows)
            if path not in self._group:
                chunk_rows = max(1, min(1024, (1 << 16) // max(1, block[0].nbytes)))
                self._group.create_dataset(path, data=block, maxshape=(None, *block.shape[1:]), chunks=(chunk_rows, *block.shape[1:]))
            else:
                ds = self._group[path]
                if ds.shape[1:] != block.shape[1:]:
                    raise StoreError(f"{path}: record shape {block.shape[1:]} does not match {ds.shape[1:]}")
                start = ds.shape[0]
                ds.resize(start + len(block), axis=0)
                ds[start:] = block
        self._pending.clear()
        self._store.flush()
        self.write_seconds += time.perf_counter() - t0

    def truncate(self, next_step: int) -> None:
        """Drop records at steps >= ``next_step`` (those after the checkpoint a resume starts from)."""
        self.flush()

        def visit(_rel: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and isinstance(obj.get("step"), h5py.Dataset):
                keep = int(np.searchsorted(obj["step"][()], next_step))
                for ds in obj.values():
                    if isinstance(ds, h5py.Dataset) and ds.maxshape and ds.maxshape[0] is None:
                        ds.resize(min(keep, ds.shape[0]), axis=0)

        self._group.visititems(visit)
        self._store.flush()

    def set_dataset_attrs(self, path: str, **attrs: Any) -> None:
        """Attributes of a recorded dataset (e.g. the BN mode and sample size of ``hessian/top_eigenvalue``)."""
        self.flush()
        self._group[path].attrs.update({k: _attr(v) for k, v in attrs.items()})

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Store a ``torch.save`` blob (model, optimizer, RNG states) as ``checkpoint``."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        if "checkpoint" in self._group:
            del self._group["checkpoint"]
        ds = self._group.create_dataset("checkpoint", data=np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        ds.attrs["step"] = step
        self.flush()


# ----------------------------------------------------------------------------- reading


@dataclass
class RunData:
    """Everything one run group holds: attributes, layers table and datasets by relative path."""

    name: str
    attrs: dict[str, Any]
    layers: list[dict[str, Any]]
    data: dict[str, np.ndarray] = field(default_factory=dict)
    dataset_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [lay["name"] for lay in self.layers]

    def has(self, section: str) -> bool:
        return f"{section}/step" in self.data


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
                layers = []
                if "layers" in group:
                    for row in group["layers"][()]:
                        layers.append({k: _decode(row[k]) for k in _LAYER_DTYPE.names})
                run = RunData(name, {k: _decode(v) for k, v in group.attrs.items()}, layers)
                if load:
                    _load_datasets(group, run)
                runs[name] = run
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as e:
            # what h5py raises on a damaged file: bad checksums, unreadable objects, garbled types
            detail = str(e.args[0]) if e.args else type(e).__name__  # KeyError's str() adds quotes
            raise StoreError(f"{path} is damaged and cannot be read: {detail.splitlines()[0][:160]}") from e
    return FileData(path, attrs, runs)


def _check_layout(h5: h5py.File, path: Path) -> None:
    """The layout of DESIGN section 4, checked before anything is read: ``/runs`` and each run are
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
            if layers.ndim != 1 or not set(_LAYER_DTYPE.names) <= set(layers.dtype.names or ()):
                raise StoreError(f"{path}: {layers.name} is not a layers table ({', '.join(_LAYER_DTYPE.names)}); {_NOT_OURS}")
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
    (strings only in ``_TEXT_DATASETS``), per layer in ``_TABLES``."""
    if isinstance(obj, h5py.Group):
        step = obj.get("step")
        if step is not None and not (isinstance(step, h5py.Dataset) and step.ndim == 1 and step.dtype.kind in "iu"):
            raise StoreError(f"{path}: {obj.name}/step is not a 1-D integer dataset; {_NOT_OURS}")
    elif rel not in _TEXT_DATASETS and (obj.dtype.kind not in "biuf" or obj.ndim == 0):
        raise StoreError(
            f"{path}: {obj.name} holds {obj.dtype} {'scalar' if obj.ndim == 0 else 'values'}, not numbers per record; {_NOT_OURS}"
        )
    elif rel.startswith(_TABLES) and rel not in _TEXT_DATASETS and not rel.endswith("/step") and obj.ndim < 2:
        raise StoreError(f"{path}: {obj.name} is {obj.ndim}-D, not [records, layers]; {_NOT_OURS}")


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


def _checkpoint(h5: h5py.File, path: Path, run: str) -> tuple[dict[str, Any], int]:
    group = h5.get(f"runs/{run}")
    if group is None:
        raise StoreError(f"{path} has no run {run!r}")
    if "checkpoint" not in group:
        raise StoreError(f"run {run!r} in {path} has no checkpoint")
    try:
        blob = group["checkpoint"][()].tobytes()
        step = int(group["checkpoint"].attrs.get("step", 0))
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), step
    except Exception as e:
        raise StoreError(f"the checkpoint of run {run!r} in {path} is corrupted: {first_line(e)}") from e


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Top-level datasets of a plain HDF5 data file (for ``h5:FILE`` data)."""
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return {k: v[()] for k, v in h5.items() if isinstance(v, h5py.Dataset)}
    except OSError as e:
        from .errors import DataError

        raise DataError(f"{path} is not a readable HDF5 file") from e

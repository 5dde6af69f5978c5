"""Writing bnprobe files: the experiment file (:class:`Store`), one run's records
(:class:`RunWriter`), and the all-or-nothing outputs of the export and plot commands.

Records are buffered in memory and appended to resizable, chunked datasets on
:meth:`RunWriter.flush`, followed by an HDF5 flush, so a run killed at any point leaves a file
that opens and holds everything up to the last flush, with the run's ``status`` attribute saying
what happened. Each dataset gets its axis labels as an ``axes`` attribute when it is created.
One process writes a file at a time (:class:`~.guard.OutputLock`), each write runs whole with
SIGINT/SIGTERM deferred, and a write that fails (a full disk) stops the run with a one-line
:class:`StoreError`, the file keeping what was flushed before, its runs marked ``failed``.
``torch`` is imported only to write the file's ``torch_version`` and to save a checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import functools
import hashlib
import io
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import h5py
import numpy as np

from .. import __version__
from ..errors import StoreError, clip
from ..measurements import STEP, TRAIN
from .guard import NoRoomError, OutputLock, check_output_path, make_room, partial_path, signals_deferred, write_failure, write_nowhere
from .layout import _LAYER_DTYPE, AXES_ATTR, FORMAT_VERSION, LayerLike, Status, spec_of
from .reader import RunData, _checkpoint, read_file, run_header

_TRAIN_STEPS = f"{TRAIN}/{STEP}"  # a run has records once this has a row


class Store:
    """An experiment file being written. Create with :meth:`create`, add runs with :meth:`run`.

    With ``force`` an existing file is replaced only once the new one holds its first flush: the
    new file is written under a temporary name and renamed over the old one then.
    """

    def __init__(
        self,
        h5: h5py.File,
        path: Path,
        pending_rename: Path | None,
        created: bool = False,
        made_parent: bool = False,
        keeps: bool = True,
        lock: OutputLock | None = None,
    ) -> None:
        self._h5 = h5
        self._lock = lock  # held from before the first write until the file is closed
        self.failure: str | None = None  # why a write failed: the store writes nothing more
        self._flushed_records = False  # a flush holding records reached the disk
        self.keeps = keeps  # False: records and checkpoints are dropped at the flush (see scratch)
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
        lock = None
        try:
            lock = OutputLock.acquire(path)  # before anything is written; the partial file is ours too
            target = partial_path(path) if path.exists() else path
            make_room(path, 0)
            # locking=False: readers (report on a live run) must not need the writer's lock
            h5 = h5py.File(target, "w" if target != path else "x", locking=False, track_order=True)
        except (OSError, StoreError) as e:  # FileExistsError: another run created it since the check
            if lock is not None:
                lock.release()
            if made_parent and not any(path.parent.iterdir()):
                path.parent.rmdir()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot create {path}: {write_failure(e)}") from e
        store = cls(h5, path, target if target != path else None, created=True, made_parent=made_parent, lock=lock)
        try:
            with store.writing():
                h5.attrs.update(
                    {
                        "format_version": FORMAT_VERSION,
                        "bnprobe_version": __version__,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "torch_version": _torch_version(),
                        "config": config_yaml,
                    }
                )
                h5.flush()  # with force, the old file is replaced at the first flush holding records, not now
        except StoreError:
            store.discard()
            raise
        return store

    @classmethod
    def scratch(cls) -> Store:
        """A store that keeps nothing (records and checkpoints are dropped at each flush; the rest
        lives in memory): what the processes other than rank 0 of a torchrun run write to, so
        that they run rank 0's code and leave no file."""
        h5 = h5py.File(io.BytesIO(), "w", track_order=True)
        h5.attrs["format_version"] = FORMAT_VERSION
        return cls(h5, Path("<memory>"), None, keeps=False)

    @classmethod
    def append_to(cls, path: str | Path, lock: OutputLock | None = None) -> Store:
        """Open an existing bnprobe file to add runs or records (checked first), holding ``lock``
        (taken here when None) until it closes."""
        path = Path(path)
        lock = lock or OutputLock.acquire(path)
        try:
            read_file(path, load=False)
            return cls(h5py.File(path, "r+", locking=False), path, None, lock=lock)
        except OSError as e:
            lock.release()
            raise StoreError(f"cannot open {path} for writing: {e}") from e
        except StoreError:
            lock.release()
            raise

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One write: whole (SIGINT/SIGTERM wait for its end), and, when it fails, the last one:
        h5py reports a failed write as OSError or RuntimeError, which becomes a one-line StoreError."""
        if self.failure is not None:
            raise StoreError(self.failure)
        try:
            with signals_deferred():
                yield
        except (OSError, RuntimeError) as e:
            self.failure = f"cannot write {clip(str(self.path))}: {write_failure(e)}"
            if not isinstance(e, NoRoomError):  # HDF5 met the full disk mid-write: close before it tries again
                self._close_failed()
            raise StoreError(self.failure) from e

    def run(self, name: str, attrs: Mapping[str, Any]) -> RunWriter:
        """The writer for run group ``/runs/<name>``, created with ``attrs`` and status ``running``."""
        if "/" in name or not name:
            raise StoreError(f"invalid run name {name!r}")
        group = self._h5.get(f"runs/{name}")
        if group is None:
            with self.writing():
                runs = self._h5["runs"] if "runs" in self._h5 else self._h5.create_group("runs", track_order=True)
                group = runs.create_group(name, track_order=True)
                group.attrs.update({k: _attr(v) for k, v in attrs.items()})
                group.attrs["status"] = Status.RUNNING.value
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
        return runs is not None and any(_TRAIN_STEPS in g and g[_TRAIN_STEPS].shape[0] > 0 for g in runs.values())

    def flush(self) -> None:
        with self.writing():
            self._h5.flush()
        if self.has_records():
            self._flushed_records = True
            self._commit()

    def _commit(self) -> None:
        if self._pending_rename is not None:
            os.replace(self._pending_rename, self.path)
            self._pending_rename = None

    def close(self) -> None:
        try:
            if self.failure is None and self._h5.id.valid:
                with signals_deferred():  # a second Ctrl-C does not cut the last flush short
                    for writer in self.writers.values():
                        writer.flush()
                    self.flush()
                    self._commit()
                    self._h5.close()
        finally:
            if self._h5.id.valid:  # a write failed, now or before
                self._close_failed()
            self._release()

    def _close_failed(self) -> None:
        """After a failed write: mark the runs still running ``failed`` and close, as far as the
        disk allows (the room kept by :func:`~.guard.make_room` is for this)."""
        try:
            for writer in self.writers.values():
                if writer._group.attrs.get("status") == Status.RUNNING.value:
                    writer._group.attrs.update({"status": Status.FAILED.value, "error": self.failure or ""})
            self._h5.flush()
        except (OSError, RuntimeError):
            # HDF5 keeps what it could not write and tries again at each dataset's release, at the
            # close and at exit, printing tracebacks or crashing the process: those writes go to
            # /dev/null. The file keeps what reached the disk.
            write_nowhere(self._h5.id.get_vfd_handle())
        with contextlib.suppress(OSError, RuntimeError):
            self._h5.close()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def discard(self) -> None:
        """Close and delete the file this store created (an existing file it would replace stays)."""
        with contextlib.suppress(OSError, RuntimeError):  # a file that failed to write may fail to close
            if self._h5.id.valid:
                self._h5.close()
        if self._created:
            (self._pending_rename or self.path).unlink(missing_ok=True)
            self._pending_rename = None
        self._release()
        if self._made_parent and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # A run that fails before its first step (a user error found late, Ctrl-C at start-up, a
        # full disk) leaves no file behind, and with --force the user's old file untouched.
        holds_records = self._flushed_records if self.failure is not None else self.has_records()
        if exc_type is not None and self._created and not holds_records:
            self.discard()
        else:
            self.close()


def _torch_version() -> str:
    import torch  # the writer's torch (already loaded where runs are written); reading never needs it

    return str(torch.__version__)


def _attr(value: Any) -> Any:
    """An HDF5-storable attribute value (None as "", str subclasses and enums as their text)."""
    if value is None:
        return ""
    if isinstance(value, enum.Enum):
        return _attr(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return [str(v) for v in value]
    return value


_Method = TypeVar("_Method", bound=Callable[..., None])


def _write(method: _Method) -> _Method:
    """A method of :class:`RunWriter` that writes: run under :meth:`Store.writing`."""

    @functools.wraps(method)
    def write(self: RunWriter, *args: Any, **kwargs: Any) -> None:
        with self._store.writing():
            method(self, *args, **kwargs)

    return cast(_Method, write)


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
        return str(self._group.name).rsplit("/", 1)[-1]

    @_write
    def set_layers(self, layers: Sequence[LayerLike]) -> None:
        """Write the layers table (name, kind, param_count, output shape, order)."""
        rows = np.array(
            [(lay.name, lay.kind, lay.param_count, "x".join(map(str, lay.output_shape)), lay.order) for lay in layers], dtype=_LAYER_DTYPE
        )
        if "layers" in self._group:
            del self._group["layers"]
        self._group.create_dataset("layers", data=rows)

    @_write
    def set_attrs(self, **attrs: Any) -> None:
        self._group.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def read_back(self, paths: Sequence[str]) -> RunData:
        """The run as flushed so far, with only the datasets ``paths`` (checks made on the records at
        the end of a run, such as its health flags, need a few of them, not every record)."""
        self.flush()
        run = run_header(self.name, self._group)
        for path in paths:
            if path in self._group and isinstance(self._group[path], h5py.Dataset):
                run.data[path] = self._group[path][()]
        return run

    def set_status(self, status: Status | str, **extra: Any) -> None:
        """Set ``status`` (a :class:`Status` or its text), flush, and make it durable."""
        try:
            status = Status(status)
        except ValueError:
            raise ValueError(f"status must be one of {tuple(s.value for s in Status)}") from None
        self.flush()
        self.set_attrs(status=status, **extra)
        self._store.flush()

    @_write
    def write_constant(self, path: str, values: Any, **attrs: Any) -> None:
        """A dataset written once (e.g. ``landscape/eta``), replaced if present."""
        if path in self._group:
            del self._group[path]
        data = np.asarray(values)
        if data.dtype.kind == "U":
            data = data.astype(h5py.string_dtype())
        ds = self._group.create_dataset(path, data=data)
        _label_axes(ds, path)
        ds.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def append(self, section: str, step: int, values: Mapping[str, Any]) -> None:
        """One record at ``step``: ``section/step`` gets the step, ``section/<key>`` each value (any shape)."""
        self._pending[f"{section}/{STEP}"].append(np.asarray(step, dtype=np.int64))
        for key, value in values.items():
            self._pending[f"{section}/{key}"].append(np.asarray(value))

    def has_pending_steps(self) -> bool:
        return bool(self._pending.get(_TRAIN_STEPS))

    def flush(self) -> None:
        """Append buffered records to their datasets and flush the file to disk."""
        if not self._store.keeps:
            self._pending.clear()
            return
        t0 = time.perf_counter()
        with self._store.writing():
            self._append_pending()
        self._pending.clear()
        self._store.flush()
        self.write_seconds += time.perf_counter() - t0

    def _append_pending(self) -> None:
        """Append every buffered block, or none: a write failing half-way is taken back as far as
        the disk allows (the dataset it failed on may keep a record more, which readers leave out:
        :class:`~.reader.Datasets` reads only the records every dataset of a section holds)."""
        blocks = {path: np.stack(rows) for path, rows in self._pending.items()}
        make_room(self._store.path, sum(self._room_for(path, block) for path, block in blocks.items()))
        before = {path: self._group[path].shape[0] for path in blocks if path in self._group}
        try:
            self._append(blocks)
        except BaseException:
            with contextlib.suppress(Exception):
                for path in blocks:
                    if path not in before and path in self._group:
                        del self._group[path]
                    elif path in before:
                        self._group[path].resize(before[path], axis=0)
            raise

    def _append(self, blocks: Mapping[str, np.ndarray]) -> None:
        for path, block in blocks.items():
            if path not in self._group:
                ds = self._group.create_dataset(
                    path, data=block, maxshape=(None, *block.shape[1:]), chunks=(_chunk_rows(block[0]), *block.shape[1:])
                )
                _label_axes(ds, path)
            else:
                ds = self._group[path]
                if ds.shape[1:] != block.shape[1:]:
                    raise StoreError(f"{path}: record shape {block.shape[1:]} does not match {ds.shape[1:]}")
                start = ds.shape[0]
                ds.resize(start + len(block), axis=0)
                ds[start:] = block
            # Written now, where a failure raises: HDF5 would otherwise write the chunks when the
            # dataset is released, where a failure can only be printed.
            ds.flush()

    def _room_for(self, path: str, block: np.ndarray) -> int:
        """Bytes the disk gives ``block`` appended to ``path``: the chunks it starts (HDF5 allocates
        whole ones), and a few for the metadata of each dataset."""
        ds = self._group.get(path)
        start, rows = (0, _chunk_rows(block[0])) if ds is None else (ds.shape[0], ds.chunks[0])
        new_chunks = -(-(start + len(block)) // rows) - -(-start // rows)
        return int(new_chunks * rows * block[0].nbytes) + 4096

    @_write
    def truncate(self, next_step: int) -> None:
        """Drop records at steps >= ``next_step`` (those after the checkpoint a resume starts from)."""
        self.flush()

        def visit(_rel: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and isinstance(obj.get(STEP), h5py.Dataset):
                keep = int(np.searchsorted(obj[STEP][()], next_step))
                for ds in obj.values():
                    if isinstance(ds, h5py.Dataset) and ds.maxshape and ds.maxshape[0] is None:
                        ds.resize(min(keep, ds.shape[0]), axis=0)

        self._group.visititems(visit)
        self._store.flush()

    @_write
    def set_dataset_attrs(self, path: str, **attrs: Any) -> None:
        """Attributes of a recorded dataset (e.g. the BN mode and sample size of ``hessian/top_eigenvalue``)."""
        self.flush()
        if self._store.keeps:
            self._group[path].attrs.update({k: _attr(v) for k, v in attrs.items()})

    @_write
    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Store a ``torch.save`` blob (model, optimizer, RNG states) as ``checkpoint``, with its SHA-256."""
        if not self._store.keeps:
            return
        import torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        blob = buffer.getvalue()
        make_room(self._store.path, len(blob))
        if "checkpoint" in self._group:
            del self._group["checkpoint"]
        ds = self._group.create_dataset("checkpoint", data=np.frombuffer(blob, dtype=np.uint8))
        ds.attrs["step"] = step
        ds.attrs["sha256"] = hashlib.sha256(blob).hexdigest()  # a resume refuses a damaged checkpoint
        self.flush()


def _chunk_rows(row: np.ndarray) -> int:
    """Rows per chunk of a record dataset: about 64 KiB, at most 1024 rows."""
    return max(1, min(1024, (1 << 16) // max(1, row.nbytes)))


def _label_axes(ds: h5py.Dataset, path: str) -> None:
    """Write the axis labels :data:`LAYOUT` gives a new dataset as its ``axes`` attribute."""
    spec = spec_of(path)
    if spec is not None and len(spec.axes) == ds.ndim:
        ds.attrs[AXES_ATTR] = list(spec.axes)

"""The HDF5 writer and reader: the only module that imports h5py, and the one that knows the layout.

One file per experiment, one group per variant under ``/runs`` (DESIGN section 4). :data:`LAYOUT`
is that layout as a table: every dataset of a run, with the label of each of its axes, in the
order readers list them. Records are buffered in memory and appended to resizable, chunked
datasets on :meth:`RunWriter.flush`, followed by an HDF5 flush, so a run killed at any point
leaves a file that opens and holds everything up to the last flush, with the run's ``status``
attribute saying what happened. Each dataset gets its axis labels as an ``axes`` attribute when
it is created; readers take them from :data:`LAYOUT` for files written before that attribute.

Reading needs no torch: ``torch`` is imported only to write the file's ``torch_version`` and to
save or load a checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import enum
import fnmatch
import io
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypedDict

import h5py
import numpy as np

from . import __version__
from .config import layer_patterns
from .errors import ConfigError, StoreError, clip, first_line, usable_path

FORMAT_VERSION = 1


class Status(str, enum.Enum):
    """A run's ``status`` attribute: ``running`` until the run ends in one of the other ways."""

    RUNNING = "running"
    FINISHED = "finished"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    FAILED = "failed"

    def __str__(self) -> str:  # the stored text, in f-strings and str() too
        return self.value


# ----------------------------------------------------------------------------- the layout

TRAIN: Final = "train"
MOMENTS: Final = "moments"
ICS: Final = "ics"
LANDSCAPE: Final = "landscape"
HESSIAN: Final = "hessian"
SPECTRUM: Final = "spectrum"
SECTIONS = (TRAIN, MOMENTS, ICS, LANDSCAPE, HESSIAN, SPECTRUM)
STEP: Final = "step"  # in every record group: the training step of each record (1-D integers)
PER_CHANNEL: Final = "per_channel"  # moments/per_channel/<layer>/<stat>: one group per layer

#: axis labels: ``record`` is always the first axis of a record dataset
RECORD: Final = "record"
LAYER: Final = "layer"
CHANNEL: Final = "channel"
BIN: Final = "bin"
ETA: Final = "eta"
BLOCK: Final = "block"
RANK: Final = "rank"  # the k-th largest eigenvalue
PROBE: Final = "probe"  # a probe vector of stochastic Lanczos quadrature
NODE: Final = "node"  # a node of one probe's Gauss quadrature
AXES_ATTR: Final = "axes"

#: the activation statistics of ``moments`` (bnprobe.probes.moments computes them in this order)
STATS = ("mean", "var", "skewness", "kurtosis", "min", "max", "zero_fraction", "p15", "p50", "p85")
#: the gradient-shift quantities of ``ics`` (bnprobe.probes.ics.ICS fields)
ICS_FIELDS = ("l2", "cosine", "grad_norm", "grad_norm_shifted", "rel_diff")
TRAIN_FIELDS = ("loss", "accuracy", "lr", "seconds")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run group (``path`` relative to it; a glob stands for a family) and the
    label of each of its axes.

    ``text``: strings, the names along an axis (``ics/layer``). ``nan_is_unrecorded``: a record
    series that is NaN throughout was not measured (a regression run's accuracy, an unset lr).
    ``group_axis``: what the dataset's group is named after (per-channel moments: the layer).
    """

    path: str
    axes: tuple[str, ...]
    text: bool = False
    nan_is_unrecorded: bool = False
    group_axis: str = ""

    @property
    def section(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def is_record(self) -> bool:
        """Records (``[record, ...]``) rather than a constant written once (the names or values along an axis)."""
        return self.axes[:1] == (RECORD,)


_PC = f"{MOMENTS}/{PER_CHANNEL}/*"
#: DESIGN section 4 as a table. The first entry a path matches is its entry; within a record
#: group, readers (the export) list datasets in this order, then by name.
LAYOUT: tuple[DatasetSpec, ...] = (
    DatasetSpec(f"*/{STEP}", (RECORD,)),
    *(DatasetSpec(f"{TRAIN}/{q}", (RECORD,), nan_is_unrecorded=True) for q in TRAIN_FIELDS),
    DatasetSpec(f"{TRAIN}/*", (RECORD,), nan_is_unrecorded=True),
    *(DatasetSpec(f"{MOMENTS}/{s}", (RECORD, LAYER)) for s in STATS),
    DatasetSpec(f"{MOMENTS}/histogram", (RECORD, LAYER, BIN)),
    *(DatasetSpec(f"{_PC}/{s}", (RECORD, CHANNEL), group_axis=LAYER) for s in STATS),
    DatasetSpec(f"{_PC}/*", (RECORD, CHANNEL), group_axis=LAYER),
    DatasetSpec(f"{MOMENTS}/*", (RECORD, LAYER)),
    DatasetSpec(f"{ICS}/layer", (LAYER,), text=True),
    *(DatasetSpec(f"{ICS}/{q}", (RECORD, LAYER)) for q in ICS_FIELDS),
    DatasetSpec(f"{ICS}/*", (RECORD, LAYER)),
    DatasetSpec(f"{LANDSCAPE}/eta", (ETA,)),
    DatasetSpec(f"{LANDSCAPE}/loss", (RECORD, ETA)),
    DatasetSpec(f"{LANDSCAPE}/grad_l2", (RECORD, ETA)),
    *(DatasetSpec(f"{LANDSCAPE}/{q}", (RECORD,)) for q in ("beta_smoothness", "loss_at_w", "loss_max", "loss_min")),
    DatasetSpec(f"{LANDSCAPE}/*", (RECORD,)),
    DatasetSpec(f"{HESSIAN}/block", (BLOCK,), text=True),
    *(DatasetSpec(f"{HESSIAN}/{q}", (RECORD,)) for q in ("top_eigenvalue", "iterations", "residual")),
    *(DatasetSpec(f"{HESSIAN}/block_{q}", (RECORD, BLOCK)) for q in ("iterations", "residual", "top_eigenvalue")),
    DatasetSpec(f"{HESSIAN}/converged", (RECORD,)),
    DatasetSpec(f"{HESSIAN}/block_*", (RECORD, BLOCK)),
    DatasetSpec(f"{HESSIAN}/*", (RECORD,)),
    DatasetSpec(f"{SPECTRUM}/block", (BLOCK,), text=True),
    DatasetSpec(f"{SPECTRUM}/top_k", (RECORD, RANK)),
    DatasetSpec(f"{SPECTRUM}/top_k_residual", (RECORD, RANK)),
    *(DatasetSpec(f"{SPECTRUM}/{q}", (RECORD,)) for q in ("trace", "trace_stderr", "iterations", "converged")),
    DatasetSpec(f"{SPECTRUM}/density_nodes", (RECORD, PROBE, NODE)),
    DatasetSpec(f"{SPECTRUM}/density_weights", (RECORD, PROBE, NODE)),
    *(DatasetSpec(f"{SPECTRUM}/block_{q}", (RECORD, BLOCK)) for q in ("top_eigenvalue", "iterations", "residual", "trace", "trace_stderr")),
    DatasetSpec(f"{SPECTRUM}/block_density_nodes", (RECORD, BLOCK, PROBE, NODE)),
    DatasetSpec(f"{SPECTRUM}/block_density_weights", (RECORD, BLOCK, PROBE, NODE)),
    DatasetSpec(f"{SPECTRUM}/block_*", (RECORD, BLOCK)),
    DatasetSpec(f"{SPECTRUM}/*", (RECORD,)),
)
_RANK = {spec: i for i, spec in enumerate(LAYOUT)}
_NAMED = frozenset(s.path for s in LAYOUT if "*" not in s.path)
_PLACEHOLDER = {LAYER: "#{}", BLOCK: "block{}", RANK: "λ{}"}
_FIRST = {RANK: 1}  # λ1 is the largest eigenvalue  # names along an axis that has no (fitting) list of names


def spec_of(path: str) -> DatasetSpec | None:
    """The :data:`LAYOUT` entry of a dataset (``path`` relative to its run), None outside the layout."""
    return next((s for s in LAYOUT if fnmatch.fnmatchcase(path, s.path)), None)


def axes_for(path: str, ndim: int) -> tuple[str, ...] | None:
    """Axis labels of a dataset with ``ndim`` axes by :data:`LAYOUT`; a dataset outside it (another
    section) is records (1-D) or records by channel (2-D). None when the shape does not fit."""
    spec = spec_of(path)
    if spec is not None:
        return spec.axes if len(spec.axes) == ndim else None
    return ((RECORD,), (RECORD, CHANNEL))[ndim - 1] if ndim in (1, 2) else None


def _plural(axes: Sequence[str]) -> str:
    return "[" + ", ".join(f"{a}s" for a in axes) + "]"


class LayerLike(Protocol):
    """A row of the layers table as writers give it (``bnprobe.layers.LayerInfo`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def param_count(self) -> int: ...
    @property
    def output_shape(self) -> Sequence[int]: ...
    @property
    def order(self) -> int: ...


class LayerRow(TypedDict):
    """A row of the layers table as readers get it (``output_shape`` as text: ``"8x16"``)."""

    name: str
    kind: str
    param_count: int
    output_shape: str
    order: int


_LAYER_FIELDS = tuple(LayerRow.__annotations__)
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
        # The temporary name is the longest name written: one too long fails here, before any writing.
        os.stat(partial_path(path), follow_symlinks=False)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        if made_parent:
            path.parent.rmdir()
        raise StoreError(f"cannot write {where}: {getattr(e, 'strerror', None) or e}") from None
    return made_parent


def partial_path(path: Path) -> Path:
    """The temporary name (``.NAME.partial``, beside it) an output is written under before it replaces ``path``."""
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """All or nothing: the block writes the path it is given (a temporary file beside ``out``), which
    then replaces ``out``; on any error the temporary file is removed and ``out`` stays as it was.
    An ``OSError`` becomes a one-line :class:`StoreError`."""
    tmp = partial_path(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


class Store:
    """An experiment file being written. Create with :meth:`create`, add runs with :meth:`run`.

    With ``force`` an existing file is replaced only once the new one holds its first flush: the
    new file is written under a temporary name and renamed over the old one then.
    """

    def __init__(
        self, h5: h5py.File, path: Path, pending_rename: Path | None, created: bool = False, made_parent: bool = False, keeps: bool = True
    ) -> None:
        self._h5 = h5
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
        target = partial_path(path) if path.exists() else path
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
                "torch_version": _torch_version(),
                "config": config_yaml,
            }
        )
        h5.flush()  # with force, the old file is replaced at the first flush holding records, not now
        return cls(h5, path, target if target != path else None, created=True, made_parent=made_parent)

    @classmethod
    def scratch(cls) -> Store:
        """A store that keeps nothing (records and checkpoints are dropped at each flush; the rest
        lives in memory): what the processes other than rank 0 of a torchrun run write to, so
        that they run rank 0's code and leave no file."""
        h5 = h5py.File(io.BytesIO(), "w", track_order=True)
        h5.attrs["format_version"] = FORMAT_VERSION
        return cls(h5, Path("<memory>"), None, keeps=False)

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

    def set_layers(self, layers: Sequence[LayerLike]) -> None:
        """Write the layers table (name, kind, param_count, output shape, order)."""
        rows = np.array(
            [(lay.name, lay.kind, lay.param_count, "x".join(map(str, lay.output_shape)), lay.order) for lay in layers], dtype=_LAYER_DTYPE
        )
        if "layers" in self._group:
            del self._group["layers"]
        self._group.create_dataset("layers", data=rows)

    def set_attrs(self, **attrs: Any) -> None:
        self._group.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def set_status(self, status: Status | str, **extra: Any) -> None:
        """Set ``status`` (a :class:`Status` or its text), flush, and make it durable."""
        try:
            status = Status(status)
        except ValueError:
            raise ValueError(f"status must be one of {tuple(s.value for s in Status)}") from None
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
        _label_axes(ds, path)
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
        if not self._store.keeps:
            self._pending.clear()
            return
        t0 = time.perf_counter()
        for path, rows in self._pending.items():
            block = np.stack(rows)
            if path not in self._group:
                chunk_rows = max(1, min(1024, (1 << 16) // max(1, block[0].nbytes)))
                ds = self._group.create_dataset(path, data=block, maxshape=(None, *block.shape[1:]), chunks=(chunk_rows, *block.shape[1:]))
                _label_axes(ds, path)
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
        if self._store.keeps:
            self._group[path].attrs.update({k: _attr(v) for k, v in attrs.items()})

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Store a ``torch.save`` blob (model, optimizer, RNG states) as ``checkpoint``."""
        if not self._store.keeps:
            return
        import torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        if "checkpoint" in self._group:
            del self._group["checkpoint"]
        ds = self._group.create_dataset("checkpoint", data=np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        ds.attrs["step"] = step
        self.flush()


def _label_axes(ds: h5py.Dataset, path: str) -> None:
    """Write the axis labels :data:`LAYOUT` gives a new dataset as its ``axes`` attribute."""
    spec = spec_of(path)
    if spec is not None and len(spec.axes) == ds.ndim:
        ds.attrs[AXES_ATTR] = list(spec.axes)


# ----------------------------------------------------------------------------- reading


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


def _names_spec(section: str, axis: str) -> DatasetSpec | None:
    """The section's constant holding what is along ``axis`` (``ics/layer``, ``landscape/eta``)."""
    return next((s for s in LAYOUT if s.section == section and s.axes == (axis,)), None)


def _with_axis(section: str, axis: str) -> Iterator[DatasetSpec]:
    """The section's named record datasets that have ``axis``, in :data:`LAYOUT` order."""
    return (s for s in LAYOUT if s.section == section and s.is_record and axis in s.axes and s.path in _NAMED)


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
                layers = [_layer_row(row) for row in group["layers"][()]] if "layers" in group else []
                run = RunData(name, {k: _decode(v) for k, v in group.attrs.items()}, layers)
                if load:
                    _load_datasets(group, run)
                runs[name] = run
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as e:
            # what h5py raises on a damaged file: bad checksums, unreadable objects, garbled types
            detail = str(e.args[0]) if e.args else type(e).__name__  # KeyError's str() adds quotes
            raise StoreError(f"{path} is damaged and cannot be read: {detail.splitlines()[0][:160]}") from e
    return FileData(path, attrs, runs)


def _layer_row(row: np.void) -> LayerRow:
    return LayerRow(
        name=str(_decode(row["name"])),
        kind=str(_decode(row["kind"])),
        param_count=int(row["param_count"]),
        output_shape=str(_decode(row["output_shape"])),
        order=int(row["order"]),
    )


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


def _checkpoint(h5: h5py.File, path: Path, run: str) -> tuple[dict[str, Any], int]:
    group = h5.get(f"runs/{run}")
    if group is None:
        raise StoreError(f"{path} has no run {run!r}")
    if "checkpoint" not in group:
        raise StoreError(f"run {run!r} in {path} has no checkpoint")
    import torch  # only checkpoints need it: reading records does not

    try:
        blob = group["checkpoint"][()].tobytes()
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
        from .errors import DataError

        raise DataError(f"{path} is not a readable HDF5 file") from e


# ----------------------------------------------------------------------------- runs as columns


@dataclass
class Column:
    """One run of one file: a column of the side-by-side tables and figures."""

    label: str
    path: Path
    run: RunData


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the globs ``patterns`` (all names do when there are none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def listing(values: Iterable[str], limit: int = 12) -> str:
    """Names for a "choose from" hint: the first ``limit`` of them, and how many there are in all."""
    values = list(dict.fromkeys(values))
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "") if values else "(none)"


def load_columns(paths: Sequence[str | Path], variant: str | None = None) -> tuple[list[FileData], list[Column]]:
    """Read ``paths`` and pick the runs ``variant`` names (comma-separated names or globs).

    Columns are labelled by variant, prefixed with the file's stem (or more of its path, where
    stems repeat) when several files are read.
    Raises :class:`ConfigError` when ``variant`` matches no run in any file.
    """
    files = [read_file(p) for p in paths]
    patterns = layer_patterns(variant) if variant else ()
    all_names = [name for f in files for name in f.runs]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    if unknown:
        raise ConfigError(f"no variant {unknown[0]!r} in {_file_list(files)}; choose from {listing(all_names)}")
    prefixes = _file_labels([f.path for f in files])
    columns = [
        Column(f"{prefix}:{name}" if len(files) > 1 else name, f.path, run)
        for f, prefix in zip(files, prefixes)
        for name, run in f.runs.items()
        if matches(name, patterns)
    ]
    return files, columns


def _file_labels(paths: Sequence[Path]) -> list[str]:
    """Each file's stem; where stems repeat (``a/run.h5``, ``b/run.h5``), as many parent folders
    as it takes to tell them apart, and a position number when even the full paths agree."""
    parts = [p.resolve().with_suffix("").parts for p in paths]
    for depth in range(1, max(len(q) for q in parts) + 1):
        labels = ["/".join(q[-depth:]) for q in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i + 1}" for i, label in enumerate(p.stem for p in paths)]


def _file_list(files: Sequence[FileData]) -> str:
    return ", ".join(str(f.path) for f in files) or "the given files"


def strings(values: Any) -> list[str]:
    """A stored string array (bytes, str or object) as a list of ``str``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1).tolist()]


def moment_layers(run: RunData) -> list[str]:
    """Names of the columns of the ``moments`` records: the layers table, in order."""
    return run.labels(MOMENTS, LAYER)


def ics_layers(run: RunData) -> list[str]:
    """Names of the columns of the ``ics`` records (its own list, else the layers table)."""
    return run.labels(ICS, LAYER)


def hessian_blocks(run: RunData) -> list[str]:
    """Names of the columns of the per-block ``hessian`` records."""
    return run.labels(HESSIAN, BLOCK)


def layer_kinds(run: RunData) -> dict[str, str]:
    return {lay["name"]: str(lay["kind"]) for lay in run.layers}

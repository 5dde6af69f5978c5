"""The layout of a bnprobe file, as a table both the writer and the reader follow.

One file per experiment, one group per variant under ``/runs``, one group per section (``train``,
``moments``, ...) in a run. :data:`LAYOUT` lists every dataset of a run with the label of each of
its axes, in the order readers list them; a run's ``status`` attribute is a :class:`Status`.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypedDict

import h5py
import numpy as np

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


TRAIN: Final = "train"
MOMENTS: Final = "moments"
ICS: Final = "ics"
LANDSCAPE: Final = "landscape"
HESSIAN: Final = "hessian"
SPECTRUM: Final = "spectrum"
HELDOUT: Final = "heldout"
SECTIONS = (TRAIN, HELDOUT, MOMENTS, ICS, LANDSCAPE, HESSIAN, SPECTRUM)
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
#: The layout as a table. The first entry a path matches is its entry; within a record group,
#: readers (the export) list datasets in this order, then by name.
LAYOUT: tuple[DatasetSpec, ...] = (
    DatasetSpec(f"*/{STEP}", (RECORD,)),
    *(DatasetSpec(f"{TRAIN}/{q}", (RECORD,), nan_is_unrecorded=True) for q in TRAIN_FIELDS),
    *(DatasetSpec(f"{HELDOUT}/{q}", (RECORD,), nan_is_unrecorded=True) for q in ("loss", "accuracy")),
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
#: names along an axis that has no (fitting) list of names, numbered from _FIRST (λ1 is the largest eigenvalue)
_PLACEHOLDER = {LAYER: "#{}", BLOCK: "block{}", RANK: "λ{}"}
_FIRST = {RANK: 1}


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


def _names_spec(section: str, axis: str) -> DatasetSpec | None:
    """The section's constant holding what is along ``axis`` (``ics/layer``, ``landscape/eta``)."""
    return next((s for s in LAYOUT if s.section == section and s.axes == (axis,)), None)


def _with_axis(section: str, axis: str) -> Iterator[DatasetSpec]:
    """The section's named record datasets that have ``axis``, in :data:`LAYOUT` order."""
    return (s for s in LAYOUT if s.section == section and s.is_record and axis in s.axes and s.path in _NAMED)


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

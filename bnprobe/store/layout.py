"""The layout of a bnprobe file, as a table both the writer and the reader follow.

One file per experiment, one group per variant under ``/runs``, one group per section (``train``,
``moments``, ...) in a run. :data:`LAYOUT` lists every dataset of a run with the label of each of
its axes, in the order readers list them, gathered from :data:`bnprobe.measurements.MEASUREMENTS`;
a run's ``status`` attribute is a :class:`Status`.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Final, Protocol, TypedDict

import h5py
import numpy as np

from ..measurements import (
    BLOCK,
    CHANNEL,
    LAYER,
    MEASUREMENTS,
    RANK,
    RECORD,
    STEP,
    DatasetSpec,
)

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


AXES_ATTR: Final = "axes"

#: The layout as a table: every dataset of every measurement (first the step axis every record group
#: has). The first entry a path matches is its entry; within a record group, readers (the export)
#: list datasets in this order, then by name.
LAYOUT: tuple[DatasetSpec, ...] = (DatasetSpec(f"*/{STEP}", (RECORD,)), *(spec for m in MEASUREMENTS for spec in m.layout))
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

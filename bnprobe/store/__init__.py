"""The HDF5 writer and reader: the only package that imports h5py, and the one that knows the layout.

:mod:`.layout` is the layout as a table, :mod:`.writer` writes files, :mod:`.reader` reads them
back, :mod:`.scan` reduces their records a slice at a time, :mod:`.columns` puts the runs of several
files side by side. Everything else imports from here. Reading needs no torch: it is imported
only to write the file's ``torch_version`` and to save or load a checkpoint.
"""

from __future__ import annotations

from ..measurements import (
    BIN,
    BLOCK,
    CHANNEL,
    ETA,
    HELDOUT,
    HESSIAN,
    ICS,
    ICS_FIELDS,
    LANDSCAPE,
    LAYER,
    MOMENTS,
    NODE,
    PER_CHANNEL,
    PROBE,
    RANK,
    RECORD,
    SECTIONS,
    SPECTRUM,
    STATS,
    STEP,
    TRAIN,
    TRAIN_FIELDS,
    DatasetSpec,
)
from .columns import Column, hessian_block_labels, ics_layers, layer_kinds, listing, load_columns, matches, moment_layers
from .guard import OutputLock, atomic_output, check_output_path, partial_path, signals_deferred
from .layout import AXES_ATTR, FORMAT_VERSION, LAYOUT, LayerLike, LayerRow, Status, axes_for, spec_of
from .reader import FileData, Recorded, RunData, load_checkpoint, read_arrays, read_file, saved_checkpoint, strings
from .scan import (
    Binned,
    aligned_slices,
    bin_sizes,
    binned,
    column_medians,
    extremes,
    record_at,
    record_count,
    record_ranges,
)
from .writer import RunWriter, Store

#: the old name of :func:`hessian_block_labels`, kept for callers
hessian_blocks = hessian_block_labels

__all__ = [
    "AXES_ATTR",
    "BIN",
    "BLOCK",
    "CHANNEL",
    "ETA",
    "FORMAT_VERSION",
    "HELDOUT",
    "HESSIAN",
    "ICS",
    "ICS_FIELDS",
    "LANDSCAPE",
    "LAYER",
    "LAYOUT",
    "MOMENTS",
    "NODE",
    "PER_CHANNEL",
    "PROBE",
    "RANK",
    "RECORD",
    "SECTIONS",
    "SPECTRUM",
    "STATS",
    "STEP",
    "TRAIN",
    "TRAIN_FIELDS",
    "Binned",
    "Column",
    "DatasetSpec",
    "FileData",
    "LayerLike",
    "LayerRow",
    "OutputLock",
    "Recorded",
    "RunData",
    "RunWriter",
    "Status",
    "Store",
    "aligned_slices",
    "atomic_output",
    "axes_for",
    "bin_sizes",
    "binned",
    "check_output_path",
    "column_medians",
    "extremes",
    "hessian_block_labels",
    "hessian_blocks",
    "ics_layers",
    "layer_kinds",
    "listing",
    "load_checkpoint",
    "load_columns",
    "matches",
    "moment_layers",
    "partial_path",
    "read_arrays",
    "read_file",
    "record_at",
    "record_count",
    "record_ranges",
    "saved_checkpoint",
    "signals_deferred",
    "spec_of",
    "strings",
]

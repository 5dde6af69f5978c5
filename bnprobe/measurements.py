"""Every measurement a run can record, in one table: what the file, config, report and plot know of it.

A measurement is its compute module (a probe factory in :mod:`bnprobe.probes`, named here by import
path so this table stays free of torch), its config section (a dataclass of
:mod:`bnprobe.probe_config`) and one :class:`Measurement` entry below: the datasets it writes and
their axes, what the report and plot call it and how a user records it. The store's layout, the
probe registry, the report's "not recorded" hints and section titles, and the plot kinds are all
read from :data:`MEASUREMENTS`, and so are the report's sections and the quantities findings
compare (one module each in :mod:`bnprobe.report.sections` and :mod:`bnprobe.quantities`, named here
by import path too); a test checks that every entry is complete.

The order of :data:`MEASUREMENTS` is the order sections are listed in a file, a report and an
export, and the order probes run at a step (the one that performs the optimizer step runs last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .probe_config import HeldoutConfig, HessianConfig, IcsConfig, LandscapeConfig, MomentsConfig, SpectrumConfig

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

STEP: Final = "step"  # in every record group: the training step of each record (1-D integers)
PER_CHANNEL: Final = "per_channel"  # moments/per_channel/<layer>/<stat>: one group per layer

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


@dataclass(frozen=True)
class Measurement:
    """One section of a run: its datasets, how it is computed and configured, how users see it.

    ``layout``: its datasets, in the order readers list them (the first entry a path matches is
    its entry, so a family's glob comes after its named members). ``probe``: ``"module:function"``
    of the factory that builds its probe from a config; empty where the trainer or the Recorder
    records it. ``config``: its section of ``cfg.probes``, if it has one. ``title``: the report's
    heading; ``what``: the noun in "no ... recorded"; ``hint``: how to record it. ``report``: the
    module of its table in ``bnprobe report`` (a ``build`` and a ``draw``, see
    :mod:`bnprobe.report.sections`), empty where the runs' summary shows it. ``findings``: the
    module of the quantities it contributes to a comparison of runs with and without BN (see
    :mod:`bnprobe.quantities`), if any. ``plot``: the ``bnprobe plot --kind`` that draws it, if any.
    """

    name: str
    title: str
    what: str
    hint: str
    layout: tuple[DatasetSpec, ...]
    probe: str = ""
    config: type | None = None
    report: str = ""
    findings: str = ""
    plot: str = ""


def _records(section: str, names: tuple[str, ...], axes: tuple[str, ...] = (), nan_is_unrecorded: bool = False) -> tuple[DatasetSpec, ...]:
    """Record datasets ``section/name`` for each name: a record axis, then ``axes``."""
    return tuple(DatasetSpec(f"{section}/{name}", (RECORD, *axes), nan_is_unrecorded=nan_is_unrecorded) for name in names)


TRAIN: Final = "train"
MOMENTS: Final = "moments"
ICS: Final = "ics"
LANDSCAPE: Final = "landscape"
HESSIAN: Final = "hessian"
SPECTRUM: Final = "spectrum"
HELDOUT: Final = "heldout"

_PC = f"{MOMENTS}/{PER_CHANNEL}/*"
_BLOCK_RECORDS = ("top_eigenvalue", "iterations", "residual")

MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement(
        TRAIN,
        "Training",
        "training records",
        "run bnprobe train",
        (*_records(TRAIN, (*TRAIN_FIELDS, "*"), nan_is_unrecorded=True),),
        plot="training",
    ),
    Measurement(
        HELDOUT,
        "Held-out loss and accuracy",
        "held-out records",
        "train on data with a held-out split (synthetic:shapes); probes.heldout.enabled",
        _records(HELDOUT, ("loss", "accuracy"), nan_is_unrecorded=True),
        probe="bnprobe.probes.heldout:probe_from_config",
        config=HeldoutConfig,
    ),
    Measurement(
        MOMENTS,
        "Activation moments",
        "moments",
        "run bnprobe train; moments are recorded every probes.moments.every steps",
        (
            *_records(MOMENTS, STATS, (LAYER,)),
            DatasetSpec(f"{MOMENTS}/histogram", (RECORD, LAYER, BIN)),
            *(DatasetSpec(f"{_PC}/{s}", (RECORD, CHANNEL), group_axis=LAYER) for s in (*STATS, "*")),
            DatasetSpec(f"{MOMENTS}/*", (RECORD, LAYER)),
        ),
        config=MomentsConfig,
        report="bnprobe.report.sections.moments",
        findings="bnprobe.quantities.moments",
        plot="moments",
    ),
    Measurement(
        ICS,
        "Gradient-shift ICS",
        "ICS",
        "run bnprobe measure-ics, or set probes.ics.every",
        (DatasetSpec(f"{ICS}/layer", (LAYER,), text=True), *_records(ICS, (*ICS_FIELDS, "*"), (LAYER,))),
        probe="bnprobe.probes.ics:probe_from_config",
        config=IcsConfig,
        report="bnprobe.report.sections.ics",
        findings="bnprobe.quantities.ics",
        plot="ics",
    ),
    Measurement(
        LANDSCAPE,
        "Loss landscape",
        "landscape",
        "run bnprobe measure-ics with probes.landscape.enabled: true",
        (
            DatasetSpec(f"{LANDSCAPE}/eta", (ETA,)),
            *_records(LANDSCAPE, ("loss", "grad_l2"), (ETA,)),
            *_records(LANDSCAPE, ("beta_smoothness", "loss_at_w", "loss_max", "loss_min", "*")),
        ),
        probe="bnprobe.probes.landscape:probe_from_config",
        config=LandscapeConfig,
        report="bnprobe.report.sections.landscape",
        findings="bnprobe.quantities.landscape",
        plot="landscape",
    ),
    Measurement(
        HESSIAN,
        "Top Hessian eigenvalue",
        "Hessian eigenvalue",
        "set probes.hessian.enabled: true",
        (
            DatasetSpec(f"{HESSIAN}/block", (BLOCK,), text=True),
            *_records(HESSIAN, _BLOCK_RECORDS),
            *_records(HESSIAN, tuple(f"block_{q}" for q in ("iterations", "residual", "top_eigenvalue")), (BLOCK,)),
            *_records(HESSIAN, ("converged",)),
            *_records(HESSIAN, ("block_*",), (BLOCK,)),
            *_records(HESSIAN, ("*",)),
        ),
        probe="bnprobe.probes.hessian:probe_from_config",
        config=HessianConfig,
        report="bnprobe.report.sections.hessian",
    ),
    Measurement(
        SPECTRUM,
        "Hessian spectrum",
        "Hessian spectrum",
        "set probes.spectrum.enabled: true",
        (
            DatasetSpec(f"{SPECTRUM}/block", (BLOCK,), text=True),
            *_records(SPECTRUM, ("top_k", "top_k_residual"), (RANK,)),
            *_records(SPECTRUM, ("trace", "trace_stderr", "iterations", "converged")),
            *_records(SPECTRUM, ("density_nodes", "density_weights"), (PROBE, NODE)),
            *_records(SPECTRUM, tuple(f"block_{q}" for q in (*_BLOCK_RECORDS, "trace", "trace_stderr")), (BLOCK,)),
            *_records(SPECTRUM, ("block_density_nodes", "block_density_weights"), (BLOCK, PROBE, NODE)),
            *_records(SPECTRUM, ("block_*",), (BLOCK,)),
            *_records(SPECTRUM, ("*",)),
        ),
        probe="bnprobe.probes.spectrum:probe_from_config",
        config=SpectrumConfig,
        report="bnprobe.report.sections.spectrum",
        findings="bnprobe.quantities.spectrum",
        plot="hessian",
    ),
)

#: the measurements by name (a run group's sections)
BY_NAME: Final = {m.name: m for m in MEASUREMENTS}
SECTIONS = tuple(BY_NAME)
#: ``bnprobe plot --kind`` -> the measurement it draws
PLOT_KINDS: Final = {m.plot: m for m in MEASUREMENTS if m.plot}

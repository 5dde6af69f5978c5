"""The ``probes`` section of a config: which layers are probed, and one sub-section per probe.

Each probe's section is a small frozen dataclass that checks its own values when built. They live
here, not in the probe modules, because those import torch, while loading or printing a config
must not. :data:`bnprobe.measurements.MEASUREMENTS` names each section beside its probe's factory
and datasets: a new probe is its module, its section class plus one field of :class:`ProbeConfig`
here, and one entry there.

Schedules: a probe's ``every: 0`` means "as often as the probe it ``FOLLOWS``" (the Hessian and
the landscape follow ICS, the spectrum follows the Hessian, and ICS, when it is off, the moments).
:func:`resolve_schedules` turns that into the interval that runs, once, while a config is loaded,
so a printed or stored config shows the real schedule and a probe reads ``cfg.probes.X.every``.

Configs of older versions spelled these keys flat (``probes.hessian_tol``, ``probes.landscape:
true``); :func:`moved_into_sections` reads them into their sections (:data:`RENAMED`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError, shown


class LayerKind(str, enum.Enum):
    """What ``probes.kinds`` may name: the classes of :func:`bnprobe.layers.layer_kind`."""

    CONV = "conv"
    LINEAR = "linear"
    NORM = "norm"
    OTHER = "other"


LAYER_KINDS = tuple(kind.value for kind in LayerKind)  # ``probes.kinds`` holds these plain strings (messages show them as such)


class IcsMethod(str, enum.Enum):
    """How :func:`bnprobe.probes.ics.gradient_shift` computes ``G'``: ``fast`` (shared prefixes, backward
    wrt one layer) or ``naive`` (the reference); both give the same numbers."""

    FAST = "fast"
    NAIVE = "naive"


class HessianBnMode(str, enum.Enum):
    """How norm layers run in the Hessian's passes: ``train`` (batch statistics, the function training
    sees; running statistics stay still) or ``eval`` (running statistics, PyHessian's choice)."""

    TRAIN = "train"
    EVAL = "eval"


def layer_patterns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Layer (or variant) globs as one tuple, however they were given: ``None`` is every layer,
    a string may hold several comma-separated globs (``"fc*,conv1"``), a sequence is taken as is."""
    if value is None:
        return ("*",)
    items = value.split(",") if isinstance(value, str) else value
    return tuple(p.strip() for p in items if p.strip())


def _check(*checks: tuple[bool, str]) -> None:
    """Raise the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass(frozen=True)
class MomentsConfig:
    """Activation moments, recorded by the trainer's hooks on the training forward itself."""

    FOLLOWS: ClassVar[str | None] = None
    MAX_HISTOGRAM_BINS: ClassVar[int] = 10_000  # records x layers x bins floats are buffered until a flush

    every: int = 10
    per_channel: bool = False
    histogram_bins: int = 0
    histogram_range: tuple[float, float] = (-10.0, 10.0)
    percentile_samples: int = 16384
    compiled: bool = False

    def __post_init__(self) -> None:
        _check(
            (self.every > 0, "probes.moments.every must be at least 1"),
            (self.histogram_bins >= 0, "probes.moments.histogram_bins must be >= 0"),
            (self.histogram_bins <= self.MAX_HISTOGRAM_BINS, f"probes.moments.histogram_bins must be at most {self.MAX_HISTOGRAM_BINS}"),
            (self.histogram_range[0] < self.histogram_range[1], "probes.moments.histogram_range must be (low, high) with low < high"),
            (self.percentile_samples > 0, "probes.moments.percentile_samples must be at least 1"),
        )


@dataclass(frozen=True)
class IcsConfig:
    """Gradient-shift ICS; ``every: 0`` is off (``measure-ics`` turns it on)."""

    FOLLOWS: ClassVar[str | None] = "moments"  # only as a link: the Hessian follows ICS, and the moments when ICS is off

    every: int = 0
    method: IcsMethod = IcsMethod.FAST

    def __post_init__(self) -> None:
        _check((self.every >= 0, "probes.ics.every must be >= 0 (0: off)"))


@dataclass(frozen=True)
class LandscapeConfig:
    """The loss landscape along the gradient; ``etas`` are multiples of the learning rate (empty: the paper's grid)."""

    FOLLOWS: ClassVar[str | None] = "ics"

    enabled: bool = False
    every: int = 0
    etas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check(
            (self.every >= 0, "probes.landscape.every must be >= 0 (0: with probes.ics.every, else probes.moments.every)"),
            (all(e > 0 for e in self.etas), "probes.landscape.etas must all be positive"),
        )


@dataclass(frozen=True)
class HessianConfig:
    """The top Hessian eigenvalue; ``bn_mode`` is how BN runs in the Hessian's and the spectrum's passes."""

    FOLLOWS: ClassVar[str | None] = "ics"

    enabled: bool = False
    every: int = 0
    tol: float = 1e-3
    max_iter: int = 100
    blocks: bool = False
    bn_mode: HessianBnMode = HessianBnMode.TRAIN

    def __post_init__(self) -> None:
        _check(
            (self.every >= 0, "probes.hessian.every must be >= 0 (0: with probes.ics.every, else probes.moments.every)"),
            (self.tol > 0, "probes.hessian.tol must be positive"),
            (self.max_iter > 0, "probes.hessian.max_iter must be at least 1"),
        )


@dataclass(frozen=True)
class SpectrumConfig:
    """The Hessian's top-k eigenvalues, trace and eigenvalue density (BN as ``probes.hessian.bn_mode``)."""

    FOLLOWS: ClassVar[str | None] = "hessian"

    enabled: bool = False
    every: int = 0
    k: int = 1
    tol: float = 1e-3
    max_iter: int = 100
    trace_samples: int = 20
    density_probes: int = 1
    density_steps: int = 90
    blocks: bool = False
    block_density: bool = False

    def __post_init__(self) -> None:
        _check(
            (self.every >= 0, "probes.spectrum.every must be >= 0 (0: with probes.hessian.every, else ics's, else the moments')"),
            (self.k >= 1, "probes.spectrum.k must be at least 1"),
            (self.tol > 0, "probes.spectrum.tol must be positive"),
            (self.max_iter >= self.k, "probes.spectrum.max_iter must be at least probes.spectrum.k"),
            (
                self.trace_samples != 1 and self.trace_samples >= 0,
                "probes.spectrum.trace_samples must be 0 (off) or at least 2 (for its standard error)",
            ),
            (self.density_probes >= 0, "probes.spectrum.density_probes must be >= 0 (0: off)"),
            (self.density_steps >= 1, "probes.spectrum.density_steps must be at least 1"),
            (
                not self.block_density or (self.blocks and self.density_probes > 0),
                "probes.spectrum.block_density needs probes.spectrum.blocks: true and probes.spectrum.density_probes >= 1",
            ),
        )


@dataclass(frozen=True)
class HeldoutConfig:
    """Loss and accuracy on the data's held-out split, in eval mode (where the data has one)."""

    FOLLOWS: ClassVar[str | None] = "moments"

    enabled: bool = True
    every: int = 0
    batch_size: int = 512

    def __post_init__(self) -> None:
        _check(
            (self.every >= 0, "probes.heldout.every must be >= 0 (0: with probes.moments.every)"),
            (self.batch_size > 0, "probes.heldout.batch_size must be at least 1"),
        )


@dataclass(frozen=True)
class ProbeConfig:
    """What is measured and how often: the layers every probe looks at, then one section per probe."""

    layers: tuple[str, ...] = ("*",)
    kinds: tuple[str, ...] = ()
    moments: MomentsConfig = field(default_factory=MomentsConfig)
    ics: IcsConfig = field(default_factory=IcsConfig)
    landscape: LandscapeConfig = field(default_factory=LandscapeConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in LAYER_KINDS]
        if unknown:
            raise ConfigError(f"probes.kinds: unknown layer kind {shown(unknown[0])}; choose from {', '.join(LAYER_KINDS)}")


SECTIONS = tuple(f.name for f in dataclasses.fields(ProbeConfig) if f.name not in ("layers", "kinds"))  # one per probe


def _interval(probes: ProbeConfig, name: str) -> int:
    """The interval section ``name`` stands for: its own ``every``, else that of the section it follows."""
    section = getattr(probes, name)
    follows = type(section).FOLLOWS
    return int(section.every) or (_interval(probes, follows) if follows else 0)


def resolve_schedules(probes: ProbeConfig, ics_every: int = 0) -> ProbeConfig:
    """``probes`` with every enabled probe's ``every: 0`` replaced by the interval it runs at; ICS,
    when off, at ``ics_every`` (``measure-ics`` measures it) before the others follow it."""
    if not probes.ics.every and ics_every:
        probes = dataclasses.replace(probes, ics=dataclasses.replace(probes.ics, every=ics_every))
    due = {
        name: dataclasses.replace(section, every=_interval(probes, name))
        for name in SECTIONS
        if getattr(section := getattr(probes, name), "enabled", False) and not section.every
    }
    return dataclasses.replace(probes, **due)


# ----------------------------------------------------------------------------- the flat keys of older configs

#: an older flat key under ``probes`` -> where it is now (under ``probes``)
RENAMED = {
    "record_every": "moments.every",
    "per_channel": "moments.per_channel",
    "histogram_bins": "moments.histogram_bins",
    "histogram_range": "moments.histogram_range",
    "percentile_samples": "moments.percentile_samples",
    "compiled_moments": "moments.compiled",
    "ics_every": "ics.every",
    "landscape_every": "landscape.every",
    "etas": "landscape.etas",
    **{f"hessian_{key}": f"hessian.{key}" for key in ("every", "tol", "max_iter", "blocks", "bn_mode")},
    **{
        f"spectrum_{key}": f"spectrum.{key}"
        for key in ("every", "k", "tol", "max_iter", "trace_samples", "density_probes", "density_steps", "blocks", "block_density")
    },
}
_SWITCHES = ("landscape", "hessian", "spectrum")  # ``probes.hessian: true`` is now ``probes.hessian.enabled: true``


def renamed(key: str, value: Any) -> str | None:
    """Where an older flat key under ``probes`` is now (``hessian_tol`` -> ``hessian.tol``); None for a current key."""
    if key in _SWITCHES and isinstance(value, bool):
        return f"{key}.enabled"
    return RENAMED.get(key)


def moved_into_sections(probes: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``probes`` with older flat keys moved into their sections, and the (old, new) keys moved."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in probes.items() if renamed(key, value) is None}
    moved: list[tuple[str, str]] = []
    for key, value in probes.items():
        new = renamed(key, value)
        if new is None:
            continue
        section, name = new.split(".")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"probes.{section}: expected a mapping of keys to values, got {shown(target)}")
        if name in target:
            raise ConfigError(f"probes.{key} and probes.{new} both given; keep probes.{new}")
        target[name] = value
        moved.append((f"probes.{key}", f"probes.{new}"))
    return out, moved

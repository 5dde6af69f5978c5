"""Probes run on a schedule by the trainer; the registry below is the only list of them.

Moments flow through the :class:`~bnprobe.Recorder`'s hooks on the training forward itself. The
probes here need extra passes on the current batch (:mod:`bnprobe.passes`: they leave no trace),
run in registry order, and the one that ``performs_step`` (ICS) runs last, so the others measure
at the weights before the step.

:data:`REGISTRY` is gathered from :data:`bnprobe.measurements.MEASUREMENTS`, which names each
probe's factory by import path beside its config section (``cfg.probes.<name>``, a dataclass of
:mod:`bnprobe.probe_config`, free of torch so that configs load without it), its datasets and how
the report and plot show it. A new probe is one module here (its factory, its records), its
config section and one :class:`~bnprobe.measurements.Measurement` entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, cast

from ..config import Config
from ..errors import ConfigError
from ..measurements import MEASUREMENTS
from ..store import RunWriter
from .base import Probe, ProbeFactory, StepBatch, every

__all__ = [
    "REGISTRY",
    "Probe",
    "ProbeFactory",
    "Registered",
    "StepBatch",
    "every",
    "load_probe_states",
    "probe_states",
    "scheduled_probes",
    "start",
    "track",
]


@dataclass(frozen=True)
class Registered:
    """A probe as the trainer knows it: how to build it, and the config section it reads."""

    factory: ProbeFactory
    section: type  # the dataclass of ``cfg.probes.<name>``


def _factory(path: str) -> ProbeFactory:
    """The factory ``"module:function"`` names."""
    module, _, name = path.partition(":")
    return cast(ProbeFactory, getattr(importlib.import_module(module), name))


REGISTRY: dict[str, Registered] = {m.name: Registered(_factory(m.probe), m.config) for m in MEASUREMENTS if m.probe and m.config}


def scheduled_probes(cfg: Config, layer_names: list[str]) -> list[Probe]:
    """The probes ``cfg`` asks for, in the order they run at a step (the step-performing one last)."""
    probes = [p for entry in REGISTRY.values() if (p := entry.factory(cfg, layer_names)) is not None]
    stepping = [p.name for p in probes if p.performs_step]
    if len(stepping) > 1:
        raise ConfigError(f"probes {', '.join(stepping)} each perform the optimizer step; enable one of them")
    return sorted(probes, key=lambda p: p.performs_step)


def start(probes: list[Probe], writer: RunWriter) -> None:
    """Write each probe's constants (the axes its records are laid out along)."""
    for probe in probes:
        for key, values in probe.constants.items():
            writer.write_constant(f"{probe.name}/{key}", values)


def track(probe: Probe, batch: StepBatch, writer: RunWriter) -> None:
    """If ``probe`` is due at this step, compute it and append its record to its section."""
    if not probe.due(batch.step):
        return
    record = probe.compute(batch)
    if not record:  # nothing to measure here (no held-out split): no record, no section
        return
    writer.append(probe.name, batch.step, record)
    for path, attrs in probe.dataset_attrs.items():
        writer.set_dataset_attrs(path, **attrs)


def probe_states(probes: list[Probe]) -> dict[str, Any]:
    """What a resumed run needs to measure exactly as an uninterrupted one (the Hessian's warm starts)."""
    return {p.name: state for p in probes if (state := p.state_dict())}


def load_probe_states(probes: list[Probe], states: dict[str, Any]) -> None:
    for p in probes:
        if p.name in states:
            p.load_state_dict(states[p.name])

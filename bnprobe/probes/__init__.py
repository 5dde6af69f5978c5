"""Probes run on a schedule by the trainer; the registry below is the only list of them.

Moments flow through the :class:`~bnprobe.Recorder`'s hooks on the training forward itself. The
probes here need extra passes on the current batch (:mod:`bnprobe.passes`: they leave no trace),
run in registry order, and the one that ``performs_step`` (ICS) runs last, so the others measure
at the weights before the step. A new probe is one module with a factory plus one line here.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..store import RunWriter
from . import hessian, ics, landscape, spectrum
from .base import Probe, ProbeFactory, StepBatch, every

__all__ = [
    "REGISTRY",
    "Probe",
    "ProbeFactory",
    "StepBatch",
    "every",
    "load_probe_states",
    "probe_states",
    "scheduled_probes",
    "start",
    "track",
]

REGISTRY: dict[str, ProbeFactory] = {
    "landscape": landscape.probe_from_config,
    "hessian": hessian.probe_from_config,
    "spectrum": spectrum.probe_from_config,
    "ics": ics.probe_from_config,
}


def scheduled_probes(cfg: Config, layer_names: list[str]) -> list[Probe]:
    """The probes ``cfg`` asks for, in the order they run at a step (the step-performing one last)."""
    probes = [p for factory in REGISTRY.values() if (p := factory(cfg, layer_names)) is not None]
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
    writer.append(probe.name, batch.step, probe.compute(batch))
    for path, attrs in probe.dataset_attrs.items():
        writer.set_dataset_attrs(path, **attrs)


def probe_states(probes: list[Probe]) -> dict[str, Any]:
    """What a resumed run needs to measure exactly as an uninterrupted one (the Hessian's warm starts)."""
    return {p.name: state for p in probes if (state := p.state_dict())}


def load_probe_states(probes: list[Probe], states: dict[str, Any]) -> None:
    for p in probes:
        if p.name in states:
            p.load_state_dict(states[p.name])

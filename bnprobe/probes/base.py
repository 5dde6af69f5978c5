"""The probe protocol (cockpit's quantity/schedule split): what the trainer knows of a probe.

A probe has a ``name`` (also its section in the run's file), a schedule ``due(step)``, says what
it needs (``performs_step``: it does the real optimizer step itself, as ICS must), keeps state a
resumed run needs (``state_dict``), and ``compute``s one record of numbers at a due step. The
trainer writes what it returns; a probe never touches the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config

Schedule = Callable[[int], bool]
Record = dict[str, Any]  # quantity -> numpy array or scalar, one record of a section


def every(interval: int) -> Schedule:
    """A schedule: steps 0, interval, 2*interval, ...; never when interval is 0."""
    return lambda step: interval > 0 and step % interval == 0


@dataclass
class StepBatch:
    """One training step as a probe sees it (and the held-out split, where the data has one). The
    probe that performs the step sets ``loss`` and ``output`` (detached); when none does, the
    trainer takes a plain step and sets them."""

    step: int
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    x: Any
    y: Any
    optimizer: torch.optim.Optimizer
    loss: torch.Tensor | None = None
    output: Any = None
    heldout: Dataset[Any] | None = None  # the data's held-out split, for probes that evaluate on it


class Probe(Protocol):
    """A measurement taken on the trainer's schedule."""

    name: str  # its section of the run in the file
    performs_step: bool  # computing it performs the real optimizer step (at most one probe may)

    @property
    def constants(self) -> Mapping[str, Any]:
        """Written once, before the first record: the axes of its records (ICS layers, step sizes)."""

    @property
    def dataset_attrs(self) -> Mapping[str, Mapping[str, Any]]:
        """Set on its datasets after each record (the Hessian's BN mode and batch size)."""

    def due(self, step: int) -> bool: ...

    def compute(self, batch: StepBatch) -> Record: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


ProbeFactory = Callable[[Config, list[str]], "Probe | None"]
"""Builds a probe from the config and the probed layers' names, or None when the config does not ask for it."""

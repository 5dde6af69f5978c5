"""Probes run on a schedule by the trainer. Moments flow through the Recorder's hooks; the
probes here need extra passes on the current batch and so run around the training step:

- ``landscape`` and ``hessian`` measure at the current weights *before* the step (no side effects);
- ``ics`` *is* the step: it performs the real optimizer step and measures the gradient shift.

Each probe declares its own schedule (``due(step)``) and writes its own section of the run.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..store import RunWriter


def every(interval: int) -> Any:
    """A schedule: steps 0, interval, 2*interval, ...; never when interval is 0."""
    return lambda step: interval > 0 and step % interval == 0


class BeforeStepProbe(Protocol):
    name: str

    def due(self, step: int) -> bool: ...

    def measure(self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> None: ...


@dataclass
class ICSProbe:
    """Gradient-shift ICS (DESIGN 1.4); performs the real step on its schedule."""

    writer: RunWriter
    layers: list[str]
    interval: int
    method: str = "fast"
    name: str = "ics"

    def __post_init__(self) -> None:
        self.due = every(self.interval)
        self.writer.write_constant("ics/layer", self.layers)

    def step(self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        from .ics import gradient_shift

        exact = [glob.escape(n) for n in self.layers]  # names, not patterns: ModuleDict keys may hold [ ] * ?
        result = gradient_shift(model, loss_fn, x, y, optimizer, layers=exact, method=self.method)
        values = [result[n] for n in self.layers]
        self.writer.append("ics", step, {key: np.array([getattr(v, key) for v in values]) for key in ("l2", "cosine", "grad_norm", "grad_norm_shifted", "rel_diff")})
        return result.loss.detach(), result.output.detach()


@dataclass
class LandscapeProbe:
    """Loss and gradient along the gradient direction over a grid of step sizes (DESIGN 1.5)."""

    writer: RunWriter
    etas: tuple[float, ...]
    interval: int
    name: str = "landscape"

    def __post_init__(self) -> None:
        self.due = every(self.interval)
        self.writer.write_constant("landscape/eta", np.asarray(self.etas, dtype=np.float64))

    def measure(self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        from .landscape import landscape

        r = landscape(model, loss_fn, x, y, list(self.etas))
        self.writer.append(
            "landscape", step,
            {"loss": np.asarray(r.loss), "grad_l2": np.asarray(r.grad_l2), "beta_smoothness": r.beta, "loss_at_w": r.loss_at_w},
        )


@dataclass
class HessianProbe:
    """Top Hessian eigenvalue by power iteration, warm-started from the previous eigenvector."""

    writer: RunWriter
    interval: int
    tol: float
    max_iter: int
    samples: int
    name: str = "hessian"
    _vector: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.due = every(self.interval)

    def measure(self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        from .hessian import top_hessian_eigenvalue

        r = top_hessian_eigenvalue(model, loss_fn, x, y, tol=self.tol, max_iter=self.max_iter, init=self._vector)
        self._vector = r.vector
        self.writer.append("hessian", step, {"top_eigenvalue": r.eigenvalue, "iterations": r.iterations, "residual": r.residual})
        self.writer.set_dataset_attrs("hessian/top_eigenvalue", bn_mode="train", samples=self.samples)


@dataclass
class ScheduledProbes:
    before_step: list[BeforeStepProbe]
    step_probe: ICSProbe | None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to measure exactly as an uninterrupted one: the Hessian warm start."""
        return {p.name: p._vector for p in self.before_step if isinstance(p, HessianProbe) and p._vector is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.before_step:
            if isinstance(p, HessianProbe) and p.name in state:
                p._vector = state[p.name]


def scheduled_probes(cfg: Any, layer_names: list[str], writer: RunWriter) -> ScheduledProbes:
    """The extra-pass probes a config asks for, bound to one run's writer."""
    p = cfg.probes
    before: list[BeforeStepProbe] = []
    if p.landscape:
        from .landscape import default_etas

        etas = p.etas and tuple(e * cfg.lr for e in p.etas) or tuple(default_etas(cfg.lr, cfg.model))
        before.append(LandscapeProbe(writer, etas, p.landscape_every or p.ics_every or p.record_every))
    if p.hessian:
        before.append(HessianProbe(writer, p.hessian_every or p.ics_every or p.record_every, p.hessian_tol, p.hessian_max_iter, cfg.batch_size))
    ics = ICSProbe(writer, layer_names, p.ics_every) if p.ics_every > 0 else None
    return ScheduledProbes(before, ics)

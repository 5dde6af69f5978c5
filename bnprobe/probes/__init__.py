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

    def measure(
        self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> None: ...


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

    def step(
        self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .ics import gradient_shift

        exact = [glob.escape(n) for n in self.layers]  # names, not patterns: ModuleDict keys may hold [ ] * ?
        result = gradient_shift(model, loss_fn, x, y, optimizer, layers=exact, method=self.method)
        values = [result[n] for n in self.layers]
        self.writer.append(
            "ics",
            step,
            {key: np.array([getattr(v, key) for v in values]) for key in ("l2", "cosine", "grad_norm", "grad_norm_shifted", "rel_diff")},
        )
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

    def measure(
        self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> None:
        from .landscape import landscape

        r = landscape(model, loss_fn, x, y, list(self.etas))
        self.writer.append(
            "landscape",
            step,
            {
                "loss": np.asarray(r.loss),
                "grad_l2": np.asarray(r.grad_l2),
                "beta_smoothness": r.beta,
                "loss_at_w": r.loss_at_w,
                "loss_min": r.loss_min,
                "loss_max": r.loss_max,
            },
        )


@dataclass
class HessianProbe:
    """Top Hessian eigenvalue by power iteration, warm-started from the previous eigenvector; with
    ``blocks``, also that of each probed layer's own diagonal block (DESIGN 1.5, 4)."""

    writer: RunWriter
    interval: int
    tol: float
    max_iter: int
    samples: int
    blocks: list[str] | None = None
    name: str = "hessian"
    _vector: Any = field(default=None, repr=False)
    _block_vectors: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.due = every(self.interval)

    def measure(
        self, step: int, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> None:
        from .hessian import hessian_blocks, top_hessian_eigenvalue

        r = top_hessian_eigenvalue(model, loss_fn, x, y, tol=self.tol, max_iter=self.max_iter, init=self._vector)
        self._vector = r.vector
        row: dict[str, Any] = {"top_eigenvalue": r.eigenvalue, "iterations": r.iterations, "residual": r.residual, "converged": r.converged}
        if self.blocks:
            exact = [glob.escape(n) for n in self.blocks]
            per = hessian_blocks(model, loss_fn, x, y, layers=exact, tol=self.tol, max_iter=self.max_iter, init=self._block_vectors)
            self._block_vectors = {n: b.vector for n, b in per.items()}
            nan = float("nan")  # a block with no trainable parameter
            row.update(
                {
                    f"block_{key}": np.array([getattr(per[n], field) if n in per else nan for n in self.blocks], dtype=np.float64)
                    for key, field in (("top_eigenvalue", "eigenvalue"), ("iterations", "iterations"), ("residual", "residual"))
                }
            )
        self.writer.append("hessian", step, row)
        self.writer.set_dataset_attrs("hessian/top_eigenvalue", bn_mode="train", samples=self.samples)


@dataclass
class ScheduledProbes:
    before_step: list[BeforeStepProbe]
    step_probe: ICSProbe | None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to measure exactly as an uninterrupted one: the Hessian warm starts."""
        return {
            p.name: {"vector": p._vector, "blocks": p._block_vectors}
            for p in self.before_step
            if isinstance(p, HessianProbe) and p._vector is not None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.before_step:
            if isinstance(p, HessianProbe) and p.name in state:
                p._vector = state[p.name]["vector"]
                p._block_vectors = dict(state[p.name]["blocks"])


def scheduled_probes(cfg: Any, layer_names: list[str], writer: RunWriter) -> ScheduledProbes:
    """The extra-pass probes a config asks for, bound to one run's writer."""
    p = cfg.probes
    before: list[BeforeStepProbe] = []
    if p.landscape:
        from .landscape import default_etas

        etas = (p.etas and tuple(e * cfg.lr for e in p.etas)) or tuple(default_etas(cfg.lr, cfg.model))
        before.append(LandscapeProbe(writer, etas, p.landscape_every or p.ics_every or p.record_every))
    if p.hessian:
        blocks = list(layer_names) if p.hessian_blocks and layer_names else None
        if blocks:
            writer.write_constant("hessian/block", blocks)
        before.append(
            HessianProbe(
                writer, p.hessian_every or p.ics_every or p.record_every, p.hessian_tol, p.hessian_max_iter, cfg.batch_size, blocks
            )
        )
    ics = ICSProbe(writer, layer_names, p.ics_every) if p.ics_every > 0 and layer_names else None
    return ScheduledProbes(before, ics)

"""The loss landscape along the gradient (Santurkar et al. 2018, Sec. 3, Fig. 4).

At parameters w with gradient g = grad L(w) on one batch, for every step size eta of a grid:

- loss variation: ``L(w - eta g)``;
- gradient predictiveness: ``||grad L(w) - grad L(w - eta g)||_2``;
- effective beta-smoothness: ``max over eta of ||grad L(w) - grad L(w - eta g)||_2 / ||eta g||_2``
  (NaN when g is zero or some evaluation diverged to NaN).

Every evaluation uses the same batch, the model's current mode (train-mode BN normalises with
batch statistics, with ``track_running_stats`` off so no running statistic moves) and the same
random draws (dropout masks, noisy-BN noise: every stream is replayed from its state at the call
and put back after). Nothing changes: parameters, buffers, ``.grad`` and RNG states are as before.
``w`` and ``g`` cover every trainable parameter. Cost: m + 1 forward/backward passes for m step
sizes (batching the m evaluations with ``torch.func.vmap`` does not pay on CPU; not done).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..errors import ConfigError
from ..passes import gradients, leave_no_trace
from .base import Record, StepBatch, every
from .params import ParamSlots

#: The paper's scan ranges, as multiples of the learning rate.
ETA_RANGES = {"vgg": (0.5, 4.0), "dln": (0.01, 30.0)}


def default_etas(lr: float, kind: str = "vgg", n: int = 8) -> list[float]:
    """``n`` step sizes, geometrically spaced over the paper's grid, as multiples of ``lr``.

    ``kind`` is a model name: ``dln`` (the deep linear network) scans [0.01, 30] x lr; every other
    model (``vgg``, ``mlp``, ``torchvision:...``, user models) scans the VGG grid [0.5, 4] x lr.
    Both end points are included. E.g. ``default_etas(0.1)`` = 0.05, 0.067, ..., 0.4.
    """
    if not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"landscape step sizes need a positive learning rate, got {lr}")
    if n < 1:
        raise ConfigError(f"landscape needs at least one step size, got n={n}")
    lo, hi = ETA_RANGES["dln" if str(kind).lower() == "dln" else "vgg"]
    if n == 1:
        return [lr * math.sqrt(lo * hi)]
    return [lr * lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]


@dataclass(frozen=True)
class LandscapeResult:
    """Loss and gradient change along -g for each eta (lists in the order of ``etas``)."""

    etas: list[float]
    loss: list[float]
    grad_l2: list[float]
    beta: float
    loss_at_w: float
    grad_norm: float

    @property
    def loss_min(self) -> float:
        return min(self.loss)

    @property
    def loss_max(self) -> float:
        return max(self.loss)

    @property
    def smoothness(self) -> list[float]:
        """``grad_l2 / ||eta g||`` per eta (beta is their maximum); NaN where ``eta g`` is 0."""
        return [d / (abs(e) * self.grad_norm) if e != 0 and self.grad_norm > 0 else math.nan for e, d in zip(self.etas, self.grad_l2)]


def landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: Any,
    y: Any,
    etas: Sequence[float],
) -> LandscapeResult:
    """Scan the loss and gradient along the negative gradient at the current parameters."""
    etas = [float(e) for e in etas]
    if not etas or not all(math.isfinite(e) for e in etas):
        raise ConfigError(f"landscape needs a non-empty list of finite step sizes, got {etas}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("landscape: the model has no trainable parameters")
    names = [n for n, _ in named]
    w = [p.detach() for _, p in named]
    slots = ParamSlots(model)

    def evaluate(values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [v.detach().requires_grad_(True) for v in values]
        trace.reset()  # stateful buffers (spectral norm) and random streams start each evaluation alike
        with slots.swapped(dict(zip(names, leaves))):
            loss = loss_fn(model(x), y)
        grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(gradients(model, loss, leaves), leaves)]
        value = loss.detach().clone() if distributed.world_size() > 1 else loss.detach()
        distributed.average_([value, *grads])  # under torchrun: the global batch's loss and gradient
        return value, grads

    with leave_no_trace(model) as trace:
        loss0, g = evaluate(w)
        losses, diffs = [], []
        for eta in etas:
            loss_e, g_e = evaluate([wi - eta * gi for wi, gi in zip(w, g)])
            losses.append(loss_e.double())
            diffs.append(_l2([a.double() - b.double() for a, b in zip(g, g_e)]))
    gnorm = _l2([gi.double() for gi in g])
    values = torch.stack([loss0.double(), gnorm, *losses, *diffs]).tolist()  # one host sync
    loss_at_w, grad_norm = values[0], values[1]
    m = len(etas)
    loss, grad_l2 = values[2 : 2 + m], values[2 + m :]
    ratios = [d / (abs(e) * grad_norm) for e, d in zip(etas, grad_l2) if e != 0 and grad_norm > 0]
    beta = max(ratios) if ratios and not any(math.isnan(r) for r in ratios) else math.nan
    return LandscapeResult(etas, loss, grad_l2, beta, loss_at_w, grad_norm)


def _l2(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the concatenation of ``parts``, summed part by part in order."""
    total = (parts[0] ** 2).sum()
    for part in parts[1:]:
        total = total + (part**2).sum()
    return torch.sqrt(total)


@dataclass
class LandscapeProbe:
    """Loss and gradient along the gradient direction over ``etas`` every ``interval`` steps."""

    etas: tuple[float, ...]
    interval: int
    name: str = "landscape"
    performs_step: bool = False
    dataset_attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def constants(self) -> Mapping[str, Any]:
        return {"eta": np.asarray(self.etas, dtype=np.float64)}

    def due(self, step: int) -> bool:
        return every(self.interval)(step)

    def compute(self, batch: StepBatch) -> Record:
        r = landscape(batch.model, batch.loss_fn, batch.x, batch.y, list(self.etas))
        return {
            "loss": np.asarray(r.loss),
            "grad_l2": np.asarray(r.grad_l2),
            "beta_smoothness": r.beta,
            "loss_at_w": r.loss_at_w,
            "loss_min": r.loss_min,
            "loss_max": r.loss_max,
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: each scan stands alone."""


def probe_from_config(cfg: Config, layers: list[str]) -> LandscapeProbe | None:
    """The scan's grid: ``probes.landscape.etas`` (multiples of the learning rate) or the paper's for the model."""
    p = cfg.probes.landscape
    if not p.enabled:
        return None
    etas = tuple(e * cfg.lr for e in p.etas) if p.etas else tuple(default_etas(cfg.lr, cfg.model))
    return LandscapeProbe(etas, p.every)

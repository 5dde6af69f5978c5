"""Held-out loss and accuracy: generalisation, and the gap between BN's train and eval modes.

At a due step the model is evaluated in eval mode (BN uses its running statistics, dropout is
off) on the data's held-out split, before the step's update. The pass runs under
:func:`~bnprobe.passes.leave_no_trace` (no buffer or random stream moves; the data loader draws its
seed from the global stream) and every module's own mode is restored afterwards, so training
continues exactly as without the probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..data import pixel_logits
from ..passes import leave_no_trace
from .base import Record, StepBatch, every


class HeldoutProbe:
    """Mean loss and accuracy over the held-out split (accuracy NaN for a regression task)."""

    name = "heldout"
    performs_step = False
    constants: Mapping[str, Any] = {}
    dataset_attrs: Mapping[str, Mapping[str, Any]] = {}

    def __init__(self, interval: int, batch_size: int) -> None:
        self.due = every(interval)
        self.batch_size = batch_size

    def compute(self, batch: StepBatch) -> Record:
        if batch.heldout is None:
            return {}
        return evaluate(batch.model, batch.loss_fn, batch.heldout, self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def evaluate(model: nn.Module, loss_fn: Any, data: Dataset[Any], batch_size: int) -> Record:
    """Mean loss and accuracy of ``model`` in eval mode over ``data``; every module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total_loss, correct, count = 0.0, 0.0, 0
    classification = True
    model.eval()
    try:
        with torch.no_grad(), leave_no_trace(model):  # the loader draws its seed from the global stream
            for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
                x, y = x.to(device), y.to(device)
                out = model(x)
                total_loss += float(loss_fn(out, y)) * len(y)
                classification = classification and not torch.is_floating_point(y)
                if classification:  # per sample, the share of its labels right (of its pixels, for segmentation)
                    correct += float((pixel_logits(out).argmax(dim=1) == y).view(len(y), -1).float().mean(1).sum())
                count += len(y)
    finally:
        for module, mode in modes:
            module.training = mode
    return {"loss": total_loss / count, "accuracy": correct / count if classification else np.nan}


def probe_from_config(cfg: Config, layers: list[str]) -> HeldoutProbe | None:
    """On by default; it records only where the data has a held-out split (the trainer passes it)."""
    p = cfg.probes.heldout
    return HeldoutProbe(p.every, p.batch_size) if p.enabled and p.every else None

"""The module types BN surgery works with: BatchNorms, and the conv/linear layers a BN can follow.

What counts as a BN (:func:`bnprobe.layers.is_batchnorm`), which layers insert targets, which BN class goes after
which layer, and the channel counts and ranks that pair a BN with the layer feeding it.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import nn

from ..errors import SurgeryError

_Feeder: TypeAlias = "nn.modules.conv._ConvNd | nn.Linear"  # a layer a BN can be paired with, folded into or inserted after
BatchNorm: TypeAlias = nn.Module  # what is_batchnorm accepts: recognised by what it holds, not by its class
_TARGETS: dict[str, tuple[type[_Feeder], ...]] = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}
_FEEDERS = (nn.modules.conv._ConvNd, nn.Linear)
_BN_FOR: dict[type[_Feeder], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` when it is a tensor (a parameter or buffer), else None: a BN's ``weight`` and
    ``bias`` are None without ``affine``, its running statistics without ``track_running_stats``."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _num_features(bn: nn.Module) -> int:
    """A frozen BN has no ``num_features``; its buffers tell."""
    features = getattr(bn, "num_features", None)
    if features is not None:
        return int(features)
    mean = _tensor(bn, "running_mean")
    if mean is None:
        raise SurgeryError(f"{type(bn).__name__} has neither num_features nor a running_mean buffer to count its channels")
    return mean.numel()


def _channels(layer: _Feeder) -> int:
    return layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features


def _channel_rank(layer: _Feeder) -> int:
    """The output rank at which dim 1 is the channel dim: (N, C) for linear, (N, C, *spatial) for conv."""
    return len(layer.kernel_size) + 2 if isinstance(layer, nn.modules.conv._ConvNd) else 2

"""Noisy BatchNorm: BN classes that add a fresh random per-channel scale and shift in training.

The noisy classes (:class:`NoisyNorm` mixed into each BN class), turning a BN into its noisy or
synchronised class in place, and the noise seeds drawn from the run seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ..config import NoiseConfig
from ..errors import SurgeryError


def _noisy(x: torch.Tensor, generator: torch.Generator, config: NoiseConfig) -> torch.Tensor:
    """``s * x + m`` along dim 1 with one fresh draw of the recipe (see :class:`NoisyNorm`)."""
    c = config
    lo_hi = torch.rand(2, generator=generator, dtype=torch.float64)
    mu = c.mu_range[0] + (c.mu_range[1] - c.mu_range[0]) * lo_hi[0]
    sigma = c.sigma_range[0] + (c.sigma_range[1] - c.sigma_range[0]) * lo_hi[1]
    channels = x.shape[1]
    shift = mu + c.mean_spread * (2 * torch.rand(channels, generator=generator, dtype=torch.float64) - 1)
    scale = sigma + c.scale_std * torch.randn(channels, generator=generator, dtype=torch.float64)
    draws = torch.stack((scale, shift)).to(x.dtype)
    if x.device.type == "cuda":  # pinned memory: the copy does not wait for the device
        draws = draws.pin_memory()
    scale, shift = draws.to(x.device, non_blocking=True).view(2, 1, channels, *[1] * (x.dim() - 2)).unbind()
    return x * scale + shift


def _set_noise(module: NoisyNorm, seed: int, config: NoiseConfig | None, after: tuple[str, ...] = ()) -> None:
    """The noise state of a fresh or converted noisy BN: its seed, recipe, own generator, and the children run after the noise."""
    module.noise_seed = int(seed)
    module.noise_config = config or NoiseConfig()
    module.generator = torch.Generator().manual_seed(module.noise_seed)
    module.after_noise = after


class NoisyNorm(nn.Module):
    """Santurkar et al.'s noisy BN, as a mix-in before a BatchNorm class: ``NoisyBatchNorm2d(NoisyNorm, nn.BatchNorm2d)``.

    In training, the BN's output gets a fresh random per-channel scale and shift at every forward:
    mu ~ U(mu_range), sigma ~ U(sigma_range); per channel m ~ U(mu - mean_spread, mu + mean_spread),
    s ~ N(sigma, scale_std); output ``s * bn(x) + m`` along dim 1. In eval mode it is the plain BN.
    The noise is inside the module, so a forward hook on it sees the noisy output.

    The draws come from ``self.generator`` (a CPU generator seeded with ``noise_seed``, found by
    ``bnprobe.rng`` by this attribute name, so a measurement pass can replay a draw); the small noise
    tensors are moved to the input's device. ``state_dict`` is the BN's plus ``_extra_state``, the
    generator state, so a resumed checkpoint continues the stream. ``after_noise`` names children
    run after the noise, in order: the activation (and dropout) of a BN that holds one, as timm's
    ``BatchNormAct2d``.
    """

    noise_seed: int
    noise_config: NoiseConfig
    generator: torch.Generator
    after_noise: tuple[str, ...]

    def __init__(self, *args: Any, seed: int = 0, noise: NoiseConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_noise(self, seed, noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = super().forward(x)
        if self.training:
            y = _noisy(y, self.generator, self.noise_config)
        for name in self.after_noise:
            y = self.get_submodule(name)(y)
        return y

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        config = "" if self.noise_config == NoiseConfig() else f", {self.noise_config}"
        return f"{super().extra_repr()}, noise_seed={self.noise_seed}{config}"


class NoisyBatchNorm1d(NoisyNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with noise in training (:class:`NoisyNorm`)."""


class NoisyBatchNorm2d(NoisyNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with noise in training (:class:`NoisyNorm`)."""


class NoisyBatchNorm3d(NoisyNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with noise in training (:class:`NoisyNorm`)."""


class NoisySyncBatchNorm(NoisyNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with noise in training (:class:`NoisyNorm`)."""


class NoisyFrozenBatchNorm2d(NoisyNorm, FrozenBatchNorm2d):  # type: ignore[misc]  # torchvision ships no types: its classes are Any
    """torchvision's ``FrozenBatchNorm2d`` with noise in training (:class:`NoisyNorm`)."""

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, noise_seed={self.noise_seed})"


NOISY_BN: dict[type[nn.Module], type[NoisyNorm]] = {
    nn.BatchNorm1d: NoisyBatchNorm1d,
    nn.BatchNorm2d: NoisyBatchNorm2d,
    nn.BatchNorm3d: NoisyBatchNorm3d,
    nn.SyncBatchNorm: NoisySyncBatchNorm,
    FrozenBatchNorm2d: NoisyFrozenBatchNorm2d,
}


_NOISY_MADE: dict[type[nn.Module], type[NoisyNorm]] = {}


_SYNC_BN: dict[type[nn.Module], type[nn.SyncBatchNorm]] = {
    nn.BatchNorm1d: nn.SyncBatchNorm,
    nn.BatchNorm2d: nn.SyncBatchNorm,
    nn.BatchNorm3d: nn.SyncBatchNorm,
    NoisyBatchNorm1d: NoisySyncBatchNorm,
    NoisyBatchNorm2d: NoisySyncBatchNorm,
    NoisyBatchNorm3d: NoisySyncBatchNorm,
}


def synchronise_bn(model: nn.Module) -> list[str]:
    """Turn each BatchNorm of ``model`` in place into ``SyncBatchNorm`` (noisy BN into its noisy
    sync class, noise and generator kept), so that under torchrun it normalises with the global
    batch's statistics; returns the names converted. Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``
    it refuses a BN subclass with its own forward (timm's ``BatchNormAct2d``) rather than drop it."""
    converted = []
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm) or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        sync = _SYNC_BN.get(type(m))
        if sync is None:
            raise SurgeryError(f"sync_bn: {name} is a {type(m).__name__}, whose own forward SyncBatchNorm would drop; use sync_bn: false")
        m.__class__ = sync
        cast(nn.SyncBatchNorm, m).process_group = None  # the default group: every process
        converted.append(name)
    return converted


def noisy_class(cls: type[nn.Module]) -> type[NoisyNorm]:
    """The noisy subclass of a BN class: one of ``NOISY_BN``, else one made (once) for ``cls``.

    A made class keeps ``cls``'s own forward (noise after it); it is not importable by name, so save
    such a model with ``state_dict()``, not by pickling the module.
    """
    if issubclass(cls, NoisyNorm):
        return cls
    if cls in NOISY_BN:
        return NOISY_BN[cls]
    if cls not in _NOISY_MADE:
        doc = f"{cls.__name__} with noise in training (:class:`NoisyNorm`)."
        _NOISY_MADE[cls] = type(f"Noisy{cls.__name__}", (NoisyNorm, cls), {"__module__": __name__, "__doc__": doc})
    return _NOISY_MADE[cls]


@dataclass
class _Seeds:
    """Noise seeds drawn from the run seed, one per noisy BN in creation (forward) order; no global RNG."""

    seed: int
    config: NoiseConfig

    def __post_init__(self) -> None:
        self._master = torch.Generator().manual_seed(self.seed)

    def next(self) -> int:
        return int(torch.randint(0, 2**31, (1,), generator=self._master))


def _make_noisy(bn: nn.Module, name: str, after: list[str], seed: int, config: NoiseConfig) -> None:
    """Turn ``bn`` in place (same object, tensors, hooks and attributes) into its noisy subclass.

    A BN subclass whose forward also runs children (``after``, e.g. dropout and activation) becomes
    the noisy class of its plain BatchNorm base, running those children after the noise.
    """
    cls = type(bn)
    if after and cls not in NOISY_BN:
        base = next((c for c in cls.__mro__ if c in NOISY_BN), None)
        if base is None:
            raise SurgeryError(
                f"cannot add noise to {name}: {cls.__name__} normalises and runs its children ({', '.join(after)}) in one forward, "
                "with no plain BatchNorm class to split it at, so the noise cannot go between the normalisation and the activation; "
                "--bn keep, insert and strip take it"
            )
        cls = base
    try:
        bn.__class__ = noisy_class(cls)
    except TypeError as e:
        raise SurgeryError(f"cannot add noise to {name}: {type(bn).__name__} cannot be made noisy ({e})") from None
    assert isinstance(bn, NoisyNorm)  # its class is now one; tells the type checker so
    _set_noise(bn, seed, config, tuple(after))

"""Save and replay every random stream a forward pass draws from, so that extra measurement
passes (ICS, landscape, Hessian) see the same dropout masks and noisy-BN draws as the real pass.

Streams: the global CPU generator, the CUDA generators when CUDA is initialised, and every
module attribute named ``generator`` holding a ``torch.Generator`` (noisy BN keeps its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RngState:
    """Every stream's state at one moment; ``modules`` by module name."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]
    modules: dict[str, torch.Tensor]

    def same(self, other: RngState) -> bool:
        """True when no stream moved between the two states (how a cached call knows it drew nothing)."""
        pairs = [(self.cpu, other.cpu), *zip(self.cuda, other.cuda), *((s, other.modules.get(n)) for n, s in self.modules.items())]
        return len(self.cuda) == len(other.cuda) and all(b is not None and torch.equal(a, b) for a, b in pairs)


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The private generators of ``model``'s modules (e.g. noisy BN), by module name."""
    return {name: m.generator for name, m in model.named_modules() if isinstance(getattr(m, "generator", None), torch.Generator)}


class Streams:
    """The random streams of one model, found once: cheap to capture and restore many times per
    step (the ICS fast path snapshots around every module call)."""

    def __init__(self, model: nn.Module) -> None:
        self.generators = module_generators(model)
        self.cuda = torch.cuda.is_initialized()

    def capture(self) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if self.cuda else []
        return RngState(torch.get_rng_state(), cuda, {n: g.get_state() for n, g in self.generators.items()})

    def restore(self, state: RngState) -> None:
        torch.set_rng_state(state.cpu)
        if state.cuda:
            torch.cuda.set_rng_state_all(state.cuda)
        for name, g in self.generators.items():
            if name in state.modules:
                g.set_state(state.modules[name])


def capture(model: nn.Module) -> RngState:
    return Streams(model).capture()


def restore(model: nn.Module, state: RngState) -> None:
    Streams(model).restore(state)


def model_device_state(model: nn.Module) -> torch.Tensor | None:
    """The random stream of the GPU ``model`` is on (None on CPU), for checkpoints: under torchrun
    each process draws from its own GPU's, and every process's is rank 0's (they draw alike)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_model_device_state(model: nn.Module, state: torch.Tensor | None) -> None:
    """Set the stream of ``model``'s GPU to ``state``; nothing on CPU (a GPU run continued on CPU
    draws from the CPU stream alone)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)

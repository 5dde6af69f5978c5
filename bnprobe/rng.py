"""Save and replay every random stream a forward pass draws from, so that extra measurement
passes (ICS, landscape) see the same dropout masks and noisy-BN draws as the real pass.

Streams: the global CPU generator, the CUDA generators when CUDA is initialised, and every
module attribute named ``generator`` holding a ``torch.Generator`` (noisy BN keeps its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RngState:
    cpu: torch.Tensor
    cuda: list[torch.Tensor]
    modules: dict[str, torch.Tensor]


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The private generators of ``model``'s modules (e.g. noisy BN), by module name."""
    return {name: m.generator for name, m in model.named_modules() if isinstance(getattr(m, "generator", None), torch.Generator)}


def capture(model: nn.Module) -> RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return RngState(torch.get_rng_state(), cuda, {n: g.get_state() for n, g in module_generators(model).items()})


def restore(model: nn.Module, state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda:
        torch.cuda.set_rng_state_all(state.cuda)
    for name, g in module_generators(model).items():
        if name in state.modules:
            g.set_state(state.modules[name])


@contextmanager
def replaying(model: nn.Module, state: RngState) -> Iterator[None]:
    """Run the block from ``state`` and put the streams back where they were before it."""
    before = capture(model)
    restore(model, state)
    try:
        yield
    finally:
        restore(model, before)

"""Where a model's parameters live, and which of them a measurement is over.

:class:`ParamSlots` lets a pass run the model on other parameter values (ICS's mixed W^t / W^{t+1},
the landscape's w - eta g) without touching the parameters themselves; :func:`select_params` picks
the parameters a Hessian is taken over.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError


class ParamSlots:
    """Every place a parameter is registered (module, attribute, canonical name), tied ones included.

    ``swapped({canonical name: tensor})`` puts tensors in place of those parameters for the block.

    Swapping tensors into these slots is what ``torch.func.functional_call`` does, minus its
    per-call bookkeeping (which dominates on small models).
    """

    def __init__(self, model: nn.Module) -> None:
        canonical = {id(p): n for n, p in model.named_parameters()}
        self.slots = [
            (m, attr, canonical[id(p)])
            for m in model.modules()
            for attr, p in m._parameters.items()
            if p is not None and id(p) in canonical
        ]

    @contextmanager
    def swapped(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        saved = [(m, attr, m._parameters[attr]) for m, attr, n in self.slots if n in values]
        try:
            for m, attr, n in self.slots:
                if n in values:
                    m._parameters[attr] = values[n]  # type: ignore[assignment]
            yield
        finally:
            for m, attr, p in saved:
                m._parameters[attr] = p


def select_params(model: nn.Module, params: Iterable[torch.Tensor | str] | None) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters: all, given ones, or those whose name or owning module matches a glob."""
    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = list(params)
    ids = {id(w) for w in wanted if isinstance(w, torch.Tensor)}
    patterns = [w for w in wanted if isinstance(w, str)]
    canonical = {id(p): n for n, p in named}
    chosen = []
    seen: set[int] = set()
    for mod_name, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            full = f"{mod_name}.{pn}" if mod_name else pn
            if id(p) not in canonical or id(p) in seen:
                continue
            if id(p) in ids or any(fnmatch.fnmatchcase(full, q) or fnmatch.fnmatchcase(mod_name, q) for q in patterns):
                seen.add(id(p))
                chosen.append((canonical[id(p)], p))
    if not chosen:
        raise ConfigError("the Hessian block selects no trainable parameter")
    return chosen

"""Hessian-vector products: the one first-order pass every Hessian measurement runs on.

One forward and one first-order backward with its graph kept (:func:`first_order`; BN mode
explicit, nothing changed: parameters, buffers, ``.grad`` and RNG streams are as before), then
each product is one double backward through that graph (:func:`hvp_function`), for the whole
model or a layer's diagonal block (:func:`layer_blocks`). :class:`FirstOrderPass` holds such a
pass so that every quantity of one measurement (power iteration, Lanczos, Hutchinson, SLQ, per
block) shares it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..config import layer_patterns
from ..errors import ConfigError
from ..layers import first_calls, layer_kind, no_layer_matches, own_parameters, select
from ..passes import BN_MODES, gradients, leave_no_trace
from .double_backward import TwiceDifferentiable
from .lanczos import MatVec, start_vector


def _check_bn_mode(mode: str) -> None:
    if mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {mode!r} for the Hessian; choose from {', '.join(BN_MODES)}")


def batch_size_of(x: Any) -> int:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 0


def first_order(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], x: Any, y: Any, ps: list[torch.Tensor], bn_mode: str
) -> tuple[list[torch.Tensor | None], list[nn.Module]]:
    """grad L wrt ``ps`` with its graph kept (for double backward; None where L does not depend on
    p), and the modules with own parameters in forward order (:func:`first_calls`)."""
    _check_bn_mode(bn_mode)
    # attention on the math backend: the fused CPU kernels have no double backward
    with (
        first_calls(model) as calls,
        leave_no_trace(model, bn_mode),
        TwiceDifferentiable(),
        sdpa_kernel([SDPBackend.MATH]),
    ):
        loss = loss_fn(model(x), y)
    grads = gradients(model, loss, ps, create_graph=True)
    return [g if g is not None and g.requires_grad else None for g in grads], [m for _, m, _ in calls]


HVP = MatVec
"""A Hessian-vector product on flat vectors (the parameters' entries concatenated in order)."""


def hvp_function(grads: Sequence[torch.Tensor | None], ps: Sequence[torch.Tensor]) -> HVP:
    """``v -> H v`` for the Hessian of the loss wrt ``ps`` (one double backward through the graph of
    ``grads``, kept for the next call): every spectral method here (power iteration, Lanczos,
    Hutchinson, SLQ) runs on it, and a block's ``grads``/``ps`` give that diagonal block's product.

    One vector per call: batching several through one double backward (``is_grads_batched``) is
    no faster on CPU once BN's double backward is cheap (:mod:`.double_backward`)."""
    sizes = [p.numel() for p in ps]
    ref = ps[0]
    live = [k for k, g in enumerate(grads) if g is not None]
    live_grads = [g for g in grads if g is not None]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if not live:
            return torch.zeros_like(v)
        parts = v.split(sizes)
        out = torch.autograd.grad(
            live_grads,
            [ps[k] for k in live],
            grad_outputs=[parts[k].view_as(ps[k]) for k in live],
            retain_graph=True,
            allow_unused=True,
        )
        products: dict[int, torch.Tensor | None] = dict(zip(live, out))
        flat = [ref.new_zeros(s) if (h := products.get(k)) is None else h.reshape(-1) for k, s in enumerate(sizes)]
        product = torch.cat(flat)  # zeros only where the loss does not depend on a parameter
        distributed.average_([product])  # under torchrun: the global batch's Hessian times v
        return product

    return hvp


def layer_blocks(
    model: nn.Module,
    order: Sequence[nn.Module],
    ps: Sequence[torch.Tensor],
    layers: Sequence[str] | str | None,
    kinds: Sequence[str] | None,
) -> list[tuple[str, list[int]]]:
    """The selected layers' diagonal blocks in forward ``order``: each layer's name and the indices
    into ``ps`` of its own parameters (layers without one left out); ``layers`` / ``kinds`` select as for ICS."""
    index = {id(p): k for k, p in enumerate(ps)}
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [(names[id(m)], [index[id(p)] for p in own_parameters(m) if id(p) in index]) for m in order]
    blocks = [(n, list(dict.fromkeys(ks))) for n, ks in blocks if ks]
    patterns = layer_patterns(layers)
    kinds_of = {names[id(m)]: layer_kind(m) for m in order}
    picked = select([(n, kinds_of[n]) for n, _ in blocks], patterns, kinds)
    if not picked:
        raise no_layer_matches(patterns, kinds)
    return [blocks[j] for j in picked]


def lanczos_start(
    grads: Sequence[torch.Tensor | None], ps: Sequence[torch.Tensor], seed: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Lanczos's start vector: the unit gradient plus a unit vector, the previous result's ``init``
    (rows summed: a warm start) or, without, a random one from ``seed``.

    The gradient lies mostly in the top eigenvectors' span (Gur-Ari, Roberts & Dyer 2018). Cold, it
    saves products, and makes their number depend less on the seed; the random half keeps every
    eigenvector in reach. Warm, it keeps the start from being (nearly) an eigenvector whose
    eigenvalue has since fallen below the top: from the previous vector alone, Lanczos sometimes
    stopped at such an eigenvalue, well below the top; with the gradient it did not. (Top-k with
    k > 1 is another matter: see :class:`~bnprobe.probes.spectrum.SpectrumProbe`.) With no usable gradient (zero, not
    finite) the start is the unit vector alone."""
    n = sum(p.numel() for p in ps)
    if init is not None and init.numel() % n:
        raise ValueError(f"init has {init.numel()} entries, not a multiple of the parameters' {n}")
    v = start_vector(None if init is None else init.reshape(-1, n).sum(0), n, ps[0], seed)
    g = torch.cat([p.new_zeros(p.numel()) if t is None else t.detach().reshape(-1) for t, p in zip(grads, ps)]).to(v.dtype)
    distributed.average_([g])  # under torchrun: the global batch's gradient, so every process starts alike
    norm = float(g.norm())
    return v + g / norm if math.isfinite(norm) and norm > 0 else v


@dataclass
class FirstOrderPass:
    """One forward and first-order backward (graph kept) that every product of a measurement runs
    on: the whole model's and each layer block's, whatever the method."""

    ps: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    order: list[nn.Module]  # modules with own parameters, in forward order (first_calls)
    bn_mode: str = "train"

    @classmethod
    def of(
        cls,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        x: Any,
        y: Any,
        bn_mode: str,
        ps: Sequence[torch.Tensor] | None = None,
    ) -> FirstOrderPass:
        """The pass over ``ps`` (default: every trainable parameter)."""
        params: list[torch.Tensor] = list(ps) if ps is not None else [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the Hessian needs a trainable parameter; the model has none")
        grads, order = first_order(model, loss_fn, x, y, params, bn_mode)
        return cls(params, grads, order, bn_mode)

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.ps)

    def block(self, ks: Sequence[int]) -> tuple[HVP, torch.Tensor, int]:
        """The diagonal block of parameters ``ks``: its product, a reference tensor and its size."""
        ps = [self.ps[k] for k in ks]
        return hvp_function([self.grads[k] for k in ks], ps), ps[0], sum(p.numel() for p in ps)

    def start(self, init: torch.Tensor | None, seed: int, ks: Sequence[int] | None = None) -> torch.Tensor:
        """:func:`lanczos_start` on the block ``ks`` (every parameter without)."""
        ks = range(len(self.ps)) if ks is None else ks
        return lanczos_start([self.grads[k] for k in ks], [self.ps[k] for k in ks], seed, init)

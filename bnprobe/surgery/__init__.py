"""BatchNorm surgery: insert, strip (or fold) and noisy BN on any model.

``apply_bn(model, mode, example_input)`` works on a deep copy and returns it with a :class:`BnPlan`.

Pairing (which layer feeds which BN, what a layer's output goes to) comes from the dataflow, never
from names or registration order: the ``torch.fx`` graph where the model traces (BN and conv/linear
kept as leaves), otherwise forward hooks that match each module's input tensor object to the module
that returned it. One side-effect-free forward on ``example_input`` (running statistics and RNG
untouched) always runs too: it gives the forward order, the output ranks and which modules run.

Names. Every layer that exists before surgery keeps its name, so the rows of the keep, insert, strip
and noisy variants of one experiment line up:

- insert: the BN for target ``P.K`` is its sibling ``P.K_bn``, placed right after it in its parent
  ``nn.Sequential`` (``features.0`` stays the conv, ``features.0_bn`` is new, ``features.1`` is still
  the ReLU). Only a target whose parent is not a plain ``nn.Sequential`` (a module with its own
  ``forward``, e.g. ``self.conv1``) is wrapped instead: ``N`` becomes ``WithBatchNorm(N.conv, N.bn)`` (or
  ``N.linear``); that rename is said in the plan's detail.
- noisy: the noise is part of the BN module, so the recorded BN output is the noisy one. Each BN
  the forward runs becomes, at its own name and with its own tensors, the noisy subclass of its class
  (``NoisyBatchNorm2d`` for ``BatchNorm2d``, ...); a model without BN gets insert with noisy BNs.
- strip: BN ``B`` becomes ``nn.Identity`` (or ``Sequential(drop, act)`` for a BN that holds an
  activation, as timm's ``BatchNormAct2d``), so ``B`` keeps existing and nothing else is renamed.

The leaf modules in forward order are exactly those of the reference layout (torchvision ``vgg11`` +
insert runs the same module types, in the same order, as ``vgg11_bn``).

A target whose output already goes straight into a BN, or that runs one in its own forward (a QAT
``ConvBn2d``), is left alone by insert ("kept"); strip and fold keep a BN whose tensors code other
than its own forward reads (``F.batch_norm`` in a parent, a QAT ``ConvBn2d``), with the reason. DenseNet
(BN before conv): insert adds a BN right after every conv whose output does not already feed a BN
(each dense layer's second conv, before ``torch.cat``, and each transition conv, before pooling), on
top of DenseNet's own pre-activation BNs. Strip removes every BN; one whose input is not the direct
output of a conv/linear (DenseNet's ``norm1``, ``transition.norm``, ``norm5``, fed by ``torch.cat``)
is removed without re-biasing anything and is reported as such. ``fold=True`` folds each BN that
can be folded exactly: fed directly by a conv/linear that runs once, feeds nothing else, shares no
parameter, and whose output scales with its weight (not timm's weight-standardising ``StdConv2d``).
Any other BN is stripped as without ``fold`` and its plan row says why it was not folded (folding
forward through the following conv is exact only without padding and never through a
non-linearity, so it is not attempted). Folds are checked on ``example_input`` in eval mode.

The package, one job a module: ``kinds`` (what counts as a BN and as a layer a BN can follow),
``noisy`` (the noisy BN classes), ``plan`` (the :class:`BnPlan` returned), ``dataflow`` (who feeds
whom), ``edits`` (module edits), ``fold`` (folding and its check), ``modes`` (insert, noisy, strip);
:func:`apply_bn`, here, picks the mode.
"""

from __future__ import annotations

import copy
import enum
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from ..config import BnMode, BnTargets, NoiseConfig
from ..errors import SurgeryError
from ..layers import is_batchnorm
from ..passes import materialise
from .dataflow import _dataflow
from .edits import FreshCopy, WithBatchNorm
from .kinds import BatchNorm
from .modes import _add_noise, _insert, _strip
from .noisy import (
    NOISY_BN,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyBatchNorm3d,
    NoisyFrozenBatchNorm2d,
    NoisyNorm,
    NoisySyncBatchNorm,
    _Seeds,
    noisy_class,
    synchronise_bn,
)
from .plan import Action, BnPlan, Change

__all__ = [
    "NOISY_BN",
    "Action",
    "BatchNorm",
    "BnPlan",
    "Change",
    "FreshCopy",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "NoisyFrozenBatchNorm2d",
    "NoisyNorm",
    "NoisySyncBatchNorm",
    "WithBatchNorm",
    "apply_bn",
    "is_batchnorm",
    "noisy_class",
    "synchronise_bn",
]

E = TypeVar("E", bound=enum.Enum)


def _as_enum(cls: type[E], value: object, what: str) -> E:
    try:
        return cls(value.value if isinstance(value, enum.Enum) else str(value).lower())
    except ValueError:
        raise SurgeryError(f"unknown {what} {value!r}; choose from {', '.join(str(m.value) for m in cls)}") from None


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_bn(
    model: nn.Module,
    mode: str | BnMode,
    example_input: object,
    *,
    targets: str | BnTargets = "auto",
    keep_bias: bool = False,
    fold: bool = False,
    noise: NoiseConfig | None = None,
    seed: int = 0,
) -> tuple[nn.Module, BnPlan]:
    """Apply a BN mode (keep | insert | strip | noisy) to a deep copy of ``model``; returns it and the plan.

    ``example_input`` (a batch of at least two) is run once without side effects to find the
    dataflow. ``fold`` applies to strip only, ``targets`` and ``keep_bias`` to insert (and to noisy
    on a model without BN). Noise generators are seeded from ``seed``, one per noisy BN in forward
    order. No global RNG is consumed, so identically seeded builds keep identical weights.
    """
    bn_mode = _as_enum(BnMode, mode, "BN mode")
    bn_targets = _as_enum(BnTargets, targets, "BN targets")
    materialise(model, example_input)
    with _no_cycle_collection():
        return _apply(copy.deepcopy(model), bn_mode, bn_targets, example_input, keep_bias, fold, noise, seed)


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Surgery copies a model (a fold check may copy it again): on a model of thousands of modules,
    tens of thousands of objects, none of them garbage, which the cyclic collector, triggered by
    the allocations, walked again and again (a quarter of the time of a strip of 2,269 modules)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _apply(
    model: nn.Module,
    bn_mode: BnMode,
    bn_targets: BnTargets,
    example_input: object,
    keep_bias: bool,
    fold: bool,
    noise: NoiseConfig | None,
    seed: int,
) -> tuple[nn.Module, BnPlan]:
    """:func:`apply_bn` on ``model``, its own copy."""
    before = _param_count(model)
    if bn_mode is BnMode.KEEP:
        return model, BnPlan(bn_mode.value, "none", (), before, before)
    flow = _dataflow(model, example_input)
    seeds = _Seeds(seed, noise or NoiseConfig()) if bn_mode is BnMode.NOISY else None
    if bn_mode is BnMode.STRIP:
        model, changes = _strip(model, flow, fold, example_input)
    elif seeds is not None and any(is_batchnorm(m) for n, m in model.named_modules() if n in flow.index or n in flow.read_outside):
        changes = _add_noise(model, flow, seeds)
    else:
        changes = _insert(model, flow, bn_targets, keep_bias, seeds)
    return model, BnPlan(bn_mode.value, flow.pairing, tuple(changes), before, _param_count(model))

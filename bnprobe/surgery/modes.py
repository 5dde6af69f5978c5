"""The BN modes that edit a model: insert, noisy (on a model with BN) and strip (or fold)."""

from __future__ import annotations

import math
from typing import TypeAlias

import torch
from torch import nn

from ..config import BnTargets
from ..errors import SurgeryError
from ..layers import is_batchnorm
from .dataflow import _feeder, _feeder_layer, _Flow
from .edits import _new_bn, _norm_tail, _place_after, _replace, _slots, _stand_in
from .fold import _bn_affine, _check_folds, _fold_blocker, _param_owners, _scale_into
from .kinds import _TARGETS, _channels, _num_features
from .noisy import NoisyNorm, _make_noisy, _Seeds
from .plan import Action, Change


def _insert(model: nn.Module, flow: _Flow, targets: BnTargets, keep_bias: bool, seeds: _Seeds | None) -> list[Change]:
    """A BN (noisy when ``seeds`` is given) right after each target layer, before whatever follows it (its non-linearity)."""
    modules = dict(model.named_modules())
    slots = _slots(model)
    if targets is BnTargets.AUTO:
        has_conv = any(isinstance(m, _TARGETS["conv"]) for m in modules.values())
        types = _TARGETS["conv" if has_conv else "linear"]
    else:
        types = _TARGETS["conv"] + _TARGETS["linear"] if targets is BnTargets.ALL else _TARGETS[targets.value]
    layers = {n: m for n, m in modules.items() if isinstance(m, types)}
    changes = []
    for name in [n for n in flow.ordered(list(flow.index)) if n in layers]:
        layer = layers[name]
        if name in flow.outputs:
            continue
        followers = sorted(u for u in flow.users.get(name, ()) if u == "op:batch_norm" or (u in modules and is_batchnorm(modules[u])))
        if followers:
            changes.append(Change(Action.KEPT, followers[0], name, "already followed by a BatchNorm"))
            continue
        own = [f"{name}.{n}" for n, m in layer.named_modules() if n and is_batchnorm(m) and f"{name}.{n}" in flow.index]
        if own:  # a fused conv-BN (a QAT ConvBn2d): a second BN would normalise twice
            changes.append(Change(Action.KEPT, own[0], name, f"already runs a BatchNorm in its own forward ({own[0]})"))
            continue
        bn = _new_bn(layer, name, flow, seeds).train(layer.training)
        detail = f"{type(bn).__name__}({_num_features(bn)})"
        if seeds is not None:
            detail += f", noise seed {bn.noise_seed}"
        if not keep_bias and layer.bias is not None:
            layer.register_parameter("bias", None)
            detail += f"; {name}'s bias removed"
        bn_name, layer_name, renamed = _place_after(layer, bn, slots[layer])
        changes.append(Change(Action.INSERTED, bn_name, layer_name, f"{detail}; {renamed}" if renamed else detail))
    return changes


def _add_noise(model: nn.Module, flow: _Flow, seeds: _Seeds) -> list[Change]:
    """Each BN the forward runs becomes its noisy subclass at its own name; a BN holding an activation gets the noise before it."""
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    changes, unreachable = [], []
    for name in flow.ordered([n for n in bns if n in flow.index or n in flow.read_outside]):
        bn = bns[name]
        if name not in flow.index:  # its forward, where the noise goes, never runs
            reader = flow.read_outside[name]
            changes.append(
                Change(Action.KEPT, name, "", f"not made noisy: its own forward never runs; code other than it reads its tensors: {reader}")
            )
            unreachable.append(name)
            continue
        feeder, _ = _feeder(model, flow, name, bn)
        if isinstance(bn, NoisyNorm):
            changes.append(Change(Action.KEPT, name, feeder or "", f"already a {type(bn).__name__}"))
            continue
        after = [n for n, _ in _norm_tail(bn, flow, name) if f"{name}.{n}" in flow.index]
        before = type(bn).__name__
        seed = seeds.next()
        _make_noisy(bn, name, after, seed, seeds.config)
        where = f", before its {', '.join(after)}" if after else ""
        changes.append(Change(Action.NOISE, name, feeder or "", f"{before} -> {type(bn).__name__}, noise seed {seed}{where}"))
    if unreachable and len(unreachable) == len(changes):  # else a noisy variant would silently equal keep
        raise SurgeryError(
            f"cannot add noise to {', '.join(unreachable)}: only code other than its own forward uses it "
            f"({flow.read_outside[unreachable[0]]}), and the noise goes in a BN's forward"
        )
    return changes


_Fold: TypeAlias = "tuple[str, nn.Module, str, str, nn.Module]"  # BN name, BN, feeder name, plan note, stand-in


def _strip(model: nn.Module, flow: _Flow, fold: bool, example_input: object) -> tuple[nn.Module, list[Change]]:
    """Every BN out; the layer that fed it gets a zero bias (strip) or the BN folded in (fold).

    With ``fold``, a BN that cannot be folded exactly (:func:`_fold_blocker`) is stripped as without
    it, and its row says why. The folds are then checked on ``example_input`` in eval mode against
    the model with only those BNs stripped: a difference means a use of a folded layer's output
    that the dataflow did not see (e.g. a data-dependent branch), and is an error.
    """
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    owners = _param_owners(model) if fold else {}
    changes: list[Change] = []
    folds: list[_Fold] = []
    stripped: dict[nn.Module, nn.Module] = {}
    for name in flow.ordered(list(bns)):
        bn = bns[name]
        if name in flow.read_outside:  # that code would find its stand-in, not the BN's tensors
            not_done = "not folded or stripped" if fold else "not stripped"
            reader = flow.read_outside[name]
            changes.append(Change(Action.KEPT, name, "", f"{not_done}: code other than its own forward reads its tensors: {reader}"))
            continue
        feeder, why = _feeder(model, flow, name, bn)
        replacement, becomes = _stand_in(flow, name, bn, feeder)
        blocker = _fold_blocker(model, flow, owners, name, bn, feeder, why) if fold else ""
        if fold and not blocker:
            assert feeder is not None
            folds.append((name, bn, feeder, becomes, replacement))
            continue
        not_folded = f"not folded: {blocker}; " if fold else ""
        note = (not_folded or why + "; ") if feeder is None else not_folded  # without a feeder, say why
        changes += _remove(model, name, bn, feeder, note, becomes)
        stripped[bn] = replacement.train(bn.training)
    model = _replace(model, stripped)
    if folds:
        model = _fold_all(model, folds, example_input, changes)
        changes.sort(key=lambda c: flow.index.get(c.module if c.action is not Action.REBIASED else c.related, math.inf))
    return model, changes


def _remove(model: nn.Module, name: str, bn: nn.Module, feeder: str | None, note: str, becomes: str) -> list[Change]:
    """The rows of a BN stripped without folding; its feeder, if any, gets a zero bias where it had none."""
    if feeder is None:
        return [Change(Action.REMOVED, name, "", f"{note}nothing re-biased{becomes}")]
    changes = [Change(Action.REMOVED, name, feeder, f"{note}{type(bn).__name__}({_num_features(bn)}){becomes}")]
    layer = _feeder_layer(model, feeder)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(_channels(layer), device=layer.weight.device, dtype=layer.weight.dtype))
        changes.append(Change(Action.REBIASED, feeder, name, f"zero-initialised bias ({_channels(layer)})"))
    return changes


def _fold_all(model: nn.Module, folds: list[_Fold], example_input: object, changes: list[Change]) -> nn.Module:
    """Check the folds together (:func:`_check_folds`), then fold each BN into its feeder; appends their rows to ``changes``."""
    _check_folds(model, [(name, feeder, replacement) for name, _, feeder, _, replacement in folds], example_input)
    for name, bn, feeder, becomes, _ in folds:
        _scale_into(_feeder_layer(model, feeder), *_bn_affine(bn))
        changes.append(Change(Action.FOLDED, name, feeder, f"running statistics and affine folded into {feeder}{becomes}"))
    return _replace(model, {bn: replacement.train(bn.training) for _, bn, _, _, replacement in folds})

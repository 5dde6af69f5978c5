"""Folding a BN into the conv/linear that feeds it: when that is exact, the fold itself, and its check."""

from __future__ import annotations

import copy
import enum
import functools
import types
from collections import defaultdict
from typing import TypeAlias

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from ..errors import SurgeryError
from ..layers import is_batchnorm
from .dataflow import _REGISTRIES, _containers, _describe, _feeder_layer, _Flow, _tensors
from .edits import _replace
from .kinds import _TARGETS, _channels, _Feeder, _tensor

_FOLD_RTOL = 1e-4


def _running_stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A BN's running mean and variance, or None when it keeps none (eval mode then uses the batch's)."""
    mean, var = _tensor(bn, "running_mean"), _tensor(bn, "running_var")
    return None if mean is None or var is None else (mean, var)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as ``scale * x + shift`` per channel, in float64."""
    stats = _running_stats(bn)
    assert is_batchnorm(bn), f"{type(bn).__name__} is not a BatchNorm"
    assert stats is not None, "only a BN with running statistics is folded (_fold_blocker)"
    mean, var = stats[0].double(), stats[1].double()
    weight, bias = _tensor(bn, "weight"), _tensor(bn, "bias")
    gamma = weight.double() if weight is not None else torch.ones_like(mean)
    beta = bias.double() if bias is not None else torch.zeros_like(mean)
    eps = bn.eps
    assert isinstance(eps, float), "is_batchnorm checked it"
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def _scale_into(layer: _Feeder, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``layer`` compute ``scale * layer(x) + shift`` per output channel (float64 arithmetic, then its dtype)."""
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
            g = layer.groups
            grouped = w.double().view(g, w.shape[0] // g, *w.shape[1:])
            folded = grouped * scale.view(g, 1, -1, *[1] * (w.dim() - 2))
        else:  # weight: (out, ...)
            folded = w.double() * scale.view(-1, *[1] * (w.dim() - 1))
        if parametrize.is_parametrized(layer, "weight"):  # the stored tensors from the folded weight (weight_norm's g and v)
            layer.weight = folded.view_as(w).to(w.dtype)
        else:
            w.copy_(folded.view_as(w))
        bias = layer.bias.double() * scale + shift if layer.bias is not None else shift
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(w.dtype))
        else:
            layer.bias.copy_(bias)


_STOCK_FORWARDS = frozenset(
    cls.forward for cls in (*_TARGETS["conv"], nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
)


def _scales_with_its_weight(layer: _Feeder, shape: tuple[int, ...] | None) -> bool:
    """Whether scaling ``layer``'s weight per output channel scales its output: true for torch's own
    conv/linear forward; a subclass with its own (timm's weight-standardising ``StdConv2d`` undoes
    any scale) is tried on a float64 copy with a random input of the shape it was called with."""
    if type(layer).forward in _STOCK_FORWARDS:
        return True
    if shape is None:
        return False
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(layer).double()
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(layer.weight.device)
    channels = _channels(layer)
    scale = (0.5 + torch.rand(channels, generator=g, dtype=torch.float64)).to(x.device)
    shift = torch.randn(channels, generator=g, dtype=torch.float64).to(x.device)
    with torch.no_grad():
        expected = probe(x)
        expected = expected * scale.view(-1, *[1] * (expected.dim() - 2)) + shift.view(-1, *[1] * (expected.dim() - 2))
        _scale_into(probe, scale, shift)
        return torch.allclose(probe(x), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


_Owners: TypeAlias = "dict[int, list[tuple[str, nn.Module]]]"


def _param_owners(model: nn.Module) -> _Owners:
    """The modules that hold each parameter (by id) as their own, from one pass over the model."""
    owners: _Owners = defaultdict(list)
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)].append((name, m))
    return owners


def _fold_blocker(model: nn.Module, flow: _Flow, owners: _Owners, name: str, bn: nn.Module, feeder: str | None, why: str) -> str:
    """Why folding ``name`` into ``feeder`` would not give the same eval-mode function ("" if it
    would). ``owners`` is :func:`_param_owners` of the model, taken once for all its BNs."""
    if feeder is None:
        return why
    if _running_stats(bn) is None:
        return "it keeps no running statistics (track_running_stats=False), so eval mode normalises by the batch"
    others = flow.users.get(feeder, set()) - {name}
    if others:
        return f"{feeder}'s output is also used by {', '.join(sorted(map(_describe, others)))}"
    if flow.calls[feeder] != 1 or flow.calls[name] != 1:
        twice = feeder if flow.calls[feeder] != 1 else name
        return f"{twice} runs {flow.calls[twice]} times per forward"
    layer = _feeder_layer(model, feeder)
    sharer = next((n for p in layer.parameters(recurse=False) for n, m in owners.get(id(p), []) if m is not layer), None)
    if sharer is not None:
        return f"{feeder}'s parameters are shared with {sharer}"
    other = [p for p in _parametrizations(layer) if p != "_WeightNorm"]
    if other:
        return f"{feeder}'s weight or bias is computed by {', '.join(other)}, which a scaled weight need not fit"
    if not _scales_with_its_weight(layer, flow.in_shape.get(feeder)):
        return f"{feeder} ({type(layer).__name__}) does not scale its output with its weight"
    return ""


def _parametrizations(layer: nn.Module) -> list[str]:
    """The class names of the parametrizations computing ``layer``'s weight and bias, in order."""
    parts = layer.parametrizations if parametrize.is_parametrized(layer) else nn.ModuleDict()
    assert isinstance(parts, nn.ModuleDict)
    return [type(p).__name__ for name in ("weight", "bias") if name in parts for p in parts[name].children()]


def _eval_output(model: nn.Module, example_input: object) -> list[torch.Tensor]:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [t.double() for t in _tensors(model(example_input))]
    finally:
        model.train(training)


def _as_double(obj: object) -> object:
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, obj)


_PLAIN = (type(None), bool, int, float, complex, str, bytes, type, enum.Enum, types.FunctionType, types.BuiltinFunctionType)
_PLAIN_TORCH = (torch.dtype, torch.device, torch.layout, torch.memory_format)


def _plain(value: object) -> bool:
    """Whether ``value`` holds no module, tensor or object bnprobe cannot see into: a twin may share it."""
    if isinstance(value, (*_PLAIN, *_PLAIN_TORCH)):
        return True
    if isinstance(value, (tuple, frozenset, list, set)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, functools.partial):
        return _plain(value.func) and _plain(value.args) and _plain(value.keywords)
    return False


def _twin(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` for the check to fold and run, its floating tensors in ``dtype`` (or
    cloned), tied tensors still tied. When every module keeps its state in its registries
    (parameters, buffers, children) and plain values elsewhere, the copy is structural: new module
    objects and tensors, other attributes shallow-copied (lists, sets and dicts one level deep, so a
    forward that appends to a list appends to the twin's). ``copy.deepcopy`` also copies every attribute of
    every module, and took most of the check's time on a model with thousands of modules. A model
    that holds a module or tensor anywhere else (a list of its layers that its forward walks), or is
    parametrized, is deep-copied: a shallow copy would run or change the model's own modules."""
    originals = list(model.modules())
    if any(parametrize.is_parametrized(m) or not all(_plain(v) for k, v in vars(m).items() if k not in _REGISTRIES) for m in originals):
        deep = copy.deepcopy(model)
        return deep.to(dtype) if dtype is not None else deep
    tensors: dict[int, torch.Tensor] = {}
    twins: dict[int, nn.Module] = {}
    for m in originals:
        twin = twins[id(m)] = copy.copy(m)
        for key, value in _containers(vars(m)):
            vars(twin)[key] = copy.copy(value)

    def tensor(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in tensors:
            data = t.detach().to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t.detach().clone()
            tensors[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        return tensors[id(t)]

    for m in originals:
        twin = twins[id(m)]
        twin._parameters = {k: None if p is None else tensor(p) for k, p in m._parameters.items()}  # type: ignore[misc]
        twin._buffers = {k: None if b is None else tensor(b) for k, b in m._buffers.items()}
        twin._modules = {k: None if c is None else twins[id(c)] for k, c in m._modules.items()}
    return twins[id(model)]


def _check_folds(model: nn.Module, folds: list[tuple[str, str, nn.Module]], example_input: object) -> None:
    """The safety net behind :func:`_fold_blocker`: the folds, done on a twin, must leave its eval
    output on ``example_input`` unchanged (to 1e-4, relative); a difference is a use of a folded
    layer's output the dataflow pass did not see (a data-dependent branch). The check runs in the
    model's own dtype first, where nearly every model passes, and only on a difference again in
    float64: a deep model (untrained, or with statistics from a few small batches) can amplify
    float32 rounding of the folded weights beyond the tolerance. A model that does not run in float64
    is judged in its own dtype. A model whose own rounding noise is larger still passes when the
    difference is within 10x that noise (:func:`_rounding_noise`)."""
    worst, reference = _fold_change(model, folds, example_input, None)
    if worst <= _FOLD_RTOL:
        return
    x = _as_double(example_input)
    dtype: torch.dtype | None = torch.float64
    try:
        worst, reference = _fold_change(model, folds, x, dtype)
    except Exception:  # noqa: BLE001 - a forward that cannot run in float64: judged in the model's dtype
        x, dtype = example_input, None
    if worst > _FOLD_RTOL and worst > 10 * _rounding_noise(model, x, dtype, reference):
        raise SurgeryError(
            f"folding BN changed {type(model).__name__}'s eval output by {worst:.1e} (relative): a folded layer's output is used in a way the dataflow pass did not see; strip without --fold"
        )


def _fold_change(
    model: nn.Module, folds: list[tuple[str, str, nn.Module]], x: object, dtype: torch.dtype | None
) -> tuple[float, list[torch.Tensor]]:
    """How far the folds move a twin's eval output on ``x`` (relative), and the output before them."""
    twin = _twin(model, dtype)
    reference = _eval_output(twin, x)
    stand_ins: dict[nn.Module, nn.Module] = {}
    for name, feeder, replacement in folds:
        bn = twin.get_submodule(name)
        _scale_into(_feeder_layer(twin, feeder), *_bn_affine(bn))
        stand_ins[bn] = _twin(replacement, dtype)
    return _relative_change(_eval_output(_replace(twin, stand_ins), x), reference), reference


def _relative_change(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(outputs, reference))


def _rounding_noise(model: nn.Module, x: object, dtype: torch.dtype | None, reference: list[torch.Tensor]) -> float:
    """How far the eval output moves when every weight moves by one rounding step (relative): no
    check can tell a fold from rounding below that. A chaotic model (an untrained EfficientNetV2 on
    small images, even in float64) would otherwise be refused for an exact fold."""
    twin = _twin(model, dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                jitter = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
                p.mul_(1 + torch.finfo(p.dtype).eps / 2 * jitter)  # unit roundoff
    return _relative_change(_eval_output(twin, x), reference)

"""Forwards made twice differentiable, and their double backward cheap, for the Hessian's passes.

Every Hessian-vector product here is a double backward through the graph of one first-order
backward (:func:`bnprobe.probes.hvp.first_order`). :class:`TwiceDifferentiable` runs the
model's forward with a few functions swapped for equal formulas:

- ``hardsigmoid`` (MobileNetV3, GhostNet, LCNet squeeze-excite) and ``normalize`` (Swin V2's cosine
  attention) for formulas that have a (finite) double backward where torch's has none;
- ``batch_norm`` (batch statistics, float32/64) for one whose backward's own derivative is written
  out (:class:`_BatchNormBackward`): 9 elementwise passes and 5 sums per layer and product, where
  torch's composite runs about 40 elementwise ops and 30 sums, a large share of a product's time on
  VGG-11 with BN, so products through BN get faster. Forward and first-order backward are torch's kernels.

Same values and the same first and second derivatives (to rounding; third derivatives through BN
are refused).
:func:`refusing_what_has_no_double_backward` names the module whose op torch cannot differentiate
twice, where nothing here replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ModelError
from ..passes import leave_no_trace


class TwiceDifferentiable(TorchFunctionMode):
    """Runs ``hardsigmoid``, ``normalize`` and ``batch_norm`` as the formulas above.

    ``hardsigmoid`` becomes ``relu6(x + 3) / 6``; ``normalize`` takes the norm of a zero vector
    without the NaN that the norm's double backward gives there; ``batch_norm`` in float32/64 runs
    as :func:`_batch_norm`. (A mode sees the calls the model makes, not those inside another torch
    function; attention, called from inside ``multi_head_attention_forward``, is handled by the
    pass's ``sdpa_kernel`` instead.)
    """

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.normalize:
            return _normalize(*args, **kwargs)
        if func is F.hardsigmoid:
            x = args[0]
            out = F.relu6(x + 3) / 6
            return x.copy_(out) if kwargs.get("inplace", args[1] if len(args) > 1 else False) else out
        return func(*args, **kwargs)


def _normalize(x: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.normalize`` whose second derivative is finite at zero vectors (p=2; others as torch's)."""
    if p != 2 or out is not None:
        return F.normalize(x, p, dim, eps, out)
    squares = x.square().sum(dim, keepdim=True)
    nonzero = squares > 0
    norm = torch.where(nonzero, torch.where(nonzero, squares, 1).sqrt(), 0)  # sqrt never sees 0
    return x / norm.clamp_min(eps)


def _batch_norm(
    input: torch.Tensor,  # F.batch_norm's names, for a caller passing keywords
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` with a cheap double backward: batch statistics through
    :class:`_BatchNormBatchStats`, running ones as an affine map of plain ops. Torch's own where
    the running statistics would move (no measurement pass does that: :func:`leave_no_trace`
    turns tracking off) or in other dtypes (half precision: torch's kernels accumulate in float32)."""
    x = input
    dtypes = {t.dtype for t in (x, running_mean, running_var, weight, bias) if t is not None}
    updates = training and running_mean is not None
    if updates or not dtypes <= {torch.float32, torch.float64} or len(dtypes) > 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if training or running_mean is None or running_var is None:
        if x.numel() // x.shape[1] == 1:  # F.batch_norm's own check, which the mode's call bypasses
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        out: torch.Tensor = _BatchNormBatchStats.apply(x, weight, bias, eps)
        return out
    shape = _channel_shape(x)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


class _BatchNormBatchStats(torch.autograd.Function):
    """BN with batch statistics: torch's forward and backward kernels; a backward that is itself
    differentiated (``create_graph``) runs as :class:`_BatchNormBackward`, whose own backward is written out."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        wanted = list(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # a plain backward
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, weight, None, None, mean, invstd, True, ctx.eps, wanted)
            return dx, dw, db, None
        w = weight if weight is not None else torch.ones_like(mean)
        dx, dw, db = _BatchNormBackward.apply(g, x, w, mean, invstd, ctx.eps)
        return dx if wanted[0] else None, dw if wanted[1] else None, db if wanted[2] else None, None


class _BatchNormBackward(torch.autograd.Function):
    """BN's backward (per channel, sums over the m entries of all but dimension 1; s = 1/sqrt(var + eps),
    x_hat = (x - mean) * s):

        dx = w s (g - mean(g) - x_hat G / m),  dw = G,  db = sum(g),  with G = sum(g x_hat),

    by torch's kernel, and its derivative written out, so that a Hessian-vector product through BN
    costs 9 elementwise passes and 5 sums per layer. For upstream gradients (a, p, q) of (dx, dw, db),
    with A = sum(a x_hat) and K = sum(a g) - sum(a) sum(g) / m:

        d/dg = w s (a - mean(a)) + (p - w s A / m) x_hat + q
        d/dw = s (K - A G / m)
        d/dx = w s^2 / m (-G (a - mean(a)) - A (g - mean(g)) + (3 A G / m - K) x_hat)
               + p s (g - mean(g) - x_hat G / m)

    (x enters through x_hat and s: d x_hat_i / d x_j = s (delta_ij - 1/m - x_hat_i x_hat_j / m),
    d s / d x_j = -s^2 x_hat_j / m). The tests check it against torch's double backward in float64.
    """

    @staticmethod
    def forward(
        ctx: Any, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(g, x, w, mean, invstd)
        return dx, dw, db

    @staticmethod
    def backward(ctx: Any, a: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # the formulas take the batch statistics as given: their derivative would be wrong
            raise RuntimeError("bnprobe's second derivative of BN cannot be differentiated again (no third derivatives)")
        g, x, w, mean, invstd = ctx.saved_tensors
        shape, dims = _channel_shape(x), [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]
        s, w, p, q = invstd.view(shape), w.view(shape), p.view(shape), q.view(shape)
        x_hat = torch.addcmul((-mean).view(shape) * s, x, s)
        a_sum, g_sum = a.sum(dims, keepdim=True), g.sum(dims, keepdim=True)
        big_a, big_g = (a * x_hat).sum(dims, keepdim=True), (g * x_hat).sum(dims, keepdim=True)
        k = (a * g).sum(dims, keepdim=True) - a_sum * g_sum / m
        ws = w * s
        d_g = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_g = torch.addcmul(torch.addcmul(q - ws * a_sum / m, x_hat, p - ws * big_a / m), a, ws)
        if ctx.needs_input_grad[1]:
            c = ws * s / m
            on_a, on_g = -c * big_g, p * s - c * big_a
            on_x_hat = c * (3 * big_a * big_g / m - k) - p * s * big_g / m
            constant = -(on_a * a_sum + on_g * g_sum) / m
            d_x = torch.addcmul(torch.addcmul(torch.addcmul(constant, x_hat, on_x_hat), a, on_a), g, on_g)
        if ctx.needs_input_grad[2]:
            d_w = (s * (k - big_a * big_g / m)).reshape(-1)
        return d_g, d_x, d_w, None, None, None


_NO_DOUBLE_BACKWARD = re.compile(  # autograd's words, and torchvision's for its ops (roi_align, deform_conv2d)
    r"derivative for (?:aten::)?(\w+?)(?:_backward)? is not implemented|double backwards on (\w+) not supported"
)


def _not_twice_differentiable(model: nn.Module, x: Any, error: RuntimeError) -> ModelError | None:
    """A one-line error naming the first module whose forward runs the op that has no double
    backward (found by running the forward again and watching which module calls what), or None
    when ``error`` is about something else."""
    match = _NO_DOUBLE_BACKWARD.search(str(error))
    if match is None:
        return None
    op = match.group(1) or match.group(2)
    stack: list[str] = []
    found: list[str] = []

    class Watch(TorchDispatchMode):  # sees every aten op, also those inside other torch functions
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]  # torch's base constructor is unannotated

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not found and stack and func._schema.name.split("::")[-1] == op:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    names = {m: f"{n} ({type(m).__name__})" if n else type(m).__name__ for n, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda m, _a: stack.append(names[m])) for m in names]
    handles += [m.register_forward_hook(lambda m, _a, _o: stack.pop() and None) for m in names]  # a hook's return replaces the output
    try:
        with leave_no_trace(model), TwiceDifferentiable(), sdpa_kernel([SDPBackend.MATH]), Watch():
            model(x)  # as the failed pass ran it
    finally:
        for h in handles:
            h.remove()
    where = found[0] if found else type(model).__name__
    return ModelError(f"no Hessian for this model: {where} runs {op}, which PyTorch cannot differentiate twice")


@contextmanager
def refusing_what_has_no_double_backward(model: nn.Module, x: Any) -> Iterator[None]:
    """Turns autograd's "derivative for X is not implemented" in the block into a ModelError that names the module."""
    try:
        yield
    except RuntimeError as e:
        refusal = _not_twice_differentiable(model, x, e)
        if refusal is None:
            raise
        raise refusal from e

"""BN's cheaper double backward equals torch's: values, gradients and Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnprobe.passes import leave_no_trace
from bnprobe.probes.double_backward import TwiceDifferentiable
from bnprobe.probes.hessian import first_order

Build = Callable[[], tuple[nn.Module, torch.Tensor]]


def _case(bn: nn.Module, shape: tuple[int, ...], first: bool = False, frozen: bool = False) -> Build:
    """BN between a parameterised input map (so second derivatives also flow through x; ``first``:
    BN on the raw input) and a tanh and linear head; ``frozen``: its affine weight takes no gradient."""

    def build() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        channels = shape[1]
        norm = bn.double()
        if norm.affine:  # away from the initial 1 and 0, so a dropped or doubled factor shows
            nn.init.uniform_(norm.weight, 0.5, 2.0)
            nn.init.uniform_(norm.bias, -1.0, 1.0)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if frozen:
            norm.weight.requires_grad_(False)
        model = nn.Sequential(*([] if first else [ScaleIn(shape)]), norm, nn.Tanh(), Head(channels)).double()
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3 + 1
        return model, x

    return build


class ScaleIn(nn.Module):
    """A per-channel scale plus a square before the BN: its input depends on a parameter, not linearly (second derivatives through x)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, *[1] * (x.dim() - 2)) + x.square() * 0.1


class Head(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(2).mean(2) if x.dim() > 2 else x)


CASES = {
    "1d [N,C]": _case(nn.BatchNorm1d(4), (6, 4)),
    "1d [N,C,L]": _case(nn.BatchNorm1d(3), (4, 3, 5)),
    "2d": _case(nn.BatchNorm2d(3), (4, 3, 2, 3)),
    "3d": _case(nn.BatchNorm3d(2), (3, 2, 2, 2, 2)),
    "no affine": _case(nn.BatchNorm2d(3, affine=False), (4, 3, 2, 2)),
    "first layer": _case(nn.BatchNorm2d(3), (4, 3, 2, 2), first=True),
    "frozen weight": _case(nn.BatchNorm1d(4), (6, 4), frozen=True),
}


def _grads_and_products(model: nn.Module, x: torch.Tensor, bn_mode: str, cheap: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat gradient and two Hessian-vector products (one batched pair), through the mode or through torch's own BN."""
    y = torch.arange(x.shape[0]) % 3
    ps = [p for p in model.parameters() if p.requires_grad]
    if cheap:
        grads = first_order(model, nn.CrossEntropyLoss(), x, y, ps, bn_mode)[0]
    else:
        with leave_no_trace(model, bn_mode):
            loss = nn.CrossEntropyLoss()(model(x), y)
        grads = list(torch.autograd.grad(loss, ps, create_graph=True))
    assert all(g is not None for g in grads)
    n = sum(p.numel() for p in ps)
    v = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    parts = v.split([p.numel() for p in ps], dim=1)
    products = torch.autograd.grad(
        grads, ps, grad_outputs=[t.reshape(2, *p.shape) for t, p in zip(parts, ps)], is_grads_batched=True, retain_graph=True
    )
    single = torch.autograd.grad(grads, ps, grad_outputs=[t[0].reshape(p.shape) for t, p in zip(parts, ps)])
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    return flat, torch.cat([h.reshape(2, -1) for h in products], 1), torch.cat([h.reshape(-1) for h in single])


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_and_hessian_products_equal_torchs(case: str, bn_mode: str) -> None:
    model, x = CASES[case]()
    g_ref, h_ref, s_ref = _grads_and_products(model, x, bn_mode, cheap=False)
    g, h, s = _grads_and_products(model, x, bn_mode, cheap=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, h[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_values_equal_torchs_with_positional_and_keyword_arguments(training: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    mean, var, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
    stats = (None, None) if training else (mean, var)
    expected = F.batch_norm(x, *stats, w, b, training, 0.1, 1e-3)
    with TwiceDifferentiable():
        positional = F.batch_norm(x, *stats, w, b, training, 0.1, 1e-3)
        keywords = F.batch_norm(input=x, running_mean=stats[0], running_var=stats[1], weight=w, bias=b, training=training, eps=1e-3)
    torch.testing.assert_close(positional, expected)
    torch.testing.assert_close(keywords, expected)


def test_the_hessian_graph_runs_through_the_cheap_backward() -> None:
    """Torch's composite BN double backward is not in the graph a product runs through (the speed up)."""
    model, x = CASES["2d"]()
    grads = first_order(model, nn.CrossEntropyLoss(), x, torch.arange(4) % 3, list(model.parameters()), "train")[0]
    seen: dict[object, str] = {}
    stack = [g.grad_fn for g in grads if g is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen[node] = node.name()
        stack.extend(f for f, _ in node.next_functions)
    names = set(seen.values())
    assert "_BatchNormBackwardBackward" in names
    assert not any(name.startswith("NativeBatchNormBackward") for name in names)


def test_running_statistics_that_would_move_and_half_precision_use_torchs_bn() -> None:
    x = torch.randn(4, 3)
    mean, var = torch.zeros(3), torch.ones(3)
    with TwiceDifferentiable():
        F.batch_norm(x, mean, var, training=True, momentum=0.5)
        half = F.batch_norm(x.half(), None, None, training=True)
    torch.testing.assert_close(mean, x.mean(0) * 0.5)  # updated as torch updates them
    assert half.dtype == torch.float16


def test_one_value_per_channel_is_refused_as_torch_refuses_it() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"), TwiceDifferentiable():
        F.batch_norm(torch.randn(1, 3), None, None, training=True)


def test_third_derivatives_through_bn_are_refused() -> None:
    """The written-out second derivative treats the batch statistics as given: differentiating it again would be wrong."""
    model, x = CASES["2d"]()
    ps = list(model.parameters())
    grads = first_order(model, nn.CrossEntropyLoss(), x, torch.arange(4) % 3, ps, "train")[0]
    with pytest.raises(RuntimeError, match="no third derivatives"):
        torch.autograd.grad(grads, ps, grad_outputs=[torch.ones_like(p) for p in ps], create_graph=True)

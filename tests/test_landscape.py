"""Loss landscape along the gradient against a naive deep-copy re-computation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from _fixtures import Noisy
from torch import nn

from bnprobe.errors import ConfigError
from bnprobe.models import dln
from bnprobe.probes.landscape import ETA_RANGES, LandscapeResult, default_etas, landscape


def net() -> nn.Module:
    """BN (train mode), dropout and a private noise generator: every way an eval could differ."""
    sn = torch.nn.utils.parametrizations.spectral_norm  # a buffer updated in every forward
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), Noisy(1), nn.ReLU(), nn.Dropout(0.3), sn(nn.Linear(12, 12)), nn.Tanh(), nn.Linear(12, 3)
    )


def naive(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: list[float], seed: int) -> LandscapeResult:
    """A straight loop over parameter copies, one fresh deep copy and the same seed per evaluation."""

    def loss_grad(shift: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor]]:
        m = copy.deepcopy(model)
        if shift is not None:
            with torch.no_grad():
                for p, s in zip(m.parameters(), shift):
                    p.sub_(s)
        torch.manual_seed(seed)
        loss = loss_fn(m(x), y)
        loss.backward()
        return loss.item(), [p.grad.detach().double().clone() for p in m.parameters()]

    l0, g = loss_grad(None)
    gnorm = math.sqrt(sum(float((t**2).sum()) for t in g))
    losses, diffs = [], []
    for eta in etas:
        le, ge = loss_grad([(eta * t).float() for t in g])
        losses.append(le)
        diffs.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g, ge))))
    beta = max(d / (eta * gnorm) for d, eta in zip(diffs, etas))
    return LandscapeResult(etas, losses, diffs, beta, l0, gnorm)


def test_matches_naive_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
    etas = default_etas(0.5)
    ref = naive(model, nn.CrossEntropyLoss(), x, y, etas, seed=5)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # .grad must survive untouched
    before = copy.deepcopy(model)
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    got = landscape(model, nn.CrossEntropyLoss(), x, y, etas)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(model[2].generator.get_state(), before[2].generator.get_state())
    for (n, a), b in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert got.etas == etas
    assert got.loss_at_w == pytest.approx(ref.loss_at_w, rel=1e-5)
    assert got.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    assert got.grad_l2 == pytest.approx(ref.grad_l2, rel=1e-4, abs=1e-6 * ref.grad_norm)
    assert got.beta == pytest.approx(ref.beta, rel=1e-4)
    assert got.beta == pytest.approx(max(got.smoothness))
    assert got.loss_min == min(got.loss) and got.loss_max == max(got.loss)
    assert got.loss[0] < got.loss_at_w  # a small step downhill lowers the loss


def test_quadratic_exact() -> None:
    """L(w) = 0.5 ||A w||^2 on a bias-free linear layer: grad = A^T A w; along -g the gradient
    changes by eta A^T A g, so beta is the largest Rayleigh quotient of A^T A along g."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    x = torch.randn(32, 4)
    loss_fn = lambda out, y: 0.5 * (out**2).sum()  # noqa: E731
    res = landscape(model, loss_fn, x, None, [0.01, 0.1])
    h = x.T @ x
    w = model.weight.detach().reshape(-1)
    g = h @ w
    assert res.grad_norm == pytest.approx(float(g.norm()), rel=1e-5)
    expected = float((h @ g).norm() / g.norm())
    assert res.beta == pytest.approx(expected, rel=1e-4)
    assert res.grad_l2[1] == pytest.approx(0.1 * float((h @ g).norm()), rel=1e-4)


def test_dln_grid_and_default_etas() -> None:
    assert default_etas(0.1) == pytest.approx([0.1 * 0.5 * 8 ** (k / 7) for k in range(8)])
    assert default_etas(0.1)[0] == pytest.approx(0.05) and default_etas(0.1)[-1] == pytest.approx(0.4)
    d = default_etas(1e-6, "dln", n=5)
    assert d[0] == pytest.approx(1e-8) and d[-1] == pytest.approx(3e-5) and len(d) == 5
    assert default_etas(0.1, "torchvision:resnet18") == default_etas(0.1, "vgg")
    assert ETA_RANGES == {"vgg": (0.5, 4.0), "dln": (0.01, 30.0)}
    with pytest.raises(ConfigError, match=r"need a positive learning rate, got 0.0"):
        default_etas(0.0)
    torch.manual_seed(0)
    model = dln(10, (10,), depth=6)
    x = torch.randn(64, 10)
    res = landscape(model, nn.MSELoss(), x, x, default_etas(0.05, "dln"))
    assert len(res.loss) == 8 and all(math.isfinite(v) for v in res.loss + res.grad_l2)
    with pytest.raises(ConfigError, match="needs a non-empty list of finite step sizes"):
        landscape(model, nn.MSELoss(), x, x, [])


def test_probe_writes_each_value_to_its_dataset(tmp_path: Path) -> None:
    """The trainer's landscape probe stores landscape()'s numbers, each under its own name."""
    from bnprobe.probes import StepBatch, start, track
    from bnprobe.probes.landscape import LandscapeProbe
    from bnprobe.store import Store, read_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
    etas = default_etas(0.5, n=5)
    expected = landscape(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, etas)
    store = Store.create(tmp_path / "l.h5")
    writer = store.run("keep", {"bn": "keep"})
    probe = LandscapeProbe(tuple(etas), interval=1)
    start([probe], writer)
    track(probe, StepBatch(0, model, nn.CrossEntropyLoss(), x, y, torch.optim.SGD(model.parameters(), lr=0.5)), writer)
    store.close()
    d = read_file(tmp_path / "l.h5").runs["keep"].data
    assert d["landscape/step"].tolist() == [0] and d["landscape/eta"].tolist() == pytest.approx(etas, rel=1e-12)
    assert d["landscape/loss"][0].tolist() == pytest.approx(expected.loss, rel=1e-6)
    assert d["landscape/grad_l2"][0].tolist() == pytest.approx(expected.grad_l2, rel=1e-5)
    for key, value in (
        ("beta_smoothness", expected.beta),
        ("loss_at_w", expected.loss_at_w),
        ("loss_min", min(expected.loss)),
        ("loss_max", max(expected.loss)),
    ):
        assert float(d[f"landscape/{key}"][0]) == pytest.approx(value, rel=1e-5), key
    assert len({round(v, 6) for v in (expected.beta, expected.loss_at_w, min(expected.loss), max(expected.loss))}) == 4  # all told apart

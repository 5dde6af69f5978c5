"""Gradient-shift ICS: the definition against a literal deep-copy reference, fast ==
naive on every model family, and "no trace" (bit-identical to a plain step)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _fixtures import Noisy, qat_conv_bn
from torch import nn

from bnprobe.errors import ConfigError
from bnprobe.layers import probed_layers
from bnprobe.models import dln, mlp, vgg
from bnprobe.passes import measuring
from bnprobe.probes.ics import ICS, gradient_shift

# ----------------------------------------------------------------------------- models


class Scaled(nn.Module):
    """Own parameter read *before* its child runs: the child must not be served from the cache."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.8, 1.2, d))
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.scale)


class Branchy(nn.Module):
    """Branches, a module called twice (shared weights), dropout, noise, an in-place op on a
    module's output, and a parent with its own parameter."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.shared = nn.Linear(d, d)
        self.a = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.Tanh())
        self.b = nn.Linear(d, d)
        self.scaled = Scaled(d)
        self.noise = Noisy(3)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        s = self.shared(h)
        total = s.sum(dim=1, keepdim=True)  # reads s without saving it...
        s.mul_(0.5)  # ...so s may be changed in place afterwards
        u = self.a(self.drop(s) + total)
        v = self.b(h)
        z = self.shared(torch.tanh(self.noise(u) + v))  # second call of `shared`
        return self.head(self.scaled(z) + h + total)  # `total` is recomputed live in every pass


class RootParam(nn.Module):
    """The root module holds a parameter (read first): caching must stay correct."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([1.1, 0.9, 1.0, 1.2]))
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x * self.alpha)))


class FunctionalUse(nn.Module):
    """A parameter read without calling its module: it belongs to no layer and stays at W^t."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        h = nn.functional.linear(h, self.proj.weight, self.proj.bias)
        return self.l2(torch.tanh(h))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.mid = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))


class Attention(nn.Module):
    """Self-attention: MultiheadAttention reads its out_proj's weights without calling out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((a + h).mean(dim=1))


def eval_instance_norm() -> nn.Module:
    """An InstanceNorm held in eval mode (running statistics) inside a training model."""
    norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    norm.running_mean.copy_(torch.tensor([0.5, -0.3, 0.2, 1.0]))
    norm.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]))
    model = nn.Sequential(nn.Conv1d(2, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    norm.eval()
    return model


def mlp_bn(inputs: int = 12, classes: int = 4, hidden: int = 10) -> nn.Module:
    """The built-in mlp with BatchNorm1d inserted after every hidden linear layer, by hand."""
    base = mlp(classes, (inputs,), hidden=hidden, depth=3)
    layers: list[nn.Module] = []
    for m in base:
        layers.append(m)
        if isinstance(m, nn.Linear) and m.out_features == hidden:
            layers.append(nn.BatchNorm1d(hidden))
    return nn.Sequential(*layers)


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))


def spectral_mlp() -> nn.Module:
    """Spectral norm updates its power-iteration buffer in every train-mode forward."""
    sn = torch.nn.utils.parametrizations.spectral_norm
    return nn.Sequential(sn(nn.Linear(6, 16)), nn.Tanh(), sn(nn.Linear(16, 16)), nn.Tanh(), nn.Linear(16, 3))


def weight_norm_mlp() -> nn.Module:
    """Weight norm computes each weight from two parameters held by a child ``parametrizations``."""
    wn = torch.nn.utils.parametrizations.weight_norm
    return nn.Sequential(wn(nn.Linear(6, 12)), nn.ReLU(), wn(nn.Linear(12, 12)), nn.ReLU(), nn.Linear(12, 3))


def noisy_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), Noisy(1), nn.ReLU(), nn.Linear(12, 12), Noisy(2), nn.Tanh(), nn.Linear(12, 3))


CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def sgd(m: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def batch(shape: tuple[int, ...], n: int, classes: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(classes, (n,), generator=g) if classes else torch.randn(n, 10, generator=g)
    return x, y


# ----------------------------------------------------------------------------- a literal reference


def warmed_up(
    model: nn.Module, loss_fn: Any, make_opt: Callable[[nn.Module], torch.optim.Optimizer], steps: int, x: Any, y: Any
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of ``model`` and its optimizer after ``steps`` training steps (momentum, Adam moments)."""
    m = copy.deepcopy(model)
    opt = make_opt(m)
    for k in range(steps):
        torch.manual_seed(100 + k)
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()
    return m, opt


def literal_reference(
    model: nn.Module, loss_fn: Any, x: Any, y: Any, make_opt: Callable[[nn.Module], torch.optim.Optimizer], seed: int, warmup: int = 0
) -> dict[str, ICS]:
    """Definition 2.1 with deep copies: step a copy, then per layer a copy at W^t whose earlier
    layers get the stepped copy's weights, one forward/backward from the same RNG seed.

    A layer's weights: the parameters of the probed module and of its submodules that no nearer
    probed module holds (parameters of modules that never run belong to the caller that reads them).
    ``warmup`` steps (on a shifted batch) first, so that the optimizer has state."""
    order = [info.name for info, _ in probed_layers(copy.deepcopy(model), x)]
    model, opt0 = warmed_up(model, loss_fn, make_opt, warmup, x.flip(0), y.flip(0))
    before = copy.deepcopy(model)
    stepped, opt = copy.deepcopy((model, opt0))

    def owner(pname: str) -> str | None:
        path = pname.split(".")[:-1]
        while path and ".".join(path) not in order:
            path.pop()
        name = ".".join(path)
        return name if name in order else None

    weights = {name: [pn for pn, _ in model.named_parameters() if owner(pn) == name] for name in order}
    torch.manual_seed(seed)
    opt.zero_grad()
    loss_fn(stepped(x), y).backward()
    stepped_params = dict(stepped.named_parameters())

    def own_grad(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        ps = [params[pn] for pn in weights[name]]
        return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in ps]).double()

    g = {n: own_grad(stepped_params, n) for n in order}
    opt.step()
    out = {}
    for k, name in enumerate(order):
        m = copy.deepcopy(before)
        here = dict(m.named_parameters())
        with torch.no_grad():
            for prev in order[:k]:
                for pname in weights[prev]:
                    here[pname].copy_(stepped_params[pname])
        torch.manual_seed(seed)
        loss_fn(m(x), y).backward()
        a, b = g[name], own_grad(here, name)
        na, nb = a.norm().item(), b.norm().item()
        l2 = (a - b).norm().item()
        out[name] = ICS(l2, (a @ b).item() / (na * nb), na, nb, l2 / na)
    return out


def assert_same_ics(a: Any, b: Any, rtol: float = 1e-4) -> None:
    assert list(a) == list(b)
    for name in a:
        u, v = a[name], b[name]
        scale = max(u.grad_norm, u.grad_norm_shifted, 1e-30)
        assert math.isclose(u.grad_norm, v.grad_norm, rel_tol=rtol), (name, u, v)
        assert math.isclose(u.grad_norm_shifted, v.grad_norm_shifted, rel_tol=rtol), (name, u, v)
        assert abs(u.l2 - v.l2) <= rtol * scale, (name, u, v)
        assert abs(u.cosine - v.cosine) <= 10 * rtol, (name, u, v)
        assert abs(u.rel_diff - v.rel_diff) <= rtol * max(1.0, u.rel_diff), (name, u, v)


def measure(
    model: nn.Module,
    loss_fn: Any,
    x: Any,
    y: Any,
    method: str,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
    seed: int = 7,
    warmup: int = 0,
    **kw: Any,
) -> Any:
    m, opt = warmed_up(model, loss_fn, make_opt, warmup, x.flip(0), y.flip(0))
    torch.manual_seed(seed)
    return gradient_shift(m, loss_fn, x, y, opt, method=method, **kw)


# ----------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_every_field_by_hand(method: str) -> None:
    """Definition 2.1 written out for a 3-layer tanh network in float64, with SGD's update
    W - lr (G + wd W) done by hand: each of the five fields against its formula."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    lr, wd = 0.7, 0.1
    w = [p.detach().clone() for p in model.parameters()]  # W0, b0, W1, b1, W2, b2

    def loss_at(ps: list[torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(x @ ps[0].T + ps[1])
        h = torch.tanh(h @ ps[2].T + ps[3])
        return ((h @ ps[4].T + ps[5] - y) ** 2).mean()

    leaves = [t.clone().requires_grad_(True) for t in w]
    grads = torch.autograd.grad(loss_at(leaves), leaves)
    stepped = [t - lr * (gr + wd * t) for t, gr in zip(w, grads)]
    expected = {}
    for k, name in enumerate(["0", "2", "4"]):
        mixed = [t.clone().requires_grad_(True) for t in stepped[: 2 * k] + w[2 * k :]]  # earlier layers updated
        shifted = torch.autograd.grad(loss_at(mixed), mixed[2 * k : 2 * k + 2])
        a = torch.cat([t.reshape(-1) for t in grads[2 * k : 2 * k + 2]])
        b = torch.cat([t.reshape(-1) for t in shifted])
        l2 = float((a - b).norm())
        expected[name] = (l2, float(a @ b / (a.norm() * b.norm())), float(a.norm()), float(b.norm()), l2 / float(a.norm()))
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    got = gradient_shift(model, MSE, x, y, opt, method=method)
    assert list(got) == ["0", "2", "4"]
    for name, fields in expected.items():
        assert tuple(got[name]) == pytest.approx(fields, rel=1e-9, abs=1e-12), name
        assert got[name].rel_diff == pytest.approx(got[name].l2 / got[name].grad_norm, rel=1e-12)  # relative to |G|, not |G'|
    assert expected["0"][0] == 0.0  # nothing runs before the first layer
    for name in ("2", "4"):  # the check tells |G| from |G'| and sees a real shift
        l2, _, n, ns, _ = expected[name]
        assert abs(n - ns) > 0.05 * n and l2 > 0.05 * n, (name, expected[name])
    for p, t in zip(model.parameters(), stepped):  # and the real step is SGD's
        assert torch.allclose(p.detach(), t, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["fast", "naive"])
@pytest.mark.parametrize(
    "case", ["mlp_bn", "branchy", "noisy", "dropout", "spectral", "weight_norm", "functional", "attention", "eval_instance_norm"]
)
def test_matches_literal_definition(case: str, method: str) -> None:
    torch.manual_seed(0)
    model, shape, classes = {
        "attention": (Attention(), (4, 6), 3),
        "eval_instance_norm": (eval_instance_norm(), (2, 6), 3),
        "functional": (FunctionalUse(), (6,), 3),
        "spectral": (spectral_mlp(), (6,), 3),
        "weight_norm": (weight_norm_mlp(), (6,), 3),
        "mlp_bn": (mlp_bn(), (12,), 4),
        "branchy": (Branchy(), (6,), 3),
        "noisy": (noisy_mlp(), (6,), 3),
        "dropout": (dropout_mlp(), (6,), 3),
    }[case]
    x, y = batch(shape, 16, classes)
    ref = literal_reference(model, CE, x, y, sgd, seed=7)
    got = measure(model, CE, x, y, method)
    assert_same_ics(ref, got)
    # the step is big enough for the shift to be visible somewhere
    assert max(v.l2 for v in got.values()) > 1e-4 * max(v.grad_norm for v in got.values())


@pytest.mark.parametrize("method", ["fast", "naive"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_matches_literal_definition_with_optimizer_state(opt_name: str, method: str) -> None:
    """After warm-up steps the update is not a plain -lr*g (momentum buffers, Adam moments): G'
    must see the weights the real ``optimizer.step()`` produced."""
    torch.manual_seed(0)
    model, (x, y) = Branchy(), batch((6,), 16, 3)
    ref = literal_reference(model, CE, x, y, OPTIMIZERS[opt_name], seed=7, warmup=2)
    got = measure(model, CE, x, y, method, make_opt=OPTIMIZERS[opt_name], warmup=2)
    assert_same_ics(ref, got)
    # and it differs from what a fresh optimizer's step would give
    fresh = measure(model, CE, x, y, method, make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=1e-2), warmup=2)
    assert any(abs(got[n].l2 - fresh[n].l2) > 1e-3 * got[n].grad_norm for n in got)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_parametrized_weights_belong_to_their_layer(method: str) -> None:
    """weight_norm's original0/original1 are the Linear's weight: its own in G', not a layer run
    before it (which would leave the first layer with a shift where nothing runs before it)."""
    torch.manual_seed(0)
    model, (x, y) = weight_norm_mlp(), batch((6,), 16, 3)
    got = measure(model, CE, x, y, method)
    assert list(got) == ["0", "2", "4"]
    assert got["0"].l2 == 0.0 and got["2"].l2 > 0
    m, _opt = warmed_up(model, CE, sgd, 0, x, y)
    CE(m(x), y).backward()
    own = torch.cat([p.grad.reshape(-1) for p in m[0].parameters()])  # original0, original1 and the bias
    assert got["0"].grad_norm == pytest.approx(float(own.norm()), rel=1e-5)


def test_attention_out_proj_belongs_to_its_caller() -> None:
    """nn.MultiheadAttention never calls out_proj: its weights are part of the attention layer."""
    torch.manual_seed(0)
    model, (x, y) = Attention(), batch((4, 6), 8, 3)
    got = measure(model, CE, x, y, "fast")
    assert list(got) == ["stem", "attn", "head"]
    m, _opt = warmed_up(model, CE, sgd, 0, x, y)
    CE(m(x), y).backward()
    attn_grad = torch.cat([p.grad.reshape(-1) for p in m.attn.parameters()])  # in_proj and out_proj
    assert got["attn"].grad_norm == pytest.approx(float(attn_grad.norm()), rel=1e-5)


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.parametrize("method", ["fast", "naive"])
def test_a_bn_run_inside_a_qat_conv_sees_the_conv_step(method: str) -> None:
    """The fused conv applies its weight before it runs its child ``conv.bn``: before the BN in the
    data flow, though the BN's call ends first. G' of the BN: the conv's weights stepped, nothing else."""
    model, (x, y) = qat_conv_bn(), batch((3, 6, 6), 8, 3)
    got = measure(model, CE, x, y, method)
    assert list(got) == ["conv", "conv.bn", "fc"]
    stepped, _opt = warmed_up(model, CE, sgd, 1, x, y)
    plain, shifted = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for (_, p), (_, q) in zip(shifted.conv.named_parameters(recurse=False), stepped.conv.named_parameters(recurse=False)):
            p.copy_(q)
    for m in (plain, shifted):
        CE(m(x), y).backward()
    g, gs = (torch.cat([p.grad.reshape(-1) for p in m.conv.bn.parameters()]) for m in (plain, shifted))
    assert got["conv.bn"].l2 > 0
    assert got["conv.bn"].l2 == pytest.approx(float((g - gs).norm()), rel=1e-4)
    assert got["conv.bn"].grad_norm == pytest.approx(float(g.norm()), rel=1e-5)
    assert got["conv.bn"].grad_norm_shifted == pytest.approx(float(gs.norm()), rel=1e-5)


@pytest.mark.parametrize(
    "case",
    ["vgg", "vgg_bn", "dln", "mlp_bn", "branchy", "root_param", "tied", "attention"],
)
def test_fast_equals_naive(case: str) -> None:
    torch.manual_seed(0)
    if case in ("vgg", "vgg_bn"):
        model = vgg(10, (3, 16, 16), width=0.125)
        if case == "vgg_bn":
            feats = []
            for m in model.features:
                feats.append(m)
                if isinstance(m, nn.Conv2d):
                    feats.append(nn.BatchNorm2d(m.out_channels))
            model.features = nn.Sequential(*feats)
        x, y = batch((3, 16, 16), 4, 10)
        loss_fn: Any = CE
    elif case == "dln":
        model, (x, y), loss_fn = dln(10, (10,)), batch((10,), 16, None), MSE
    elif case == "mlp_bn":
        model, (x, y), loss_fn = mlp_bn(), batch((12,), 8, 4), CE
    elif case == "branchy":
        model, (x, y), loss_fn = Branchy(), batch((6,), 8, 3), CE
    elif case == "attention":
        model, (x, y), loss_fn = Attention(), batch((4, 6), 8, 3), CE
    elif case == "root_param":
        model, (x, y), loss_fn = RootParam(), batch((4,), 8, 2), CE
    else:
        model, (x, y), loss_fn = Tied(), batch((5,), 8, 5), CE
    naive = measure(model, loss_fn, x, y, "naive")
    fast = measure(model, loss_fn, x, y, "fast")
    assert_same_ics(naive, fast)
    assert list(fast) == [i.name for i, _ in probed_layers(copy.deepcopy(model), x)]


class EvalTemperature(nn.Module):
    """The root's parameter is read in eval mode only: in a training step its layer is called but
    leaves the loss alone (the fast path's replay of that layer has no gradient path at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out if self.training else out / self.temperature


def test_a_layer_whose_parameters_the_step_leaves_unused() -> None:
    torch.manual_seed(0)
    model, (x, y) = EvalTemperature(), batch((4,), 8, 3)
    naive, fast = measure(model, CE, x, y, "naive"), measure(model, CE, x, y, "fast")
    assert list(naive) == list(fast) == ["lin", ""]
    assert_same_ics({"lin": naive["lin"]}, {"lin": fast["lin"]})
    for got in (naive, fast):  # no gradient before or after: zero norms, no direction
        assert (got[""].grad_norm, got[""].grad_norm_shifted, got[""].l2) == (0.0, 0.0, 0.0) and math.isnan(got[""].cosine)


def test_fast_equals_naive_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = batch((3, 32, 32), 2, 10)
    naive = measure(model, CE, x, y, "naive", make_opt=lambda m: sgd(m, 0.01))
    fast = measure(model, CE, x, y, "fast", make_opt=lambda m: sgd(m, 0.01))
    assert len(fast) == 41  # 20 conv, 20 BN, fc
    assert_same_ics(naive, fast)


def test_noise_is_replayed() -> None:
    """With lr = 0 the step changes nothing, so G' must equal G: only true if the G' passes see
    the same noise and dropout draws as the real pass."""
    torch.manual_seed(0)
    model = Branchy()
    x, y = batch((6,), 8, 3)
    with torch.no_grad():  # the model really is random in train mode
        assert not torch.equal(copy.deepcopy(model)(x), copy.deepcopy(model)(x))
    for method in ("fast", "naive"):
        res = measure(model, CE, x, y, method, make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
        for name, v in res.items():
            assert v.l2 <= 1e-6 * v.grad_norm, (method, name, v)
            assert v.cosine == pytest.approx(1.0, abs=1e-6)
    noisy = noisy_mlp()
    fast = measure(noisy, CE, x, y, "fast")
    naive = measure(noisy, CE, x, y, "naive")
    assert_same_ics(naive, fast)


# ----------------------------------------------------------------------------- no trace


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    gens = {n: m.generator.get_state() for n, m in model.named_modules() if isinstance(getattr(m, "generator", None), torch.Generator)}
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "gens": gens,
    }


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_identical(u, v, f"{where}/{i}")
    else:
        assert a == b, where


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("method", ["fast", "naive"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", ["dropout", "bn", "branchy", "spectral"])
def test_no_trace(case: str, opt_name: str, method: str) -> None:
    torch.manual_seed(0)
    model = {"dropout": dropout_mlp, "bn": lambda: mlp_bn(6, 3), "branchy": Branchy, "spectral": spectral_mlp}[case]()
    make = OPTIMIZERS[opt_name]
    plain, measured = copy.deepcopy(model), copy.deepcopy(model)
    opt_p, opt_m = make(plain), make(measured)
    torch.manual_seed(3)
    for step in range(2):
        x, y = batch((6,), 8, 3, seed=step)
        opt_p.zero_grad()
        out = plain(x)
        loss = CE(out, y)
        loss.backward()
        opt_p.step()
    state_p = _state(plain, opt_p)
    torch.manual_seed(3)
    for step in range(2):
        x, y = batch((6,), 8, 3, seed=step)
        res = gradient_shift(measured, CE, x, y, opt_m, method=method)
    state_m = _state(measured, opt_m)
    _assert_identical(state_p, state_m)
    assert torch.equal(res.loss, loss.detach()) and not res.loss.requires_grad
    assert torch.equal(res.output, out.detach()) and not res.output.requires_grad
    if case == "bn":
        assert int(dict(measured.named_buffers())["2.num_batches_tracked"]) == 2


# ----------------------------------------------------------------------------- layer selection and API


def test_layer_subsets() -> None:
    torch.manual_seed(0)
    model = Branchy()
    x, y = batch((6,), 8, 3)
    full = measure(model, CE, x, y, "fast")
    names = list(full)
    assert names[0] == "stem" and "scaled" in names and "scaled.lin" in names
    assert names.index("scaled") < names.index("scaled.lin")  # its own scale is applied before its child runs
    for layers in (["a.*"], ["shared", "head"], "b", [names[-1]]):
        sub = measure(model, CE, x, y, "fast", layers=layers)
        assert set(sub) < set(full) and list(sub) == [n for n in names if n in sub]
        for n in sub:
            assert sub[n] == pytest.approx(full[n], rel=1e-6, abs=1e-12)
    assert list(measure(model, CE, x, y, "fast", kinds=["norm"])) == ["a.1"]
    assert measure(model, CE, x, y, "fast", layers=["a.*"]).keys() == {"a.0", "a.1"}
    with pytest.raises(ConfigError, match="no layer matches"):
        measure(model, CE, x, y, "fast", layers=["nothing*"])
    with pytest.raises(ConfigError, match="unknown ICS method"):
        measure(model, CE, x, y, "slow")


def test_result_and_before_step() -> None:
    torch.manual_seed(0)
    model = dropout_mlp()
    x, y = batch((6,), 8, 3)
    calls = []

    def clip() -> None:
        calls.append(1)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)

    m = copy.deepcopy(model)
    opt = sgd(m)
    res = gradient_shift(m, CE, x, y, opt, before_step=clip)
    assert calls == [1]
    assert res.column("cosine") == [v.cosine for v in res.values()]
    # G is the gradient before clipping: the norms are far above the clip threshold
    assert max(res.column("grad_norm")) > 1e-2
    assert res.method == "fast" and "ICSResult" in repr(res)
    first = next(iter(res.values()))
    assert first.l2 == 0.0 and first.cosine == pytest.approx(1.0)  # nothing runs before layer 1


def test_hooks_can_tell_extra_passes() -> None:
    torch.manual_seed(0)
    model = mlp_bn(6, 3)
    seen = []
    model[1].register_forward_hook(lambda mod, i, o: seen.append(measuring()))
    x, y = batch((6,), 8, 3)
    gradient_shift(model, CE, x, y, sgd(model), method="naive")
    assert seen[0] is False and seen.count(False) == 1 and all(seen[1:]) and len(seen) > 1
    assert not measuring()


class CountingLinear(nn.Linear):
    runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return super().forward(x)


def test_fast_shares_the_updated_prefix() -> None:
    """Layer 1 runs in the real pass and the one recording pass only; layer j >= 2 also runs in the
    passes of layers 2..j (its suffix), never in those of later layers; naive runs it every time."""
    torch.manual_seed(0)
    model = nn.Sequential(
        CountingLinear(6, 8), nn.ReLU(inplace=True), CountingLinear(8, 8), nn.Tanh(), CountingLinear(8, 8), nn.Tanh(), CountingLinear(8, 3)
    )
    x, y = batch((6,), 8, 3)
    fast = copy.deepcopy(model)
    gradient_shift(fast, CE, x, y, sgd(fast))
    assert [m.runs for m in fast if isinstance(m, CountingLinear)] == [2, 3, 4, 5]
    naive = copy.deepcopy(model)
    gradient_shift(naive, CE, x, y, sgd(naive), method="naive")
    assert [m.runs for m in naive if isinstance(m, CountingLinear)] == [5, 5, 5, 5]
    assert not any("forward" in m.__dict__ for m in fast.modules())  # patches removed


def test_dln_direction() -> None:
    """Santurkar et al.'s deep linear network: with full-batch GD, cos(G, G') stays
    near 1 without BN and is clearly lower with BN after every hidden layer (Glorot init, so the
    25-layer product carries signal and the step is not vanishingly small)."""
    from bnprobe.data import synthetic_linear
    from bnprobe.models import glorot_init

    x, y = synthetic_linear(seed=0, n=256).train.tensors  # type: ignore[attr-defined]
    cos = {}
    for bn in (False, True):
        torch.manual_seed(0)
        model = glorot_init(dln(10, (10,)))
        if bn:
            lin = list(model)
            model = nn.Sequential(*[m for layer in lin[:-1] for m in (layer, nn.BatchNorm1d(10))], lin[-1])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(30):
            opt.zero_grad()
            MSE(model(x), y).backward()
            opt.step()
        res = gradient_shift(model, MSE, x, y, opt, kinds=["linear"])
        assert len(res) == 25
        cos[bn] = sum(res.column("cosine")[1:]) / 24
    assert cos[False] > 0.99
    assert cos[True] < 0.9


def test_frozen_layers_get_nan_rows() -> None:
    torch.manual_seed(0)
    model = mlp_bn(6, 3)
    for p in model[2].parameters():  # the first BN's affine parameters
        p.requires_grad_(False)
    x, y = batch((6,), 8, 3)
    names = [i.name for i, _ in probed_layers(copy.deepcopy(model), x)]
    naive = measure(model, CE, x, y, "naive")
    fast = measure(model, CE, x, y, "fast")
    assert list(fast) == names and "2" in fast
    assert all(math.isnan(v) for v in fast["2"]) and all(math.isnan(v) for v in naive["2"])
    del naive._values["2"], fast._values["2"]
    assert_same_ics(naive, fast)
    only_frozen = measure(model, CE, x, y, "fast", layers=["2"])
    assert list(only_frozen) == ["2"] and math.isnan(only_frozen["2"].l2)


def test_probe_writes_each_field_to_its_dataset(tmp_path: Path) -> None:
    """What the trainer's ICS probe stores under ics/<field> is that field of gradient_shift's
    result on the same model and batch (no field swapped, none dropped), layers in ics/layer order."""
    from bnprobe.probes import StepBatch, start, track
    from bnprobe.probes.ics import ICSProbe
    from bnprobe.store import Store, read_file

    torch.manual_seed(0)
    model = mlp_bn(6, 3)
    x, y = batch((6,), 8, 3)
    reference = copy.deepcopy(model)
    expected = gradient_shift(reference, CE, x, y, sgd(reference))
    store = Store.create(tmp_path / "ics.h5")
    writer = store.run("keep", {"bn": "keep"})
    names = list(expected)
    layers = names[1:][::-1] + names[:1]  # any order: the probe keeps the one it is given
    probe = ICSProbe(layers, interval=1)
    step = StepBatch(0, model, CE, x, y, sgd(model))
    start([probe], writer)
    track(probe, step, writer)
    store.close()
    loss = step.loss
    assert loss is not None
    assert float(loss) == pytest.approx(float(expected.loss), rel=1e-6)
    data = read_file(tmp_path / "ics.h5").runs["keep"].data
    assert [n.decode() if isinstance(n, bytes) else str(n) for n in data["ics/layer"]] == layers
    assert data["ics/step"].tolist() == [0]
    for field in ICS._fields:
        np.testing.assert_allclose(data[f"ics/{field}"][0], [getattr(expected[n], field) for n in layers], rtol=1e-6, err_msg=field)
    assert (
        len({float(v) for f in ("l2", "grad_norm", "grad_norm_shifted", "rel_diff") for v in data[f"ics/{f}"][0, :-1]}) > 6
    )  # the fields differ

"""Top Hessian eigenvalue by power iteration against the full Hessian and eigvalsh."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnprobe.errors import ConfigError
from bnprobe.probes.hessian import hessian_blocks, top_hessian_eigenvalue



def tiny(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(3, (10,), generator=g)


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """The exact Hessian wrt the named parameters (all by default), on a throw-away copy."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    names = names or list(params)
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        d, k = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[k : k + s.numel()].view(s)
            k += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(m, d, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def largest_magnitude(h: torch.Tensor) -> float:
    evals = torch.linalg.eigvalsh(h)
    return float(evals[evals.abs().argmax()])


@pytest.mark.parametrize("bn", [True, False])
def test_matches_eigvalsh(bn: bool) -> None:
    model = tiny(bn)
    x, y = data()
    expected = largest_magnitude(full_hessian(model, x, y))
    res = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=2000)
    assert res.converged and res.bn_mode == "train" and res.samples == 10
    assert res.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert res.residual < 1e-3 * abs(res.eigenvalue)
    assert res.vector.norm().item() == pytest.approx(1.0)


def test_warm_start_and_tolerance() -> None:
    model = tiny()
    x, y = data()
    cold = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-8, max_iter=2000)
    warm = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-8, max_iter=2000, init=cold.vector)
    assert warm.iterations <= 3 < cold.iterations
    assert warm.eigenvalue == pytest.approx(cold.eigenvalue, rel=1e-7)
    loose = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-2)
    assert loose.iterations < cold.iterations
    capped = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-12, max_iter=3)
    assert capped.iterations == 3 and not capped.converged
    per_param = [t.clone() for t in cold.vector.split([p.numel() for p in model.parameters()])]
    assert top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-8, init=per_param).iterations <= 3


def test_blocks_and_subsets() -> None:
    model = tiny()
    x, y = data()
    names = ["0.weight", "0.bias"]
    expected = largest_magnitude(full_hessian(model, x, y, names))
    by_pattern = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000, params=["0"])
    by_tensor = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000, params=[model[0].weight, model[0].bias])
    assert by_pattern.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert by_tensor.eigenvalue == pytest.approx(expected, rel=1e-6)
    blocks = hessian_blocks(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000)
    assert list(blocks) == ["0", "1", "3"]
    assert blocks["0"].eigenvalue == pytest.approx(expected, rel=1e-6)
    last = largest_magnitude(full_hessian(model, x, y, ["3.weight", "3.bias"]))
    assert blocks["3"].eigenvalue == pytest.approx(last, rel=1e-6)
    assert list(hessian_blocks(model, nn.CrossEntropyLoss(), x, y, kinds=["norm"])) == ["1"]
    with pytest.raises(ConfigError):
        top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, params=["nothing"])


def test_bn_mode_and_no_trace() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    x, y = data()
    model(x)  # move the running statistics off their initial values
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    train = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-6, max_iter=500)
    evalm = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-6, max_iter=500, bn_mode="eval")
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert model.training and model[1].training and model[1].track_running_stats
    assert evalm.bn_mode == "eval" and train.bn_mode == "train"
    assert evalm.eigenvalue != pytest.approx(train.eigenvalue, rel=1e-3)
    # eval mode is the Hessian of the function with BN on its running statistics
    plain = tiny()
    plain(x)
    ref = copy.deepcopy(plain).eval()
    expected = largest_magnitude(full_hessian(ref, x, y))
    got = top_hessian_eigenvalue(plain, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000, bn_mode="eval")
    assert got.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert plain.training
    with pytest.raises(ConfigError):
        top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, bn_mode="frozen")

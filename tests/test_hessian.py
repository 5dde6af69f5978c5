"""Top Hessian eigenvalue by power iteration against the full Hessian and eigvalsh."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bnprobe.errors import ConfigError, ModelError
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
    return full_hessian_of(model, x, y, nn.CrossEntropyLoss(), names)


def full_hessian_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, names: list[str] | None = None) -> torch.Tensor:
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
        return loss_fn(torch.func.functional_call(m, d, (x,)), y)

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


def test_eval_mode_instance_norm_keeps_its_running_statistics() -> None:
    """With ``bn_mode="eval"`` a norm layer normalises with its running statistics in the Hessian
    passes, as in the model's own eval-mode forward (InstanceNorm would otherwise use per-sample ones)."""
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    norm.running_mean.copy_(torch.tensor([0.5, -0.3, 0.2]))
    norm.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    model = nn.Sequential(nn.Conv1d(1, 3, 2), norm, nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)).double()
    norm.eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 1, 4, generator=g, dtype=torch.float64), torch.randint(3, (10,), generator=g)
    expected = largest_magnitude(full_hessian(model, x, y))
    res = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=2000, bn_mode="eval")
    assert res.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert torch.equal(norm.running_mean, torch.tensor([0.5, -0.3, 0.2]))


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
    by_tensor = top_hessian_eigenvalue(
        model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000, params=[model[0].weight, model[0].bias]
    )
    assert by_pattern.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert by_tensor.eigenvalue == pytest.approx(expected, rel=1e-6)
    blocks = hessian_blocks(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=3000)
    assert list(blocks) == ["0", "1", "3"]
    assert blocks["0"].eigenvalue == pytest.approx(expected, rel=1e-6)
    last = largest_magnitude(full_hessian(model, x, y, ["3.weight", "3.bias"]))
    assert blocks["3"].eigenvalue == pytest.approx(last, rel=1e-6)
    assert list(hessian_blocks(model, nn.CrossEntropyLoss(), x, y, kinds=["norm"])) == ["1"]
    with pytest.raises(ConfigError, match="selects no trainable parameter"):
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
    with pytest.raises(ConfigError, match="unknown BN mode 'frozen' for the Hessian; choose from"):
        top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, bn_mode="frozen")


def test_trainer_records_model_and_block_eigenvalues(in_tmp: Path) -> None:
    """``probes.hessian.blocks``: ``hessian/block_*`` rows, one column per probed layer, equal to
    eigvalsh of that layer's block of the full Hessian at the weights the step started from."""
    from bnprobe.config import load_config
    from bnprobe.data import batches, load_data
    from bnprobe.experiment import run_experiment
    from bnprobe.store import read_file, strings
    from bnprobe.trainer import prepare_model

    overrides = {
        "model": "dln",
        "model_options": {"depth": 3, "width": 4},
        "data": "synthetic:linear",
        "data_options": {"n": 64, "dim": 4},
        "steps": 2,
        "batch_size": 16,
        "lr": 0.05,
        "output": "h.h5",
        "probes.moments.every": 1,
        "probes.hessian.enabled": True,
        "probes.hessian.every": 1,
        "probes.hessian.blocks": True,
        "probes.hessian.tol": 1e-9,
        "probes.hessian.max_iter": 5000,
    }
    cfg = load_config(None, overrides)
    run_experiment(cfg)
    run = read_file("h.h5").runs["keep"]
    names = strings(run.data["hessian/block"])
    assert run.data["hessian/block_top_eigenvalue"].shape == (2, len(names))

    bundle = load_data(cfg.data, seed=cfg.seed, **dict(cfg.data_options))
    model, _ = prepare_model(cfg, bundle, torch.device("cpu"))
    x, y = next(batches(bundle, cfg.batch_size, cfg.seed))
    model = model.double()
    x, y = x.double(), y.double()

    def top(names_: list[str] | None) -> float:
        h = full_hessian_of(model, x, y, nn.MSELoss(), names_)
        return largest_magnitude(h)

    assert run.data["hessian/top_eigenvalue"][0] == pytest.approx(top(None), rel=1e-4)
    for k, layer in enumerate(names):
        params = [n for n, _ in dict(model.named_modules())[layer].named_parameters(prefix=layer)]
        assert run.data["hessian/block_top_eigenvalue"][0, k] == pytest.approx(top(params), rel=1e-4), layer


# ----------------------------------------------------------------------------- ops without double backward


class Gate(nn.Module):
    """A squeeze-excite-like gate: ``gate(x)`` is ``hardsigmoid`` (torch has no double backward for
    it) or the same function written as ``relu6(x + 3) / 6``."""

    def __init__(self, gate: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * self.gate(h))


def assert_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, expected: float) -> None:
    """Power iteration run to convergence finds the reference's largest-magnitude eigenvalue."""
    result = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-10, max_iter=500)
    assert result.eigenvalue == pytest.approx(expected, rel=1e-6)


def test_hardsigmoid_gets_a_hessian_equal_to_its_twice_differentiable_formula() -> None:
    x, y = data()
    model = Gate(nn.Hardsigmoid()).double()
    formula = Gate(lambda h: nn.functional.relu6(h + 3) / 6).double()
    expected = largest_magnitude(full_hessian(formula, x, y))
    assert_top_eigenvalue(model, x, y, expected)


class Attention(nn.Module):
    """One attention head through ``F.scaled_dot_product_attention`` (timm's ViTs), or written out."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x.view(2, 5, 4)).unsqueeze(1).chunk(3, dim=-1)
        if self.fused:
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / 2, dim=-1) @ v
        return self.head(a.reshape(10, 4))


def test_scaled_dot_product_attention_gets_a_hessian_equal_to_the_written_out_attention() -> None:
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(3)), torch.arange(10) % 3
    expected = largest_magnitude(full_hessian(Attention(fused=False), x, y))
    result = top_hessian_eigenvalue(Attention(fused=True), nn.CrossEntropyLoss(), x, y, tol=1e-8, max_iter=500)
    assert result.eigenvalue == pytest.approx(expected, rel=1e-4)


class Transformer(nn.Module):
    """torchvision's ViT encoder block attends through nn.MultiheadAttention, which calls attention
    from inside ``multi_head_attention_forward``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(2, 5, 4)
        return self.head(self.attention(h, h, h, need_weights=False)[0].reshape(10, 4))


def test_attention_inside_multihead_attention_gets_a_hessian() -> None:
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(3)), torch.arange(10) % 3
    with sdpa_kernel([SDPBackend.MATH]):  # the reference needs a twice-differentiable kernel too
        expected = largest_magnitude(full_hessian(Transformer(), x, y))
    result = top_hessian_eigenvalue(Transformer(), nn.CrossEntropyLoss(), x, y, tol=1e-8, max_iter=500)
    assert result.eigenvalue == pytest.approx(expected, rel=1e-4)


class BiasTable(nn.Module):
    """LeViT's attention biases: a parameter table read through an index buffer (saved by autograd)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(4))
        self.register_buffer("index", torch.tensor([[0, 3, 1], [2, 2, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.table[self.index].prod(0)


def test_an_index_buffer_survives_the_pass_for_the_double_backward() -> None:
    x, y = data()
    model = BiasTable().double()
    expected = largest_magnitude(full_hessian(model, x, y))
    assert_top_eigenvalue(model, x, y, expected)


class CosineAttention(nn.Module):
    """Swin V2's cosine similarity of normalised rows, on an input with a zero (padding) row."""

    def __init__(self, normalize: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(4, 6, bias=False), nn.Linear(4, 3)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.normalize(self.fc(x).view(-1, 2, 3))
        return self.head((q @ q.transpose(1, 2)).flatten(1))


def test_normalize_of_a_zero_row_gives_a_finite_hessian() -> None:
    x, y = data()
    x[3] = 0
    safe = CosineAttention(lambda v: v / v.square().sum(-1, keepdim=True).clamp_min(1e-300).sqrt().clamp_min(1e-12)).double()
    expected = largest_magnitude(full_hessian(safe, x, y))
    assert_top_eigenvalue(CosineAttention(lambda v: nn.functional.normalize(v, dim=-1)).double(), x, y, expected)


class RawHardsigmoid(nn.Module):
    """Calls the kernel without the functional wrapper: an op PyTorch cannot differentiate twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.hardsigmoid(x)


def test_a_model_that_is_not_twice_differentiable_is_refused_naming_the_module() -> None:
    x, y = data()
    model = nn.Sequential(nn.Linear(4, 6), RawHardsigmoid(), nn.Linear(6, 3)).double()
    with pytest.raises(
        ModelError, match=r"^no Hessian for this model: 1 \(RawHardsigmoid\) runs hardsigmoid, which PyTorch cannot differentiate twice$"
    ):
        top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, max_iter=3)
    with pytest.raises(ModelError, match=r"1 \(RawHardsigmoid\) runs hardsigmoid"):
        hessian_blocks(model, nn.CrossEntropyLoss(), x, y, max_iter=3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_probe_measures_in_the_configured_bn_mode(mode: str) -> None:
    """``probes.hessian.bn_mode`` reaches the Hessian probe: its record equals
    top_hessian_eigenvalue in that mode and its attributes say which."""
    from bnprobe.config import load_config
    from bnprobe.probes import StepBatch
    from bnprobe.probes.hessian import probe_from_config

    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = data()
    model(x)  # running statistics away from their initial values: the two modes differ
    cfg = load_config(
        None, {"probes.hessian.enabled": True, "probes.hessian.bn_mode": mode, "probes.hessian.tol": 1e-9, "probes.hessian.max_iter": 3000}
    )
    probe = probe_from_config(cfg, [])
    assert probe is not None
    record = probe.compute(StepBatch(0, model, nn.CrossEntropyLoss(), x, y, torch.optim.SGD(model.parameters(), lr=0.1)))
    expected = {
        m: top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, tol=1e-9, max_iter=3000, bn_mode=m).eigenvalue
        for m in ("train", "eval")
    }
    assert record["top_eigenvalue"] == pytest.approx(expected[mode], rel=1e-6)
    assert expected["train"] != pytest.approx(expected["eval"], rel=1e-3)
    assert probe.dataset_attrs["hessian/top_eigenvalue"]["bn_mode"] == mode


class RoiHead(nn.Module):
    """A detection head's pooling: torchvision's roi_align, whose backward has no backward of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x.view(-1, 1, 2, 2))
        boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=x.dtype)] * len(x)
        return self.head(torchvision.ops.roi_align(features, boxes, 2).flatten(1))


def test_torchvisions_words_for_an_op_without_double_backward_are_recognised() -> None:
    """ "double backwards on roi_align not supported" came out as a raw RuntimeError."""
    x, y = data()
    with pytest.raises(ModelError, match=r"^no Hessian for this model: RoiHead runs roi_align, which PyTorch cannot differentiate twice$"):
        top_hessian_eigenvalue(RoiHead().double(), nn.CrossEntropyLoss(), x, y, max_iter=3)

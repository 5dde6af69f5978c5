"""No pass bnprobe makes outside the training step leaves a trace (bnprobe.passes): layer
discovery, the output check, the surgery planning pass and the landscape and Hessian probes
change no buffer (BN statistics, InstanceNorm running statistics, spectral norm's vectors) and no
random stream (global, a module's own generator), and the Recorder does not see them."""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _fixtures import Noisy
from torch import nn
from torch.utils.checkpoint import checkpoint

from bnprobe.data import load_data
from bnprobe.errors import ModelError
from bnprobe.layers import execution_order, probed_layers
from bnprobe.passes import leave_no_trace, measuring
from bnprobe.probes.hessian import hessian_blocks, top_hessian_eigenvalue
from bnprobe.probes.ics import gradient_shift
from bnprobe.probes.landscape import landscape
from bnprobe.probes.spectrum import top_eigenvalues
from bnprobe.recorder import Recorder
from bnprobe.surgery import apply_bn
from bnprobe.trainer import _check_output

CE = nn.CrossEntropyLoss()


def stateful() -> nn.Module:
    """Every kind of state a forward may move: BN and InstanceNorm running statistics, spectral
    norm's power-iteration vectors, dropout (global RNG) and a private generator (noisy-BN-like)."""
    torch.manual_seed(0)
    sn = torch.nn.utils.parametrizations.spectral_norm
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        nn.ReLU(),
        sn(nn.Conv2d(6, 6, 3)),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        Noisy(4),
        nn.Dropout(0.3),
        sn(nn.Linear(6, 10)),
    ).train()


def snapshot(model: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    buffers = [(b, b.clone()) for b in model.buffers()]
    return buffers, torch.get_rng_state(), model[8].generator.get_state()


def assert_untouched(model: nn.Module, before: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]) -> None:
    buffers, cpu, own = before
    for b, value in buffers:
        assert torch.equal(b, value), "a buffer moved"
    assert torch.equal(torch.get_rng_state(), cpu), "the global RNG moved"
    assert torch.equal(model[8].generator.get_state(), own), "the module's generator moved"
    assert all(m.training for m in model.modules()) and model[1].track_running_stats and model[4].track_running_stats


def the_passes() -> dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], object]]:
    bundle = load_data("synthetic:cifar10", n=8)
    return {
        "probed_layers": lambda m, x, y: probed_layers(m, x),
        "execution_order": lambda m, x, y: execution_order(m, x),
        "output check": lambda m, x, y: _check_output(m, bundle, x, y),
        **{f"apply_bn {mode}": (lambda m, x, y, mode=mode: apply_bn(m, mode, x)) for mode in ("keep", "insert", "strip", "noisy")},
        "apply_bn strip --fold": lambda m, x, y: apply_bn(m, "strip", x, fold=True),
        "landscape": lambda m, x, y: landscape(m, CE, x, y, [0.1, 0.2]),
        "hessian": lambda m, x, y: top_hessian_eigenvalue(m, CE, x, y, max_iter=3),
        "hessian eval-mode BN": lambda m, x, y: top_hessian_eigenvalue(m, CE, x, y, max_iter=3, bn_mode="eval"),
        "hessian blocks": lambda m, x, y: hessian_blocks(m, CE, x, y, max_iter=3),
    }


@pytest.mark.parametrize("name", list(the_passes()))
def test_no_pass_moves_a_buffer_or_a_random_stream(name: str) -> None:
    model = stateful()
    x, y = torch.randn(4, 3, 12, 12), torch.randint(10, (4,))
    model(x)  # statistics and vectors off their initial values
    before = snapshot(model)
    the_passes()[name](model, x, y)
    assert_untouched(model, before)
    # the checks can fail: the same forward outside a pass moves every kind of state
    model(x)
    buffers, cpu, own = before
    assert not torch.equal(torch.get_rng_state(), cpu) and not torch.equal(model[8].generator.get_state(), own)
    still = [name for (name, b), (_, v) in zip(model.named_buffers(), buffers) if torch.equal(b, v)]
    assert still == ["1.num_batches_tracked"]  # InstanceNorm never counts its batches


def test_the_ics_step_moves_exactly_what_a_plain_step_moves() -> None:
    model = stateful()
    x, y = torch.randn(4, 3, 12, 12), torch.randint(10, (4,))
    plain = copy.deepcopy(model)
    opt_m, opt_p = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.manual_seed(7)
    gradient_shift(model, CE, x, y, opt_m)
    measured_rng = torch.get_rng_state()
    torch.manual_seed(7)
    opt_p.zero_grad()
    CE(plain(x), y).backward()
    opt_p.step()
    assert torch.equal(measured_rng, torch.get_rng_state())
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(model[8].generator.get_state(), plain[8].generator.get_state())


def test_measuring_is_per_context_and_nests() -> None:
    model = nn.Linear(2, 2)
    seen: list[bool] = []
    assert not measuring()
    with leave_no_trace(model):
        with leave_no_trace(model):
            assert measuring()
        assert measuring()
        worker = threading.Thread(target=lambda: seen.append(measuring()))  # another thread is not in this pass
        worker.start()
        worker.join()
    assert not measuring() and seen == [False]
    with pytest.raises(RuntimeError, match="inside"), leave_no_trace(model):
        raise RuntimeError("inside")
    assert not measuring()


class Checkpointed(nn.Module):
    """A BN block under activation checkpointing: its forward reruns in backward, outside any pass."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.pre, self.block, self.head = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, self.pre(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    "measure",
    [
        lambda m, x, y: gradient_shift(m, CE, x, y, torch.optim.SGD(m.parameters(), lr=0.5), method="naive"),
        lambda m, x, y: gradient_shift(m, CE, x, y, torch.optim.SGD(m.parameters(), lr=0.5), method="fast"),
        lambda m, x, y: top_eigenvalues(m, CE, x, y, k=1),
        lambda m, x, y: landscape(m, CE, x, y, [0.1]),
    ],
    ids=["ics-naive", "ics-fast", "top-eigenvalues", "landscape"],
)
def test_activation_checkpointing_is_refused_not_measured_wrong(measure: Callable[..., object], reentrant: bool) -> None:
    """The rerun would see the model's own weights and BN switches, not the pass's: wrong numbers."""
    torch.manual_seed(0)
    model, x, y = Checkpointed(reentrant), torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(ModelError, match=r"runs its forward again during backward \(activation checkpointing"):
        measure(model, x, y)


def scripted() -> nn.Module:
    """A TorchScript submodule, which takes no hooks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, and still in models people bring
        block = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    return nn.Sequential(nn.Linear(4, 4), block, nn.Linear(8, 3))


@pytest.mark.parametrize(
    "use",
    [
        lambda m, x, y, tmp: probed_layers(m, x),
        lambda m, x, y, tmp: apply_bn(m, "strip", x),
        lambda m, x, y, tmp: gradient_shift(m, CE, x, y, torch.optim.SGD(m.parameters(), lr=0.1)),
        lambda m, x, y, tmp: landscape(m, CE, x, y, [0.1]),
        lambda m, x, y, tmp: top_eigenvalues(m, CE, x, y, k=1),
        lambda m, x, y, tmp: Recorder(m, tmp / "run.h5"),
    ],
    ids=["layers", "surgery", "ics", "landscape", "hessian", "recorder"],
)
def test_a_scripted_submodule_is_refused_by_name(use: Callable[..., object], tmp_path: Path) -> None:
    """Every entry point failed with torch's "register_forward_pre_hook is not supported on ScriptModules"."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ModelError, match=r"^1 is a TorchScript module \(torch.jit.script\), which takes no hooks"):
        use(scripted(), x, y, tmp_path)
    assert not (tmp_path / "run.h5").exists()


def test_lazy_modules_are_materialised_by_one_plain_forward_first() -> None:
    """A deep copy of a lazy parameter failed (surgery), and so did the no-trace pass of layer discovery."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(10)
    ).train()
    x, stream = torch.randn(2, 3, 8, 8), torch.get_rng_state()
    assert [info.name for info, _ in probed_layers(model, x)] == ["0", "1", "5"]
    _, plan = apply_bn(model, "strip", x)
    assert [c.module for c in plan.changes] == ["1"]
    assert model.training and model[1].num_batches_tracked == 0 and not model[1].running_mean.any()
    assert torch.equal(torch.get_rng_state(), stream)  # the lazy weights drew nothing the run will see


class Observer(nn.Module):
    """A fake-quant observer's habits: a buffer empty until the first call, which resizes it, and a
    counter the forward replaces with a new tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.min_val.resize_(x.shape[1]).copy_(x.detach().amin(0))
        self.calls = self.calls + 1
        return x


def test_a_buffer_the_forward_resizes_or_replaces_is_put_back() -> None:
    """Copying into the resized buffer failed ("fails on the example input"); a replaced one kept its new value."""
    model = nn.Sequential(nn.Linear(4, 4), Observer(), nn.Linear(4, 3))
    x = torch.randn(8, 4)
    for _ in range(2):  # the second pass starts from the buffers the first put back
        assert [info.name for info, _ in probed_layers(model, x)] == ["0", "2"]
        assert model[1].min_val.shape == (0,) and model[1].calls == 0
    apply_bn(model, "insert", x)
    assert model[1].min_val.shape == (0,) and model[1].calls == 0

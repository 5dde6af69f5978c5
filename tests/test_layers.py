"""Probed layers come in forward-execution order, not registration order."""

import pytest
import torch
from _fixtures import qat_conv_bn
from torch import nn

from bnprobe.errors import ConfigError
from bnprobe.layers import execution_order, probed_layers
from bnprobe.passes import leave_no_trace


class Shuffled(nn.Module):
    """``__init__`` order differs from ``forward`` order, and ``shared`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.shared = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.stem = nn.Linear(3, 4)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.shared(x)
        x = self.bn(x)
        x = self.shared(torch.relu(x))
        return self.head(x)


def test_forward_order_and_shared_module_once() -> None:
    model = Shuffled()
    names = [info.name for info, _ in probed_layers(model, torch.randn(5, 3))]
    assert names == ["stem", "shared", "bn", "head"]  # unused never runs: no activations, no gradient


def test_kinds_and_globs_select() -> None:
    model = Shuffled()
    infos = [info for info, _ in probed_layers(model, torch.randn(5, 3), patterns=["s*"], kinds=["linear"])]
    assert [i.name for i in infos] == ["stem", "shared"]
    assert [i.order for i in infos] == [0, 1]
    assert infos[0].output_shape == (5, 4) and infos[0].param_count == 16


def test_discovery_leaves_no_trace() -> None:
    model = Shuffled().train()
    x = torch.randn(5, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    execution_order(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_no_match_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no layer matches"):
        probed_layers(Shuffled(), torch.randn(5, 3), patterns=["nothing*"])
    with pytest.raises(ConfigError, match="unknown layer kind"):
        probed_layers(Shuffled(), torch.randn(5, 3), kinds=["convolution"])


class _RandomNet(nn.Module):
    """Dropout (global RNG), a private generator (noisy-BN-like) and BatchNorm, in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.generator = torch.Generator().manual_seed(5)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.fc(x))))
        return self.out(h + torch.rand(h.shape, generator=self.generator))


def test_discovery_with_dropout_leaves_rng_and_bn_statistics_alone() -> None:
    """Layer discovery runs one real forward: no random draw (global or a module's own generator)
    and no BatchNorm statistic (running mean/var, num_batches_tracked) may show it happened."""
    torch.manual_seed(0)
    model = _RandomNet().train()
    x = torch.randn(6, 3)
    bn = {k: v.clone() for k, v in model.bn.state_dict().items()}

    def unchanged() -> None:
        assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"
        assert torch.equal(model.generator.get_state(), gen), "the module's generator moved"
        for k, v in model.bn.state_dict().items():
            assert torch.equal(v, bn[k]), k
        assert model.training and model.bn.training and model.bn.track_running_stats

    rng, gen = torch.get_rng_state(), model.generator.get_state()
    for discover in (lambda: probed_layers(model, x), lambda: execution_order(model, x)):
        names = discover()
        assert names
        unchanged()
    with leave_no_trace(model), torch.no_grad():
        model(x)
    unchanged()
    # the same forward outside discovery does draw and does update BN: the checks above can fail
    model(x)
    assert not torch.equal(torch.get_rng_state(), rng) and not torch.equal(model.generator.get_state(), gen)
    assert int(model.bn.num_batches_tracked) == 1 and not torch.equal(model.bn.running_mean, bn["running_mean"])


# torch.ao.quantization says it moves to torchao; its QAT modules are what these tests need
_QAT_DEPRECATED = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(_QAT_DEPRECATED)
def test_a_qat_conv_comes_before_the_bn_it_runs() -> None:
    """The fused conv uses its weight, then calls its child ``conv.bn``, whose call ends first."""
    names = [info.name for info, _ in probed_layers(qat_conv_bn(), torch.randn(2, 3, 6, 6))]
    assert names == ["conv", "conv.bn", "fc"]


class Scaled(nn.Module):
    """Applies its own parameter after its child has run."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(x)


class WeightNormedFirst(nn.Module):
    """A weight_norm'd weight of its own applied before its child BN runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(nn.functional.linear(x, self.weight))
        return out


def test_nested_holders_come_in_the_order_their_parameters_are_used() -> None:
    scaled = nn.Sequential(Scaled(), nn.Linear(4, 2))
    assert [i.name for i, _ in probed_layers(scaled, torch.randn(5, 3))] == ["0.inner", "0", "1"]
    normed = nn.utils.parametrizations.weight_norm(WeightNormedFirst())
    assert [i.name for i, _ in probed_layers(normed, torch.randn(5, 3))] == ["", "bn"]  # original0/1 are its use

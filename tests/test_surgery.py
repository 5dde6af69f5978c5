"""BatchNorm surgery: insert, strip, fold and noisy BN, paired by dataflow."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import bnprobe.surgery.noisy
from bnprobe import rng
from bnprobe.config import BnMode, BnTargets, NoiseConfig
from bnprobe.errors import SurgeryError
from bnprobe.layers import probed_layers
from bnprobe.models import build_model
from bnprobe.surgery import (
    Action,
    BnPlan,
    FreshCopy,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyFrozenBatchNorm2d,
    NoisyNorm,
    apply_bn,
    is_batchnorm,
)

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def leaf_types(model: nn.Module, x: torch.Tensor) -> list[type]:
    """Types of the leaf modules in the order the forward calls them (each call counted)."""
    calls: list[type] = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(type(m))) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BN: random running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.running_mean is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def one_sgd_step(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Loss before and after one SGD step on a fixed random batch; every gradient must be finite."""
    model.train()
    y = torch.tensor([1, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y)
    return loss.item(), after.item()


def small_densenet() -> nn.Module:
    """torchvision's DenseNet code (BN before conv, torch.cat) at a size that runs in milliseconds."""
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)


def norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_batchnorm(m)]


def weighted_layers(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def noise_states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: g.get_state() for n, g in rng.module_generators(model).items()}


# ----------------------------------------------------------------------------- small models


class BatchNormAct2d(nn.BatchNorm2d):
    """A look-alike of timm's BatchNormAct2d. ``act`` is registered before ``drop`` but runs after it."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class Crossed(nn.Module):
    """Names and registration order lie: ``bn1`` follows ``conv2`` and ``bn2`` follows ``conv1``.

    With ``traceable=False`` the forward branches on data, so torch.fx cannot trace it.
    """

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.traceable = traceable
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv1(x)))
        if not self.traceable and bool(h.sum() > -1):
            h = h * 1.0
        return self.head(self.bn1(self.conv2(h)).mean((2, 3)))


class ConvBn(nn.Module):
    """A 3x3 conv (3 -> 4 channels) and a BN: each subclass's forward is the dataflow its test is about."""

    def __init__(self, conv: type[nn.Conv2d] = nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


class SharedOutput(ConvBn):
    """The conv's output goes to the BN and around it: folding the BN into the conv would be wrong."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.traceable = traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.traceable or bool(y.sum() > -1e9):
            return self.bn(y) + y
        return y


class Zoo(nn.Module):
    """Every BN flavour after every feeding layer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv3d(3, 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.sync = nn.SyncBatchNorm(6)
        self.up = nn.ConvTranspose2d(6, 6, 3, groups=2, bias=False)
        self.frozen = FrozenBatchNorm2d(6)
        self.conv_act = nn.Conv2d(6, 6, 1, bias=False)
        self.bnact = BatchNormAct2d(6)
        self.conv1 = nn.Conv1d(6, 4, 1)
        self.bn1 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 8, bias=False)
        self.bnfc = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn3(self.conv3(x.unsqueeze(2))).squeeze(2)
        h = self.frozen(self.up(torch.relu(self.sync(self.conv(h)))))
        h = self.bnact(self.conv_act(h))
        h = self.bn1(self.conv1(h.flatten(2))).mean(2)
        return self.out(self.bnfc(self.fc(h)))


# ----------------------------------------------------------------------------- insert


@pytest.mark.slow
def test_vgg11_insert_runs_the_layout_of_vgg11_bn() -> None:
    torch.manual_seed(0)
    model, plan = apply_bn(torchvision.models.vgg11(num_classes=10), "insert", IMAGES)
    reference = torchvision.models.vgg11_bn(num_classes=10)
    assert leaf_types(model, IMAGES) == leaf_types(reference, IMAGES)
    assert [c.action for c in plan.changes] == ["inserted"] * 8
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    assert not any(is_batchnorm(m) for m in model.classifier.modules())
    names = dict(model.named_modules())
    assert [type(names[n]) for n in ("features.0", "features.0_bn", "features.1")] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert weighted_layers(model) == weighted_layers(torchvision.models.vgg11(num_classes=10))


def test_insert_puts_the_bn_next_to_the_layer_under_a_sibling_name_and_keep_bias_keeps_its_bias() -> None:
    torch.manual_seed(0)
    base = build_model("vgg", 10, (3, 32, 32), width=0.125)
    model, plan = apply_bn(base, "insert", IMAGES, keep_bias=True)
    assert list(dict(model.features.named_children()))[:5] == ["0", "0_bn", "1", "2", "3"]
    assert type(model.features) is nn.Sequential and isinstance(model.features.get_submodule("0_bn"), nn.BatchNorm2d)
    assert isinstance(model.get_submodule("features.1"), nn.ReLU) and isinstance(
        model.features[1], nn.BatchNorm2d
    )  # integer indexing is by position
    assert torch.equal(model.features[0].bias, base.features[0].bias)
    assert plan.rows()[0] == ("inserted", "features.0_bn", "features.0", "BatchNorm2d(8)")
    assert isinstance(model.classifier, nn.Linear)  # the output layer gets none
    assert base.features[0].bias is not None and "0_bn" not in base.features._modules  # the input model is untouched
    _, plan = apply_bn(base, "insert", IMAGES)
    assert plan.rows()[0][3] == "BatchNorm2d(8); features.0's bias removed"


@pytest.mark.parametrize(("name", "input_shape"), [("vgg", (3, 32, 32)), ("mlp", (1, 8, 8)), ("dln", (10,))])
@pytest.mark.parametrize("mode", ["insert", "noisy"])
def test_insert_and_noisy_keep_every_conv_and_linear_name_of_the_built_in_models(
    name: str, input_shape: tuple[int, ...], mode: str
) -> None:
    options = {"width": 0.125} if name == "vgg" else {"depth": 4} if name == "dln" else {}
    base = build_model(name, 10, input_shape, **options)
    model, plan = apply_bn(base, mode, torch.randn(4, *input_shape))
    assert weighted_layers(model) == weighted_layers(base) != set()
    assert all(c.action == "inserted" and c.module == f"{c.related}_bn" and "renamed" not in c.detail for c in plan.changes)
    assert set(norms(model)) == {c.module for c in plan.changes}


class Custom(nn.Module):
    """``conv1`` runs from a custom forward; ``body`` is a Sequential subclass with its own forward (which could index its
    children by position, so nothing is added to it); ``tail`` holds one conv twice."""

    class Residual(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.body = self.Residual(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        shared = nn.Conv2d(4, 4, 1)
        self.tail = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.body(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_insert_wraps_only_a_layer_outside_a_sequential_says_so_and_shares_the_bn_of_a_shared_layer() -> None:
    model, plan = apply_bn(Custom(), "insert", IMAGES)
    assert plan.rows() == [
        (
            "inserted",
            "conv1.bn",
            "conv1.conv",
            "BatchNorm2d(4); conv1's bias removed; conv1 renamed conv1.conv (Custom is not an nn.Sequential)",
        ),
        (
            "inserted",
            "body.0.bn",
            "body.0.conv",
            "BatchNorm2d(4); body.0's bias removed; body.0 renamed body.0.conv (Residual has its own forward)",
        ),
        ("inserted", "tail.0_bn", "tail.0", "BatchNorm2d(4); tail.0's bias removed"),
    ]
    assert isinstance(model.conv1.conv, nn.Conv2d) and isinstance(model.conv1.bn, nn.BatchNorm2d)
    assert (
        type(model.body) is Custom.Residual and list(model.body._modules) == ["0", "1"] and list(model.body[0]._modules) == ["conv", "bn"]
    )
    assert list(model.tail._modules) == ["0", "0_bn", "1", "2", "2_bn", "3"] and model.tail.get_submodule(
        "0_bn"
    ) is model.tail.get_submodule("2_bn")
    assert leaf_types(model, IMAGES) == [nn.Conv2d, nn.BatchNorm2d] + [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] + [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
    ] * 2 + [nn.Linear]


class ReadsItsLayer(nn.Module):
    """Reads its conv's weight through the conv's name, as timm's PositionalEncodingFourier does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.to(self.proj.weight.dtype)) * self.proj.out_channels
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["insert", "noisy"])
def test_a_wrapped_layer_still_answers_for_its_attributes(mode: str) -> None:
    model, _ = apply_bn(ReadsItsLayer(), mode, IMAGES)
    assert list(model.proj._modules) == ["conv", "bn"] and model.proj.weight is model.proj.conv.weight
    assert model.proj.out_channels == 4
    one_sgd_step(model, IMAGES)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        model.proj.nothing


@pytest.mark.parametrize(("name", "input_shape", "activation"), [("mlp", (1, 8, 8), nn.Sigmoid), ("dln", (10,), None)])
def test_insert_on_linear_models_puts_bn_before_each_nonlinearity_never_after_the_output(
    name: str, input_shape: tuple[int, ...], activation: type | None
) -> None:
    model, _ = apply_bn(build_model(name, 10, input_shape), "insert", torch.randn(4, *input_shape))
    types = [t for t in leaf_types(model, torch.randn(4, *input_shape)) if t is not nn.Flatten]
    linears = types.count(nn.Linear)
    expected = [nn.Linear, nn.BatchNorm1d] + ([activation] if activation else [])
    assert types == expected * (linears - 1) + [nn.Linear]


@pytest.mark.parametrize(("targets", "expected"), [("all", ["0_bn", "3_bn"]), (BnTargets.LINEAR, ["3_bn"]), ("conv", ["0_bn"])])
def test_insert_targets_choose_the_layer_kinds_and_never_the_output_layer(targets: str | BnTargets, expected: list[str]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 8), nn.ReLU(), nn.Linear(8, 2))
    _, plan = apply_bn(model, "insert", IMAGES, targets=targets)
    assert [c.module for c in plan.changes] == expected


def test_insert_leaves_layers_that_already_feed_a_bn_and_places_densenet_bn_after_its_convs() -> None:
    model, plan = apply_bn(small_densenet(), "insert", IMAGES)
    actions = {(c.action, c.related) for c in plan.changes}
    assert ("kept", "features.conv0") in actions  # conv0 -> norm0 already
    assert ("inserted", "features.denseblock1.denselayer1.conv2.conv") in actions  # before torch.cat; _DenseLayer has its own forward
    assert ("inserted", "features.transition1.conv") in actions  # before the pooling, in the _Transition Sequential
    assert "features.transition1.conv_bn" in norms(model)
    assert ("kept", "features.denseblock1.denselayer1.conv1") in actions  # conv1 -> norm2 already


def test_insert_refuses_a_linear_whose_output_has_no_channel_dim_1() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(SurgeryError, match="after 0: its output has rank 3"):
        apply_bn(model, "insert", torch.randn(4, 5, 6))


# ----------------------------------------------------------------------------- strip


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("resnet18", {"zero_init_residual": True}, 32),
        ("mobilenet_v3_small", {}, 32),
        ("efficientnet_b0", {}, 32),
        ("googlenet", {"aux_logits": False, "init_weights": True}, 32),
        pytest.param("densenet121", {}, 32, marks=pytest.mark.slow),
    ],
)
def test_strip_leaves_no_bn_rebiases_the_feeding_layers_and_trains(name: str, options: dict[str, Any], size: int) -> None:
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None, num_classes=10, **options)
    x = torch.randn(2, 3, size, size)
    model, plan = apply_bn(base, "strip", x)
    assert norms(model) == []
    removed = [c for c in plan.changes if c.action == "removed"]
    assert len(removed) == len(norms(base))
    for change in removed:
        if change.related:
            assert model.get_submodule(change.related).bias is not None
    before, after = one_sgd_step(model, x)
    assert torch.isfinite(torch.tensor([before, after])).all()
    if name == "densenet121":  # BN before conv: removed, reported, nothing re-biased
        pre = next(c for c in plan.changes if c.module == "features.denseblock1.denselayer1.norm1")
        assert pre.related == "" and "from cat" in pre.detail


def test_strip_keeps_the_activation_of_a_bn_that_holds_one_in_forward_order() -> None:
    model, plan = apply_bn(Zoo(), "strip", torch.randn(4, 3, 5, 5))
    assert norms(model) == []
    assert isinstance(model.bnact, nn.Sequential) and list(dict(model.bnact.named_children())) == ["drop", "act"]
    assert isinstance(model.bnact.act, nn.ReLU) and isinstance(model.bn3, nn.Identity)
    assert {c.module for c in plan.changes if c.action == "rebiased"} == {"conv3", "conv", "up", "conv_act", "fc"}
    assert "-> Sequential(drop, act)" in next(c.detail for c in plan.changes if c.module == "bnact")
    assert "from conv1" not in str(plan.rows()) and model.conv1.bias is not None  # already had one


class InPlaceAfterBn(nn.Module):
    """BN on a tanh output that is also used around it, then an in-place ReLU (held by the BN or not)."""

    def __init__(self, held: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.held = held
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1)
        self.bn = BatchNormAct2d(4) if held else nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        if held:
            self.bn.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(x))
        y = self.bn(h) if self.held else self.act(self.bn(h))
        return (self.conv2(y) + h.sum(1, keepdim=True)).mean((2, 3))


@pytest.mark.parametrize("held", [False, True])
def test_strip_never_lets_an_in_place_activation_change_the_bn_input(held: bool) -> None:
    base = InPlaceAfterBn(held)
    model, plan = apply_bn(base, "strip", IMAGES)
    with torch.no_grad():
        h = torch.tanh(base.conv1(IMAGES))
        expected = (base.conv2(torch.relu(h)) + h.sum(1, keepdim=True)).mean((2, 3))
        assert torch.allclose(model(IMAGES), expected)
    one_sgd_step(model, IMAGES)  # autograd kept tanh's output: changed in place, backward would fail
    assert plan.rows()[0][3].endswith("-> Sequential(drop, act)" if held else "-> FreshCopy")


def test_strip_adds_no_copy_where_the_bn_input_is_a_private_conv_output() -> None:
    model, plan = apply_bn(torchvision.models.resnet18(num_classes=10), "strip", IMAGES)
    assert not any(isinstance(m, FreshCopy) for m in model.modules()) and "FreshCopy" not in str(plan.rows())


@pytest.mark.parametrize("traceable", [True, False])
def test_pairing_follows_the_dataflow_not_names_with_fx_or_hooks(traceable: bool) -> None:
    _, plan = apply_bn(Crossed(traceable), "strip", IMAGES)
    assert plan.pairing == "torch.fx" if traceable else plan.pairing.startswith("forward hooks")
    assert [r[:3] for r in plan.rows()] == [
        ("removed", "bn2", "conv1"),
        ("rebiased", "conv1", "bn2"),
        ("removed", "bn1", "conv2"),
        ("rebiased", "conv2", "bn1"),
    ]


# ----------------------------------------------------------------------------- fold


@pytest.mark.parametrize("name", ["resnet18", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_fold_is_exact_in_eval_mode(name: str) -> None:
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None, num_classes=10)
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert norms(model) == [] and {c.action for c in plan.changes} == {"folded"}
    with torch.no_grad():
        assert relative_error(model.eval()(IMAGES), base.eval()(IMAGES)) < 1e-5


def test_fold_handles_every_bn_flavour_and_grouped_transposed_convs() -> None:
    base = Zoo()
    for m in base.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    randomise_bn(base)
    x = torch.randn(4, 3, 5, 5)
    model, _ = apply_bn(base, "strip", x, fold=True)
    with torch.no_grad():
        assert relative_error(model.eval()(x), base.eval()(x)) < 1e-5


def test_fold_strips_a_bn_without_a_feeding_conv_says_why_and_folds_the_rest_exactly() -> None:
    torch.manual_seed(0)
    base = small_densenet()
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert norms(model) == []
    unfolded = {c.module: c.detail for c in plan.changes if c.action == "removed"}
    folded = {c.module for c in plan.changes if c.action == "folded"}
    assert unfolded["features.denseblock1.denselayer1.norm1"].startswith("not folded: its input comes from cat, not a conv/linear")
    assert folded and folded | set(unfolded) == set(norms(base))
    expected = small_densenet()  # the same function with only the unfolded BNs taken out
    expected.load_state_dict(base.state_dict())
    for name in unfolded:
        parent, _, key = name.rpartition(".")
        setattr(expected.get_submodule(parent), key, nn.Identity())
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(other), expected.eval()(other)) < 1e-5


@pytest.mark.parametrize("traceable", [True, False])
def test_fold_strips_a_bn_whose_conv_output_is_also_used_elsewhere_and_says_why(traceable: bool) -> None:
    base = SharedOutput(traceable)
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert plan.rows()[0][:3] == ("removed", "bn", "conv")
    assert plan.rows()[0][3].startswith("not folded: conv's output is also used by add")  # (and by sum, untraced)
    assert torch.equal(model.conv.weight, base.conv.weight)


class ReadsTheShape(ConvBn):
    """Reads the conv output's shape besides feeding it to the BN: a use that reads no values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y).reshape(y.shape[0], -1)[:, : y.size(1)]


def test_fold_ignores_uses_that_read_only_the_shape() -> None:
    base = ReadsTheShape()
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert plan.pairing == "torch.fx" and [c.action for c in plan.changes] == ["folded"]
    with torch.no_grad():
        assert relative_error(model.eval()(IMAGES), base.eval()(IMAGES)) < 1e-6


class InPlaceBetween(ConvBn):
    """An in-place op between the conv and its BN: hooks alone see the conv's tensor reach the BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if bool(h.sum() > -1e9):  # data-dependent: torch.fx cannot trace it
            torch.relu_(h)
        return self.bn(h)


def test_fold_sees_operations_outside_modules_when_fx_cannot_trace() -> None:
    base = InPlaceBetween()
    randomise_bn(base)
    _model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert plan.pairing.startswith("forward hooks")
    assert plan.rows()[0][:3] == ("removed", "bn", "")
    assert plan.rows()[0][3].startswith("not folded: its input comes from relu_, not a conv/linear")


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv, as timm's: its forward normalises each output channel's weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class Twice(nn.Module):
    """``shared`` runs twice, into two BNs; ``tied`` shares its weight with ``tied_too``."""

    def __init__(self) -> None:
        super().__init__()
        self.std = StdConv2d(3, 4, 3, bias=False)
        self.bn_std = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.tied, self.tied_too = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.tied_too.weight = self.tied.weight
        self.bn_tied = nn.BatchNorm2d(4)
        self.plain = nn.Conv2d(4, 4, 1)
        self.bn_plain = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_std(self.std(x))
        h = self.bn_a(self.shared(h)) + self.bn_b(self.shared(h))
        h = self.bn_tied(self.tied(h)) + self.tied_too(h)
        return self.bn_plain(self.plain(h))


def test_fold_leaves_out_every_bn_whose_fold_would_change_the_function() -> None:
    base = Twice()
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    why = {c.module: c.detail.split("; ")[0] for c in plan.changes if c.action == "removed"}
    assert why == {
        "bn_std": "not folded: std (StdConv2d) does not scale its output with its weight",
        "bn_a": "not folded: shared's output is also used by bn_b",
        "bn_b": "not folded: shared's output is also used by bn_a",
        "bn_tied": "not folded: tied's parameters are shared with tied_too",
        "bn_plain": "not folded: it keeps no running statistics (track_running_stats=False), so eval mode normalises by the batch",
    }
    assert norms(model) == []


def ill_conditioned_mlp(depth: int = 24, width: int = 32) -> nn.Module:
    """Linear-BN-tanh blocks with weight gain 4 (the chaotic regime): float32 rounding of any weight
    (6e-8) moves the output by ~1e-3, so a float32 comparison cannot tell an exact fold from a wrong one."""
    g = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width, width, generator=g) * 4 / width**0.5)
        layers += [linear, nn.BatchNorm1d(width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 3))
    randomise_bn(model)
    return model


def test_fold_safety_net_works_in_float64_so_float32_rounding_does_not_refuse_an_exact_fold() -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    base = ill_conditioned_mlp()
    _model, plan = apply_bn(base, "strip", x, fold=True)
    assert [c.action for c in plan.changes] == ["folded"] * 24
    twin = copy.deepcopy(base).double()  # the fold itself is exact: folding the float64 model changes nothing
    folded, _ = apply_bn(twin, "strip", x.double(), fold=True)
    with torch.no_grad():
        assert relative_error(folded.eval()(x.double()), twin.eval()(x.double())) < 1e-9


class Chaotic(nn.Module):
    """Its output turns over completely when a weight moves by one float64 rounding step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(1e17 * self.bn(self.fc(x)))


def test_fold_safety_net_allows_what_the_models_own_rounding_does() -> None:
    """Folding is exact, but no check can show it below the model's rounding noise; a chaotic
    model (an untrained EfficientNetV2 at 28 px) was refused for an exact fold."""
    base = Chaotic()
    randomise_bn(base)
    _, plan = apply_bn(base, "strip", torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), fold=True)
    assert [c.action for c in plan.changes] == ["folded"]


class KeepsACopy(nn.Conv2d):
    """A conv that keeps a copy of its output, made inside its own forward, where no dataflow pass looks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.copy = y.clone()
        return y


class UsesTheCopy(ConvBn):
    """Adds the conv's hidden copy to the BN output: a use of the conv's output no dataflow pass sees."""

    def __init__(self) -> None:
        super().__init__(KeepsACopy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv.copy


class UsesTheCopyThroughAList(UsesTheCopy):
    """The same hidden use, its forward reaching the layers through a plain list (not registered children)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [self.conv, self.bn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.layers
        return bn(conv(x)) + conv.copy


class WalksAList(nn.Module):
    """Its forward walks a plain list of its layers, which strip (swapping registered children) cannot update."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.seen = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), []
        self.layers = [self.conv, self.bn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        self.seen.append(x.shape)
        return x


def test_fold_safety_net_refuses_a_use_the_dataflow_cannot_see() -> None:
    """A hidden use of a conv's output, also with the layers reached through a plain list: a check
    on a copy of only the registered children ran the model's own layers through the list, compared
    the unfolded model with itself and accepted a wrong fold (output 21% off)."""
    for base in (UsesTheCopy(), UsesTheCopyThroughAList(), WalksAList()):
        randomise_bn(base)
        name = type(base).__name__
        with pytest.raises(SurgeryError, match=rf"folding BN changed {name}'s eval output by .* the dataflow pass did not see"):
            apply_bn(base, "strip", IMAGES, fold=True)


class NotesShapes(ConvBn):
    """Keeps its layers as registered children; its forward appends to a list."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Size] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.seen.append(y.shape)
        return y


def test_planning_leaves_no_attribute_on_the_model_it_returns() -> None:
    """The planning passes ran the forward (and torch.fx a traced one): the returned model kept a
    list entry per pass and a cached output, under torch.fx a Proxy, which no deep copy survives."""
    for mode in ("insert", "strip", "noisy"):
        model, _ = apply_bn(NotesShapes(), mode, IMAGES)
        assert model.seen == [], mode
        model, _ = apply_bn(UsesTheCopy(), mode, IMAGES)
        assert not hasattr(model.conv, "copy"), mode
        copy.deepcopy(model)(IMAGES)


def test_fold_check_leaves_the_model_it_checks_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs a twin: the model's BN statistics (train mode, reached through a list) and
    the list its forward appends to stay as they were. A model whose layers are all registered
    children gets a structural twin (no deep copy), with its own lists."""
    from bnprobe.surgery import fold

    model = WalksAList().train()
    randomise_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError):
        fold._check_folds(model, [("bn", "conv", nn.Identity())], IMAGES)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.seen == []
    registered = NotesShapes()
    randomise_bn(registered)
    registered.register_forward_hook(lambda m, i, o: None)  # a plain function: shared, no reason to copy deeply

    def no_deep_copy(*args: object) -> None:
        raise AssertionError("deep-copied")

    monkeypatch.setattr(fold.copy, "deepcopy", no_deep_copy)
    fold._check_folds(registered, [("bn", "conv", nn.Identity())], IMAGES)
    assert registered.seen == []


def test_fold_into_a_conv_subclass_with_its_own_forward_that_still_scales() -> None:
    class PaddedConv(nn.Conv2d):  # as timm's Conv2dSame: pads its input, then convolves
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    base = nn.Sequential(PaddedConv(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    randomise_bn(base)
    model, plan = apply_bn(base, "strip", IMAGES, fold=True)
    assert [c.action for c in plan.changes] == ["folded"]
    with torch.no_grad():
        assert relative_error(model.eval()(IMAGES), base.eval()(IMAGES)) < 1e-6


def test_fold_check_runs_on_a_twin_that_shares_no_tensor_with_the_model() -> None:
    """The check folds its twin in place: a twin tensor shared with the model would fold the model twice."""
    from bnprobe.surgery.fold import _twin

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    model[2].weight = model[0].weight  # tied
    for source, dtype in ((model, torch.float64), (model, None), (copy.deepcopy(model).double(), torch.float64)):
        twin = _twin(source, dtype)
        assert isinstance(twin, nn.Sequential) and all(a is not b for a, b in zip(twin.modules(), source.modules()))
        theirs = [*source.parameters(), *source.buffers()]
        tensors = [*twin.parameters(), *twin.buffers()]
        assert not {t.untyped_storage().data_ptr() for t in tensors} & {t.untyped_storage().data_ptr() for t in theirs}
        assert twin[2].weight is twin[0].weight and isinstance(twin[0].weight, nn.Parameter)
        assert twin[0].weight.dtype == (dtype or torch.float32) and twin[1].num_batches_tracked.dtype == torch.long
        torch.testing.assert_close(twin[1].running_var.float(), source[1].running_var.float())


class _Blocks(nn.Sequential):
    """``n`` conv-BN-ReLU blocks: a model whose traversals the test below counts."""

    def __init__(self, n: int) -> None:
        super().__init__(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(n)])


def test_fold_walks_the_model_a_fixed_number_of_times_however_many_bns_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strip with fold was quadratic: each BN's swap and parameter-sharing check walked every module
    (15 s on a model with 326 BNs and 2,269 modules)."""
    walks = 0
    named_modules = nn.Module.named_modules

    def counting(self: nn.Module, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
        nonlocal walks
        walks += isinstance(self, _Blocks) and memo is None
        return named_modules(self, memo, prefix, remove_duplicate)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    counts = []
    for n in (4, 16):
        walks = 0
        _, plan = apply_bn(_Blocks(n), "strip", torch.randn(2, 4, 8, 8), fold=True)
        assert [c.action for c in plan.changes] == ["folded"] * n
        counts.append(walks)
    assert counts[0] == counts[1]


# ----------------------------------------------------------------------------- noisy


def noisy_vgg(seed: int = 0, noise: NoiseConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    model, _ = apply_bn(build_model("vgg", 10, (3, 32, 32), width=0.125), BnMode.NOISY, IMAGES, seed=seed, noise=noise)
    return model


def test_noisy_inserts_noisy_bns_each_with_its_own_seeded_generator() -> None:
    model = noisy_vgg()
    noisy = [m for m in model.modules() if isinstance(m, NoisyNorm)]
    assert len(noisy) == 8 == len(norms(model))
    assert type(model.features.get_submodule("0_bn")) is NoisyBatchNorm2d and isinstance(noisy[0], nn.BatchNorm2d)
    assert set(rng.module_generators(model)) == set(norms(model))
    assert len({m.noise_seed for m in noisy}) == 8
    assert set(model.state_dict()) >= {
        f"features.0_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "_extra_state")
    }
    model.train()
    assert torch.equal(model(IMAGES), noisy_vgg()(IMAGES))  # same run seed, same draws
    assert not torch.equal(noisy_vgg().train()(IMAGES), noisy_vgg(seed=1).train()(IMAGES))


def test_noisy_train_draws_afresh_eval_is_plain_bn_and_draws_replay() -> None:
    model = noisy_vgg().train()
    state = rng.capture(model)
    first = model(IMAGES)
    assert not torch.equal(first, model(IMAGES))
    rng.restore(model, state)
    assert torch.equal(first, model(IMAGES))
    torch.manual_seed(0)
    plain, _ = apply_bn(build_model("vgg", 10, (3, 32, 32), width=0.125), "insert", IMAGES)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    with torch.no_grad():
        assert torch.equal(model.eval()(IMAGES), plain.eval()(IMAGES))


def test_noise_follows_the_recipe() -> None:
    bn = NoisyBatchNorm1d(
        4000, affine=False, seed=3, noise=NoiseConfig(mu_range=(2.0, 2.0), sigma_range=(3.0, 3.0), mean_spread=0.1, scale_std=0.1)
    )
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(4, 1).expand(4, 4000)  # batch-normalised to -+1 / sqrt(1 + eps)
    unit = 1 / (1 + bn.eps) ** 0.5
    y = bn(x).double()
    assert torch.equal(y[0], y[2]) and torch.equal(y[1], y[3])  # per channel, not per sample
    shift, scale = (y[1] + y[0]) / 2, (y[1] - y[0]) / (2 * unit)
    assert (shift - 2.0).abs().max() <= 0.1 + 1e-6 and abs(shift.mean().item() - 2.0) < 0.01
    assert abs(scale.mean().item() - 3.0) < 0.02 and abs(scale.std().item() - 0.1) < 0.01
    assert not torch.equal(bn(x), bn(x))  # fresh draws at every call
    state = bn.generator.get_state()
    assert torch.equal(bn.eval()(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, eps=bn.eps))  # eval: plain BN
    assert torch.equal(bn.generator.get_state(), state)  # and no draw


def test_a_hook_on_a_noisy_bn_records_the_noisy_output_the_next_layer_gets() -> None:
    model = noisy_vgg().train()
    bn = model.features.get_submodule("0_bn")
    seen: dict[str, torch.Tensor] = {}
    handles = [
        bn.register_forward_hook(lambda m, args, out: seen.update(bn_in=args[0].clone(), bn_out=out.clone())),
        model.get_submodule("features.1").register_forward_pre_hook(lambda m, args: seen.update(relu_in=args[0].clone())),
    ]
    model(IMAGES)
    for h in handles:
        h.remove()
    assert torch.equal(seen["bn_out"], seen["relu_in"])
    plain = nn.functional.batch_norm(seen["bn_in"], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert relative_error(seen["bn_out"], plain) > 0.1


def test_probe_passes_consume_no_noise_draw() -> None:
    model = noisy_vgg().train()
    before = noise_states(model)
    layers = probed_layers(model, IMAGES)
    assert "features.0_bn" in [info.name for info, _ in layers]
    after = noise_states(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_noise_generator_state_travels_in_the_state_dict() -> None:
    model = noisy_vgg().train()
    saved = model.state_dict()
    expected = model(IMAGES)
    restored = noisy_vgg(seed=5).train()
    restored.load_state_dict(saved)
    assert torch.equal(restored(IMAGES), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_draws_land_on_the_input_device() -> None:
    model = noisy_vgg().cuda().train()
    x = IMAGES.cuda()
    assert model(x).device.type == "cuda"
    state = rng.capture(model)
    first = model(x)
    rng.restore(model, state)
    assert torch.equal(first, model(x))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BN subclass with its own forward and no children: noisy mode keeps that forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_noisy_on_a_model_with_bn_makes_each_bn_noisy_at_its_name_before_its_activation() -> None:
    base = Zoo()
    randomise_bn(base)
    x = torch.randn(4, 3, 5, 5)
    model, plan = apply_bn(base, "noisy", x)
    assert {c.action for c in plan.changes} == {"noise"} and len(plan.changes) == 6
    assert norms(model) == norms(base) and model.state_dict().keys() - base.state_dict().keys() == {
        f"{n}._extra_state" for n in norms(base)
    }
    assert all(isinstance(m, NoisyNorm) for m in model.modules() if is_batchnorm(m))
    assert type(model.bnact) is NoisyBatchNorm2d and model.bnact.after_noise == (
        "drop",
        "act",
    )  # the call order, not the registration order
    assert (
        type(model.frozen) is NoisyFrozenBatchNorm2d and isinstance(model.sync, nn.SyncBatchNorm) and isinstance(model.bn3, nn.BatchNorm3d)
    )
    assert next(c.detail for c in plan.changes if c.module == "bnact").endswith(
        "-> NoisyBatchNorm2d, noise seed " + str(model.bnact.noise_seed) + ", before its drop, act"
    )
    assert ("noise", "bnfc", "fc") in [r[:3] for r in plan.rows()]
    assert plan.params_after == plan.params_before
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base.eval()(x))
    model.train()
    model.bnact.noise_config = NoiseConfig(mu_range=(-50.0, -50.0))  # every value negative after the noise: the ReLU zeroes all
    with torch.no_grad():
        assert torch.equal(model.bnact(torch.randn(4, 6, 3, 3)), torch.zeros(4, 6, 3, 3))
    scaled, _ = apply_bn(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBatchNorm2d(4)), "noisy", IMAGES)
    assert isinstance(scaled[1], ScaledBatchNorm2d) and isinstance(scaled[1], NoisyNorm)
    with torch.no_grad():
        out = scaled.eval()(IMAGES)
        assert torch.allclose(out, 2 * nn.functional.batch_norm(scaled[0](IMAGES), scaled[1].running_mean, scaled[1].running_var))


def test_strip_removes_noisy_bns_too() -> None:
    x = torch.randn(4, 3, 5, 5)
    noisy, _ = apply_bn(Zoo(), "noisy", x)
    model, plan = apply_bn(noisy, "strip", x)
    assert norms(model) == [] and rng.module_generators(model) == {}
    assert list(model.bnact._modules) == ["drop", "act"] and isinstance(model.bn3, nn.Identity)
    assert len([c for c in plan.changes if c.action == "removed"]) == 6


def test_a_pickled_noisy_bn_loads_from_its_module_and_from_the_package_path() -> None:
    """Modules pickled when the noisy classes lived in ``bnprobe.surgery`` name them by that path; the
    package re-exports them, so those pickles load, as do ones naming ``bnprobe.surgery.noisy``."""
    assert bnprobe.surgery.NoisyBatchNorm2d is bnprobe.surgery.noisy.NoisyBatchNorm2d
    bn = NoisyBatchNorm2d(4, seed=3)
    new = pickle.dumps(bn, protocol=2)  # protocol 2 names a class as text: "bnprobe.surgery.noisy\nNoisyBatchNorm2d\n"
    old = new.replace(b"bnprobe.surgery.noisy\n", b"bnprobe.surgery\n")
    assert old != new
    for blob in (new, old):
        loaded = pickle.loads(blob)
        assert type(loaded) is NoisyBatchNorm2d and loaded.noise_seed == 3
        assert torch.equal(loaded.generator.get_state(), bn.generator.get_state())
        assert torch.equal(loaded.running_var, bn.running_var)


# ----------------------------------------------------------------------------- variants and plan


def test_variants_share_their_weights_and_surgery_draws_no_global_random_numbers() -> None:
    def convs(mode: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        base = build_model("vgg", 10, (3, 32, 32), width=0.125)
        state = torch.get_rng_state()
        model, _ = apply_bn(base, mode, IMAGES)
        assert torch.equal(torch.get_rng_state(), state)
        return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    keep = convs("keep")
    for mode in ("insert", "strip", "noisy"):
        assert all(torch.equal(a, b) for a, b in zip(keep, convs(mode), strict=True))


def test_plan_rows_and_summary() -> None:
    model, plan = apply_bn(torchvision.models.resnet18(num_classes=10), "strip", IMAGES)
    assert isinstance(plan, BnPlan) and plan.mode == "strip"
    assert all(len(r) == len(plan.columns) and all(isinstance(v, str) for v in r) for r in plan.rows())
    assert {c.action for c in plan.changes} == {Action.REMOVED, Action.REBIASED} == {"removed", "rebiased"}
    assert {type(r[0]) for r in plan.rows()} == {str}  # the table shows plain words, not enum members
    assert [f"{a}" for a in (Action.FOLDED, Action.NOISE)] == [str(Action.FOLDED), "noise"] == ["folded", "noise"]
    assert plan.params_after == sum(p.numel() for p in model.parameters()) < plan.params_before
    assert (
        plan.summary()
        == f"bn strip: 20 removed, 20 rebiased; parameters {plan.params_before:,} -> {plan.params_after:,} (pairing: torch.fx)"
    )
    kept, kept_plan = apply_bn(model, "keep", IMAGES)
    assert kept is not model and kept_plan.rows() == [] and "no change" in kept_plan.summary()


def test_bad_arguments_and_failing_models_are_one_line_errors() -> None:
    with pytest.raises(SurgeryError, match="unknown BN mode 'remove'; choose from keep, insert, strip, noisy"):
        apply_bn(nn.Linear(2, 2), "remove", torch.randn(2, 2))
    with pytest.raises(SurgeryError, match="unknown BN targets 'convs'"):
        apply_bn(nn.Linear(2, 2), "insert", torch.randn(2, 2), targets="convs")
    with pytest.raises(SurgeryError, match="Linear fails on the example input: mat1 and mat2") as info:
        apply_bn(nn.Linear(2, 2), "strip", torch.randn(2, 3))
    assert "\n" not in str(info.value)


def frozen_bn_net() -> nn.Module:
    """Two frozen BNs of other libraries, neither a torch BatchNorm subclass."""
    from timm.layers import FrozenBatchNormAct2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        FrozenBatchNormAct2d(8),
        nn.Conv2d(8, 8, 3),
        FrozenBatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    randomise_bn(model)
    return model


def test_a_bn_is_recognised_by_what_it_holds_not_its_class() -> None:
    """timm's FrozenBatchNormAct2d was not a BN: strip said "no change", insert added a BN after it."""
    model = frozen_bn_net()
    assert not is_batchnorm(nn.InstanceNorm2d(4, track_running_stats=True))  # same buffers, per-sample statistics
    stripped, plan = apply_bn(model, "strip", IMAGES)
    assert [(c.action, c.module) for c in plan.changes if c.action is Action.REMOVED] == [(Action.REMOVED, "1"), (Action.REMOVED, "3")]
    assert not any(is_batchnorm(m) for m in stripped.modules())
    assert [type(m) for m in stripped[1].children()] == [nn.Identity, nn.ReLU]  # the activation it held stays
    folded, _ = apply_bn(model, "strip", IMAGES, fold=True)
    torch.testing.assert_close(folded.eval()(IMAGES), model.eval()(IMAGES))
    _, plan = apply_bn(model, "insert", IMAGES)
    assert {(c.action, c.related) for c in plan.changes} == {(Action.KEPT, "0"), (Action.KEPT, "2")}


def test_noise_on_a_bn_that_runs_its_activation_itself_is_refused_in_one_line_that_says_why() -> None:
    """timm's FrozenBatchNormAct2d applies its activation in its own forward and has no plain BN class
    to run instead: noisy BN, whose noise goes before the activation, cannot split it."""
    with pytest.raises(SurgeryError) as refused:
        apply_bn(frozen_bn_net(), "noisy", IMAGES)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot add noise to 1: FrozenBatchNormAct2d")
    assert "between the normalisation and the activation" in message and "strip" in message


class ReadsItsBn(nn.Module):
    """A parent that normalises with its child BN's tensors itself (``F.batch_norm``): the BN's own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, self.training)
        return self.head(x.relu().mean((2, 3)))


class AlsoRunsABn(ReadsItsBn):
    """:class:`ReadsItsBn` with a second BN that runs its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, self.training)
        return self.head(self.extra(x).relu().mean((2, 3)))


def test_a_bn_read_by_other_code_is_kept_with_the_reason_and_its_statistics_stay() -> None:
    """Strip put an Identity there ('Identity' object has no attribute 'running_mean'); insert added a BN
    after the conv; the planning pass moved the running statistics."""
    model = ReadsItsBn().train()
    before = model.bn.running_mean.clone()
    stripped, plan = apply_bn(model, "strip", IMAGES)
    assert [(c.action, c.module, c.detail) for c in plan.changes] == [
        (Action.KEPT, "bn", "not stripped: code other than its own forward reads its tensors: batch_norm")
    ]
    stripped(IMAGES)
    _, plan = apply_bn(model, "insert", IMAGES)
    assert [(c.action, c.related) for c in plan.changes] == [(Action.KEPT, "conv")]
    with pytest.raises(SurgeryError, match=r"^cannot add noise to bn: only code other than its own forward uses it \(batch_norm\)"):
        apply_bn(model, "noisy", IMAGES)  # its forward, where the noise goes, never runs: the variant would equal keep
    _, plan = apply_bn(AlsoRunsABn(), "noisy", IMAGES)  # noise where it can go, and a row for the BN it cannot reach
    assert [(c.action, c.module) for c in plan.changes] == [(Action.NOISE, "extra"), (Action.KEPT, "bn")]
    assert plan.changes[1].detail == "not made noisy: its own forward never runs; code other than it reads its tensors: batch_norm"
    probed_layers(model, IMAGES)
    assert torch.equal(model.bn.running_mean, before)


def test_a_conv_with_a_parametrized_weight_is_one_layer_for_the_dataflow() -> None:
    """weight_norm's parametrization made the conv a non-leaf: insert skipped it, strip re-biased
    nothing and fold declined ("rank-None output"). Weight norm folds exactly; spectral norm would
    renormalise the folded weight, so that BN is stripped with the reason."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    def net(wrap: Any, bn: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            wrap(nn.Conv2d(3, 4, 3, bias=False)), *[nn.BatchNorm2d(4)] * bn, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)
        )
        randomise_bn(model)
        return model

    _, plan = apply_bn(net(weight_norm, False), "insert", IMAGES)
    assert [(c.action, c.module, c.related) for c in plan.changes] == [(Action.INSERTED, "0_bn", "0")]
    _, plan = apply_bn(net(weight_norm, True), "strip", IMAGES)
    assert [(c.action, c.module) for c in plan.changes] == [(Action.REMOVED, "1"), (Action.REBIASED, "0")]
    model = net(weight_norm, True)
    folded, plan = apply_bn(model, "strip", IMAGES, fold=True)
    assert [(c.action, c.related) for c in plan.changes] == [(Action.FOLDED, "0")]
    torch.testing.assert_close(folded.eval()(IMAGES), model.eval()(IMAGES))
    _, plan = apply_bn(net(spectral_norm, True), "strip", IMAGES, fold=True)
    assert "not folded: 0's weight or bias is computed by _SpectralNorm" in plan.changes[0].detail


def test_surgery_leaves_the_garbage_collector_as_it_found_it() -> None:
    """Surgery pauses the cyclic collector while it copies (it walked every copied object again and
    again); it is back on afterwards, after a refusal too, and stays off for a caller who had it off."""
    import gc

    apply_bn(UsesTheCopy(), "strip", IMAGES)
    assert gc.isenabled()
    refused = UsesTheCopy()
    randomise_bn(refused)
    with pytest.raises(SurgeryError):
        apply_bn(refused, "strip", IMAGES, fold=True)
    assert gc.isenabled()
    gc.disable()
    try:
        apply_bn(UsesTheCopy(), "strip", IMAGES)
        assert not gc.isenabled()
    finally:
        gc.enable()
